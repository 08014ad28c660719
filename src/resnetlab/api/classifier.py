"""``rl.load``: a trained model, from a run directory, a checkpoint or an export folder, that predicts images given
as files, PIL images, numpy arrays or uint8 tensors.

Underneath is the :class:`~resnetlab.deployment.predictor.Predictor` that ``resnetlab predict`` and ``serve`` use,
so an image is prepared exactly as the evaluation prepared it (the preprocessing recorded in the checkpoint).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

from resnetlab.errors import CheckpointError, DataError

if TYPE_CHECKING:
    import numpy
    import torch
    from PIL import Image

    from resnetlab.deployment.predictor import Predictor

    ImageInput = Union[str, Path, Image.Image, numpy.ndarray, torch.Tensor]

logger = logging.getLogger("resnetlab.api")

PREDICT_BATCH = 64  # images prepared and run together: bounds the memory of a long list


@dataclass(frozen=True)
class Prediction:
    """The classes of one image, most likely first.

    Attributes:
        label: The most likely class's name: the best guess, also when the answer is ``unknown``.
        class_id: Its id in the training data (a GTSRB class number, a folder name, ...).
        confidence: Its softmax probability, calibrated (``softmax(logits / T)``) when the model has a temperature
            and ``raw`` was not asked for.
        topk: ``(name, confidence)`` of the ``topk`` most likely classes.
        path: The file, for an input given as a path; else None.
        unknown: The confidence is below the operating point: the model does not know (``label`` is its guess).
        reason: Why the answer is unknown, in words; None when it is not.
        energy: The energy score ``-T logsumexp(logits / T)`` at the applied temperature (lower: more like the
            training images); None for a model whose output is probabilities.
    """

    label: str
    class_id: Any
    confidence: float
    topk: list[tuple[str, float]]
    path: str | None = None
    unknown: bool = False
    reason: str | None = None
    energy: float | None = None

    def __repr__(self) -> str:
        where = f", path={self.path!r}" if self.path is not None else ""
        unknown = ", unknown=True" if self.unknown else ""
        return f"Prediction(label={self.label!r}, confidence={self.confidence:.3f}{unknown}{where})"


class Classifier:
    """A trained model ready to predict. Make one with :func:`load`.

    Attributes:
        classes: The class names, in the order of the model's outputs.
        preprocessing: How an image becomes the model's input (size, resize, crop, normalization), as recorded.
    """

    def __init__(self, predictor: Predictor, source: Path):
        self.predictor = predictor
        self.source = Path(source)
        self.classes: list[str] = list(predictor.class_names)
        self.preprocessing: dict[str, Any] = dict(predictor.record["preprocessing"])

    @cached_property
    def model(self) -> torch.nn.Module:
        """The ``torch.nn.Module`` in eval mode and float32, with the checkpoint's weights (not for an export: an
        export is a compiled program, not a module; load the checkpoint it was made from)."""
        from resnetlab.checkpoint import load_checkpoint, model_from_checkpoint
        from resnetlab.deployment.records import checkpoint_file_of, is_export_dir

        if is_export_dir(self.source):
            raise CheckpointError(f"'{self.source}' is an export, which holds no torch module; rl.load the "
                                  "checkpoint or run directory it was exported from for .model")
        model, _ = model_from_checkpoint(load_checkpoint(checkpoint_file_of(self.source)))
        return model.float().eval()

    @property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> the normalized float32 tensor [3, S, S] that :attr:`model` takes (resize, crop, contrast and
        normalization as recorded): ``clf.model(clf.transform(image)[None])`` gives the logits."""
        from resnetlab.data.preprocessing import normalize

        predictor = self.predictor

        def transform(image: Image.Image) -> torch.Tensor:
            return normalize(predictor.prepare_pil(image)[None], predictor.mean, predictor.std)[0]

        return transform

    def predict(self, x: ImageInput | Sequence[ImageInput], topk: int = 5, tta: bool = False, *,
                raw: bool | None = None, coverage: float | None = None, max_error: float | None = None,
                threshold: float | None = None, accept_all: bool | None = None) -> Prediction | list[Prediction]:
        """The classes of an image, or of each image of a list.

        Args:
            x: A file path, a PIL image, a numpy ``H x W x 3`` (or ``H x W``) uint8 array, a uint8 tensor
                ``3 x H x W``, or a list of them. Arrays and tensors are whole images: they are resized and
                normalized like files.
            topk: Classes to keep per image.
            tta: Average over the test-time augmentation views ``evaluate --tta`` uses.
            raw: For this call, instead of the option given to :func:`load`: uncalibrated confidences.
            coverage: For this call: the operating point that keeps this fraction of validation images.
            max_error: For this call: the operating point with at most this error among accepted images.
            threshold: For this call: answer ``unknown`` below this confidence.
            accept_all: For this call: never answer ``unknown``. Not given: the options of :func:`load`.

        Returns:
            One :class:`Prediction` for a single input, a list for a list.

        Example:
            >>> clf = rl.load("runs/demo")  # doctest: +SKIP
            >>> clf.predict("sign.png", topk=3).label  # doctest: +SKIP
            'stop'
        """
        import torch

        if topk < 1:
            raise DataError(f"topk={topk}: give at least 1")
        answers = self._answers(raw, coverage, max_error, threshold, accept_all)
        single = not isinstance(x, (list, tuple))
        items = [x] if single else list(x)
        predictions: list[Prediction] = []
        for start in range(0, len(items), PREDICT_BATCH):
            chunk = items[start : start + PREDICT_BATCH]
            batch = torch.stack([self._prepare(item, start + offset) for offset, item in enumerate(chunk)])
            names = [str(item) if isinstance(item, (str, Path)) else "" for item in chunk]
            results = self.predictor.predict_tensors(batch, names, topk=topk, tta=tta, answers=answers)
            for item, result in zip(chunk, results):
                predictions.append(Prediction(
                    label=result.classes[0], class_id=result.class_ids[0], confidence=result.confidences[0],
                    topk=list(zip(result.classes, result.confidences)),
                    path=str(item) if isinstance(item, (str, Path)) else None, unknown=result.unknown,
                    reason=result.reason, energy=result.energy))
        return predictions[0] if single else predictions

    def _answers(self, raw, coverage, max_error, threshold, accept_all):
        """The call's AnswerOptions: None (the predictor's own) when no option is given."""
        if raw is None and coverage is None and max_error is None and threshold is None and accept_all is None:
            return None
        from resnetlab.deployment.predictor import AnswerOptions

        base = self.predictor.answers
        choosing = coverage is not None or max_error is not None or threshold is not None or accept_all is not None
        # a new way of choosing the operating point replaces the one given to load(), rather than joining it
        return AnswerOptions(raw=base.raw if raw is None else raw,
                             coverage=coverage if choosing else base.coverage,
                             max_error=max_error if choosing else base.max_error,
                             threshold=threshold if choosing else base.threshold,
                             accept_all=bool(accept_all) if choosing else base.accept_all)

    def _prepare(self, item: Any, index: int) -> torch.Tensor:
        """One input -> the uint8 [3, S, S] model input, through the recorded preprocessing."""
        import numpy as np
        import torch
        from PIL import Image

        if isinstance(item, (str, Path)):
            return self.predictor.prepare(item)
        if isinstance(item, Image.Image):
            return self.predictor.prepare_pil(item)
        if isinstance(item, torch.Tensor):
            if item.dtype != torch.uint8 or item.ndim != 3 or item.shape[0] not in (1, 3):
                raise DataError(f"input {index}: a tensor must be uint8 3 x H x W (or 1 x H x W), got "
                                f"{str(item.dtype).removeprefix('torch.')} {' x '.join(map(str, item.shape))}")
            item = item.expand(3, -1, -1).permute(1, 2, 0).cpu().numpy()
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] not in (1, 3, 4)):
                raise DataError(f"input {index}: an array must be uint8 H x W x 3 (or H x W), got {item.dtype} "
                                f"{' x '.join(map(str, item.shape))}")
            if item.ndim == 3 and item.shape[2] == 1:
                item = item[:, :, 0]
            return self.predictor.prepare_pil(Image.fromarray(np.ascontiguousarray(item)))
        raise DataError(f"input {index}: cannot predict a {type(item).__name__}; pass a path, a PIL image, a numpy "
                        "uint8 array or a uint8 tensor")

    def __repr__(self) -> str:
        size = self.preprocessing.get("input_size")
        return (f"Classifier({str(self.source)!r}, classes={len(self.classes)}, input={size}x{size}, "
                f"backend={self.predictor.backend.name})")


def load(path: str | Path, *, backend: str = "auto", precision: str = "auto", raw: bool = False,
         coverage: float | None = None, max_error: float | None = None, threshold: float | None = None,
         accept_all: bool = False) -> Classifier:
    """A trained model from a run directory, a checkpoint file or an export folder.

    Confidences are calibrated (``softmax(logits / T)``) when the model has a temperature, and an answer below the
    operating point stored with it is ``unknown`` (its best guess still given), as ``resnetlab predict``.

    Args:
        path: A run directory (its ``checkpoints/best.pt``), a checkpoint, or a folder ``rl.export`` wrote.
        backend: ``auto``, ``torch``, ``onnxruntime``, ``torchscript`` or ``aoti``, as ``resnetlab predict``.
        precision: ``auto``, ``float32`` or ``bf16``, as ``resnetlab predict``.
        raw: Uncalibrated confidences, and no operating point unless ``threshold`` is given.
        coverage: Choose the operating point that keeps this fraction of in-domain validation images.
        max_error: Choose the operating point with at most this error among accepted validation images.
        threshold: Answer ``unknown`` below this confidence.
        accept_all: Never answer ``unknown``. At most one of ``coverage``, ``max_error``, ``threshold`` and
            ``accept_all``.

    Returns:
        A :class:`Classifier`.

    Example:
        >>> clf = rl.load("runs/demo")  # doctest: +SKIP
        >>> clf.classes[:2], clf.predict(["a.png", "b.png"], topk=1)  # doctest: +SKIP
    """
    from resnetlab.deployment.predictor import AnswerOptions, load_predictor

    answers = AnswerOptions(raw=raw, coverage=coverage, max_error=max_error, threshold=threshold,
                            accept_all=accept_all)
    if not Path(path).exists():
        raise CheckpointError(f"'{path}' does not exist; pass a run directory, a checkpoint or an export folder")
    predictor = load_predictor(path, backend=backend, precision=precision, log=logger.info, answers=answers)
    return Classifier(predictor, Path(path))
