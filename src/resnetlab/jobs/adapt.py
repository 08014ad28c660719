"""Adapt a trained model to a new domain without labels: ``resnetlab adapt CHECKPOINT --data SPEC``.

The checkpoint's BatchNorm statistics are re-estimated on the new images (AdaBN), optionally after TENT has trained
the BN affine parameters to make the predictions confident (:mod:`resnetlab.engine.adaptation`), and the result is
written as a NEW checkpoint of the same format, beside the run (``RUN/adapted/<data>-<method>.pt``), with
``meta["adaptation"]`` saying how it was made. ``evaluate``, ``predict``, ``export`` and ``serve`` take it like any
checkpoint. The input checkpoint is only read.

The images are prepared exactly as the checkpoint's preprocessing record says (ROI crop where the source has boxes,
resize, contrast, normalization), without augmentation: the statistics must be those of what the model will see.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from resnetlab._version import __version__
from resnetlab.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    preprocessing_from_meta,
    resolve_checkpoint_file,
    validate_meta,
)
from resnetlab.config import RunConfig
from resnetlab.data.build import SplitData, auto_workers, load_split
from resnetlab.data.formats.common import describe_paths
from resnetlab.data.pipeline import IN_MEMORY_MAX_SIZE, FileBatches, FileImageDataset, TensorBatches
from resnetlab.data.preprocessing import Preprocessing
from resnetlab.data.unlabelled import open_unlabelled
from resnetlab.deployment.records import file_sha256
from resnetlab.engine.adaptation import adapt_batchnorm, batchnorm_layers, mean_entropy, tent
from resnetlab.errors import ConfigError, DataError
from resnetlab.jobs.evaluate import dataset_file_name, evaluation_data_config
from resnetlab.utils.io import torch_save

_logger = logging.getLogger(__name__)  # the default log of functions that take a `log` callable

METHODS = ("adabn", "tent")
DEVICES = ("auto", "cpu", "cuda")
TENT_LR = 1e-3  # TENT's Adam rate for CIFAR-10-C (Wang et al. 2021, section 4)
# Fewer images than this give BatchNorm statistics that are mostly noise: a handful of photos is not a domain.
MIN_IMAGES = 16
PROGRESS_LINES = 10  # TENT logs its loss about this many times


@dataclass(frozen=True)
class AdaptOutcome:
    """The adapted checkpoint and its ``meta["adaptation"]`` record."""

    checkpoint: Path
    record: dict[str, Any]


def adapted_path(checkpoint_file: Path, spec: str, method: str, out: Path | None) -> Path:
    """Where the adapted checkpoint goes: ``out`` if it names a ``.pt`` file; inside ``out`` if it is a folder (or a
    path without a suffix); by default ``RUN/adapted/<data>-<method>.pt`` beside the run's ``checkpoints/`` (or
    ``adapted/`` beside a checkpoint file kept elsewhere)."""
    file_name = f"{dataset_file_name(spec)}-{method}.pt"
    if out is None:
        resolved = checkpoint_file.resolve()
        run_dir = resolved.parent.parent if resolved.parent.name == "checkpoints" else resolved.parent
        return run_dir / "adapted" / file_name
    out = Path(out)
    if out.is_dir() or not out.suffix:
        return out / file_name
    if out.suffix != ".pt":
        raise ConfigError(f"--out '{out}': name a .pt file or a folder")
    return out


def check_output(path: Path, checkpoint_file: Path, *, overwrite: bool) -> None:
    """Never the input checkpoint; an existing file only with ``overwrite``."""
    if path.exists() and path.resolve() == checkpoint_file.resolve():
        raise ConfigError(f"--out '{path}' is the checkpoint being adapted; adapt writes a new checkpoint and never "
                          "changes its input: choose another file")
    if path.is_dir():
        raise ConfigError(f"--out '{path}' is a folder; name the .pt file to write")
    if path.exists() and not overwrite:
        raise ConfigError(f"'{path}' already exists; add --overwrite to replace it, or choose another --out")


def choose_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise ConfigError(f"--device '{device}': choose auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA GPU is available; use --device cpu or auto")
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


class _Passes:
    """Shuffled passes over the images: each iteration is a new epoch of a :class:`FileBatches` (whose order is a
    function of its seed and the epoch) or a new permutation of :class:`TensorBatches` (drawn from torch's generator,
    which the job seeds inside a forked RNG state)."""

    def __init__(self, batches: TensorBatches | FileBatches):
        self.batches, self.epoch = batches, 0

    def __iter__(self):
        if isinstance(self.batches, FileBatches):
            self.batches.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _readable(table, prep: Preprocessing, *, on_bad_image: str, log: Callable[[str], None]) -> SplitData:
    """The images ready for batching (small inputs decoded once into memory, as evaluation does; large ones checked
    and read by DataLoader workers later), unreadable ones stopping the job or left out by ``on_bad_image``."""
    split = load_split(table, prep, in_memory=prep.input_size <= IN_MEMORY_MAX_SIZE, on_bad_image="skip",
                       name="adapt")
    if split.bad:
        listed = describe_paths([b.path for b in split.bad])
        if on_bad_image == "error":
            raise DataError(f"{len(split.bad)} unreadable image(s) in --data: {listed}. Fix or remove them, or pass "
                            "data.on_bad_image=skip to adapt without them")
        log(f"data.on_bad_image=skip: left out {len(split.bad)} unreadable image(s): {listed}")
    return split


def _passes(split: SplitData, prep: Preprocessing, batch_size: int, seed: int) -> _Passes:
    """Shuffled batches of the images, prepared as recorded and not augmented."""
    if split.images is not None:
        return _Passes(TensorBatches(split.images, split.labels, batch_size, mean=prep.mean, std=prep.std,
                                     shuffle=True))
    dataset = FileImageDataset(split.table, prep)  # no transform: resize_to_input as recorded
    return _Passes(FileBatches(dataset, batch_size, mean=prep.mean, std=prep.std, shuffle=True, drop_last=False,
                               num_workers=min(auto_workers(), 4), seed=seed))


def _batch_size(requested: int | None, default: int, count: int, log: Callable[[str], None]) -> int:
    """At least two batches' worth of images: BN statistics of one batch that is the whole set are no estimate of
    a domain, and TENT needs several steps."""
    if count < MIN_IMAGES:
        raise DataError(f"--data holds {count} readable image(s); adaptation needs at least {MIN_IMAGES} images of the "
                        "new domain (a few hundred give stable BatchNorm statistics)")
    if requested is not None:
        if requested < 2:
            raise ConfigError(f"--batch-size {requested}: BatchNorm statistics need batches of at least 2 images")
        if count < 2 * requested:
            raise ConfigError(f"--batch-size {requested} with {count} images: give a batch size of at most "
                              f"{count // 2} (at least two batches), or more images")
        return requested
    size = min(default, count // 2)
    if size < default:
        log(f"batch size {size} (the run's {default} would leave fewer than two batches of the {count} images)")
    return size


def _adapted_meta(meta: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    if meta.get("adaptation"):  # adapting an adapted model: its own record stays, one level down
        record = {**record, "previous": meta["adaptation"]}
    new = {**meta, "adaptation": record}
    calibration = meta.get("calibration")
    if calibration:
        # The temperature and operating point were fitted to the source model's validation logits; they are kept
        # (a reasonable default), and marked, so that nobody mistakes them for a fit on the adapted model.
        new["calibration"] = {**calibration, "fitted_before_adaptation": True}
    return new


def adapt_job(checkpoint: Path, data_spec: str, *, out: Path | None = None, method: str = "adabn",
              steps: int | None = None, lr: float | None = None, batch_size: int | None = None, seed: int = 0,
              device: str = "auto", overrides: list[str] | None = None, overwrite: bool = False,
              prior_strength: float = 0.0, log: Callable[[str], None] = _logger.info) -> AdaptOutcome:
    """Adapt ``checkpoint`` (a file or run directory) to the images of ``data_spec`` and write a new checkpoint.

    Args:
        checkpoint: A checkpoint or a run directory (its ``checkpoints/best.pt``).
        data_spec: The new domain: ``folder:PATH`` of images (no class folders needed), or any labelled spec, whose
            labels are ignored.
        out: The new checkpoint (a ``.pt`` file or a folder); default ``RUN/adapted/<data>-<method>.pt``.
        method: ``adabn`` (BN statistics only) or ``tent`` (entropy minimisation of the BN affine parameters, then
            BN statistics).
        steps: TENT optimizer steps (default: one pass over the images).
        lr: TENT learning rate (Adam; default 1e-3).
        batch_size: Images per batch (default: the run's training batch size, at most half the images).
        seed: Seeds the order of the images.
        device: ``auto``, ``cpu`` or ``cuda``.
        overrides: ``data.*`` settings for reading the data (``data.on_bad_image=skip`` ...); the preprocessing is
            the checkpoint's.
        overwrite: Replace an existing output file.
        prior_strength: How many images the model's own BatchNorm statistics count as beside the new ones
            (Schneider et al. 2020); 0 replaces them (AdaBN). A few hundred keeps a small or class-skewed set of new
            images from overriding them.
        log: Where progress lines go.
    """
    if method not in METHODS:
        raise ConfigError(f"--method '{method}': choose adabn or tent")
    if method == "adabn" and (steps is not None or lr is not None):
        raise ConfigError("--steps and --lr apply to --method tent (AdaBN estimates statistics, without a gradient)")
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps {steps}: give at least 1")
    if not (prior_strength >= 0 and math.isfinite(prior_strength)):
        raise ConfigError(f"--prior {prior_strength}: give a number of images >= 0 (0: the new statistics alone)")
    if lr is not None and not lr > 0:
        raise ConfigError(f"--lr {lr}: give a positive learning rate, e.g. 0.001")
    for text in overrides or []:
        if not text.startswith("data."):
            raise ConfigError(f"override '{text}': adapt takes data.* settings only (e.g. data.on_bad_image=skip)")
    checkpoint_file = resolve_checkpoint_file(checkpoint)
    out_file = adapted_path(checkpoint_file, data_spec, method, out)
    check_output(out_file, checkpoint_file, overwrite=overwrite)
    run_device = choose_device(device)

    source_sha256 = file_sha256(checkpoint_file)
    state = load_checkpoint(checkpoint_file)
    model, meta = model_from_checkpoint(state)
    if not any(layer.track_running_stats for layer in batchnorm_layers(model)):
        raise ConfigError(f"'{checkpoint_file}': model {meta['model']['name']} has no BatchNorm layers, so there is "
                          "nothing to adapt (AdaBN and TENT change BatchNorm layers only); adapt a model with "
                          "BatchNorm, such as the resnet family (`resnetlab models`)")
    prep = preprocessing_from_meta(meta)
    saved = RunConfig.model_validate(meta["config"])
    # The run's data settings read the new images (format options, on_bad_image), but not its class subset: that
    # selects by label, and the new domain's labels (if any) are not used.
    saved = saved.model_copy(update={"data": saved.data.model_copy(update={"classes": None})})
    data_cfg = evaluation_data_config(saved, data_spec, overrides)
    images = open_unlabelled(data_cfg)
    for note in images.notes:
        log(note)

    with torch.random.fork_rng(devices=[]):  # the order of the images, without touching the caller's stream
        torch.default_generator.manual_seed(seed)  # the CPU generator alone: randperm draws from it
        split = _readable(images.table, prep, on_bad_image=data_cfg.on_bad_image, log=log)
        size = _batch_size(batch_size, saved.data.batch_size, len(split.table), log)
        batches = _passes(split, prep, size, seed)
        model = model.float().to(run_device)
        entropy_before = mean_entropy(model, batches)
        tent_steps = 0
        if method == "tent":
            tent_steps = steps if steps is not None else len(batches)
            every = max(1, tent_steps // PROGRESS_LINES)

            def progress(step: int, loss: float) -> None:
                if step % every == 0 or step == tent_steps:
                    log(f"tent step {step}/{tent_steps}: mean entropy {loss:.4f}")

            log(f"TENT: {tent_steps} Adam step(s) at lr {lr or TENT_LR:g} on the BatchNorm weights and biases, "
                f"batches of {size}")
            tent(model, batches, tent_steps, lr or TENT_LR, progress=progress)
        estimated = adapt_batchnorm(model, batches, prior_strength=prior_strength)
        entropy_after = mean_entropy(model, batches)
    prior = (f", the model's own counted as {prior_strength:g} images beside them" if prior_strength else "")
    log(f"BatchNorm statistics of {len(batchnorm_layers(model))} layers re-estimated on {estimated} images "
        f"(AdaBN{prior}); "
        f"mean prediction entropy on them {entropy_before:.4f} (source model) -> {entropy_after:.4f} (adapted)")

    record = {
        "method": method, "data": images.spec, "num_images": estimated, "labels_used": False,
        "steps": tent_steps, "lr": (lr or TENT_LR) if method == "tent" else None, "batch_size": size, "seed": seed,
        "prior_strength": prior_strength, "source_checkpoint": str(checkpoint_file.resolve()), "source_checkpoint_sha256": source_sha256,
        "mean_entropy_before": round(entropy_before, 6), "mean_entropy_after": round(entropy_after, 6),
        "resnetlab_version": __version__, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if meta.get("calibration"):
        log("note: the checkpoint's temperature and operating point were fitted before adaptation; they are kept "
            "and marked so (meta.calibration.fitted_before_adaptation)")
    source_weights = state["model"]
    weights = {name: tensor.detach().cpu().to(source_weights[name].dtype) if name in source_weights else tensor.cpu()
               for name, tensor in model.state_dict().items()}
    new_meta = _adapted_meta(meta, record)
    validate_meta(new_meta, out_file)  # what evaluate, predict and serve check first: fail here, before writing
    torch_save({"model": weights, "meta": new_meta}, out_file)
    log(f"adapted checkpoint written to {out_file}")
    return AdaptOutcome(out_file, new_meta["adaptation"])
