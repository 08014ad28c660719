"""Leak-free splits: stratified where samples are independent, stratified-grouped where they are not.

GTSRB holds ~30 frames of each physical sign (a track). A random split puts frames of one sign on both sides and
validation then reports near 100% while the test set says otherwise, so wherever the data has groups the split
keeps each group whole (scikit-learn's ``StratifiedGroupKFold``) and the log says which strategy was used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from resnetlab.config import DataConfig
from resnetlab.data.records import DatasetSource, SampleTable
from resnetlab.errors import DataError
from resnetlab.utils.io import write_csv_rows


def use_groups(table: SampleTable, strategy: str) -> bool:
    if strategy == "grouped" and table.groups is None:
        raise DataError("data.split=grouped but this dataset has no groups (tracks or a group column); "
                        "use data.split=stratified")
    return table.groups is not None and strategy in ("auto", "grouped")


def kfold_indices(table: SampleTable, n_folds: int, seed: int, grouped: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train_indices, val_indices)`` for each of ``n_folds`` stratified (and, if ``grouped``, group-whole) folds."""
    if n_folds < 2:
        raise DataError(f"k-fold needs at least 2 folds, got {n_folds}")
    counts = np.bincount(table.labels)
    if counts[counts > 0].min() < n_folds:
        rare = int(np.flatnonzero((counts > 0) & (counts < n_folds))[0])
        raise DataError(f"class index {rare} has only {counts[rare]} sample(s), fewer than the {n_folds} folds asked for")
    dummy = np.zeros(len(table))
    if grouped:
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        folds = splitter.split(dummy, table.labels, table.groups)
    else:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        folds = splitter.split(dummy, table.labels)
    return [(np.sort(train), np.sort(val)) for train, val in folds]


def holdout_indices(table: SampleTable, fraction: float, seed: int, grouped: bool) -> tuple[np.ndarray, np.ndarray]:
    """Split off about ``fraction`` of the samples, stratified by class, keeping groups whole when ``grouped``."""
    if fraction <= 0:
        return np.arange(len(table)), np.zeros(0, dtype=np.int64)
    if grouped:
        # One fold of a stratified-grouped k-fold with k = 1/fraction is a held-out part of about that size.
        n_folds = max(2, int(round(1 / fraction)))
        n_groups = len(set(table.groups.tolist()))
        if n_groups < n_folds:
            raise DataError(f"only {n_groups} groups (tracks): too few to hold out {fraction:.0%} by group (one "
                            f"group is already {1 / n_groups:.0%}); raise data.val_fraction/data.test_fraction to at "
                            f"least {1 / n_groups:.2f}, or use data.split=stratified (frames of a group then land on "
                            "both sides)")
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        keep, held = next(splitter.split(np.zeros(len(table)), table.labels, table.groups))
        return np.sort(keep), np.sort(held)
    indices = np.arange(len(table))
    if len(table) < 2:
        raise DataError(f"only {len(table)} image(s): too few to hold out {fraction:.0%} of them; add images")
    stratify = table.labels if can_stratify(table.labels, fraction) else None
    keep, held = train_test_split(indices, test_size=fraction, random_state=seed, stratify=stratify)
    return np.sort(keep), np.sort(held)


def can_stratify(labels: np.ndarray, fraction: float) -> bool:
    """Whether a stratified hold-out of ``fraction`` is possible: every class needs two samples, and both sides at
    least one sample per class (scikit-learn's conditions). Tiny sets fall back to a plain random split."""
    counts = np.bincount(labels)
    classes = int((counts > 0).sum())
    held = int(np.ceil(fraction * len(labels)))
    return counts[counts > 0].min() >= 2 and held >= classes and len(labels) - held >= classes


@dataclass
class SplitPlan:
    """The three splits a run uses and how they were made."""

    train: SampleTable
    val: SampleTable
    test: SampleTable
    strategy: str  # "grouped by track", "stratified", ...
    sources: dict[str, str]  # for each split: where it came from ("dataset", "held out of train" ...)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def plan_splits(splits: dict[str, SampleTable], *, strategy: str, val_fraction: float, test_fraction: float,
                seed: int, group_kind: str | None = None) -> SplitPlan:
    """Take the splits the data brings and hold out the missing ones from train (test first, then val)."""
    train = splits["train"]
    grouped = use_groups(train, strategy)
    label = f"grouped by {group_kind or 'group'}" if grouped else "stratified"
    if not grouped and not can_stratify(train.labels, min(f for f in (val_fraction, test_fraction) if f > 0)
                                        if (val_fraction > 0 or test_fraction > 0) else 0.5):
        label = "random (too few images per class to stratify)"
    sources = {"train": "dataset"}
    test = splits.get("test")
    if test is None or len(test) == 0:
        keep, held = holdout_indices(train, test_fraction, seed + 1, grouped)
        test, train = train.subset(held), train.subset(keep)
        sources["test"] = f"held out of train ({test_fraction:.0%}, {label})"
    else:
        sources["test"] = "dataset"
    val = splits.get("val")
    if val is None or len(val) == 0:
        keep, held = holdout_indices(train, val_fraction, seed, grouped)
        val, train = train.subset(held), train.subset(keep)
        sources["val"] = f"held out of train ({val_fraction:.0%}, {label})"
    else:
        sources["val"] = "dataset"
    return SplitPlan(train=train, val=val, test=test, strategy=label, sources=sources)



def plan_data_splits(source: DatasetSource, cfg: DataConfig) -> SplitPlan:
    """The splits a run's data settings (``data.split``, fractions, ``data.split_seed``) make of ``source``."""
    return plan_splits(source.splits, strategy=cfg.split, val_fraction=cfg.val_fraction,
                       test_fraction=cfg.test_fraction, seed=cfg.split_seed, group_kind=source.group_kind)


def write_split_manifest(plan: SplitPlan, class_names: list[str], path: Path) -> None:
    """One row per sample: split, path, label index and name, group and ROI box ("x1 y1 x2 y2"): the audit trail of
    who went where, and what a report needs to show each image as the model saw it."""
    def rows():
        yield ["split", "path", "label", "class_name", "group", "roi"]
        for name in ("train", "val", "test"):
            table = getattr(plan, name)
            for i, (p, label) in enumerate(zip(table.paths, table.labels.tolist())):
                group = "" if table.groups is None else table.groups[i]
                roi = "" if table.rois is None or table.rois[i][0] < 0 else " ".join(map(str, table.rois[i].tolist()))
                yield [name, p, label, class_names[label], group, roi]

    lines = rows()
    write_csv_rows(path, next(lines), lines, lineterminator="\r\n")
