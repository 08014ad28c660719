"""The k folds a tune scores every setting on, built once from the base config.

What is cross-validated is the data's training split: the same ``train`` table an ordinary run of the base config
would train on (the data's validation hold-out and its test split stay out). The folds are stratified by class
and, where the data has groups (GTSRB tracks), keep each group whole, so no frame of a validation sign is ever in
that fold's training part. Each fold is handed to the training job as a ready-made :class:`SplitPlan` whose test
split is empty: the test images are not even loaded while tuning. Normalization statistics are computed by the
data layer from the plan's ``train`` table, that is, from each fold's training part alone.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field

import numpy as np

from resnetlab.config import RunConfig
from resnetlab.data.datasets import open_dataset
from resnetlab.data.records import DatasetSource, SampleTable
from resnetlab.data.splits import SplitPlan, kfold_indices, plan_data_splits, use_groups
from resnetlab.errors import DataError


@dataclass
class CrossValidation:
    source: DatasetSource
    data_plan: SplitPlan  # the base config's own train/val/test split
    folds: list[tuple[np.ndarray, np.ndarray]]  # (train, val) indices into data_plan.train
    grouped: bool
    always_train: list[str] = field(default_factory=list)  # classes too rare to validate: in every fold's train

    @property
    def table(self) -> SampleTable:
        """The table that is cross-validated: the data's training split."""
        return self.data_plan.train

    @property
    def n_folds(self) -> int:
        return len(self.folds)

    def fold_plan(self, index: int) -> SplitPlan:
        train, val = self.folds[index]
        kind = f"grouped by {self.source.group_kind or 'group'}" if self.grouped else "stratified"
        empty = SampleTable([], np.zeros(0, dtype=np.int64))
        return SplitPlan(
            train=self.table.subset(train), val=self.table.subset(val), test=empty,
            strategy=f"fold {index + 1} of {self.n_folds} ({kind} k-fold of the training split)",
            sources={"train": f"the other {self.n_folds - 1} folds of the training split",
                     "val": f"fold {index + 1} of the training split",
                     "test": "none (the test split is not used while tuning)"})

    def refit_plan(self) -> SplitPlan:
        """A fresh copy of the data's own split (the data layer may drop unreadable files from the plan it gets)."""
        plan = self.data_plan
        return SplitPlan(train=plan.train, val=plan.val, test=plan.test, strategy=plan.strategy,
                         sources=dict(plan.sources))

    def fingerprint(self) -> str:
        """A hash of what is cross-validated and how it is cut, to tell a resumed tune that the data changed."""
        digest = hashlib.sha1(self.table.fingerprint().encode())
        for train, val in self.folds:
            digest.update(val.tobytes())
        return digest.hexdigest()[:16]

    def describe(self) -> str:
        sizes = ", ".join(f"{len(train)}/{len(val)}" for train, val in self.folds)
        how = f"stratified-grouped by {self.source.group_kind or 'group'}" if self.grouped else "stratified"
        text = (f"{self.n_folds}-fold {how} cross-validation of the training split ({len(self.table)} images); "
                f"train/val images per fold: {sizes}")
        if self.always_train:
            unit = f"{self.source.group_kind or 'group'}s" if self.grouped else "images"
            shown = ", ".join(self.always_train[:6]) + (" ..." if len(self.always_train) > 6 else "")
            text += (f". {len(self.always_train)} class(es) with fewer than {self.n_folds} {unit} stay in every "
                     f"fold's training part and are never validated: {shown}")
        return text


def build_cross_validation(cfg: RunConfig, n_folds: int, seed: int | None = None) -> CrossValidation:
    """Read the data of ``cfg`` once and cut its training split into ``n_folds`` leak-free folds.

    A class with fewer groups (or, ungrouped, fewer images) than folds cannot be in every fold's training part and
    also be validated without splitting a group; its images are kept in the training part of every fold and never
    validated, so every model still learns every class and no group is split (the log says which classes).
    """
    source = open_dataset(cfg.data)
    data_plan = plan_data_splits(source, cfg.data)
    table = data_plan.train
    grouped = use_groups(table, cfg.data.split)
    units = table.groups if grouped else np.arange(len(table)).astype(str)
    per_class = [len(set(units[table.labels == c].tolist())) for c in range(source.num_classes)]
    rare = [c for c, count in enumerate(per_class) if 0 < count < n_folds]
    always_train = np.flatnonzero(np.isin(table.labels, rare))
    rotated = np.setdiff1d(np.arange(len(table)), always_train)
    if len(np.unique(table.labels[rotated])) < 2:
        what = f"{source.group_kind or 'group'}s" if grouped else "images"
        raise DataError(f"too few {what} per class for {n_folds} folds (most classes have fewer than {n_folds}); "
                        "use fewer --folds")
    folds = [(np.sort(np.concatenate([rotated[train], always_train])), rotated[val])
             for train, val in kfold_indices(table.subset(rotated), n_folds,
                                             cfg.data.split_seed if seed is None else seed, grouped)]
    present = np.flatnonzero(table.class_counts(source.num_classes) > 0)
    for index, (train, _) in enumerate(folds):
        missing = np.setdiff1d(present, np.unique(table.labels[train]))
        if len(missing):
            names = [source.class_names[i] for i in missing[:5]]
            raise DataError(f"fold {index + 1} of {n_folds} has no training images of class(es) {names}; use fewer "
                            "--folds or drop those classes with data.classes")
    return CrossValidation(source=source, data_plan=data_plan, folds=folds, grouped=grouped,
                           always_train=[source.class_names[c] for c in rare])


def fold_config(cfg: RunConfig, *, n_folds: int, trial_budget_minutes: float | None) -> RunConfig:
    """The config a fold trains with: the setting's, quiet, and with its share of the trial's time budget."""
    tree = copy.deepcopy(cfg.to_dict())
    tree["logging"]["quiet"] = True
    if trial_budget_minutes is not None:
        share = trial_budget_minutes / n_folds
        own = tree["train"].get("time_budget")
        tree["train"]["time_budget"] = share if own is None else min(own, share)
    return RunConfig.model_validate(tree)
