"""What every dataset format is read into: tables of samples, before any pixel is decoded.

A format reader (GTSRB, class folders, CSV, CIFAR, the synthetic set) turns what is on disk into a
:class:`DatasetSource`: the class list and one :class:`SampleTable` per split the data brings (``train`` always;
``val`` and ``test`` where the data has them). Splitting, class subsets, statistics and the input pipeline then
work on these tables and never need to know which format they came from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class BadImage:
    """A sample left out of a run, and why: an unreadable file, a listed file that is missing, an unknown class id.

    With ``data.on_bad_image=error`` any of these stops the run before training; with ``skip`` they are left out and
    the train job writes them to ``bad_images.csv`` in the run directory. Nothing is dropped without a record.
    """

    path: str
    reason: str


@dataclass
class SampleTable:
    """The samples of one split: absolute image paths, label indices and optional ROI boxes and group ids.

    ``rois`` holds inclusive pixel boxes ``x1, y1, x2, y2`` (GTSRB's convention), or -1 where a sample has none.
    ``groups`` holds an id per sample for samples that must stay together in a split (GTSRB tracks: 30 frames of one
    physical sign); ``None`` when the data has no groups.
    """

    paths: list[str]
    labels: np.ndarray
    rois: np.ndarray | None = None
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.rois is not None:
            self.rois = np.asarray(self.rois, dtype=np.int64).reshape(-1, 4)
        if self.groups is not None:
            self.groups = np.asarray(self.groups).astype(str)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: np.ndarray | list[int]) -> SampleTable:
        indices = np.asarray(indices, dtype=np.int64)
        return SampleTable(
            paths=[self.paths[i] for i in indices],
            labels=self.labels[indices],
            rois=None if self.rois is None else self.rois[indices],
            groups=None if self.groups is None else self.groups[indices],
        )

    @staticmethod
    def concat(tables: list[SampleTable]) -> SampleTable:
        tables = [t for t in tables if len(t)]
        if not tables:
            return SampleTable([], np.zeros(0, dtype=np.int64))
        has_rois = all(t.rois is not None for t in tables)
        has_groups = all(t.groups is not None for t in tables)
        return SampleTable(
            paths=[p for t in tables for p in t.paths],
            labels=np.concatenate([t.labels for t in tables]),
            rois=np.concatenate([t.rois for t in tables]) if has_rois else None,
            groups=np.concatenate([t.groups for t in tables]) if has_groups else None,
        )

    def class_counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes)

    def fingerprint(self) -> str:
        """A short hash of what the table holds (paths, labels, boxes), for caches and for checking a rebuilt split."""
        digest = hashlib.sha1()
        for path, label in zip(self.paths, self.labels.tolist()):
            digest.update(f"{path}\0{label}\n".encode())
        if self.rois is not None:
            digest.update(self.rois.tobytes())
        return digest.hexdigest()[:16]


@dataclass
class DatasetSource:
    """A dataset as read from disk: its classes and the splits it brings."""

    spec: str
    root: Path
    class_ids: list[int | str]
    class_names: list[str]
    splits: dict[str, SampleTable]
    group_kind: str | None = None  # what a group is ("track"), or None
    notes: list[str] = field(default_factory=list)  # what the reader noticed (files ignored ...), for the log
    # Rows or files the reader could not use (missing files, unknown class ids, empty classes), per split.
    # open_dataset stops on them with data.on_bad_image=error; with skip they reach RunData.bad / bad_images.csv.
    rejected: dict[str, list[BadImage]] = field(default_factory=dict)
    # Pairs of class ids that are mirror images of each other (GTSRB 33/34 ...), for augment.mirror_swap.
    mirror_pairs: tuple[tuple[int | str, int | str], ...] = ()

    def reject(self, split: str, path: str, reason: str) -> None:
        self.rejected.setdefault(split, []).append(BadImage(str(path), reason))

    def all_rejected(self) -> list[BadImage]:
        return [bad for split in sorted(self.rejected) for bad in self.rejected[split]]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> str:
        # Paths are absolute, so the same files reached through another spelling of the path match.
        digest = hashlib.sha1()
        for name in sorted(self.splits):
            digest.update(f"{name}:{self.splits[name].fingerprint()}".encode())
        return digest.hexdigest()[:16]
