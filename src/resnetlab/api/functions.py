"""The functions of the Python API. Each is also the body of a CLI command (``resnetlab train`` calls
:func:`train`, ...), so a call and a command with the same options do the same thing and fail with the same one-line
:class:`~resnetlab.errors.ResnetlabError`.

Messages go to the ``resnetlab`` loggers (``logging``); nothing here prints.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resnetlab.api.options import (
    RUN_FLAGS,
    Overrides,
    keyword_overrides,
    override_texts,
    resolve_run_config,
    run_flags,
    value_text,
)
from resnetlab.api.results import Comparison, Evaluation, Export, Run, TuneResult
from resnetlab.api.results import Adaptation
from resnetlab.errors import ConfigError, ResnetlabError

if TYPE_CHECKING:
    import torch

    from resnetlab.api.classifier import Classifier
    from resnetlab.api.datasets import ImageDataset
    from resnetlab.config import RunConfig

logger = logging.getLogger("resnetlab.api")


# ---------------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------------

# The fine-tuning options of train (the CLI's --init-from, --freeze, --original-data) and their config keys.
FINETUNE_OPTIONS: dict[str, str] = {
    "init_from": "model.init_from",
    "freeze": "train.freeze",
    "original_data": "eval.original_data",
}


def train_config(data: str | None = None, *, recipe: str | Path | None = None, resume: str | Path | None = None,
                 overrides: Overrides = None, progress: bool | None = None, where: str = "train",
                 also_known: Sequence[str] = (), **options: Any) -> RunConfig:
    """The config :func:`train` would run with these arguments, without running it (the CLI's ``train``
    resolves its flags through this very function).

    Example:
        >>> train_config(epochs=2, optim__lr=0.05).optim.lr
        0.05
    """
    flags_given = {name: options.pop(name) for name in list(options) if name in RUN_FLAGS}
    finetune = {FINETUNE_OPTIONS[name]: options.pop(name) for name in list(options) if name in FINETUNE_OPTIONS}
    texts = keyword_overrides(options, known=[*RUN_FLAGS, *FINETUNE_OPTIONS, "overrides", "progress", *also_known],
                              where=where)
    flags = run_flags(data=data, progress=progress, **flags_given)
    # a path given as a Path is the config's text; None: not given
    flags.update({key: str(value) if isinstance(value, os.PathLike) else value for key, value in finetune.items()})
    return resolve_run_config(recipe=recipe, resume=resume, flags=flags, overrides=texts + override_texts(overrides))


def train(data: str | None = None, *, recipe: str | Path | None = None, out: str | Path | None = None,
          overwrite: bool = False, resume: str | Path | None = None, overrides: Overrides = None,
          progress: bool | None = None, **options: Any) -> Run:
    """Train a model, test it on the test split and write its report, into one run directory.

    Args:
        data: The dataset: ``synthetic-signs``, ``gtsrb:PATH``, ``folder:PATH``, ``csv:FILE`` ... (default: the
            recipe's).
        recipe: A shipped recipe (``rl.list_recipes()``) or a YAML file; None: ``demo``.
        out: The run directory (default ``runs/<recipe>-<time>``); it must be new or empty.
        overwrite: Replace the run in a non-empty ``out`` (when the new one has finished).
        resume: Continue the run in this directory from its last checkpoint, with its own config.
        overrides: Config keys to set, as ``{"optim.lr": 0.05}`` or ``["optim.lr=0.05"]``; they win over
            everything else.
        progress: False: no progress bar or console log (``--quiet``); None: the recipe's choice.
        **options: ``epochs``, ``batch_size``, ``model``, ``seed``, ``device`` (the CLI's flags); for fine-tuning
            a trained model, ``init_from`` (its run directory or checkpoint), ``freeze`` (``none``, ``backbone``,
            ``all_but_bn_and_head``) and ``original_data`` (the dataset to measure forgetting on); and any config
            key written ``section__key=value`` (``optim__lr=0.05``, ``train__ema=True``).

    Returns:
        The :class:`~resnetlab.api.results.Run`.

    Raises:
        ConfigError: An unknown option or config key, or a bad value; DataError: data that cannot be read.

    Example:
        >>> run = rl.train(epochs=1, data__input_size=32)  # doctest: +SKIP
        >>> run.metrics["top1"], run.report_path  # doctest: +SKIP
        >>> new = rl.train("csv:photos/labels.csv", recipe="finetune-new-domain", init_from=run.dir)  # doctest: +SKIP
    """
    from resnetlab.jobs.train import default_run_dir, train_job

    cfg = train_config(data, recipe=recipe, resume=resume, overrides=overrides, progress=progress, **options)
    run_dir = Path(resume) if resume is not None else Path(out) if out is not None else default_run_dir(cfg.recipe)
    train_job(cfg, run_dir, overwrite=overwrite, resume=resume is not None)
    return Run(run_dir)


def run(path: str | Path) -> Run:
    """An existing run directory as a :class:`~resnetlab.api.results.Run`.

    Example:
        >>> rl.run("runs/demo-20260101-120000").metrics["top1"]  # doctest: +SKIP
    """
    from resnetlab.reporting.runs_index import is_run_dir

    folder = Path(path)
    if not is_run_dir(folder):
        raise ResnetlabError(f"'{folder}' is not a resnetlab run directory (no config.yaml with run_info.json, "
                             "checkpoints/ or train.log); pass a folder rl.train or `resnetlab train` wrote")
    return Run(folder)


# ---------------------------------------------------------------------------------------------------------------
# evaluate / compare
# ---------------------------------------------------------------------------------------------------------------

EVALUATE_OPTIONS = ("batch_size", "device", "export_dir")
SPLITS = ("test", "val", "all")


def evaluate(source: str | Path | Run, data: str | None = None, *, split: str = "test", out: str | Path | None = None,
             overwrite: bool = False, tta: bool = False, raw: bool = False, coverage: float | None = None,
             max_error: float | None = None, overrides: Overrides = None, **data_options: Any) -> Evaluation:
    """Evaluate a trained model (or one of its exports) on a dataset: metrics, per-class table, report.

    Args:
        source: A run directory, a checkpoint or a :class:`~resnetlab.api.results.Run`.
        data: The dataset (default: the one the model was trained on).
        split: ``test``, ``val`` (the run's own held-out split, rebuilt) or ``all``.
        out: Output folder, new or empty (default ``<run>/evaluations/<data>-<split>-<time>``).
        overwrite: Write over the files of a non-empty ``out``.
        tta: Test-time augmentation.
        raw: Evaluate the uncalibrated confidences (no temperature; every answer accepted). By default the
            checkpoint's stored temperature and operating point apply, as in ``predict`` and ``serve``.
        coverage: Choose the operating point on the stored validation curve to keep this fraction of images.
        max_error: Choose it for at most this error among the accepted validation images.
        overrides: ``data.*`` settings for reading the data, as a dict or ``KEY=VALUE`` list (the preprocessing
            is the checkpoint's).
        **data_options: ``batch_size``, ``device`` (auto, cpu, cuda), ``export_dir`` (evaluate this export of the
            checkpoint instead) and ``data__key=value`` settings.

    Returns:
        The :class:`~resnetlab.api.results.Evaluation`.

    Example:
        >>> ev = rl.evaluate("runs/signs", data="csv:other/labels.csv")  # doctest: +SKIP
        >>> ev.metrics["top1"], ev.per_class[:3]  # doctest: +SKIP
    """
    from resnetlab.jobs.evaluate import default_evaluation_dir, evaluate_job
    from resnetlab.reporting.report import render_report

    if split not in SPLITS:
        raise ConfigError(f"--split '{split}': choose test, val or all")
    checkpoint = Path(source.dir if isinstance(source, Run) else source)
    named = {name: data_options.pop(name) for name in list(data_options) if name in EVALUATE_OPTIONS}
    texts = keyword_overrides(data_options, known=EVALUATE_OPTIONS, where="evaluate") + override_texts(overrides)
    export_dir = named.get("export_dir")
    out_dir = Path(out) if out is not None else default_evaluation_dir(checkpoint, data, split)
    evaluate_job(checkpoint, data, split, out_dir, tta=tta, device=named.get("device") or "auto",
                 batch_size=named.get("batch_size"), overrides=texts,
                 export_dir=Path(export_dir) if export_dir is not None else None, overwrite=overwrite,
                 raw=raw, coverage=coverage, max_error=max_error, log=logger.info)
    render_report(out_dir)
    return Evaluation(out_dir)


CALIBRATE_OPTIONS = ("batch_size", "device")


def calibrate(source: str | Path | Run, data: str | None = None, *, split: str = "val", coverage: float | None = None,
              max_error: float | None = None, overrides: Overrides = None, **data_options: Any) -> dict[str, Any]:
    """Fit a model's temperature and operating point again on a labelled split and store them in its checkpoint.

    For checkpoints trained before calibration was stored, runs without a validation split, and models changed
    after training (adapted, fine-tuned). ``evaluate``, ``predict`` and ``serve`` then apply the new calibration.

    Args:
        source: A run directory, a checkpoint or a :class:`~resnetlab.api.results.Run`.
        data: A labelled dataset whose classes are among the model's (default: the one it was trained on).
        split: ``val`` (the run's own held-out split, rebuilt as training made it), ``test`` or ``all``.
        coverage: Operating point that keeps this fraction of the images.
        max_error: Operating point with at most this error among the accepted images. Without either, the rule
            of the stored operating point, else the run's ``eval.max_error``/``eval.coverage``.
        overrides: ``data.*`` settings for reading the data, as a dict or ``KEY=VALUE`` list.
        **data_options: ``batch_size``, ``device`` (auto, cpu, cuda) and ``data__key=value`` settings.

    Returns:
        The calibration record now in the checkpoint's ``meta["calibration"]``: ``temperature``, ``fitted_on``,
        ``num_images``, ``ece_before``/``ece_after``, ``risk_coverage`` and ``operating_point``.

    Example:
        >>> record = rl.calibrate("runs/signs", max_error=0.01)  # doctest: +SKIP
        >>> record["temperature"], record["operating_point"]  # doctest: +SKIP
    """
    from resnetlab.jobs.calibrate import calibrate_job

    checkpoint = Path(source.dir if isinstance(source, Run) else source)
    named = {name: data_options.pop(name) for name in list(data_options) if name in CALIBRATE_OPTIONS}
    texts = keyword_overrides(data_options, known=CALIBRATE_OPTIONS, where="calibrate") + override_texts(overrides)
    return calibrate_job(checkpoint, data, split, coverage=coverage, max_error=max_error,
                         device=named.get("device") or "auto", batch_size=named.get("batch_size"), overrides=texts,
                         log=logger.info)


def compare(dirs: Sequence[str | Path | Run | Evaluation], out: str | Path | None = None, *,
            reference: str | Path | Run | Evaluation | None = None) -> Comparison:
    """Compare runs or evaluations side by side; the first is the baseline.

    Evaluations of one checkpoint on different datasets also get a domain-shift comparison (per-class accuracy
    drop, calibration, coverage at the operating point, out-of-distribution AUROC) against a reference evaluation.

    Args:
        dirs: Two or more run directories or evaluation folders (or the objects for them).
        out: Output folder (default ``compare-<time>``).
        reference: The in-domain evaluation the others of its checkpoint are shifted domains of (a label, a
            folder or its object; default: the first of them).

    Returns:
        The :class:`~resnetlab.api.results.Comparison` (``compare.csv`` as ``.table``, ``compare.html``).

    Example:
        >>> rl.compare(["runs/a", "runs/b"]).table[0]  # doctest: +SKIP
    """
    from resnetlab.reporting.compare import compare_runs

    folders = [Path(d.dir if isinstance(d, (Run, Evaluation)) else d) for d in dirs]
    if len(folders) < 2:
        raise ConfigError("compare needs at least two run or evaluation folders")
    for folder in folders:
        if not folder.is_dir():
            raise ConfigError(f"'{folder}' is not a folder; pass run directories or evaluation folders")
    out_dir = Path(out) if out is not None else Path(f"compare-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    if isinstance(reference, (Run, Evaluation)):
        reference = reference.dir
    compare_runs(folders, out_dir, reference=reference)
    return Comparison(out_dir)


# ---------------------------------------------------------------------------------------------------------------
# tune
# ---------------------------------------------------------------------------------------------------------------

TUNE_OPTIONS = ("metric", "pruner", "prune_warmup", "prune_startup", "trial_budget", "sampler_seed", "storage",
                "study_name", "timeout", "overwrite", "space")


def grid_texts(grid: Mapping[str, Sequence[Any]] | Sequence[str] | None) -> list[str]:
    """``{"optim.lr": [0.01, 0.1]}`` (or the CLI's ``["optim.lr=0.01,0.1"]``) -> ``["optim.lr=0.01,0.1"]``."""
    if grid is None:
        return []
    if isinstance(grid, Mapping):
        texts = []
        for key, values in grid.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise ConfigError(f"grid[{key!r}]: give a list of values, e.g. {{{key!r}: [0.01, 0.1]}}")
            texts.append(f"{key}=" + ",".join(value_text(value) for value in values))
        return texts
    return [str(text) for text in grid]


def tune(data: str | None = None, *, recipe: str | Path | None = None,
         grid: Mapping[str, Sequence[Any]] | Sequence[str] | None = None, folds: int = 3, refit: bool = False,
         search: str = "grid", trials: int | None = None, out: str | Path | None = None,
         overrides: Overrides = None, progress: bool | None = None, command: str | None = None,
         **options: Any) -> TuneResult:
    """Search hyperparameters with k-fold cross-validation on the training split; optionally refit the best.

    Args:
        data: The dataset (default: the recipe's).
        recipe: The recipe every trial starts from; None: ``demo``.
        grid: Values to search, ``{"optim.lr": [0.01, 0.1]}``; a key with one value is a plain override.
        folds: Folds of the training split.
        refit: Retrain the best setting on the training split and test it once.
        search: ``grid`` (every combination) or ``optuna`` (with ``trials``).
        trials: Optuna: settings to try.
        out: The tune folder; calling again with the same ``out`` resumes the search (default
            ``runs/tune-<recipe>-<time>``).
        overrides: Config keys for every trial, as for :func:`train`.
        progress: As for :func:`train`.
        command: The command line that resumes this search, for the report (the CLI gives its own).
        **options: The run options of :func:`train` (``epochs``, ``batch_size``, ``section__key`` ...) and the
            search's: ``metric``, ``pruner``, ``prune_warmup``, ``prune_startup``, ``trial_budget``
            (minutes), ``sampler_seed``, ``storage``, ``study_name``, ``timeout`` (minutes), ``overwrite``,
            ``space`` (a YAML search-space file).

    Returns:
        The :class:`~resnetlab.api.results.TuneResult`.

    Example:
        >>> result = rl.tune(grid={"optim.lr": [0.05, 0.1]}, folds=2, epochs=1, out="runs/lr")  # doctest: +SKIP
        >>> result.best["params"]  # doctest: +SKIP
    """
    from resnetlab.tuning import TuneOptions, build_space, split_grid_items, tune_job

    if search not in ("grid", "optuna"):
        raise ConfigError(f"--search '{search}': choose grid or optuna")
    searching = {name: options.pop(name) for name in list(options) if name in TUNE_OPTIONS}
    searched, fixed = split_grid_items(grid_texts(grid))
    base = train_config(data, recipe=recipe, overrides=[*override_texts(overrides), *fixed], progress=progress,
                        where="tune", also_known=TUNE_OPTIONS, **options)
    search_space = build_space(base, searched, searching.pop("space", None))
    if out is None:
        out = Path("runs") / f"tune-{base.recipe}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    tune_options = TuneOptions(
        out=Path(out), search=search, folds=folds, n_trials=trials, metric=searching.get("metric", "val_top1"),
        storage=searching.get("storage"), study_name=searching.get("study_name"),
        pruner=searching.get("pruner", "auto"), prune_startup_trials=searching.get("prune_startup", 3),
        prune_warmup_epochs=searching.get("prune_warmup", 1), trial_budget=searching.get("trial_budget"),
        timeout=searching.get("timeout"), refit=refit, overwrite=bool(searching.get("overwrite", False)),
        sampler_seed=searching.get("sampler_seed"), command=command)
    return TuneResult(Path(out), outcome=tune_job(base, search_space, tune_options))


# ---------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------


def export(model_or_path: str | Path | Run | Classifier, format: str = "onnx", out: str | Path | None = None, *,
           dynamic_batch: bool = False, quantize: str | None = None, precision: str = "float32",
           opset: int | None = None, parity_batch: int = 8, calibration_data: str | None = None,
           raw: bool = False) -> Export:
    """Export a trained model to ONNX, TorchScript or an AOTInductor package, checked against the eager model.

    Args:
        model_or_path: A run directory, a checkpoint, a :class:`~resnetlab.api.results.Run` or a
            :class:`~resnetlab.api.classifier.Classifier` loaded from a checkpoint.
        format: ``onnx``, ``torchscript`` or ``aoti``.
        out: The export folder (default ``<run>/exports/<format>[-int8|-bf16]``).
        dynamic_batch: Accept any batch size (ONNX; TorchScript always does).
        quantize: ``int8``: static quantization through ONNX Runtime.
        precision: ``float32``, or ``bf16`` (``format="aoti"``).
        opset: ONNX opset (default 18).
        parity_batch: Batch N of the parity check besides batch 1.
        calibration_data: Dataset for int8 calibration and the int8/bf16 accuracy check (default: the training data).
        raw: Export raw logits; by default a calibrated model's graph outputs ``logits / temperature``.

    Returns:
        The :class:`~resnetlab.api.results.Export`.

    Example:
        >>> exp = rl.export("runs/signs", "onnx", "exports/signs")  # doctest: +SKIP
        >>> rl.load(exp.dir).predict("sign.png")  # doctest: +SKIP
    """
    from resnetlab.api.classifier import Classifier
    from resnetlab.deployment.export import DEFAULT_OPSET, EXPORT_PRECISIONS, FORMATS, export_checkpoint
    from resnetlab.deployment.records import checkpoint_file_of, is_export_dir

    if isinstance(model_or_path, Classifier):
        if is_export_dir(model_or_path.source):
            raise ConfigError(f"'{model_or_path.source}' is already an export; export the checkpoint it came from")
        source = model_or_path.source
    else:
        source = Path(model_or_path.dir if isinstance(model_or_path, Run) else model_or_path)
    if format not in FORMATS:
        raise ConfigError(f"--format '{format}': choose {', '.join(FORMATS)}")
    if precision not in EXPORT_PRECISIONS:
        raise ConfigError(f"--precision '{precision}': choose {' or '.join(EXPORT_PRECISIONS)}")
    if opset is not None and format != "onnx":
        raise ConfigError("--opset applies to ONNX exports only")
    if calibration_data is not None and quantize is None and precision == "float32":
        raise ConfigError("--calibration-data is used with --quantize int8 or --precision bf16")
    if out is None:
        checkpoint_file = checkpoint_file_of(source).resolve()
        # beside the run's checkpoints/ folder, or beside a checkpoint file kept elsewhere
        run_dir = checkpoint_file.parent.parent if checkpoint_file.parent.name == "checkpoints" else checkpoint_file.parent
        suffix = f"-{quantize}" if quantize else ("-bf16" if precision == "bf16" else "")
        out = run_dir / "exports" / f"{format}{suffix}"
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file; pass a folder")
    result = export_checkpoint(source, out, fmt=format, dynamic_batch=dynamic_batch, opset=opset or DEFAULT_OPSET,
                               parity_batch=parity_batch, quantize=quantize, calibration_data=calibration_data,
                               precision=precision, raw=raw, log=logger.info)
    return Export(result.out_dir, result=result)


# ---------------------------------------------------------------------------------------------------------------
# adapt
# ---------------------------------------------------------------------------------------------------------------


def adapt(source: str | Path | Run, data: str, *, out: str | Path | None = None, method: str = "adabn",
          steps: int | None = None, lr: float | None = None, batch_size: int | None = None, seed: int = 0,
          device: str = "auto", overwrite: bool = False, prior_strength: float = 0.0,
          overrides: Overrides = None) -> Adaptation:
    """Adapt a trained model to a new domain's images, without labels, into a new checkpoint.

    AdaBN (Li et al. 2016) re-estimates the BatchNorm running statistics on the new images; ``method="tent"``
    (Wang et al. 2021) first trains the BatchNorm weights and biases to minimise the entropy of the model's
    predictions on them, then re-estimates the statistics. Nothing else changes, and the input checkpoint is only
    read. The images are prepared as the checkpoint's preprocessing says, without augmentation.

    Args:
        source: A run directory, a checkpoint or a :class:`~resnetlab.api.results.Run`.
        data: The new domain: ``folder:PATH`` (every image below PATH; class folders are not needed and not read),
            or any labelled spec (``gtsrb:PATH``, ``csv:FILE`` ...), whose labels are ignored.
        out: The new checkpoint, a ``.pt`` file or a folder (default ``<run>/adapted/<data>-<method>.pt``).
        method: ``adabn`` or ``tent``.
        steps: TENT's optimizer steps (default: one pass over the images, one step per batch).
        lr: TENT's learning rate (Adam; default 1e-3).
        batch_size: Images per batch (default: the run's training batch size, at most half the images).
        seed: Seeds the order of the images.
        device: ``auto``, ``cpu`` or ``cuda``.
        overwrite: Replace an existing output file.
        prior_strength: How many images the model's own BatchNorm statistics count as beside the new ones
            (Schneider et al. 2020); 0 (the default) replaces them.
        overrides: ``data.*`` settings for reading the data (``{"data.on_bad_image": "skip"}``), as for
            :func:`evaluate`.

    Returns:
        The :class:`~resnetlab.api.results.Adaptation`: ``.checkpoint``, ``.record`` (``meta["adaptation"]``),
        ``.load()``.

    Raises:
        ConfigError: A bad option, an existing output without ``overwrite``, or a model without BatchNorm;
            DataError: too few or unreadable images.

    Example:
        >>> adapted = rl.adapt("runs/signs", data="folder:photos/night", method="tent")  # doctest: +SKIP
        >>> rl.evaluate(adapted.checkpoint, data="csv:night/labels.csv").metrics["top1"]  # doctest: +SKIP
    """
    from resnetlab.jobs.adapt import adapt_job

    checkpoint = Path(source.dir if isinstance(source, Run) else source)
    texts = override_texts(overrides)
    outcome = adapt_job(checkpoint, data, out=Path(out) if out is not None else None, method=method, steps=steps,
                        lr=lr, batch_size=batch_size, seed=seed, device=device, overrides=texts,
                        overwrite=overwrite, prior_strength=prior_strength, log=logger.info)
    return Adaptation(outcome.checkpoint, record=outcome.record)


# ---------------------------------------------------------------------------------------------------------------
# registries and data
# ---------------------------------------------------------------------------------------------------------------


def list_models() -> list[str]:
    """The registered model names (``rl.create_model`` and ``model=`` take them).

    Example:
        >>> "resnet50" in rl.list_models()
        True
    """
    from resnetlab.models import list_models as registered

    return registered()


def create_model(name: str, num_classes: int, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
    """A registered model with ``num_classes`` outputs, randomly initialised or with ImageNet weights.

    Args:
        name: A name from :func:`list_models` (case-insensitive).
        num_classes: Outputs of the classifier.
        pretrained: Start from torchvision's ImageNet weights (ImageNet ResNets; needs them downloaded or cached).
        **kwargs: ``drop_rate``, ``pretrained_path``, ``zero_init_residual`` and the model's own options.

    Example:
        >>> model = rl.create_model("resnet20", num_classes=43)
        >>> model(torch.zeros(1, 3, 32, 32)).shape  # doctest: +SKIP
        torch.Size([1, 43])
    """
    from resnetlab.models import create_model as build

    return build(name, num_classes, pretrained=pretrained, **kwargs)


def list_recipes() -> list[str]:
    """The shipped recipes (``rl.train(recipe=...)`` takes them, or a YAML file).

    Example:
        >>> "demo" in rl.list_recipes()
        True
    """
    from resnetlab.recipes import list_recipes as shipped

    return shipped()


def open_dataset(spec: str, split: str = "train", *, transform: Any = None, overrides: Overrides = None,
                 recipe: str | Path | None = None) -> ImageDataset:
    """A dataset as a ``torch.utils.data.Dataset`` of ``(image, label)``, split as a run would split it.

    Args:
        spec: ``synthetic-signs``, ``gtsrb:PATH``, ``folder:PATH``, ``csv:FILE`` ...
        split: ``train``, ``val`` or ``test``: the splits a run with the same data settings would use (a held-out
            part of the training data where the dataset has no such split).
        transform: Called on each PIL image (RGB, cropped to its ROI box where it has one); None: the PIL image.
        overrides: ``data.*`` settings (``{"data.classes": [1, 2]}``), as for :func:`train`.
        recipe: The recipe whose data settings apply (default: none, the config defaults).

    Returns:
        A dataset with ``.classes`` (names), ``.class_ids`` and ``.paths``.

    Example:
        >>> ds = rl.open_dataset("gtsrb:/data/GTSRB", split="val", transform=rl.load("runs/signs").transform)  # doctest: +SKIP
        >>> loader = torch.utils.data.DataLoader(ds, batch_size=64)  # doctest: +SKIP
    """
    from resnetlab.api.datasets import ImageDataset
    from resnetlab.config import build_config
    from resnetlab.data.datasets import open_dataset as open_source
    from resnetlab.data.splits import plan_data_splits
    from resnetlab.recipes import load_recipe

    if split not in ("train", "val", "test"):
        raise ConfigError(f"split '{split}': choose train, val or test")
    cfg = build_config(load_recipe(str(recipe)) if recipe else {}, {"data.spec": spec}, override_texts(overrides))
    source = open_source(cfg.data)
    table = getattr(plan_data_splits(source, cfg.data), split)
    return ImageDataset(table, source.class_names, source.class_ids, roi_crop=cfg.data.roi_crop, transform=transform)


def environment_rank_is_main() -> bool:
    """Whether this process answers for a run (under torchrun, only rank 0 does)."""
    return os.environ.get("RANK", "0") == "0"


def tune_command(argv: Sequence[str] | None) -> str | None:
    """The command line that resumes or joins a tune (``--overwrite`` would discard it instead)."""
    if argv is None:
        return None
    return "resnetlab tune " + shlex.join(a for a in argv if a != "--overwrite")
