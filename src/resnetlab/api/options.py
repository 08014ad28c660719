"""How the options of a call (the CLI's flags, ``section__key=value`` keyword arguments, ``KEY=VALUE`` overrides)
become a :class:`~resnetlab.config.RunConfig`: the one resolution that ``rl.train``, ``rl.tune`` and the ``train``
and ``tune`` commands share, so that the same options give the same config whichever face they came through.

The order is the config module's: the recipe, then the named flags, then the overrides (keyword arguments written
``section__key`` first, then the ``overrides`` argument), each winning over the one before.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from resnetlab.config import RunConfig, build_config, load_yaml, shown
from resnetlab.errors import ConfigError

# The named run options (CLI flags and keyword arguments alike) and the config keys they stand for.
RUN_FLAGS: dict[str, str] = {
    "data": "data.spec",
    "batch_size": "data.batch_size",
    "model": "model.name",
    "epochs": "train.epochs",
    "seed": "train.seed",
    "device": "train.device",
}

Overrides = Mapping[str, Any] | Sequence[str] | None


def value_text(value: Any) -> str:
    """A Python value as the text of a ``KEY=VALUE`` override, read back to the same value.

    JSON is YAML, so the text goes through :func:`~resnetlab.config.parse_override` like a CLI override does:
    ``0.05`` -> ``0.05``, ``None`` -> ``null``, ``[2, 3]`` -> ``[2, 3]``, ``"a: b"`` -> ``"a: b"`` (quoted, so
    that a string stays a string). Paths and other objects are given as their text.
    """
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value, default=str, ensure_ascii=False)


def override_texts(overrides: Overrides) -> list[str]:
    """``{"optim.lr": 0.05}`` or ``["optim.lr=0.05"]`` -> ``["optim.lr=0.05"]`` (None: none)."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{key}={value_text(value)}" for key, value in overrides.items()]
    if isinstance(overrides, (str, bytes)):
        raise ConfigError(f"overrides={shown(overrides)}: pass a dict {{'optim.lr': 0.05}} or a list "
                          "['optim.lr=0.05'], not a single string")
    return [str(text) for text in overrides]


def keyword_overrides(options: Mapping[str, Any], *, known: Sequence[str], where: str) -> list[str]:
    """``section__key=value`` keyword arguments as ``section.key=value`` overrides; any other name that is not in
    ``known`` is a :class:`~resnetlab.errors.ConfigError` naming it."""
    texts = []
    for name, value in options.items():
        if "__" not in name:
            listed = ", ".join(sorted(known))
            raise ConfigError(f"{where}() got an unknown option {name!r}; it takes {listed}, or any config key "
                              "written section__key=value (optim__lr=0.05 for optim.lr)")
        texts.append(f"{name.replace('__', '.')}={value_text(value)}")
    return texts


def run_flags(*, data: str | None = None, batch_size: int | None = None, model: str | None = None,
              epochs: int | None = None, seed: int | None = None, device: str | None = None,
              progress: bool | None = None) -> dict[str, Any]:
    """The named run options as dotted config keys (None: not given, the recipe's value stands).

    ``progress=False`` is the CLI's ``--quiet`` (``logging.quiet=true``); ``True`` turns the console output on
    even where the recipe is quiet.
    """
    values = {"data": data, "batch_size": batch_size, "model": model, "epochs": epochs, "seed": seed, "device": device}
    flags: dict[str, Any] = {RUN_FLAGS[name]: value for name, value in values.items()}
    flags["logging.quiet"] = None if progress is None else not progress
    return flags


def base_tree(recipe: str | Path | None, resume: str | Path | None = None) -> dict[str, Any]:
    """The tree the options apply to: the recipe (default: demo), or with ``resume`` the run's own config.yaml."""
    from resnetlab.recipes import load_recipe

    if resume is None:
        return load_recipe(str(recipe or "demo"))
    if recipe is not None:
        raise ConfigError("--resume continues a run with its own config; do not combine it with --recipe")
    config = Path(resume) / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"--resume '{resume}': no config.yaml there; is it a resnetlab run directory?")
    return load_yaml(config)


def resolve_run_config(*, recipe: str | Path | None = None, resume: str | Path | None = None,
                       flags: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config of a ``train`` or ``tune`` call: recipe (or resumed run) < flags < overrides.

    Args:
        recipe: A shipped recipe's name or a YAML file; None: ``demo``.
        resume: A run directory whose config.yaml replaces the recipe.
        flags: Dotted keys from :func:`run_flags` (None values are not given).
        overrides: ``KEY=VALUE`` texts, applied in order.

    Example:
        >>> cfg = resolve_run_config(flags=run_flags(epochs=2), overrides=["optim.lr=0.05"])
        >>> cfg.train.epochs, cfg.optim.lr
        (2, 0.05)
    """
    return build_config(base_tree(recipe, resume), dict(flags or {}), list(overrides))
