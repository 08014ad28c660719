"""GTSRB in the official layout of the benchmark's archives (Stallkamp et al., 2012)::

    GTSRB/Final_Training/Images/000NN/GT-000NN.csv   Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId
    GTSRB/Final_Training/Images/000NN/TTTTT_FFFFF.ppm  track TTTTT, frame FFFFF of class NN
    GTSRB/Final_Test/Images/NNNNN.ppm
    GT-final_test.csv                                   the test labels (a separate archive), same columns

The archive torchvision downloads (``GTSRB-Training_fixed.zip``) names the training folder ``GTSRB/Training``
instead of ``Final_Training/Images``; both are found, as are the folders one level down (``PATH/GTSRB``,
``PATH/gtsrb/GTSRB``), so ``--data gtsrb:PATH`` works on what the archives or ``data.download=true`` left in PATH.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resnetlab.config import DataConfig
from resnetlab.data.formats.common import require_dir
from resnetlab.data.formats.gtsrb_tables import OFFICIAL_NAME, read_gtsrb_csv, source_from_class_id_tables
from resnetlab.data.records import BadImage, DatasetSource, SampleTable
from resnetlab.errors import DataError, first_line

TRAIN_FOLDERS = (("Final_Training", "Images"), ("Training",))
TEST_FOLDER = ("Final_Test", "Images")
TEST_LABELS = "GT-final_test.csv"
DOWNLOAD_PAGE = "https://benchmark.ini.rub.de/gtsrb_dataset.html"


@dataclass
class OfficialLayout:
    train_dir: Path  # holds one folder per class (00000 ... 00042)
    test_dir: Path | None  # the test images, when present
    test_csv: Path | None  # GT-final_test.csv (with ClassId), when present


def _candidate_bases(root: Path) -> list[Path]:
    return [root, root / "GTSRB", root / "gtsrb", root / "gtsrb" / "GTSRB"]


def find_official_layout(root: Path) -> OfficialLayout | None:
    """Where the official archives' folders are below ``root``, or ``None`` when they are not there."""
    for base in _candidate_bases(Path(root)):
        for parts in TRAIN_FOLDERS:
            train_dir = base.joinpath(*parts)
            if train_dir.is_dir() and any(p.is_dir() and p.name.isdecimal() for p in train_dir.iterdir()):
                test_dir = base.joinpath(*TEST_FOLDER)
                test_dir = test_dir if test_dir.is_dir() else None
                label_places = ([test_dir] if test_dir else []) + [base, base.parent, Path(root)]
                test_csv = next((p / TEST_LABELS for p in label_places if (p / TEST_LABELS).is_file()), None)
                return OfficialLayout(train_dir, test_dir, test_csv)
    return None


def _read_class_folder(folder: Path, rejected: list[BadImage], notes: list[str]) -> SampleTable:
    annotations = sorted(folder.glob("GT-*.csv"))
    if annotations:
        return read_gtsrb_csv(annotations[0], folder, path_column="Filename", rejected=rejected)[0]
    # No annotation file (a hand-made copy): the folder name is the class, the box is unknown.
    class_id = int(folder.name)
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".ppm" and not p.name.startswith("."))
    notes.append(f"{folder}: no GT-{folder.name}.csv, so no ROI boxes for its {len(images)} image(s)")
    groups = []
    for path in images:
        match = OFFICIAL_NAME.match(path.name)
        groups.append(f"{class_id}_{int(match.group(1))}" if match else None)
    return SampleTable([str(p.resolve()) for p in images], np.full(len(images), class_id, dtype=np.int64),
                       np.full((len(images), 4), -1, dtype=np.int64),
                       np.asarray(groups) if groups and all(g is not None for g in groups) else None)


def read_gtsrb_official(root: Path, spec: str, cfg: DataConfig | None = None) -> DatasetSource:
    layout = find_official_layout(root)
    if layout is None:
        raise DataError(f"'{root}' has no Final_Training/Images (GTSRB's official layout)")
    rejected: dict[str, list[BadImage]] = {"train": [], "test": []}
    notes: list[str] = []
    class_tables = [_read_class_folder(folder, rejected["train"], notes)
                    for folder in sorted(p for p in layout.train_dir.iterdir() if p.is_dir() and p.name.isdecimal())]
    train = SampleTable.concat(class_tables)
    if train.groups is None and any(t.groups is not None for t in class_tables):
        notes.append("some class folders have image names without a track number: no track-grouped split")
    tables = {"train": train}
    if layout.test_dir is not None:
        if layout.test_csv is not None:
            test = read_gtsrb_csv(layout.test_csv, layout.test_dir, path_column="Filename", rejected=rejected["test"])[0]
            test.groups = None
            tables["test"] = test
        else:
            notes.append(f"{layout.test_dir}: test images without labels ({TEST_LABELS} is not there; it comes in "
                         "the archive GTSRB_Final_Test_GT.zip), so they are not used")
    source = source_from_class_id_tables(spec, Path(root), tables, {k: v for k, v in rejected.items() if v})
    source.notes = notes + [f"GTSRB official layout: training images in {layout.train_dir}"]
    return source


def download_gtsrb(root: Path) -> Path:
    """Fetch the official training archive, test images and test labels into ``root`` (needs internet access).

    torchvision's :class:`~torchvision.datasets.GTSRB` knows the archives, their URLs and checksums; it leaves
    ``root/gtsrb/GTSRB/Training``, ``root/gtsrb/GTSRB/Final_Test/Images`` and ``root/gtsrb/GT-final_test.csv``,
    which :func:`find_official_layout` finds.
    """
    from torchvision.datasets import GTSRB

    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    try:
        for split in ("train", "test"):
            GTSRB(str(root), split=split, download=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise DataError(f"could not download GTSRB into '{root}': {first_line(err)}; "
                        f"check the internet connection, or download the archives by hand from {DOWNLOAD_PAGE} "
                        "and unpack them there") from None
    return require_dir(root, "GTSRB folder")
