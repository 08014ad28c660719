"""Everything a run needs from its data, built from the config: source, splits, preprocessing and batches."""

from __future__ import annotations

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
from resnetlab.data.splits import SplitPlan, plan_splits
from resnetlab.errors import ConfigError, DataError


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
                   log: Callable[[str], None] = print, source: DatasetSource | None = None,
                   plan: SplitPlan | None = None) -> RunData:
    """``source`` and ``plan`` may be given ready-made (k-fold tuning passes each fold's plan); by default they are
    read and split from ``cfg.data``. Normalization statistics always come from ``plan.train`` alone."""
    source = source or open_dataset(cfg.data)
    for note in source.notes:
        log(note)
    if plan is None:
        plan = plan_splits(source.splits, strategy=cfg.data.split, val_fraction=cfg.data.val_fraction,
                           test_fraction=cfg.data.test_fraction, seed=cfg.data.split_seed, group_kind=source.group_kind)
    log(f"split: {plan.strategy}; train {len(plan.train)}, val {len(plan.val)}, test {len(plan.test)} images "
        f"(val: {plan.sources['val']}; test: {plan.sources['test']})")
    prep = base_preprocessing(cfg)
    in_memory = uses_memory(cfg)
    # Rows the reader could not use (on_bad_image=skip; with error open_dataset has stopped already).
    bad: dict[str, list[BadImage]] = {name: list(rows) for name, rows in source.rejected.items()}
    policy = get_policy(cfg.augment.preset, random_erasing=cfg.augment.random_erasing)
    mirror = _mirror_swap(cfg, source, policy, log)
    num_classes = source.num_classes

    if in_memory:
        decoded = {}
        for name in ("train", "val", "test"):
            table = getattr(plan, name)
            decoded[name] = decode_split(table, prep, threads=torch.get_num_threads())
            report_bad_images(decoded[name].bad, cfg.data.on_bad_image, name)
            bad[name] = bad.get(name, []) + decoded[name].bad
            if decoded[name].bad:  # skip mode: the plan's tables follow what was decoded
                setattr(plan, name, table.subset(decoded[name].kept))
        mean, std = _normalization(cfg, lambda: channel_stats(decoded["train"].images))
    else:
        for name in ("train", "val", "test"):
            table = getattr(plan, name)
            unreadable = check_files_readable(table, threads=max(2, torch.get_num_threads()))
            report_bad_images(unreadable, cfg.data.on_bad_image, name)
            bad[name] = bad.get(name, []) + unreadable
            if unreadable:
                broken = {b.path for b in unreadable}
                setattr(plan, name, table.subset([i for i, p in enumerate(table.paths) if p not in broken]))
        mean, std = _normalization(cfg, lambda: file_stats(plan.train, prep, seed=cfg.data.split_seed))
    prep = Preprocessing(**{**prep.__dict__, "mean": tuple(mean), "std": tuple(std)})
    log(f"normalization ({cfg.data.normalize}): mean {list(prep.mean)}, std {list(prep.std)}")

    train_counts = plan.train.class_counts(num_classes)
    empty = [source.class_names[i] for i in np.flatnonzero(train_counts == 0)]
    if empty:
        raise DataError(f"class(es) {empty} have no training images after splitting; add images or drop the class "
                        "with data.classes")
    weights = None
    if cfg.data.sampler == "weighted":
        weights = torch.as_tensor(1.0 / train_counts[plan.train.labels], dtype=torch.double)

    batch, eval_batch = cfg.data.batch_size, cfg.data.eval_batch_size
    if in_memory:
        augment = None if cfg.augment.preset == "none" and not policy.erasing else BatchAugment(policy)
        per_image = build_per_image(randaugment=cfg.augment.randaugment, trivialaugment=cfg.augment.trivialaugment)
        common = dict(mean=prep.mean, std=prep.std, rank=rank, world_size=world_size)
        train = TensorBatches(decoded["train"].images, decoded["train"].labels, batch, shuffle=True,
                              drop_last=len(plan.train) > batch, augment=augment, sample_weights=weights,
                              per_image=per_image, mirror=mirror, **common)
        val = TensorBatches(decoded["val"].images, decoded["val"].labels, eval_batch, **common)
        test = TensorBatches(decoded["test"].images, decoded["test"].labels, eval_batch, **common)
    else:
        workers = cfg.data.num_workers if cfg.data.num_workers is not None else auto_workers()
        transform = build_file_transform(policy, prep.input_size, randaugment=cfg.augment.randaugment,
                                         trivialaugment=cfg.augment.trivialaugment)
        common = dict(mean=prep.mean, std=prep.std, num_workers=workers, pin_memory=pin_memory, rank=rank,
                      world_size=world_size, seed=cfg.train.seed)
        train = FileBatches(FileImageDataset(plan.train, prep, transform, seed=cfg.train.seed), batch, shuffle=True,
                            drop_last=len(plan.train) > batch, sample_weights=weights,
                            batch_augment=batch_stage(policy), mirror=mirror, **common)
        val = FileBatches(FileImageDataset(plan.val, prep), eval_batch, shuffle=False, drop_last=False, **common)
        test = FileBatches(FileImageDataset(plan.test, prep), eval_batch, shuffle=False, drop_last=False, **common)
    return RunData(source=source, plan=plan, prep=prep, train=train, val=val, test=test,
                   train_counts=train_counts, in_memory=in_memory, bad=bad)


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
    if prep.input_size <= IN_MEMORY_MAX_SIZE:
        decoded = decode_split(table, prep, threads=torch.get_num_threads())
        report_bad_images(decoded.bad, on_bad_image, split)
        return (TensorBatches(decoded.images, decoded.labels, batch_size, mean=prep.mean, std=prep.std),
                table.subset(decoded.kept), decoded.bad)
    bad = check_files_readable(table)
    report_bad_images(bad, on_bad_image, split)
    if bad:
        broken = {b.path for b in bad}
        table = table.subset([i for i, p in enumerate(table.paths) if p not in broken])
    return (FileBatches(FileImageDataset(table, prep), batch_size, mean=prep.mean, std=prep.std, shuffle=False,
                        drop_last=False, num_workers=auto_workers()), table, bad)
