"""The deployment record: what a served or exported model is, which classes it knows and how its input is made.

The same record describes a checkpoint (built from its ``meta``) and an export folder (``preprocessing.json``),
so ``GET /model``, ``predict`` and ``export`` all read one shape of data::

    {"format": "resnetlab-deployment", "format_version": 1, "resnetlab_version": "0.1.0",
     "model": {"name": "resnet20", "num_classes": 43, ...},
     "classes": {"ids": [...], "names": [...]},
     "preprocessing": {"input_size": 32, "resize": "squash", "crop_pct": 0.875, "interpolation": "bilinear",
                       "roi_crop": true, "mean": [...], "std": [...], "channel_order": "RGB",
                       "contrast": "none"},   # or "equalize"/"autocontrast": the luminance, per image, before resizing
     "input": {"name": "input", "shape": ["batch", 3, 32, 32], "dtype": "float32", "layout": "NCHW", ...},
     "output": {"name": "logits", "kind": "logits", "temperature_applied": 1.37},   # null: the graph emits raw logits
     "calibration": {"temperature": 1.37, "operating_point": {...}, ...},   # the checkpoint's, or null
     "test_time_flip": false,
     "artifact": {"format": "onnx", "file": "model.onnx", "precision": "float32", "parity": {...}}}   # exports only
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from resnetlab._version import __version__
from resnetlab.checkpoint import (
    CalibrationRecord,
    ClassesRecord,
    PreprocessingRecord,
    StrictRecord,
    describe_invalid,
    resolve_checkpoint_file,
)
from resnetlab.config import shown
from resnetlab.data.preprocessing import Preprocessing
from resnetlab.errors import CheckpointError

RECORD_FILE = "preprocessing.json"
RECORD_FORMAT = "resnetlab-deployment"
RECORD_FORMAT_VERSION = 1
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.ts", "aoti": "model.pt2"}
INPUT_NAME, OUTPUT_NAME = "input", "logits"
SCALING = "x / 255 per channel in channel_order, then (x - mean) / std"
NEITHER_RUN_NOR_EXPORT = ("'{path}' is neither an export folder (no preprocessing.json) nor a run directory "
                          "(no checkpoints/best.pt); pass a checkpoint, a run directory or an export folder")


def checkpoint_file_of(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's checkpoints/best.pt, where an export folder would also do."""
    return resolve_checkpoint_file(path, folder_error=NEITHER_RUN_NOR_EXPORT)


def _horizontal_flip_in_training(meta: dict[str, Any]) -> bool | None:
    """Whether the model was trained with mirrored images, i.e. whether flip test-time augmentation is safe."""
    from resnetlab.data.augment import get_policy
    from resnetlab.errors import ConfigError

    preset = (meta.get("config") or {}).get("augment", {}).get("preset")
    if preset is None:
        return None
    try:
        return get_policy(preset).hflip > 0
    except ConfigError:
        return None


def record_from_meta(meta: dict[str, Any], *, checkpoint_sha256: str | None = None) -> dict[str, Any]:
    """The deployment record of a checkpoint, from its ``meta`` alone."""
    prep = Preprocessing.from_dict(meta["preprocessing"])
    size = prep.input_size
    model = meta["model"]
    return {
        "format": RECORD_FORMAT,
        "format_version": RECORD_FORMAT_VERSION,
        "resnetlab_version": __version__,
        "model": {"name": model["name"], "num_classes": int(model["num_classes"]), "kwargs": model.get("kwargs", {}),
                  "epoch": meta.get("epoch"), "weights": meta.get("weights"), "monitor": meta.get("monitor"),
                  "best_metric": meta.get("best_metric"), "trained_with_resnetlab": meta.get("resnetlab_version")},
        "classes": {"ids": list(meta["classes"]["ids"]), "names": list(meta["classes"]["names"])},
        "preprocessing": prep.to_dict(),
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32", "layout": "NCHW",
                  "scaling": SCALING},
        # A checkpoint's model emits raw logits; an export that divides by the temperature in its graph says so here.
        "output": {"name": OUTPUT_NAME, "kind": meta.get("output", "logits"), "temperature_applied": None},
        # Carried even into a raw export, so that a runtime reading it can apply the temperature and operating point.
        "calibration": meta.get("calibration"),
        "test_time_flip": _horizontal_flip_in_training(meta),
        "source": {"checkpoint_sha256": checkpoint_sha256, "data": (meta.get("data") or {}).get("spec")},
    }


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_export_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / RECORD_FILE).is_file()


def read_export_record(folder: str | Path) -> dict[str, Any]:
    """Read and check an export folder's ``preprocessing.json``; the model file it names must be there."""
    folder = Path(folder)
    path = folder / RECORD_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"'{folder}' has no {RECORD_FILE}; pass an export folder made by `resnetlab export` "
                              "or a checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"'{path}' is not valid JSON ({err}); re-run `resnetlab export`") from None
    except RecursionError:
        raise CheckpointError(f"'{path}' is not an export record (nested too deeply); "
                              "re-run `resnetlab export`") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise CheckpointError(f"'{path}' is not a resnetlab export record; re-run `resnetlab export`")
    if record.get("format_version") != RECORD_FORMAT_VERSION:
        raise CheckpointError(f"'{path}' has export format {shown(record.get('format_version'))}; this resnetlab "
                              f"reads format {RECORD_FORMAT_VERSION}; re-run `resnetlab export`")
    for key in ("classes", "preprocessing", "output", "artifact"):
        if key not in record:
            raise CheckpointError(f"'{path}' lacks the '{key}' entry; re-run `resnetlab export`")
    try:
        checked = ExportRecord.model_validate(record).model_dump()
    except ValidationError as err:
        raise CheckpointError(f"'{path}' is not a usable export record: {describe_invalid(err, 'record')}; "
                              "re-run `resnetlab export`") from None
    model_file = folder / checked["artifact"]["file"]
    if not model_file.is_file():
        raise CheckpointError(f"export '{folder}' names model file '{model_file.name}', which is missing")
    return checked


class OutputRecord(StrictRecord):
    name: str = OUTPUT_NAME
    kind: Literal["logits", "probabilities"]
    # The temperature the exported graph already divides its logits by (None: it emits raw logits).
    temperature_applied: float | None = Field(None, gt=0, allow_inf_nan=False)


class ArtifactRecord(StrictRecord):
    format: Literal[tuple(MODEL_FILES)]  # type: ignore[valid-type]
    file: str
    precision: Literal["float32", "bf16", "int8"] = "float32"

    @field_validator("file")
    @classmethod
    def _inside_the_folder(cls, name: str) -> str:
        # The model file lies beside the record; a path elsewhere is not something an export writes.
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise ValueError("not a file name inside the export folder")
        return name


class ExportRecord(StrictRecord):
    """The parts of ``preprocessing.json`` that predict, serve and evaluate --export read."""

    classes: ClassesRecord
    preprocessing: PreprocessingRecord
    output: OutputRecord
    artifact: ArtifactRecord
    test_time_flip: bool | None = None
    calibration: CalibrationRecord | None = None

    @model_validator(mode="after")
    def _temperature_is_the_calibrated_one(self) -> ExportRecord:
        # A predictor decides from these two entries whether to divide by the temperature itself: they must agree,
        # or it would apply the temperature twice or apply one that was never fitted.
        applied = self.output.temperature_applied
        if applied is None:
            return self
        if self.output.kind != "logits":
            raise ValueError("output.temperature_applied is set on an output that is not logits")
        if self.calibration is None:
            raise ValueError("output.temperature_applied is set but there is no calibration record")
        if abs(applied - self.calibration.temperature) > 1e-9 * self.calibration.temperature:
            raise ValueError(f"output.temperature_applied {applied} differs from calibration.temperature "
                             f"{self.calibration.temperature}")
        return self
