"""Prediction from a checkpoint: class names with confidences, using only the preprocessing the checkpoint records."""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

import torch

from resnetlab.data.formats.common import IMAGE_EXTENSIONS, list_images
from resnetlab.data.preprocessing import Preprocessing, normalize, prepare_image, pil_to_uint8, resize_to_input
from resnetlab.engine.checkpoint import load_checkpoint, model_from_checkpoint, preprocessing_from_meta
from resnetlab.errors import DataError


@dataclass
class Prediction:
    path: str
    classes: list[str] = field(default_factory=list)  # top-k class names, most likely first
    class_ids: list = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        if self.error:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "top": [{"class": c, "class_id": cid, "index": i, "confidence": p}
                                           for c, cid, i, p in zip(self.classes, self.class_ids, self.indices, self.confidences)]}


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files, folders (every image below them) and glob patterns -> a list of paths, in the order given."""
    paths: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += [str(p) for p in list_images(path)[0]]
        elif any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            paths += [m for m in matches if Path(m).suffix.lower() in IMAGE_EXTENSIONS]
        else:
            paths.append(item)  # a missing file is reported per file, not here
    return paths


class Predictor:
    """A model rebuilt from its checkpoint, in eval mode, with its recorded preprocessing."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu"):
        state = load_checkpoint(checkpoint)
        self.model, self.meta = model_from_checkpoint(state)
        self.prep: Preprocessing = preprocessing_from_meta(self.meta)
        self.class_names: list[str] = list(self.meta["classes"]["names"])
        self.class_ids: list = list(self.meta["classes"]["ids"])
        self.device = torch.device(device)
        self.model.to(self.device)
        self.mean = torch.as_tensor(self.prep.mean)
        self.std = torch.as_tensor(self.prep.std)

    @torch.inference_mode()
    def logits(self, batch_uint8: torch.Tensor, *, tta_flip: bool = False) -> torch.Tensor:
        x = normalize(batch_uint8, self.mean, self.std).to(self.device)
        logits = self.model(x).float()
        if tta_flip:
            probs = (logits.softmax(1) + self.model(x.flip(-1)).float().softmax(1)) / 2
            logits = probs.clamp(min=1e-12).log()
        return logits.cpu()

    def prepare(self, path: str) -> torch.Tensor:
        # Files given to predict have no ROI box: the whole image is the sign (as cropped by a detector).
        return prepare_image(path, self.prep, None)

    def prepare_pil(self, image) -> torch.Tensor:
        return pil_to_uint8(resize_to_input(image.convert("RGB"), self.prep))

    def predict_paths(self, paths: list[str], *, topk: int = 5, batch_size: int = 64,
                      tta_flip: bool = False) -> list[Prediction]:
        results: list[Prediction] = []
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            tensors, ok = [], []
            for path in chunk:
                try:
                    tensors.append(self.prepare(path))
                    ok.append(Prediction(path))
                except DataError as err:
                    results.append(Prediction(path, error=str(err)))
            if tensors:
                probs = self.logits(torch.stack(tensors), tta_flip=tta_flip).softmax(dim=1)
                for prediction, row in zip(ok, probs):
                    self._fill(prediction, row, topk)
                    results.append(prediction)
        order = {p: i for i, p in enumerate(paths)}
        return sorted(results, key=lambda r: order[r.path])

    def _fill(self, prediction: Prediction, probs: torch.Tensor, topk: int) -> None:
        values, indices = probs.topk(min(topk, len(self.class_names)))
        prediction.indices = indices.tolist()
        prediction.classes = [self.class_names[i] for i in prediction.indices]
        prediction.class_ids = [self.class_ids[i] for i in prediction.indices]
        prediction.confidences = [round(float(v), 6) for v in values]
