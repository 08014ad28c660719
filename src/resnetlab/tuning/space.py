"""The search space: which config keys a tune varies, and over which values or ranges.

A parameter is named by its dotted config key (``optim.lr``), which is also its name in the Optuna study. Values
are typed by the config itself: every value (and both ends of every range) is set on the base config and
validated, so ``optim.lr=1e-3,1e-2`` becomes floats, ``optim.name=sgdd`` fails before anything is trained, and
``trials.csv`` shows values as the run saw them.

Two ways to write a space:

* ``--grid KEY=V1,V2 ...`` on the command line: a list of values per key (read as a YAML list, so
  ``data.classes=[1,2],[3,4]`` is two lists);
* a YAML file for ``--space``, one dotted key per entry::

      optim.lr: {low: 1.0e-4, high: 0.3, log: true}   # a range; float or int as the config key is
      train.epochs: {low: 3, high: 12}
      optim.momentum: {low: 0.8, high: 0.98, step: 0.02}
      optim.name: [sgd, adam]                          # a list of values to choose from
      data.batch_size: {choices: [32, 64, 128]}
"""

from __future__ import annotations

import copy
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from resnetlab.config import RunConfig, load_yaml, set_dotted, validate_config
from resnetlab.errors import ConfigError

#: Keys that decide which images are in the data and how they are split. Every setting of a tune must see the same
#: folds, so these belong to the base config, not to the search space.
FIXED_DATA_KEYS = frozenset({
    "data.spec", "data.classes", "data.split", "data.val_fraction", "data.test_fraction", "data.split_seed",
    "data.synthetic_per_class", "data.synthetic_seed", "data.download", "data.on_bad_image",
})

_SCALAR_TYPES = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Param:
    """One searched config key: a list of values (``categorical``) or an ``int``/``float`` range."""

    key: str
    kind: Literal["categorical", "int", "float"]
    choices: tuple[Any, ...] = ()
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None

    # Optuna stores categorical choices as str/int/float/bool/None only; other values (lists) travel as JSON text.
    def encoded_choices(self) -> list[Any]:
        return [value if isinstance(value, _SCALAR_TYPES) else json.dumps(value) for value in self.choices]

    def decode(self, stored: Any) -> Any:
        """The config value of a value Optuna stored for this parameter."""
        if self.kind != "categorical":
            return stored
        encoded = self.encoded_choices()
        for value, code in zip(self.choices, encoded):
            if code == stored and type(code) is type(stored):
                return value
        return self.choices[encoded.index(stored)]

    def suggest(self, trial) -> Any:
        """Ask an Optuna trial for this parameter's value (the sampler decides: grid, TPE, or a re-enqueued trial)."""
        if self.kind == "categorical":
            return self.decode(trial.suggest_categorical(self.key, self.encoded_choices()))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def describe(self) -> str:
        if self.kind == "categorical":
            return ", ".join(format_value(v) for v in self.choices)
        text = f"{format_value(self.low)} .. {format_value(self.high)}"
        if self.step:
            text += f" step {format_value(self.step)}"
        return text + (" (log)" if self.log else "") + f" ({self.kind})"

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        out: dict[str, Any] = {"type": self.kind, "low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass
class SearchSpace:
    params: dict[str, Param] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.params)

    @property
    def keys(self) -> list[str]:
        return list(self.params)

    def add(self, param: Param) -> None:
        if param.key in self.params:
            raise ConfigError(f"search space names '{param.key}' twice (in --grid and/or --space); keep one")
        self.params[param.key] = param

    def is_grid(self) -> bool:
        return all(p.kind == "categorical" for p in self.params.values())

    def grid_size(self) -> int:
        size = 1
        for param in self.params.values():
            size *= len(param.choices)
        return size

    def grid_for_optuna(self) -> dict[str, list[Any]]:
        """The search space as :class:`optuna.samplers.GridSampler` takes it."""
        return {key: param.encoded_choices() for key, param in self.params.items()}

    def suggest(self, trial) -> dict[str, Any]:
        return {key: param.suggest(trial) for key, param in self.params.items()}

    def decode(self, stored: dict[str, Any]) -> dict[str, Any]:
        return {key: self.params[key].decode(stored[key]) for key in self.params if key in stored}

    def to_dict(self) -> dict[str, Any]:
        return {key: param.to_dict() for key, param in self.params.items()}


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


# ---------------------------------------------------------------------------------------------------------------
# Applying a setting to the base config
# ---------------------------------------------------------------------------------------------------------------


def apply_params(base: RunConfig, params: dict[str, Any], source: str = "search space") -> RunConfig:
    """The base config with each dotted key set to its value, validated."""
    tree = base.to_dict()
    for key, value in params.items():
        set_dotted(tree, key, copy.deepcopy(value))
    return validate_config(tree, source)


def config_value(cfg: RunConfig, key: str) -> Any:
    """The value of a dotted key in a config, as plain JSON data (tuples become lists)."""
    node: Any = cfg.to_dict()
    for part in key.split("."):
        node = node[part]
    return node


def _typed(base: RunConfig, key: str, value: Any, origin: str) -> Any:
    return config_value(apply_params(base, {key: value}, origin), key)


def _check_key(key: str) -> None:
    set_dotted({}, key, None)  # raises ConfigError naming the key if it is not a config key
    if key in FIXED_DATA_KEYS:
        raise ConfigError(f"'{key}' cannot be searched: it changes which images are in the folds, and every setting "
                          "must be scored on the same folds; set it in the base config (KEY=VALUE) instead")
    if "." not in key:
        raise ConfigError(f"'{key}' is a section, not a value; name a key inside it, like {key}.name "
                          "(a --space file takes dotted keys at its top level)")


def _choices(base: RunConfig, key: str, values: list[Any], origin: str) -> tuple[Any, ...]:
    if not values:
        raise ConfigError(f"{origin}: '{key}' lists no values")
    typed = [_typed(base, key, value, origin) for value in values]
    seen: list[Any] = []
    for value in typed:
        if value in seen:
            raise ConfigError(f"{origin}: '{key}' lists the value {format_value(value)} twice")
        seen.append(value)
    return tuple(typed)


# ---------------------------------------------------------------------------------------------------------------
# --grid KEY=V1,V2
# ---------------------------------------------------------------------------------------------------------------


def parse_grid_item(text: str) -> tuple[str, list[Any]]:
    """``'optim.lr=0.001,0.01'`` -> ``('optim.lr', [0.001, 0.01])``; the values are read as one YAML list."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise ConfigError(f"--grid '{text}' is not KEY=V1,V2,...; write it like optim.lr=0.001,0.01")
    try:
        values = yaml.safe_load(f"[{raw}]")
    except yaml.YAMLError:
        raise ConfigError(f"--grid '{text}': cannot read the values as a comma-separated list") from None
    return key, list(values)


def grid_param(base: RunConfig, text: str) -> Param:
    key, values = parse_grid_item(text)
    _check_key(key)
    return Param(key=key, kind="categorical", choices=_choices(base, key, values, f"--grid {key}"))


# ---------------------------------------------------------------------------------------------------------------
# --space FILE.yaml
# ---------------------------------------------------------------------------------------------------------------


def _numeric_kind(key: str) -> Literal["int", "float"] | None:
    """``int`` or ``float`` from the config field's annotation (``float | None`` counts as float), else None."""
    known: Any = RunConfig
    annotation: Any = None
    for part in key.split("."):
        annotation = known.model_fields[part].annotation
        known = annotation
    is_union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    options = typing.get_args(annotation) if is_union else (annotation,)
    if float in options:
        return "float"
    if int in options and bool not in options:
        return "int"
    return None


def range_param(base: RunConfig, key: str, spec: dict[str, Any], origin: str) -> Param:
    unknown = set(spec) - {"low", "high", "log", "step", "type"}
    if unknown:
        raise ConfigError(f"{origin}: '{key}' has unknown field(s) {', '.join(sorted(unknown))}; a range takes "
                          "low, high and optionally log, step, type (int or float)")
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{origin}: '{key}' needs both low and high (or a list of values to choose from)")
    kind = spec.get("type") or _numeric_kind(key)
    if kind not in ("int", "float"):
        raise ConfigError(f"{origin}: '{key}' is not a number in the config, so it cannot take a range; "
                          "give a list of values instead")
    cast = int if kind == "int" else float
    try:
        low, high = cast(spec["low"]), cast(spec["high"])
        step = None if spec.get("step") is None else cast(spec["step"])
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: '{key}' low/high/step must be numbers (got {spec!r})") from None
    log = bool(spec.get("log", False))
    if not low < high:
        raise ConfigError(f"{origin}: '{key}' needs low < high (got {low} and {high})")
    if log and low <= 0:
        raise ConfigError(f"{origin}: '{key}' has log: true, so low must be above 0 (got {low})")
    if log and step is not None:
        raise ConfigError(f"{origin}: '{key}' cannot have both log and step (Optuna samples one or the other)")
    if step is not None and step <= 0:
        raise ConfigError(f"{origin}: '{key}' step must be above 0 (got {step})")
    for end in (low, high):  # both ends must be valid config values (lr > 0, epochs >= 1 ...)
        _typed(base, key, end, origin)
    return Param(key=key, kind=kind, low=low, high=high, log=log, step=step)


def load_space_file(base: RunConfig, path: str | Path) -> SearchSpace:
    tree = load_yaml(path)
    origin = f"--space {path}"
    space = SearchSpace()
    for key, spec in tree.items():
        key = str(key)
        _check_key(key)
        if isinstance(spec, list):
            space.add(Param(key=key, kind="categorical", choices=_choices(base, key, spec, origin)))
        elif isinstance(spec, dict) and "choices" in spec:
            if set(spec) != {"choices"} or not isinstance(spec["choices"], list):
                raise ConfigError(f"{origin}: '{key}' with choices takes only a list: {{choices: [a, b]}}")
            space.add(Param(key=key, kind="categorical", choices=_choices(base, key, spec["choices"], origin)))
        elif isinstance(spec, dict):
            space.add(range_param(base, key, spec, origin))
        else:
            raise ConfigError(f"{origin}: '{key}' must be a list of values or a range {{low: .., high: ..}} "
                              f"(got {spec!r})")
    if not space:
        raise ConfigError(f"{origin}: the file names no parameters")
    return space


def split_grid_items(items: list[str]) -> tuple[list[str], list[str]]:
    """``--grid`` items with several values, and those with one value as plain ``KEY=VALUE`` overrides.

    A single value searches nothing, so it is applied to the base config like any override; this also makes an
    override written after ``--grid`` on the command line do what it says.
    """
    searched, overrides = [], []
    for text in items:
        _, values = parse_grid_item(text)
        (searched if len(values) > 1 else overrides).append(text)
    return searched, overrides


def build_space(base: RunConfig, grid_items: list[str], space_file: str | Path | None) -> SearchSpace:
    """The search space from ``--grid`` items (each with several values) and an optional ``--space`` file."""
    space = load_space_file(base, space_file) if space_file else SearchSpace()
    for text in grid_items:
        space.add(grid_param(base, text))
    return space
