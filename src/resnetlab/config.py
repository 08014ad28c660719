"""The typed run configuration and how it is resolved.

A run is described by one :class:`RunConfig`. It is resolved in three layers, each overriding the one before
(as in timm's ``--config`` plus flags, and nanoGPT's configurator):

1. a recipe (a YAML file shipped in ``resnetlab/recipes`` or a path given by the user),
2. the CLI's named flags (``--epochs``, ``--model`` ...), which are shorthands for dotted keys,
3. ``KEY=VALUE`` overrides with dotted keys (``optim.lr=0.01``); values are parsed as YAML, so
   ``data.classes=[2,3,14,17]`` and ``train.ema=true`` work.

Every section forbids unknown keys and pydantic checks types, so a misspelt or mistyped key is an error that
names the key instead of a silent no-op.
"""

from __future__ import annotations

import copy
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from resnetlab.errors import ConfigError, first_line


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    spec: str = Field("synthetic-signs", description="Dataset: synthetic-signs, gtsrb:PATH, folder:PATH, ...")
    input_size: int = Field(32, ge=8, description="Side of the square model input in pixels")
    resize: Literal["squash", "shorter_crop"] = Field(
        "squash",
        description="How an image reaches input_size at evaluation: 'squash' resizes to a square (GTSRB, ROI crops); "
        "'shorter_crop' resizes the shorter side to input_size/crop_pct then centre-crops (photos)",
    )
    crop_pct: float = Field(0.875, gt=0, le=1)
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    roi_crop: bool = Field(True, description="Crop to the ROI box where the dataset has one (GTSRB)")
    contrast: Literal["none", "autocontrast", "equalize"] = Field(
        "none", description="Per-image contrast normalization of the luminance before resizing, in training, "
        "evaluation and deployment alike (GTSRB: 'equalize')")
    classes: list[int | str] | None = Field(None, description="Keep only these class ids or names, relabelled 0..k-1")
    split: Literal["auto", "stratified", "grouped"] = Field(
        "auto", description="How validation (and, when the dataset has none, test) is held out; auto = grouped where groups exist"
    )
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.15, ge=0, lt=1, description="Used only when the dataset has no test split")
    split_seed: int = 0
    normalize: Literal["dataset", "imagenet", "none"] = Field(
        "dataset", description="Mean/std from the training split ('dataset') or ImageNet's (pretrained models)"
    )
    batch_size: int = Field(128, ge=1, description="Global batch; split evenly over torchrun processes")
    eval_batch_size: int = Field(256, ge=1)
    in_memory: Literal["auto", "always", "never"] = Field(
        "auto", description="Decode the dataset once into a uint8 tensor (auto: when input_size <= 64)"
    )
    num_workers: int | None = Field(None, ge=0, description="DataLoader workers for large images (None: auto)")
    sampler: Literal["random", "weighted", "sqrt"] = Field(
        "random", description="Training draw: random (each image once per epoch); weighted (classes equally often, "
        "with replacement); sqrt (a class as often as the square root of its count: rare classes more often "
        "without starving the common ones)"
    )
    on_bad_image: Literal["error", "skip"] = "error"
    cifar100_labels: Literal["fine", "coarse"] = Field(
        "fine", description="cifar100:PATH: the 100 fine classes or the 20 coarse superclasses"
    )
    synthetic_per_class: int = Field(300, ge=4)
    synthetic_seed: int = 0
    download: bool = Field(False, description="Fetch gtsrb:/cifar10:/cifar100: archives into PATH when they are not there")


class ModelConfig(_Section):
    name: str = "resnet20"
    pretrained: bool | Literal["auto"] = Field(
        False, description="ImageNet weights through torchvision; 'auto': use them when they can be fetched, else "
        "train from random initialisation and say so")
    pretrained_path: str | None = None
    drop_rate: float | None = Field(None, ge=0, lt=1, description="Dropout before the final linear layer (None: the model's default)")
    zero_init_residual: bool = False
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra model constructor arguments")
    init_from: str | None = Field(
        None, description="Fine-tune a trained resnetlab model: a run directory (its checkpoints/best.pt) or a "
        "checkpoint. Its weights, class list (head kept), preprocessing and architecture are used; the data's "
        "classes are mapped onto its classes by id or name (CLI: --init-from)")


class AugmentConfig(_Section):
    preset: str = Field("signs", description="none, cifar, signs, imagenet, objects, signs-wild (signs in other conditions: framing, strong colour and hue jitter, colour cast, grayscale, dark/faded/foggy weather, blur, noise, JPEG; no flips; see data/augment.py)")
    randaugment: bool = False
    trivialaugment: bool = False
    mixup_alpha: float = Field(0.0, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)
    mirror_swap: bool = Field(False, description="Flip mirror-image classes and swap their labels (GTSRB 33/34 ...)")
    random_erasing: float = Field(0.0, ge=0, le=1)


class OptimConfig(_Section):
    name: Literal["sgd", "adam", "adamw", "rmsprop"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    no_decay_norm_bias: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0, description="Adam/AdamW epsilon")
    wrapper: Literal["none", "sam", "gnp"] = Field("none", description="SAM or gradient-norm penalty around the optimizer")
    sam_rho: float = Field(0.05, gt=0)
    gnp_alpha: float = Field(0.8, ge=0, le=1, description="Gradient-norm penalty: weight of the perturbed gradient")
    gnp_r: float = Field(0.01, gt=0, description="Gradient-norm penalty: finite-difference step")


class ScheduleConfig(_Section):
    name: Literal["constant", "step", "multistep", "cosine", "onecycle", "plateau"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    warmup_start_factor: float = Field(0.1, gt=0, le=1)
    min_lr: float = Field(0.0, ge=0)
    step_size: int = Field(30, ge=1)
    milestones: list[int] = Field(default_factory=lambda: [30, 60, 90])
    gamma: float = Field(0.1, gt=0)
    max_lr: float | None = Field(None, description="one-cycle peak (default: optim.lr)")
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    plateau_patience: int = Field(3, ge=0)


class LossConfig(_Section):
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weights: Literal["none", "balanced"] | list[float] = Field(
        "none", description="Per-class loss weights: none, balanced (inverse training frequency) or one number per "
        "class"
    )


class ProgressiveResizeConfig(_Section):
    """Progressive resizing (fastai, FFCV): the first part of training sees its batches scaled down.

    Small inputs make early steps cheap (a CIFAR ResNet at 24 px costs about 0.55 of a 32 px step), and early in
    training the model learns coarse shapes that need no fine detail; the last part trains and validates at
    ``data.input_size``, the size the model is evaluated and deployed at. Epoch ``e`` of ``E`` trains at
    ``min_size`` until ``start`` of the epochs have passed, then at sizes growing linearly to ``data.input_size``
    at ``end``, rounded down to a multiple of ``multiple``. Validation is always at ``data.input_size``, so the
    validation top-1 of the small epochs is low (the model has not yet seen objects at that scale); early stopping
    counts its patience from the first epoch at full size."""

    min_size: int | None = Field(None, ge=8, description="Side of the smallest training input in pixels; None: off")
    start: float = Field(0.0, ge=0, lt=1, description="Fraction of the epochs trained at min_size")
    end: float = Field(0.5, gt=0, le=1, description="Fraction of the epochs after which training is at full size")
    multiple: int = Field(4, ge=1, description="Sizes in between are rounded down to a multiple of this")

    @model_validator(mode="after")
    def _ordered(self) -> ProgressiveResizeConfig:
        if self.end <= self.start:
            raise ConfigError(f"train.progressive.end ({self.end:g}) must come after train.progressive.start "
                              f"({self.start:g}): both are fractions of the epochs")
        return self


class TrainConfig(_Section):
    epochs: int = Field(30, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast where the CPU/GPU supports it, else fp32 (fp16 only on CUDA)"
    )
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = False
    deterministic: bool = False
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: all cores)")
    grad_clip_norm: float | None = Field(None, gt=0)
    grad_clip_value: float | None = Field(None, gt=0)
    ema: bool = Field(False, description="Keep an exponential moving average of the weights, validated beside them")
    ema_decay: float = Field(0.999, gt=0, lt=1)
    ema_warmup: bool = Field(True, description="EMA decay min(ema_decay, (1+n)/(10+n)) after n updates, as timm")
    ema_keep_best: bool = Field(True, description="best.pt holds the EMA weights in epochs where they validate better")
    monitor: Literal["val_top1", "val_loss"] = "val_top1"
    keep: Literal["best", "last"] = Field(
        "best", description="The weights best.pt holds and the test evaluates: the best epoch by train.monitor, or "
        "the last epoch (schedules that anneal to zero, with a validation split too small to choose by: picking "
        "the maximum of a noisy validation curve favours lucky epochs)")
    early_stopping_patience: int | None = Field(None, ge=1)
    early_stopping_min_delta: float = Field(0.0, ge=0)
    time_budget: float | None = Field(None, gt=0, description="Minutes of training, then stop cleanly")
    epochs_from_budget: bool = Field(
        False, description="With train.time_budget: time the real input pipeline and training step for a few "
        "steps, then train for as many epochs as fill the budget on this machine (train.epochs is the most), so the "
        "schedule anneals within the budget instead of being cut off; config.yaml records the epochs chosen")
    progressive: ProgressiveResizeConfig = Field(default_factory=ProgressiveResizeConfig)
    max_steps_per_epoch: int | None = Field(None, ge=1, description="Stop each epoch after this many batches (smoke tests)")
    save_every: int | None = Field(None, ge=1, description="Also keep checkpoints/epoch_N.pt every N epochs")
    keep_top_k: int = Field(
        1, ge=1, description="Also keep the k best epochs as checkpoints/top_epoch_N.pt (1: best.pt only)"
    )
    sync_bn: bool = Field(False, description="SyncBatchNorm across processes in torchrun runs (CUDA only)")
    freeze: Literal["none", "backbone", "all_but_bn_and_head"] = Field(
        "none", description="Parameters that do not train: 'backbone' trains the final classifier layer only (its "
        "BatchNorm layers stay in eval mode, running statistics as trained); 'all_but_bn_and_head' trains the "
        "BatchNorm scales and shifts and the classifier (running statistics adapt to the new data). Needs starting "
        "weights (model.init_from, or pretrained ones) (CLI: --freeze)")

    # Settings that contradict each other fail when the config is built, before a run starts. ConfigError is not a
    # ValueError, so pydantic lets it through with its own message.
    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.epochs_from_budget and not self.time_budget:
            raise ConfigError("train.epochs_from_budget sizes the epochs to train.time_budget, which is not set; give "
                              "train.time_budget=MINUTES or drop train.epochs_from_budget")
        if self.keep == "last" and self.early_stopping_patience:
            raise ConfigError("train.keep=last keeps the last epoch, so early stopping (train.early_stopping_patience) "
                              "would only cut the schedule short; use one or the other")
        return self


class EvalConfig(_Section):
    split: Literal["test", "val"] = "test"
    tta: bool = False
    topk: int = Field(5, ge=1)
    gradcam: bool = True
    # Validation and test evaluation in float32 by default, whatever precision trained the model: the float32
    # deployment path (ONNX Runtime, the default of `predict` and `serve` below 1 GMAC per image) then reports the
    # very confidences that `evaluate` wrote. "train" evaluates under the training autocast instead: faster, with
    # confidences that differ in the third decimal.
    precision: Literal["fp32", "train"] = "fp32"
    # When `predict` and `serve` would run the model in bf16 on this machine (large models on CPUs with bf16
    # instructions), also evaluate that bf16 package on the test split and report what it costs.
    deployment_check: bool = True
    # The operating point stored with the model (see resnetlab.evaluation.selective): below its confidence
    # threshold `predict` and `serve` answer "unknown". Chosen on the validation split after training by one rule:
    # keep at least `coverage` of the in-domain validation images, or (when set, it wins) at most `max_error` error
    # among the accepted ones.
    coverage: float = Field(0.99, gt=0, le=1, description="Operating point: fraction of in-domain validation images "
                                                           "accepted (predict/serve answer 'unknown' below it)")
    max_error: float | None = Field(None, ge=0, lt=1, description="Operating point: at most this error among "
                                                                    "accepted validation images (wins over coverage)")
    original_data: str | None = Field(
        None, description="With model.init_from: the dataset whose test split measures what fine-tuning forgot "
        "(the original and the fine-tuned model are both evaluated on it); None: the one the original model was "
        "trained on, when it can be read here; 'none': skip (CLI: --original-data)")


class LoggingConfig(_Section):
    quiet: bool = False
    tensorboard: bool = False


class RunConfig(_Section):
    recipe: str = "custom"
    description: str = ""
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _progressive_below_input(self) -> RunConfig:
        low = self.train.progressive.min_size
        if low is not None and low > self.data.input_size:
            raise ConfigError(f"train.progressive.min_size={low} is larger than data.input_size="
                              f"{self.data.input_size}; progressive resizing starts below the input size")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------------------------
# Resolution: recipe < flags < KEY=VALUE
# ---------------------------------------------------------------------------------------------------------------


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 80
_SHORT_REPR.maxlevel = 3


def shown(value: Any) -> str:
    """A value from the user's input as the one line of an error message: quoted, escaped and bounded (a YAML
    alias can make a small file stand for a huge structure)."""
    return _SHORT_REPR.repr(value)


def oversized(tree: Any, *, max_values: int = 200_000, max_depth: int = 64) -> str | None:
    """Why a tree of dicts and lists read from a user's file is too large to process, or None.

    YAML aliases and pickle references let a small file stand for a structure whose expansion never ends (a
    "billion laughs"), or for one that contains itself; validating or dumping such a tree would hang or exhaust
    memory. Values are counted each time they are reached, as an expansion would count them, and the walk stops
    at the limit, so the check itself is cheap.
    """
    pending, seen = [(tree, 0)], 0
    while pending:
        node, depth = pending.pop()
        seen += 1
        if seen > max_values:
            return f"it holds more than {max_values:,} values"
        if depth > max_depth:
            return f"it is nested more than {max_depth} levels deep (or contains itself)"
        if isinstance(node, dict):
            pending.extend((value, depth + 1) for value in node.values())
        elif isinstance(node, (list, tuple, set, frozenset)):
            pending.extend((value, depth + 1) for value in node)
    return None


def parse_override(text: str) -> tuple[str, Any]:
    """``'optim.lr=0.01'`` -> ``('optim.lr', 0.01)``; the value is read as YAML (numbers, lists, booleans)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {shown(text)} is not KEY=VALUE; write it like optim.lr=0.01")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except (yaml.YAMLError, RecursionError):  # not YAML (or nested past the parser's depth): the text itself
        value = raw
    problem = oversized(value)
    if problem:
        raise ConfigError(f"override {shown(text)}: the value is not a config value ({problem})")
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``key='a.b'``, checking that every part of the key exists."""
    parts = key.split(".")
    node: Any = tree
    known: Any = RunConfig
    for depth, part in enumerate(parts):
        fields = getattr(known, "model_fields", None)
        if fields is None or part not in fields:
            where = ".".join(parts[:depth]) or "the top level"
            choices = ", ".join(sorted(fields)) if fields else "none (it is a value, not a section)"
            raise ConfigError(f"unknown config key {shown(key)}: {shown(part)} is not a key of {where} "
                              f"(known: {choices})")
        annotation = fields[part].annotation
        if depth == len(parts) - 1:
            node[part] = value
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {shown('.'.join(parts[: depth + 1]))} is a value, not a section")
            known = annotation


def build_config(base: dict[str, Any] | None = None, flags: dict[str, Any] | None = None,
                 overrides: list[str] | None = None) -> RunConfig:
    """Merge a recipe tree, named-flag values (dotted keys; ``None`` means 'not given') and ``KEY=VALUE`` texts."""
    tree = copy.deepcopy(base or {})
    _check_known_keys(tree)
    for key, value in (flags or {}).items():
        if value is not None:
            set_dotted(tree, key, value)
    for text in overrides or []:
        set_dotted(tree, *parse_override(text))
    return validate_config(tree)


def validate_config(tree: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        value = first.get("input")
        raise ConfigError(f"{source}: bad value for '{key}' ({shown(value)}): {first['msg']}") from None


def _check_known_keys(tree: dict[str, Any], model: type[BaseModel] = RunConfig, prefix: str = "") -> None:
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if key not in model.model_fields:
            raise ConfigError(f"unknown config key {shown(dotted)} (known: {', '.join(sorted(model.model_fields))})")
        sub = model.model_fields[key].annotation
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            _check_known_keys(value, sub, dotted + ".")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not UTF-8 text; save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"config file '{path}' cannot be read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {first_line(err)}") from None
    except RecursionError:
        raise ConfigError(f"config file '{path}' is nested too deeply to be a recipe") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (data:, model:, ...)")
    problem = oversized(tree)
    if problem:
        raise ConfigError(f"config file '{path}' is not a recipe: {problem}")
    return tree
