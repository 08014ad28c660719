"""String-keyed model registry (timm style).

A model is a small function decorated with :func:`register_model`; its module holds a ``default_cfgs`` dict with the
model's preprocessing record under the same name. Names are looked up case-insensitively with '-' and '_' ignored,
so ``simple-cnn``, ``ResNet-50`` and ``WRN-28-10`` find ``simple_cnn``, ``resnet50`` and ``wrn28_10``.
"""

from __future__ import annotations

import copy
import difflib
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from resnetlab.errors import ConfigError

ModelFn = TypeVar("ModelFn", bound=Callable[..., nn.Module])

_model_entrypoints: dict[str, Callable[..., nn.Module]] = {}
_model_default_cfgs: dict[str, dict[str, Any]] = {}
_model_descriptions: dict[str, str] = {}
_lookup_keys: dict[str, str] = {}  # normalised spelling -> registered name


def _lookup_key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def register_model(fn: ModelFn) -> ModelFn:
    """Register ``fn`` under its own name; its module must define ``default_cfgs[fn.__name__]``."""
    name = fn.__name__
    module_cfgs = getattr(sys.modules[fn.__module__], "default_cfgs", {})
    if name not in module_cfgs:
        raise RuntimeError(f"{fn.__module__}.default_cfgs has no entry for model {name!r}")
    key = _lookup_key(name)
    if key in _lookup_keys and _lookup_keys[key] != name:
        raise RuntimeError(f"model names {name!r} and {_lookup_keys[key]!r} differ only in case, '-' or '_'")
    _model_entrypoints[name] = fn
    _model_default_cfgs[name] = module_cfgs[name]
    _model_descriptions[name] = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
    _lookup_keys[key] = name
    return fn


def list_models() -> list[str]:
    """All registered model names, sorted."""
    return sorted(_model_entrypoints)


def resolve_model_name(name: str) -> str:
    """The registered spelling of ``name``; an unknown name raises ConfigError listing near matches."""
    registered = _lookup_keys.get(_lookup_key(name))
    if registered is not None:
        return registered
    raise ConfigError(_unknown_model_message(name))


def _unknown_model_message(name: str) -> str:
    # Match on the normalised spelling, then keep only the matches about as close as the best one, so "resnet5"
    # suggests resnet50 and resnet56 rather than every resnet.
    by_key = {_lookup_key(n): n for n in _model_entrypoints}
    scored = sorted(
        ((difflib.SequenceMatcher(None, _lookup_key(name), key).ratio(), by_key[key]) for key in by_key),
        reverse=True,
    )
    best = scored[0][0] if scored else 0.0
    near = sorted(n for ratio, n in scored if ratio >= 0.6 and ratio >= best - 0.05)[:5]
    if near:
        return f"unknown model {name!r}; did you mean: {', '.join(near)}? See `resnetlab models`."
    return f"unknown model {name!r}; see `resnetlab models` for the available models."


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    return _model_entrypoints[resolve_model_name(name)]


def get_model_default_cfg(name: str) -> dict[str, Any]:
    """A copy of the model's default config: input_size (C, H, W), mean, std, interpolation, crop_pct, ..."""
    return copy.deepcopy(_model_default_cfgs[resolve_model_name(name)])


def get_model_description(name: str) -> str:
    return _model_descriptions[resolve_model_name(name)]
