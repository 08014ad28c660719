"""Checkpoints: a plain dict of state dicts plus ``meta``, a JSON-able record of everything needed to rebuild the
model and its preprocessing (model name and arguments, classes, preprocessing, data fingerprint, config).

``evaluate``, ``predict``, ``export`` and ``serve`` read ``meta`` alone, so training, evaluation and deployment
cannot disagree on preprocessing. Files are written atomically and read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import resnetlab
from resnetlab.data.preprocessing import Preprocessing
from resnetlab.errors import CheckpointError, first_line
from resnetlab.utils.io import torch_save

FORMAT_VERSION = 1
NOT_A_RUN_DIRECTORY = "'{path}' is a folder without checkpoints/best.pt; pass a .pt checkpoint file"


def build_meta(*, model_name: str, model_kwargs: dict, class_ids: list, class_names: list[str], prep: Preprocessing,
               config: dict, data: dict, epoch: int, monitor: str, best_metric: float | None,
               weights: str = "raw") -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "resnetlab_version": resnetlab.__version__,
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
    path = resolve_checkpoint_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError) as err:
        raise CheckpointError(f"cannot load checkpoint '{path}': {first_line(err, 200)}. Is it a resnetlab checkpoint "
                              "(checkpoints/best.pt or last.pt of a run)?") from None
    if not isinstance(state, dict) or "meta" not in state or "model" not in state:
        raise CheckpointError(f"'{path}' is not a resnetlab checkpoint (no 'meta' record); "
                              "use checkpoints/best.pt or last.pt from a resnetlab run")
    version = state["meta"].get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"'{path}' has checkpoint format {version}; this resnetlab reads format {FORMAT_VERSION}")
    return state


def model_from_checkpoint(state: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from ``meta`` and load its weights; return it in eval mode with the meta record."""
    from resnetlab.models import create_model

    meta = state["meta"]
    spec = meta["model"]
    model = create_model(spec["name"], spec["num_classes"], **spec.get("kwargs", {}))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint weights do not fit model '{spec['name']}' with {spec['num_classes']} "
                              f"classes: {first_line(err)}") from None
    return model.eval(), meta


def preprocessing_from_meta(meta: dict[str, Any]) -> Preprocessing:
    return Preprocessing.from_dict(meta["preprocessing"])
