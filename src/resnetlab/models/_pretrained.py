"""Loading pretrained weights: torchvision's ImageNet weights (online) or a local weights file (offline).

Both paths end in :func:`load_state_dict_into`, which accepts a checkpoint only if it has exactly the model's
parameters and shapes, apart from
- the classifier ``fc`` when its class count differs (the model keeps its freshly initialised ``fc``);
- keys listed in ``skip_mismatched`` whose shapes differ (the small-input ResNets skip ImageNet's 7x7 ``conv1``);
- BatchNorm ``num_batches_tracked`` counters, absent from old checkpoints such as torchvision's V1 weights.
Anything else is a checkpoint for another architecture, reported as "is for X, not Y" in one line.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import get_weight

from resnetlab.errors import CheckpointError, ResnetlabError
from resnetlab.models import _registry

_logger = logging.getLogger(__name__)

# Prefixes that wrappers add to every key: DistributedDataParallel ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_CLASSIFIER_PREFIX = "fc."


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def download_torchvision_state_dict(weights_name: str, *, progress: bool = True) -> dict[str, Tensor]:
    """Fetch (or read from the torch hub cache) torchvision weights such as ``ResNet50_Weights.IMAGENET1K_V2``."""
    weights = get_weight(weights_name)
    try:
        return weights.get_state_dict(progress=progress, check_hash=True)
    # URLError and socket errors are OSErrors; a corrupt download fails its hash check with a RuntimeError.
    except (OSError, RuntimeError, ValueError) as err:
        raise ResnetlabError(
            f"cannot fetch pretrained weights {weights_name} from {weights.url} (offline?): {_one_line(err)}; "
            f"download that file on a machine with internet access and pass model.pretrained_path=FILE"
        ) from err


def load_weights_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state dict from ``path``: a raw state dict, or a checkpoint dict holding it under 'model'/'state_dict'."""
    if not os.path.isfile(path):
        raise CheckpointError(f"model.pretrained_path={path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for corrupt, truncated or non-PyTorch files
        raise CheckpointError(
            f"cannot read weights file {path}: {_one_line(err)}; expected a file written by torch.save"
        ) from err
    state_dict = _find_state_dict(checkpoint)
    if state_dict is None:
        raise CheckpointError(
            f"weights file {path} holds no state dict; expected a raw state dict or a dict with a 'model' or "
            f"'state_dict' entry"
        )
    return _strip_wrapper_prefixes(state_dict)


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) > 0 and all(isinstance(v, Tensor) for v in value.values())


def _find_state_dict(checkpoint: Any) -> dict[str, Tensor] | None:
    if _is_state_dict(checkpoint):
        return dict(checkpoint)
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model"):
            if _is_state_dict(checkpoint.get(key)):
                return dict(checkpoint[key])
    return None


def _strip_wrapper_prefixes(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


def _shapes(state_dict: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """Key -> shape, without the classifier and BN counters, for comparing architectures."""
    return {
        key: tuple(value.shape)
        for key, value in state_dict.items()
        if not key.startswith(_CLASSIFIER_PREFIX) and not key.endswith("num_batches_tracked")
    }


@functools.lru_cache(maxsize=None)
def _candidate_shapes(name: str, shortcut: str | None) -> dict[str, tuple[int, ...]]:
    # The meta device allocates no memory and initialises nothing; the cache spares repeated builds.
    kwargs = {} if shortcut is None else {"shortcut": shortcut}
    with torch.device("meta"):
        candidate = _registry.model_entrypoint(name)(**kwargs)
    return _shapes(candidate.state_dict())


def guess_architecture(state_dict: Mapping[str, Tensor]) -> str | None:
    """The registered model (with its shortcut option where it has one) whose parameters match, else None."""
    wanted = _shapes(state_dict)
    for name in _registry.list_models():
        family = _registry.get_model_default_cfg(name)["family"]
        shortcuts = (None, "A", "B") if family in ("cifar-resnet", "preact-resnet") else (None,)
        for shortcut in shortcuts:
            if _candidate_shapes(name, shortcut) == wanted:
                return name if shortcut is None else f"{name} (shortcut={shortcut})"
    return None


def load_state_dict_into(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    model_name: str,
    source: str,
    skip_mismatched: tuple[str, ...] = (),
) -> None:
    """Copy ``state_dict`` into ``model`` (see the module docstring for what may differ); raise CheckpointError."""
    state = dict(state_dict)
    model_state = model.state_dict()

    fc_weight, model_fc_weight = state.get("fc.weight"), model_state.get("fc.weight")
    # A classifier for another class count (or none at all, or a model without one) is not a mismatch.
    keep_model_classifier = fc_weight is None or model_fc_weight is None or fc_weight.shape != model_fc_weight.shape
    if keep_model_classifier:
        state = {key: value for key, value in state.items() if not key.startswith(_CLASSIFIER_PREFIX)}

    missing = [
        key
        for key in model_state
        if key not in state
        and not key.endswith("num_batches_tracked")
        and not (keep_model_classifier and key.startswith(_CLASSIFIER_PREFIX))
    ]
    unexpected = [key for key in state if key not in model_state]
    mismatched = [key for key in state if key in model_state and state[key].shape != model_state[key].shape]
    skipped = [key for key in mismatched if key in skip_mismatched]
    mismatched = [key for key in mismatched if key not in skipped]

    if missing or unexpected or mismatched:
        guess = guess_architecture(state_dict)
        is_for = f"is for {guess}" if guess else "is for a different architecture"
        example = (missing + unexpected + mismatched)[0]
        raise CheckpointError(
            f"{source} {is_for}, not {model_name}: {len(missing)} missing, {len(unexpected)} unexpected and "
            f"{len(mismatched)} mismatched keys (first: {example!r}); pass weights saved from a {model_name}"
        )

    for key in skipped:
        _logger.warning(
            "%s: not loading %s %s into %s's %s (different stem); it keeps its random initialisation",
            source,
            key,
            tuple(state[key].shape),
            model_name,
            tuple(model_state[key].shape),
        )
        del state[key]
    if keep_model_classifier and model_fc_weight is not None:
        _logger.info(
            "%s: classifier has %s outputs, %s needs %d: fc keeps its new initialisation",
            source,
            "no" if fc_weight is None else fc_weight.shape[0],
            model_name,
            model_fc_weight.shape[0],
        )
    model.load_state_dict(state, strict=False)
