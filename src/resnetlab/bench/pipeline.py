"""``resnetlab data profile``: is the input pipeline or the model the bottleneck of a recipe's training?

Both are measured in one process, one after the other, with the recipe's settings:

* **Per-file stages**, one thread, on a seeded sample of training files: *read* (the file's bytes), *decode* (to
  RGB), *crop* (ROI crop and resize to the input size; for file pipelines the first transform, a resize or
  RandomResizedCrop).
* **What an epoch costs**. In memory (input up to 64 px) the files above are decoded once and cached, and each
  epoch only runs *augment* (RandAugment per image if asked, the preset on the whole batch, mirror swap) and
  *collate* (gather samples, normalize) -- the exact code of :class:`~resnetlab.data.pipeline.TensorBatches`, on
  the same thread as training. File pipelines run *augment* (the rest of the v2 transform) per image in workers and
  *collate* (stack, batch erasing, normalize) in the main process; their delivered rate is also measured end to end
  through the run's DataLoader with its workers.
* **The training step** of the recipe's model: forward, loss, backward and optimizer step at the recipe's batch
  size, with the runtime the engine chooses (bf16 autocast and channels_last where supported).

The pipeline rate divided by the training rate is the margin: above 1 the model is the bottleneck. For in-memory
pipelines, which run on the training thread, the report also gives the share of each step spent on data.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from resnetlab.config import RunConfig
from resnetlab.data.augment import MirrorSwap, build_file_transform, get_policy
from resnetlab.data.build import (
    SplitData,
    auto_workers,
    base_preprocessing,
    evaluation_batches,
    training_batches,
    uses_memory,
)
from resnetlab.data.datasets import open_dataset
from resnetlab.data.preprocessing import crop_to_roi, load_image, pil_to_uint8, resize_to_input
from resnetlab.data.splits import plan_data_splits
from resnetlab.errors import DataError


@dataclass
class Stage:
    name: str
    microseconds_per_image: float
    note: str = ""

    @property
    def images_per_second(self) -> float:
        return 1e6 / self.microseconds_per_image if self.microseconds_per_image > 0 else float("inf")


@dataclass
class ProfileResult:
    spec: str
    recipe: str
    model: str
    input_size: int
    batch_size: int
    pipeline: str  # "in-memory" or "files, N workers"
    stages: list[Stage]
    pipeline_images_per_second: float  # what the pipeline delivers per epoch
    train_images_per_second: float  # what the training step consumes
    one_off_images_per_second: float | None  # in memory: the decode done once (then cached)
    loader_images_per_second: float | None  # files: measured through the DataLoader with its workers
    runtime: str
    conditions: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.pipeline_images_per_second / self.train_images_per_second

    @property
    def bottleneck(self) -> str:
        return "model" if self.ratio >= 1 else "data pipeline"

    def verdict(self) -> str:
        text = (f"the pipeline delivers {self.pipeline_images_per_second:,.0f} img/s and the training step consumes "
                f"{self.train_images_per_second:,.0f} img/s: {self.ratio:.1f}x, so the {self.bottleneck} is the "
                "bottleneck")
        if self.pipeline == "in-memory":
            share = self.train_images_per_second / (self.pipeline_images_per_second + self.train_images_per_second)
            text += f"; data work takes {share:.0%} of each training step (same thread)"
        return text

    def to_dict(self) -> dict:
        record = asdict(self)
        for stage, item in zip(self.stages, record["stages"]):
            item["images_per_second"] = round(stage.images_per_second, 1)
        record.update(ratio=round(self.ratio, 2), bottleneck=self.bottleneck, verdict=self.verdict())
        return record


def _timed(function: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def profile_pipeline(cfg: RunConfig, *, files: int = 256, batches: int = 20, train_steps: int = 10,
                     log: Callable[[str], None] = lambda message: None) -> ProfileResult:
    from resnetlab.engine.runtime import resolve_runtime

    d = cfg.data
    source = open_dataset(d)
    plan = plan_data_splits(source, d)
    table = plan.train
    if len(table) == 0:
        raise DataError(f"{source.spec}: the training split is empty; nothing to profile")
    runtime = resolve_runtime(cfg.train)  # sets the thread count the run would use
    prep = base_preprocessing(cfg)
    in_memory = uses_memory(cfg)
    policy = get_policy(cfg.augment.preset, random_erasing=cfg.augment.random_erasing)
    mirror = (MirrorSwap.for_classes(source.class_ids, source.mirror_pairs)
              if cfg.augment.mirror_swap and source.mirror_pairs else None)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(len(table), size=min(files, len(table)), replace=False))
    file_transform = build_file_transform(policy, prep.input_size, randaugment=cfg.augment.randaugment,
                                          trivialaugment=cfg.augment.trivialaugment)
    first_step, later_steps = file_transform.transforms[0], file_transform.transforms[1:]
    log(f"timing read, decode and crop on {len(sample)} training files (1 thread)")

    def crop(image, roi):
        return crop_to_roi(image, roi) if prep.roi_crop else image

    read_s = decode_s = crop_s = augment_s = 0.0
    prepared, labels = [], []
    for i in sample.tolist():
        path = table.paths[i]
        _, seconds = _timed(lambda: open(path, "rb").read())
        read_s += seconds

        roi = None if table.rois is None else table.rois[i]
        try:  # the pipeline's own decoding (any mode to RGB, upright), with the crop timed on its own below
            image, seconds = _timed(lambda path=path, roi=roi: load_image(path, roi, roi_crop=False))
        except DataError as err:
            raise DataError(f"{err}; run `resnetlab data inspect` to list bad files") from None
        decode_s += seconds
        if in_memory:
            resized, seconds = _timed(lambda image=image, roi=roi: resize_to_input(crop(image, roi), prep))
            crop_s += seconds
            prepared.append(pil_to_uint8(resized))
        else:
            cropped, seconds = _timed(lambda image=image, roi=roi: first_step(crop(image, roi)))
            crop_s += seconds
            if later_steps:
                tensor, seconds = _timed(lambda cropped=cropped: _compose(later_steps, cropped))
                augment_s += seconds
                prepared.append(tensor)
            else:
                prepared.append(pil_to_uint8(cropped))
        labels.append(int(table.labels[i]))
    n = len(sample)
    stages = [Stage("read", read_s / n * 1e6, "file bytes"), Stage("decode", decode_s / n * 1e6, "to RGB"),
              Stage("crop", crop_s / n * 1e6, "ROI crop + resize" if in_memory else type(first_step).__name__)]
    images = torch.stack(prepared)
    targets = torch.as_tensor(labels, dtype=torch.int64)
    batch_size = cfg.data.batch_size
    # timing does not depend on the normalization's values
    timing_prep = dataclasses.replace(prep, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))

    loader_rate = one_off = None
    if in_memory:
        one_off = 1e6 / sum(s.microseconds_per_image for s in stages)
        loaded = SplitData(table.subset(sample), images, targets)
        stream = training_batches(cfg, loaded, timing_prep, policy, mirror)  # what the run's training draws
        gather = evaluation_batches(loaded, timing_prep, batch_size)  # no augmentation: collate alone
        full_s, collate_s = 0.0, 0.0
        for _ in range(2):  # warm-up
            stream.transform(images[:batch_size], targets[:batch_size])
        for _ in range(batches):
            index = torch.randint(0, len(images), (batch_size,))
            collate_s += _timed(lambda: gather.transform(images[index], targets[index]))[1]
            full_s += _timed(lambda: stream.transform(images[index], targets[index]))[1]
        total = batches * batch_size
        collate_us = collate_s / total * 1e6
        full_us = full_s / total * 1e6  # gather + augment + normalize: the real per-batch work of an epoch
        stages.append(Stage("augment", max(full_us - collate_us, 0.0), _augment_note(cfg, mirror)
                            + f"; batches of {batch_size}, per-sample parameters"))
        stages.append(Stage("collate", collate_us, "gather from the uint8 tensor + normalize"))
        pipeline_rate = 1e6 / full_us
        pipeline = "in-memory"
    else:
        stages.append(Stage("augment", augment_s / n * 1e6, _augment_note(cfg, mirror)))
        post = training_batches(cfg, SplitData(table.subset([])), timing_prep, policy, mirror, workers=0)
        collate_s = 0.0
        for _ in range(batches):
            index = torch.randint(0, len(images), (batch_size,))
            items = [images[j] for j in index.tolist()]
            collate_s += _timed(lambda: post.transform(torch.stack(items), targets[index]))[1]
        stages.append(Stage("collate", collate_s / (batches * batch_size) * 1e6, "stack + batch erasing + normalize"))
        per_image_us = sum(s.microseconds_per_image for s in stages)
        workers = cfg.data.num_workers if cfg.data.num_workers is not None else auto_workers()
        loader_rate = _loader_rate(cfg, table, timing_prep, workers, policy, mirror,
                                   max_batches=max(3, min(batches, 10)), log=log)
        pipeline_rate = loader_rate
        pipeline = f"files, {workers} worker(s)" if workers else "files, main process"
        log(f"one process would deliver {1e6 / per_image_us:,.0f} img/s; measured through the DataLoader: "
            f"{loader_rate:,.0f} img/s")

    train_rate = _train_rate(cfg, source.num_classes, runtime, batch_size, train_steps, log)
    return ProfileResult(
        spec=source.spec, recipe=cfg.recipe, model=cfg.model.name, input_size=prep.input_size, batch_size=batch_size,
        pipeline=pipeline, stages=stages, pipeline_images_per_second=pipeline_rate, train_images_per_second=train_rate,
        one_off_images_per_second=one_off, loader_images_per_second=loader_rate, runtime=runtime.describe(),
        conditions=_conditions(runtime))


def _compose(steps: list, image):
    for step in steps:
        image = step(image)
    return image


def _augment_note(cfg: RunConfig, mirror: MirrorSwap | None) -> str:
    parts = [f"preset {cfg.augment.preset}"]
    if cfg.augment.randaugment:
        parts.append("RandAugment")
    if cfg.augment.trivialaugment:
        parts.append("TrivialAugment")
    if mirror is not None:
        parts.append("mirror swap")
    return " + ".join(parts)


def _loader_rate(cfg: RunConfig, table, prep, workers, policy, mirror, *, max_batches: int, log) -> float:
    """Images per second delivered through the run's own DataLoader, timed from the first batch (workers started)."""
    batch_size = cfg.data.batch_size
    needed = min(len(table), batch_size * (max_batches + 1))
    subset = table.subset(np.random.default_rng(1).choice(len(table), size=needed, replace=False))
    batches = training_batches(cfg, SplitData(subset), prep, policy, mirror, workers=workers)
    log(f"timing the DataLoader with {workers} worker(s) on {needed} files")
    iterator = iter(batches)
    next(iterator)  # worker start-up and the first batch are not the steady state
    start, images = time.perf_counter(), 0
    for images_batch, _ in iterator:
        images += len(images_batch)
    seconds = time.perf_counter() - start
    del iterator, batches  # stops the workers
    if images == 0:  # a split too small for a second batch: time the first one alone, start-up included
        return float(batch_size) / max(seconds, 1e-9)
    return images / seconds


def _train_rate(cfg: RunConfig, num_classes: int, runtime, batch_size: int, steps: int, log) -> float:
    """The images/s of the Trainer's own step for this config (same model, optimizer, precision and layout)."""
    from resnetlab.bench.train import trainer_step_rate

    log(f"timing {steps} training steps of {cfg.model.name} at batch {batch_size} ({runtime.describe()})")
    step_cfg = cfg.model_copy(deep=True)
    step_cfg.data.batch_size = batch_size
    return trainer_step_rate(step_cfg, num_classes, steps=steps)


def _conditions(runtime) -> dict:
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average": load,
            "device": str(runtime.device), "precision": runtime.precision, "channels_last": runtime.channels_last,
            "torch": str(torch.__version__), "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
