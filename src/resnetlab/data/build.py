"""Everything a run needs from its data, built from the config: source, splits, preprocessing and batches."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from resnetlab.config import RunConfig
from resnetlab.data.augment import (
    BatchAugment,
    MirrorSwap,
    batch_stage,
    build_file_transform,
    build_per_image,
    get_policy,
)
from resnetlab.data.datasets import open_dataset
from resnetlab.data.pipeline import (
    IN_MEMORY_MAX_SIZE,
    BadImage,
    FileBatches,
    FileImageDataset,
    TensorBatches,
    channel_stats,
    check_files_readable,
    decode_split,
    file_stats,
    report_bad_images,
)
from resnetlab.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from resnetlab.data.records import DatasetSource, SampleTable
from resnetlab.data.splits import SplitPlan, plan_data_splits
from resnetlab.errors import ConfigError, DataError

_logger = logging.getLogger(__name__)  # the default log of functions that take a `log` callable


@dataclass
class RunData:
    source: DatasetSource
    plan: SplitPlan
    prep: Preprocessing
    train: TensorBatches | FileBatches
    val: TensorBatches | FileBatches
    test: TensorBatches | FileBatches
    train_counts: np.ndarray
    in_memory: bool
    bad: dict[str, list[BadImage]] = field(default_factory=dict)


def base_preprocessing(cfg: RunConfig) -> Preprocessing:
    d = cfg.data
    return Preprocessing(input_size=d.input_size, resize=d.resize, crop_pct=d.crop_pct,
                         interpolation=d.interpolation, roi_crop=d.roi_crop, contrast=d.contrast)


def uses_memory(cfg: RunConfig) -> bool:
    mode = cfg.data.in_memory
    return mode == "always" or (mode == "auto" and cfg.data.input_size <= IN_MEMORY_MAX_SIZE)


def auto_workers() -> int:
    return min(8, max(1, (os.cpu_count() or 2)))


def build_run_data(cfg: RunConfig, *, rank: int = 0, world_size: int = 1, pin_memory: bool = False,
                   log: Callable[[str], None] = _logger.info, source: DatasetSource | None = None,
                   plan: SplitPlan | None = None,
                   normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
                   absent_classes_ok: bool = False) -> RunData:
    """``source`` and ``plan`` may be given ready-made (k-fold tuning passes each fold's plan); by default they are
    read and split from ``cfg.data``. Normalization statistics come from ``plan.train`` alone, unless
    ``normalization`` gives them as ``(mean, std)`` (a fine-tuned model keeps those of its checkpoint).

    Every class needs training images, except with ``absent_classes_ok`` a class without a single image in any
    split: data expressed in a trained model's class list (fine-tuning) holds only some of its classes.
    """
    source = source or open_dataset(cfg.data)
    for note in source.notes:
        log(note)
    if plan is None:
        plan = plan_data_splits(source, cfg.data)
    log(f"split: {plan.strategy}; train {len(plan.train)}, val {len(plan.val)}, test {len(plan.test)} images "
        f"(val: {plan.sources['val']}; test: {plan.sources['test']})")
    prep = base_preprocessing(cfg)
    in_memory = uses_memory(cfg)
    # Rows the reader could not use (on_bad_image=skip; with error open_dataset has stopped already).
    bad: dict[str, list[BadImage]] = {name: list(rows) for name, rows in source.rejected.items()}
    policy = get_policy(cfg.augment.preset, random_erasing=cfg.augment.random_erasing)
    mirror = _mirror_swap(cfg, source, policy, log)
    num_classes = source.num_classes

    splits = {}
    for name in ("train", "val", "test"):
        splits[name] = load_split(getattr(plan, name), prep, in_memory=in_memory, on_bad_image=cfg.data.on_bad_image,
                                  name=name)
        bad[name] = bad.get(name, []) + splits[name].bad
        setattr(plan, name, splits[name].table)  # skip mode: the plan's tables follow what can be read
    if normalization is not None:
        mean, std = normalization
    elif in_memory:
        mean, std = _normalization(cfg, lambda: channel_stats(splits["train"].images))
    else:
        mean, std = _normalization(cfg, lambda: file_stats(plan.train, prep, seed=cfg.data.split_seed))
    prep = Preprocessing(**{**prep.__dict__, "mean": tuple(mean), "std": tuple(std)})
    log(f"normalization ({'given' if normalization is not None else cfg.data.normalize}): mean {list(prep.mean)}, "
        f"std {list(prep.std)}")

    train_counts = plan.train.class_counts(num_classes)
    missing = train_counts == 0
    if absent_classes_ok:
        missing &= sum(getattr(plan, name).class_counts(num_classes) for name in ("train", "val", "test")) > 0
    empty = [source.class_names[i] for i in np.flatnonzero(missing)]
    if empty:
        raise DataError(f"class(es) {empty} have no training images after splitting; add images or drop the class "
                        "with data.classes")
    weights = None
    if cfg.data.sampler != "random":
        # a class's share of the draw is its count times its images' weight: 1/n_c makes the shares equal,
        # 1/sqrt(n_c) makes them proportional to sqrt(n_c)
        per_class = 1.0 / train_counts if cfg.data.sampler == "weighted" else 1.0 / np.sqrt(train_counts)
        weights = torch.as_tensor(per_class[plan.train.labels], dtype=torch.double)

    workers = None if in_memory else (cfg.data.num_workers if cfg.data.num_workers is not None else auto_workers())
    train = training_batches(cfg, splits["train"], prep, policy, mirror, sample_weights=weights, rank=rank,
                             world_size=world_size, pin_memory=pin_memory, workers=workers)
    val, test = (evaluation_batches(splits[name], prep, cfg.data.eval_batch_size, rank=rank, world_size=world_size,
                                    pin_memory=pin_memory, workers=workers, seed=cfg.train.seed)
                 for name in ("val", "test"))
    return RunData(source=source, plan=plan, prep=prep, train=train, val=val, test=test,
                   train_counts=train_counts, in_memory=in_memory, bad=bad)


@dataclass
class SplitData:
    """One split as the pipeline holds it: its table without the unreadable files, and in memory its decoded
    images (uint8) and labels."""

    table: SampleTable
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    bad: list[BadImage] = field(default_factory=list)


def load_split(table: SampleTable, prep: Preprocessing, *, in_memory: bool, on_bad_image: str,
               name: str) -> SplitData:
    """A split made ready for batching in one call: decoded into memory (cached) or its files checked, the
    unreadable ones reported by ``on_bad_image`` (stop, or skip and list) and left out."""
    threads = torch.get_num_threads()
    if in_memory:
        decoded = decode_split(table, prep, threads=threads)
        report_bad_images(decoded.bad, on_bad_image, name)
        return SplitData(table.subset(decoded.kept) if decoded.bad else table, decoded.images, decoded.labels,
                         decoded.bad)
    unreadable = check_files_readable(table, threads=max(2, threads))
    report_bad_images(unreadable, on_bad_image, name)
    if unreadable:
        broken = {b.path for b in unreadable}
        table = table.subset([i for i, p in enumerate(table.paths) if p not in broken])
    return SplitData(table, bad=unreadable)


def training_batches(cfg: RunConfig, split: SplitData, prep: Preprocessing, policy, mirror: MirrorSwap | None, *,
                     sample_weights: torch.Tensor | None = None, rank: int = 0, world_size: int = 1,
                     pin_memory: bool = False, workers: int | None = None) -> TensorBatches | FileBatches:
    """The training batches of a split, augmented as ``cfg`` says: in memory per batch, from files per image in
    ``workers`` DataLoader workers (default: ``data.num_workers``, else one per core up to 8)."""
    batch = cfg.data.batch_size
    drop_last = len(split.table) > batch
    if split.images is not None:
        augment = None if cfg.augment.preset == "none" and not policy.erasing else BatchAugment(policy)
        per_image = build_per_image(randaugment=cfg.augment.randaugment, trivialaugment=cfg.augment.trivialaugment)
        return TensorBatches(split.images, split.labels, batch, shuffle=True, drop_last=drop_last, augment=augment,
                             sample_weights=sample_weights, per_image=per_image, mirror=mirror, mean=prep.mean,
                             std=prep.std, rank=rank, world_size=world_size)
    if workers is None:
        workers = cfg.data.num_workers if cfg.data.num_workers is not None else auto_workers()
    transform = build_file_transform(policy, prep.input_size, randaugment=cfg.augment.randaugment,
                                     trivialaugment=cfg.augment.trivialaugment)
    return FileBatches(FileImageDataset(split.table, prep, transform, seed=cfg.train.seed), batch, shuffle=True,
                       drop_last=drop_last, sample_weights=sample_weights, batch_augment=batch_stage(policy),
                       mirror=mirror, mean=prep.mean, std=prep.std, num_workers=workers, pin_memory=pin_memory,
                       rank=rank, world_size=world_size, seed=cfg.train.seed)


def evaluation_batches(split: SplitData, prep: Preprocessing, batch_size: int, *, rank: int = 0, world_size: int = 1,
                       pin_memory: bool = False, workers: int | None = None,
                       seed: int = 0) -> TensorBatches | FileBatches:
    """The batches of a split as evaluation sees it: in order, every image, no augmentation."""
    if split.images is not None:
        return TensorBatches(split.images, split.labels, batch_size, mean=prep.mean, std=prep.std, rank=rank,
                             world_size=world_size)
    return FileBatches(FileImageDataset(split.table, prep), batch_size, shuffle=False, drop_last=False,
                       mean=prep.mean, std=prep.std, num_workers=auto_workers() if workers is None else workers,
                       pin_memory=pin_memory, rank=rank, world_size=world_size, seed=seed)


def _mirror_swap(cfg: RunConfig, source: DatasetSource, policy, log: Callable[[str], None]) -> MirrorSwap | None:
    pairs = ", ".join(f"{a}/{b}" for a, b in source.mirror_pairs)
    if not cfg.augment.mirror_swap:
        if policy.hflip and source.mirror_pairs:
            log(f"warning: augment.preset={cfg.augment.preset} flips images horizontally, but classes {pairs} are "
                "mirror images of each other, so their flipped images get the wrong label; use a preset without "
                "flips (signs), optionally with augment.mirror_swap=true")
        return None
    if policy.hflip:
        raise ConfigError(f"augment.mirror_swap=true flips mirror-image classes and swaps their labels, but "
                          f"augment.preset={cfg.augment.preset} also flips every image without relabelling; "
                          "choose a preset without flips (signs or none)")
    mirror = MirrorSwap.for_classes(source.class_ids, source.mirror_pairs)
    if mirror is None:
        raise ConfigError(f"augment.mirror_swap=true, but {source.spec} has no pair of mirror-image classes "
                          "(GTSRB 33/34, 36/37, 38/39, both classes of a pair present); turn it off")
    log(f"mirror swap: flipping half the samples of classes {pairs} into their mirror class")
    return mirror


def _normalization(cfg: RunConfig, compute: Callable[[], tuple]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if cfg.data.normalize == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if cfg.data.normalize == "none":
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return compute()


def eval_batches_for_table(table: SampleTable, prep: Preprocessing, batch_size: int, *, on_bad_image: str = "error",
                           split: str = "eval") -> tuple[TensorBatches | FileBatches, SampleTable, list[BadImage]]:
    """Evaluation batches for any table with a recorded preprocessing (used by `evaluate` on new data): the batches,
    the table of the images in them, and the images left out as unreadable (``on_bad_image=skip``)."""
    loaded = load_split(table, prep, in_memory=prep.input_size <= IN_MEMORY_MAX_SIZE, on_bad_image=on_bad_image,
                        name=split)
    return evaluation_batches(loaded, prep, batch_size), loaded.table, loaded.bad
