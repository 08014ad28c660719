"""Checkpoints: a plain dict of state dicts plus ``meta``, a JSON-able record of everything needed to rebuild the
model and its preprocessing (model name and arguments, classes, preprocessing, data fingerprint, config).

``evaluate``, ``predict``, ``export`` and ``serve`` read ``meta`` alone, so training, evaluation and deployment
cannot disagree on preprocessing. Files are written atomically and read with ``torch.load(weights_only=True)``,
which builds tensors and plain containers and refuses every other object a pickle names (so loading a checkpoint
never runs code from it); :func:`load_checkpoint` then checks the structure and every field of ``meta`` once, so a
malformed file is one line naming the field in every command.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from resnetlab._version import __version__
from resnetlab.config import DataConfig, RunConfig, oversized, shown
from resnetlab.data.preprocessing import CONTRAST_MODES, IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from resnetlab.errors import CheckpointError, ResnetlabError, first_line
from resnetlab.utils.io import torch_save

FORMAT_VERSION = 1
NOT_A_RUN_DIRECTORY = "'{path}' is a folder without checkpoints/best.pt; pass a .pt checkpoint file"
RETRAIN_ADVICE = "use checkpoints/best.pt or last.pt of a resnetlab run, or train the model again"

# ---------------------------------------------------------------------------------------------------------------
# The shape of ``meta`` (and of an export's preprocessing.json, which shares its parts), checked once where a file
# is read, so that every command meets a malformed record as one line naming the field instead of a KeyError deep
# inside evaluate, predict, export or serve. Unknown keys are kept (a newer resnetlab may add some); the types of
# the known ones are strict, so a string where a number belongs is named rather than converted.
# ---------------------------------------------------------------------------------------------------------------


class StrictRecord(BaseModel):
    """A record read from a file: unknown keys kept, known ones strictly typed."""

    model_config = ConfigDict(extra="allow", strict=True)


_Name = Annotated[str, Field(min_length=1)]
_Triple = Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=3, max_length=3)]


class PreprocessingRecord(StrictRecord):
    """:class:`~resnetlab.data.preprocessing.Preprocessing` as stored; only ``input_size`` has no default."""

    # At most 8192: far above any ResNet's input, and below sizes whose buffers alone would exhaust memory.
    input_size: int = Field(ge=8, le=8192)
    resize: DataConfig.model_fields["resize"].annotation = "squash"  # type: ignore[valid-type]
    crop_pct: float = Field(0.875, gt=0, le=1)
    interpolation: DataConfig.model_fields["interpolation"].annotation = "bilinear"  # type: ignore[valid-type]
    roi_crop: bool = True
    mean: _Triple = list(IMAGENET_MEAN)
    std: _Triple = list(IMAGENET_STD)
    channel_order: Literal["RGB"] = "RGB"
    contrast: Literal[CONTRAST_MODES] = "none"  # type: ignore[valid-type]

    @field_validator("std")
    @classmethod
    def _positive(cls, std: list[float]) -> list[float]:
        if min(std) <= 0:
            raise ValueError("every std must be positive")
        return std


class ClassesRecord(StrictRecord):
    ids: list[int | str]
    names: list[str]

    @model_validator(mode="after")
    def _same_length(self) -> ClassesRecord:
        if len(self.ids) != len(self.names):
            raise ValueError(f"{len(self.ids)} ids for {len(self.names)} names")
        if not self.names:
            raise ValueError("no classes")
        return self


# Options of create_model that fetch other weights: a checkpoint's weights are its own, so its record never names
# them (and a crafted one must not make `predict` download or read another file).
_FOREIGN_WEIGHTS_OPTIONS = ("pretrained", "pretrained_path", "progress")


class ModelRecord(StrictRecord):
    name: _Name
    num_classes: int = Field(ge=1)
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kwargs")
    @classmethod
    def _own_weights_only(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        named = [key for key in _FOREIGN_WEIGHTS_OPTIONS if key in kwargs]
        if named:
            raise ValueError(f"names {', '.join(named)}, which would load other weights")
        return kwargs


class DataRecord(StrictRecord):
    spec: str | None = None
    fingerprint: str
    split_fingerprints: dict[str, str] = Field(default_factory=dict)


_Probability = Annotated[float, Field(ge=0, le=1)]


class RiskCoverageRecord(StrictRecord):
    """The validation risk-coverage curve of calibrated confidences (thresholds falling, coverage rising)."""

    threshold: list[_Probability]
    coverage: list[_Probability]
    error: list[_Probability]

    @model_validator(mode="after")
    def _same_length(self) -> RiskCoverageRecord:
        if not (len(self.threshold) == len(self.coverage) == len(self.error)) or not self.threshold:
            raise ValueError("threshold, coverage and error must be non-empty lists of one length")
        return self


class OperatingPointRecord(StrictRecord):
    rule: Literal["coverage", "max_error", "threshold", "accept_all"]
    target: float
    threshold: _Probability
    coverage: _Probability | None = None
    error: _Probability | None = None


class CalibrationRecord(StrictRecord):
    """``meta["calibration"]``: what :func:`resnetlab.evaluation.selective.fit_calibration` fitted on validation."""

    temperature: float = Field(gt=0, allow_inf_nan=False)
    fitted_on: str
    num_images: int = Field(ge=1)
    ece_before: float | None = None
    ece_after: float | None = None
    risk_coverage: RiskCoverageRecord
    operating_point: OperatingPointRecord


class CheckpointMeta(StrictRecord):
    format_version: int
    resnetlab_version: str | None = None
    model: ModelRecord
    classes: ClassesRecord
    preprocessing: PreprocessingRecord
    output: Literal["logits"] = "logits"
    data: DataRecord
    config: dict[str, Any]
    epoch: int | None = Field(None, ge=0)
    monitor: str | None = None
    best_metric: float | None = None
    weights: Literal["raw", "ema"] = "raw"
    # Absent in checkpoints written before calibration was stored, or by runs without a validation split.
    calibration: CalibrationRecord | None = None

    @model_validator(mode="after")
    def _classes_fit_the_model(self) -> CheckpointMeta:
        if len(self.classes.names) != self.model.num_classes:
            raise ValueError(f"model.num_classes is {self.model.num_classes} but classes.names has "
                             f"{len(self.classes.names)} names")
        return self


def describe_invalid(err: ValidationError, record: str) -> str:
    """The first problem pydantic found, as 'its meta.preprocessing.input_size is missing'."""
    first = err.errors()[0]
    # a key comes from the user's file: one that is not a printable line is shown quoted and escaped
    where = ".".join([record, *(str(k) if str(k).isprintable() else shown(str(k)) for k in first["loc"])])
    if first["type"] == "missing":
        return f"its {where} is missing"
    if first["type"] in ("model_type", "dict_type", "model_attributes_type"):
        return f"its {where} is {_kind(first.get('input'))}, not a record of named fields"
    message = first["msg"].removeprefix("Value error, ")
    if not first["loc"]:
        return f"its {where} is invalid ({message})"
    return f"its {where} is {shown(first.get('input'))} ({message})"


def _kind(value: Any) -> str:
    return "missing" if value is None else f"a {type(value).__name__}"


def validate_meta(meta: Any, path: str | Path) -> dict[str, Any]:
    """``meta`` checked against :class:`CheckpointMeta`, defaults filled in; one-line CheckpointError naming the
    first bad field otherwise."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"'{path}' is not a resnetlab checkpoint: its meta is {_kind(meta)}, not the record "
                              f"resnetlab writes; {RETRAIN_ADVICE}")
    problem = oversized(meta)
    if problem:
        raise CheckpointError(f"'{path}' is not a resnetlab checkpoint: its meta is not the record resnetlab writes "
                              f"({problem}); {RETRAIN_ADVICE}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"'{path}' has checkpoint format {shown(version)}; this resnetlab reads format "
                              f"{FORMAT_VERSION}")
    try:
        checked = CheckpointMeta.model_validate(meta).model_dump()
        # evaluate rebuilds the run's RunConfig from this record: a bad one is the checkpoint's fault, named here.
        checked["config"] = RunConfig.model_validate(checked["config"]).to_dict()
    except ValidationError as err:
        where = "meta" if err.title == CheckpointMeta.__name__ else "meta.config"
        raise CheckpointError(f"'{path}' is not a usable resnetlab checkpoint: {describe_invalid(err, where)}; "
                              f"{RETRAIN_ADVICE}") from None
    return checked


def build_meta(*, model_name: str, model_kwargs: dict, class_ids: list, class_names: list[str], prep: Preprocessing,
               config: dict, data: dict, epoch: int, monitor: str, best_metric: float | None,
               weights: str = "raw") -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "resnetlab_version": __version__,
        "torch_version": str(torch.__version__),
        "model": {"name": model_name, "num_classes": len(class_names), "kwargs": model_kwargs},
        "classes": {"ids": list(class_ids), "names": list(class_names)},
        "preprocessing": prep.to_dict(),
        "output": "logits",
        "data": data,
        "config": config,
        "epoch": epoch,
        "monitor": monitor,
        "best_metric": best_metric,
        "weights": weights,  # which weights `model` holds: "raw" or "ema"
    }


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    torch_save(state, path)


def store_calibration(path: str | Path, calibration: dict[str, Any]) -> dict[str, Any]:
    """Write ``calibration`` (a :func:`~resnetlab.evaluation.selective.fit_calibration` record) into the checkpoint
    at ``path`` as ``meta["calibration"]``, atomically; returns the new meta."""
    try:
        CalibrationRecord.model_validate(calibration)
    except ValidationError as err:
        raise CheckpointError(f"calibration for '{path}' is not valid: {describe_invalid(err, 'calibration')}") from None
    state = load_checkpoint(path)
    state["meta"] = {**state["meta"], "calibration": calibration}
    save_checkpoint(path, state)
    return state["meta"]


def resolve_checkpoint_file(path: str | Path, *, folder_error: str = NOT_A_RUN_DIRECTORY) -> Path:
    """A checkpoint file, or a run directory's checkpoints/best.pt.

    ``folder_error`` is the message (``{path}`` filled in) for a folder without a best checkpoint: callers that also
    take other folders (an export) say so there.
    """
    path = Path(path)
    if path.is_dir():
        candidate = path / "checkpoints" / "best.pt"
        if not candidate.is_file():
            raise CheckpointError(folder_error.format(path=path))
        return candidate
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` and check its structure and ``meta`` record."""
    path = resolve_checkpoint_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load fails on a damaged or foreign file with whatever its
        # zip, pickle or struct reader meets first (UnpicklingError, BadZipFile, RuntimeError, struct.error, EOFError
        # ...: see test_fuzz_readers.py); every one of them is the file's fault, not resnetlab's.
        raise CheckpointError(_unloadable(path, err)) from None
    if not isinstance(state, dict) or "meta" not in state or "model" not in state:
        raise CheckpointError(f"'{path}' is not a resnetlab checkpoint (no 'meta' record); "
                              "use checkpoints/best.pt or last.pt from a resnetlab run")
    weights = state["model"]
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        raise CheckpointError(f"'{path}' is not a usable resnetlab checkpoint: its 'model' entry is not a state dict "
                              f"(parameter names and tensors); {RETRAIN_ADVICE}")
    meta = validate_meta(state["meta"], path)
    _check_model_spec(meta["model"], path)
    return {**state, "meta": meta}


def _unloadable(path: Path, err: BaseException) -> str:
    """Why ``path`` cannot be loaded, in one line. torch's message for a pickle that names other objects ends in
    advice to load it with weights_only=False, i.e. to run whatever the file holds: that is never passed on."""
    text = str(err)
    if "weights_only" in text or "Weights only load failed" in text:
        # The refused name comes from the file: only an identifier-like one is repeated.
        refused = re.search(r"Unsupported global: GLOBAL ([A-Za-z_][\w.]{0,120})", text)
        return (f"'{path}' holds objects that resnetlab does not load"
                + (f" (it names {refused.group(1).rstrip('.')})" if refused else "")
                + ": it is not a plain resnetlab checkpoint (tensors, numbers, strings and lists), and loading it "
                f"could run code it contains (possibly unsafe); {RETRAIN_ADVICE}, or re-save just the model's state "
                "dict with torch.save")
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return (f"cannot load checkpoint '{path}': {first[:200]}. Is it a resnetlab checkpoint (checkpoints/best.pt or "
            "last.pt of a run)?")


def _check_model_spec(spec: dict[str, Any], path: Path) -> None:
    """Build the recorded model on the meta device (no memory, no weights), so that an unknown name or option is
    named here, with the file, rather than where a command first builds it."""
    from resnetlab.models import create_model

    try:
        with torch.device("meta"):
            create_model(spec["name"], spec["num_classes"], **spec["kwargs"])
    except (ResnetlabError, TypeError, ValueError, KeyError, AttributeError, RuntimeError) as err:
        # A model option of the wrong type fails inside the model's constructor with whatever it meets.
        first = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
        model = shown(spec["name"]) + (f" with options {shown(spec['kwargs'])}" if spec["kwargs"] else "")
        raise CheckpointError(f"'{path}' is not a usable resnetlab checkpoint: its meta.model ({model}) cannot be "
                              f"built ({first[:200]}); {RETRAIN_ADVICE}") from None


def model_from_checkpoint(state: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from ``meta`` and load its weights; return it in eval mode with the meta record."""
    from resnetlab.models import create_model

    meta = state["meta"]
    spec = meta["model"]
    model = create_model(spec["name"], spec["num_classes"], **spec.get("kwargs", {}))
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint weights do not fit model '{spec['name']}' with {spec['num_classes']} "
                              f"classes: {first_line(err)}") from None
    return model.eval(), meta


def preprocessing_from_meta(meta: dict[str, Any]) -> Preprocessing:
    return Preprocessing.from_dict(meta["preprocessing"])
