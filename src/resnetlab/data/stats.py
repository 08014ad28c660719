"""Per-channel mean and std of a dataset's training split (``resnetlab data stats``), overall and per class.

The numbers are the ones a run with the same config normalizes with (``data.normalize=dataset``): computed from the
training split that :func:`~resnetlab.data.splits.plan_splits` leaves after holding out validation and test images,
never from those, at the model's input size and after the ROI crop. In-memory runs (input size up to 64 px) use
every training image; file-backed runs a seeded sample of 2,000. Results are cached under the dataset's fingerprint
(paths, labels, boxes, file sizes and times), so asking again is instant and a changed file invalidates them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from resnetlab.config import RunConfig
from resnetlab.data.build import base_preprocessing, uses_memory
from resnetlab.data.cache import cache_root
from resnetlab.data.datasets import open_dataset
from resnetlab.data.pipeline import (
    STATS_MAX_IMAGES,
    geometry_key,
    channel_stats,
    decode_split,
    files_signature,
    report_bad_images,
    stats_sample,
)
from resnetlab.data.splits import plan_data_splits
from resnetlab.utils.io import write_json


@dataclass
class ChannelStats:
    images: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass
class DatasetStats:
    spec: str
    fingerprint: str  # of the training split the numbers come from
    split: str  # how that split was made
    input_size: int
    resize: str
    roi_crop: bool
    train_images: int
    sampled: bool  # True when a sample of the split was used (file-backed data)
    overall: ChannelStats
    per_class: list[dict] | None = None  # {"index", "id", "name", "images", "mean", "std"} per class

    def to_dict(self) -> dict:
        return asdict(self)


def compute_dataset_stats(cfg: RunConfig, *, per_class: bool = False, use_cache: bool = True,
                          log: Callable[[str], None] = lambda message: None) -> DatasetStats:
    d = cfg.data
    source = open_dataset(d)
    for note in source.notes:
        log(note)
    plan = plan_data_splits(source, d)
    prep = base_preprocessing(cfg)
    in_memory = uses_memory(cfg)
    table = plan.train
    key = hashlib.sha1(f"{table.fingerprint()}|{files_signature(table.paths)}|{geometry_key(prep)}|{in_memory}|"
                       f"{d.split_seed}|{per_class}|{d.on_bad_image}".encode()).hexdigest()[:20]
    cache_file = cache_root() / "stats" / f"dataset-{key}.json"
    if use_cache and cache_file.is_file():
        record = json.loads(cache_file.read_text())
        overall = record["overall"]
        record["overall"] = ChannelStats(overall["images"], tuple(overall["mean"]), tuple(overall["std"]))
        return DatasetStats(**record)

    indices = np.arange(len(table)) if in_memory else stats_sample(table, STATS_MAX_IMAGES, d.split_seed)
    log(f"decoding {len(indices)} training image(s) at {prep.input_size} px")
    # In-memory runs decode the whole split anyway: go through the same cache, so the run reuses this work.
    decoded = decode_split(table if in_memory else table.subset(indices), prep, threads=torch.get_num_threads(),
                           use_cache=in_memory)
    report_bad_images(decoded.bad, d.on_bad_image, "train")
    mean, std = channel_stats(decoded.images)
    classes = None
    if per_class:
        classes = []
        for index, (cid, name) in enumerate(zip(source.class_ids, source.class_names)):
            chosen = decoded.images[decoded.labels == index]
            c_mean, c_std = channel_stats(chosen) if len(chosen) else (None, None)
            classes.append({"index": index, "id": cid, "name": name, "images": len(chosen),
                            "mean": list(c_mean) if c_mean else None, "std": list(c_std) if c_std else None})
    stats = DatasetStats(spec=source.spec, fingerprint=table.fingerprint(), split=plan.strategy,
                         input_size=prep.input_size, resize=prep.resize,
                         roi_crop=prep.roi_crop and table.rois is not None and bool((table.rois[:, 0] >= 0).any()),
                         train_images=len(table), sampled=len(indices) < len(table),
                         overall=ChannelStats(len(decoded.images), tuple(mean), tuple(std)), per_class=classes)
    if use_cache:
        write_json(cache_file, stats.to_dict())
    return stats
