"""``rl.open_dataset``: a dataset's split as a ``torch.utils.data.Dataset``, for a user's own training loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from resnetlab.data.preprocessing import load_image
from resnetlab.data.records import SampleTable


class ImageDataset(Dataset):
    """``(image, label)`` pairs of one split: the image as a PIL RGB image (cropped to its ROI box where it has one)
    or what ``transform`` makes of it, the label as an int index into :attr:`classes`.

    Attributes:
        classes: The class names, indexed by label.
        class_ids: The classes' ids in the dataset (GTSRB numbers, folder names, ...).
        paths: The image files, in item order.
    """

    def __init__(self, table: SampleTable, class_names: list[str], class_ids: list, *, roi_crop: bool = True,
                 transform: Callable[[Any], Any] | None = None):
        self.table = table
        self.classes = list(class_names)
        self.class_ids = list(class_ids)
        self.paths = list(table.paths)
        self.roi_crop = roi_crop
        self.transform = transform

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        roi = self.table.rois[index] if self.table.rois is not None else None
        image = load_image(self.table.paths[index], roi, self.roi_crop)
        label = int(self.table.labels[index])
        return (self.transform(image) if self.transform is not None else image), label

    def __repr__(self) -> str:
        return f"ImageDataset({len(self)} images, {len(self.classes)} classes)"
