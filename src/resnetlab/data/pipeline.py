"""The input pipeline: decoded once into memory for small images, DataLoader workers for large ones.

Both paths yield ``(images, labels)`` with images as normalized float32 [B, 3, S, S] and labels as int64 [B], and a
resumed run sees the same batches as an uninterrupted one: the in-memory path draws from torch's global generator,
whose state the checkpoints carry; the file path draws each image's augmentation from a seed of its own (seed,
epoch, image) and its order from a generator seeded per epoch, so neither the workers' fresh start after a resume
nor their number changes a batch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from resnetlab.data.augment import BatchAugment, MirrorSwap, PerImage
from resnetlab.data.cache import cache_root
from resnetlab.data.formats.common import describe_paths
from resnetlab.data.preprocessing import (
    Preprocessing,
    check_image,
    load_image,
    normalize,
    normalize_contrast,
    pil_to_uint8,
    prepare_image,
    resize_to_input,
)
from resnetlab.data.records import BadImage, SampleTable
from resnetlab.errors import DataError
from resnetlab.utils.io import torch_save, write_json

IN_MEMORY_MAX_SIZE = 64  # pixels: at or below this, decode once and augment batches on tensors

__all__ = ["BadImage", "DecodedSplit", "FileBatches", "FileImageDataset", "IN_MEMORY_MAX_SIZE", "TensorBatches",
           "cache_root", "channel_stats", "check_files_readable", "decode_split", "file_stats", "report_bad_images"]


@dataclass
class DecodedSplit:
    """A split decoded to uint8 [N, 3, S, S], with the samples that could not be read left out and listed."""

    images: torch.Tensor
    labels: torch.Tensor
    kept: np.ndarray  # indices into the original table
    bad: list[BadImage] = field(default_factory=list)


def files_signature(paths: list[str]) -> str:
    """A hash of the size and modification time of every file: a cache keyed on it dies when a file is replaced."""
    digest = hashlib.sha1()
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(b"-\n")
    return digest.hexdigest()[:16]


def geometry_key(prep: Preprocessing) -> str:
    return f"{prep.input_size}-{prep.resize}-{prep.crop_pct}-{prep.interpolation}-{int(prep.roi_crop)}-{prep.contrast}"


def decode_split(table: SampleTable, prep: Preprocessing, *, threads: int = 2, use_cache: bool = True) -> DecodedSplit:
    """Decode, ROI-crop and resize every image of ``table`` once; cached on disk by content fingerprint."""
    key = hashlib.sha1(f"{table.fingerprint()}|{files_signature(table.paths)}|{geometry_key(prep)}".encode())
    cache_file = cache_root() / "decoded" / f"{key.hexdigest()[:20]}.pt"
    if use_cache and cache_file.is_file():
        try:
            cached = torch.load(cache_file, weights_only=True)
            return DecodedSplit(cached["images"], cached["labels"], cached["kept"].numpy(),
                                [BadImage(p, r) for p, r in cached["bad"]])
        except Exception:  # a cache file from another version or a damaged one is rebuilt, never trusted
            pass

    def decode(i: int) -> torch.Tensor | BadImage:
        roi = None if table.rois is None else table.rois[i]
        try:
            return prepare_image(table.paths[i], prep, roi)
        except DataError as err:
            return BadImage(table.paths[i], str(err))

    # Pillow releases the GIL while decoding and resizing, so threads use both cores without pickling costs.
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(decode, range(len(table)), chunksize=64))
    kept = np.asarray([i for i, r in enumerate(results) if not isinstance(r, BadImage)], dtype=np.int64)
    bad = [r for r in results if isinstance(r, BadImage)]
    size = prep.input_size
    images = torch.stack([results[i] for i in kept]) if len(kept) else torch.zeros(0, 3, size, size, dtype=torch.uint8)
    labels = torch.as_tensor(table.labels[kept], dtype=torch.int64)
    decoded = DecodedSplit(images, labels, kept, bad)
    if use_cache:
        torch_save({"images": images, "labels": labels, "kept": torch.as_tensor(kept),
                    "bad": [(b.path, b.reason) for b in bad]}, cache_file)
    return decoded


def check_files_readable(table: SampleTable, *, threads: int = 2, use_cache: bool = True) -> list[BadImage]:
    """Decode every file far enough to know it is a complete image; used before training on file-backed data.

    The answer is cached by the files' paths, sizes and modification times, so a second run on unchanged files
    skips the work, and a file that was fixed or replaced is checked again.
    """
    key = hashlib.sha1(f"{table.fingerprint()}|{files_signature(table.paths)}".encode()).hexdigest()[:20]
    cache_file = cache_root() / "checked" / f"{key}.json"
    if use_cache and cache_file.is_file():
        try:
            return [BadImage(path, reason) for path, reason in json.loads(cache_file.read_text())["bad"]]
        except (ValueError, KeyError, TypeError):
            pass

    def check(path: str) -> BadImage | None:
        try:
            check_image(path)
        except DataError as err:
            return BadImage(path, str(err))
        return None

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        bad = [b for b in pool.map(check, table.paths, chunksize=32) if b is not None]
    if use_cache:
        write_json(cache_file, {"bad": [(b.path, b.reason) for b in bad], "files": len(table)})
    return bad


def report_bad_images(bad: list[BadImage], policy: str, split: str) -> None:
    if bad and policy == "error":
        raise DataError(f"{len(bad)} unreadable image(s) in the {split} split: {describe_paths([b.path for b in bad])}. "
                        "Fix or remove them, or pass data.on_bad_image=skip to train without them (they are then "
                        "listed in bad_images.csv)")


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a uint8 [N, 3, H, W] tensor, in [0, 1] units (chunked, float64 sums)."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    for chunk in images.split(2048):
        x = chunk.to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / max(count, 1)
    std = (total_sq / max(count, 1) - mean * mean).clamp(min=1e-12).sqrt()
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


STATS_MAX_IMAGES = 2000  # file-backed splits: statistics from a seeded sample of this many images


def stats_sample(table: SampleTable, max_images: int = STATS_MAX_IMAGES, seed: int = 0) -> np.ndarray:
    """The indices of the (seeded) sample of ``table`` that file-backed statistics are computed from."""
    if len(table) <= max_images:
        return np.arange(len(table))
    return np.sort(np.random.default_rng(seed).choice(len(table), size=max_images, replace=False))


def file_stats(table: SampleTable, prep: Preprocessing, max_images: int = STATS_MAX_IMAGES, seed: int = 0):
    """Mean and std over (a seeded sample of) a file-backed split at the model's input size; cached by fingerprint."""
    key = hashlib.sha1(f"{table.fingerprint()}|{files_signature(table.paths)}|{geometry_key(prep)}|{max_images}|{seed}"
                       .encode()).hexdigest()[:20]
    cache_file = cache_root() / "stats" / f"{key}.json"
    if cache_file.is_file():
        record = json.loads(cache_file.read_text())
        return tuple(record["mean"]), tuple(record["std"])
    indices = stats_sample(table, max_images, seed)
    sample = decode_split(table.subset(indices), prep, use_cache=False)
    mean, std = channel_stats(sample.images)
    write_json(cache_file, {"mean": mean, "std": std, "images": len(sample.images)})
    return mean, std


# ---------------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------------


class TensorBatches:
    """Batches from an in-memory uint8 tensor, augmented per batch; a drop-in for a DataLoader.

    Per batch: gather the samples (uint8), ``per_image`` (RandAugment/TrivialAugment, one draw per image), scale to
    [0, 1], ``augment`` (the preset, per-sample parameters), ``mirror`` (flip and relabel mirror-image classes),
    normalize.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, mean, std,
                 shuffle: bool = False, drop_last: bool = False, augment: BatchAugment | None = None,
                 sample_weights: torch.Tensor | None = None, rank: int = 0, world_size: int = 1,
                 per_image: PerImage | None = None, mirror: MirrorSwap | None = None):
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.augment = augment
        self.per_image = per_image
        self.mirror = mirror
        self.sample_weights = sample_weights
        self.rank, self.world_size = rank, world_size

    def _order(self) -> torch.Tensor:
        n = len(self.labels)
        if self.sample_weights is not None:
            order = torch.multinomial(self.sample_weights, n, replacement=True)
        elif self.shuffle:
            order = torch.randperm(n)
        else:
            order = torch.arange(n)
        if self.world_size > 1:  # as DistributedSampler: pad to a multiple of the world size, then stride
            per_rank = -(-n // self.world_size)
            order = torch.cat([order, order[: per_rank * self.world_size - n]])[self.rank :: self.world_size]
        return order

    def __len__(self) -> int:
        n = -(-len(self.labels) // self.world_size)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def transform(self, batch: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 samples -> the normalized, augmented float batch and its (possibly mirror-swapped) labels."""
        if self.per_image is not None:
            batch = self.per_image(batch)
        if self.augment is not None:
            batch = self.augment(batch.float().div_(255.0))
        if self.mirror is not None:
            batch, labels = self.mirror(batch, labels)
        return normalize(batch, self.mean, self.std), labels

    def __iter__(self):
        order = self._order()
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            if self.drop_last and len(index) < self.batch_size:
                break
            yield self.transform(self.images[index], self.labels[index])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The random seed of one image's augmentation in one epoch: a function of the three alone."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class FileImageDataset(Dataset):
    """Images read from disk one by one (large photos), through a v2 transform in a DataLoader worker.

    Indexed by ``(epoch, i)`` (what :class:`EpochSampler` yields), the random augmentation of image ``i`` in
    ``epoch`` is drawn from its own seed (:func:`sample_seed`), not from a worker's running random stream. So the
    batches are the same whatever the number of workers, and a resumed run, whose workers start afresh, sees the
    batches the uninterrupted run saw. A plain integer index augments from the ambient stream.
    """

    def __init__(self, table: SampleTable, prep: Preprocessing, transform=None, *, seed: int = 0):
        self.table, self.prep, self.transform, self.seed = table, prep, transform, seed

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (None, key)
        roi = None if self.table.rois is None else self.table.rois[i]
        image = load_image(self.table.paths[i], roi, self.prep.roi_crop)
        if self.transform is None:
            tensor = pil_to_uint8(resize_to_input(image, self.prep))
        else:
            # The transform resizes (and crops) by itself; the contrast step comes first, as in resize_to_input.
            image = normalize_contrast(image, self.prep.contrast)
            if epoch is None:
                tensor = self.transform(image)
            else:
                # fork_rng: with num_workers=0 this runs in the training process, whose own stream must go on
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(sample_seed(self.seed, epoch, i))
                    tensor = self.transform(image)
        return tensor, int(self.table.labels[i])


class EpochSampler(Sampler):
    """Indices tagged with their epoch, ``(epoch, i)``, in an order that is a function of the seed and the epoch.

    ``base`` (a weighted or distributed sampler) chooses the indices; without one they are a permutation (shuffle)
    or in order. Either way nothing is drawn from torch's global generator, whose state the training loop's own
    random steps (mixup, erasing) and the checkpoints share. As with DistributedSampler, call :meth:`set_epoch`
    before each epoch (the Trainer does): without it every pass repeats the same epoch.

    With ``world_size`` > 1 the indices are split between the ranks as DistributedSampler splits them (padded to a
    multiple of the world size, then every ``world_size``-th from ``rank``). The draw is a function of the seed and
    the epoch, so every rank draws the same indices and the shards are disjoint parts of one draw: this is how a
    weighted sampler, which knows nothing of ranks, is sharded.
    """

    def __init__(self, length: int, *, shuffle: bool, seed: int, base: Sampler | None = None, rank: int = 0,
                 world_size: int = 1):
        self.length, self.shuffle, self.seed, self.base = length, shuffle, seed, base
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.generator = torch.Generator()
        if base is not None and hasattr(base, "generator"):
            base.generator = self.generator  # WeightedRandomSampler draws from it

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        drawn = len(self.base) if self.base is not None else self.length
        return -(-drawn // self.world_size)

    def __iter__(self):
        self.generator.manual_seed(sample_seed(self.seed, self.epoch, -1))
        if self.base is not None:
            indices = list(self.base)
        elif self.shuffle:
            indices = torch.randperm(self.length, generator=self.generator).tolist()
        else:
            indices = list(range(self.length))
        if self.world_size > 1:
            per_rank = -(-len(indices) // self.world_size)
            indices = (indices + indices[: per_rank * self.world_size - len(indices)])[self.rank :: self.world_size]
        return ((self.epoch, int(i)) for i in indices)


class FileBatches:
    """A DataLoader over :class:`FileImageDataset` whose uint8 batches are finished in the main process.

    Workers decode and augment image by image; here the collated batch gets the batch-level steps shared with the
    in-memory pipeline (``batch_augment``: random erasing; ``mirror``: mirror-image relabelling) and is normalized.
    Workers persist across epochs (no re-fork per epoch) and batches are pinned for fast copies to a GPU.
    """

    def __init__(self, dataset: FileImageDataset, batch_size: int, *, mean, std, shuffle: bool, drop_last: bool,
                 num_workers: int, sample_weights: torch.Tensor | None = None, pin_memory: bool = False,
                 rank: int = 0, world_size: int = 1, seed: int = 0,
                 batch_augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 mirror: MirrorSwap | None = None):
        from torch.utils.data import DistributedSampler, WeightedRandomSampler

        base, shard = None, {}
        if sample_weights is not None:
            # one weighted draw per epoch, the same on every rank, of which each rank takes its share
            base = WeightedRandomSampler(sample_weights, len(dataset), replacement=True)
            shard = {"rank": rank, "world_size": world_size}
        elif world_size > 1:
            base = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, base=base, **shard)
        # The uint8 batches the workers collate are turned into float here, so it is the float batch that is put in
        # page-locked memory (see transform), for asynchronous copies to the GPU.
        self.pin_memory = pin_memory and torch.cuda.is_available()
        # generator: the workers' base seed is drawn from it, not from torch's global generator, so that starting
        # the workers (once: they persist) takes nothing from the stream the checkpoints restore
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, drop_last=drop_last,
                                 num_workers=num_workers, persistent_workers=num_workers > 0,
                                 prefetch_factor=4 if num_workers > 0 else None,
                                 generator=torch.Generator().manual_seed(seed))
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        self.batch_augment = batch_augment
        self.mirror = mirror

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def transform(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch_augment is not None:
            images = self.batch_augment(images.float().div_(255.0))
        if self.mirror is not None:
            images, labels = self.mirror(images, labels)
        if self.pin_memory:  # normalize straight into a pinned buffer: no extra copy
            out = torch.empty(images.shape, dtype=torch.float32, pin_memory=True).copy_(images)
            if images.dtype == torch.uint8:
                out.div_(255.0)
            return out.sub_(self.mean.view(1, 3, 1, 1)).div_(self.std.view(1, 3, 1, 1)), labels.pin_memory()
        return normalize(images, self.mean, self.std), labels

    def __iter__(self):
        for images, labels in self.loader:
            yield self.transform(images, labels)
