"""The study's trials as data files in the tune folder: ``trials.csv``, ``curves.csv``, ``effects.csv``, ``best.json``.

Everything is read from the Optuna storage, not from the trial folders, so the files are complete whichever worker
(on whichever machine) ran a trial, and any worker can rewrite them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from resnetlab.tuning.space import SearchSpace, format_value
from resnetlab.tuning.study import (
    REFIT_ATTR, STATUS_ATTR, WORKER_ATTR, StudyView, is_crashed, is_skipped, root_number, worker_label,
)
from resnetlab.tuning.trial import CURVE_COLUMNS, METRICS, fold_key
from resnetlab.utils.io import write_csv_rows, write_json

STATE_NAMES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
               TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}


@dataclass
class TrialRow:
    """One setting as it stands in the study."""

    number: int
    state: str
    params: dict[str, Any]
    folds: list[dict[str, Any] | None]
    score: float | None  # the objective: mean over folds of the metric (complete trials only)
    note: str = ""
    worker: str = ""
    slot_dir: str = ""
    rank: int | None = None
    stats: dict[str, float] = field(default_factory=dict)  # mean_/std_ of val_top1 and val_loss over finished folds

    def fold_value(self, index: int, column: str) -> float | None:
        fold = self.folds[index] if index < len(self.folds) else None
        return None if fold is None else fold.get(column)


def collect_rows(study: optuna.Study, space: SearchSpace, n_folds: int, metric: str) -> list[TrialRow]:
    """A row per setting: trials that were skipped as duplicates or superseded by a retry are left out."""
    rows = []
    for trial in StudyView.of(study).trials:
        if is_skipped(trial) or is_crashed(trial):
            continue
        rows.append(_row(trial, space, n_folds))
    maximize = METRICS[metric] == "maximize"
    complete = sorted((r for r in rows if r.state == "complete"),
                      key=lambda r: ((-r.score if maximize else r.score), r.stats.get(f"std_{metric}", 0.0), r.number))
    for rank, row in enumerate(complete, start=1):
        row.rank = rank
    others = sorted((r for r in rows if r.state != "complete"), key=lambda r: r.number)
    return complete + others


def _row(trial: FrozenTrial, space: SearchSpace, n_folds: int) -> TrialRow:
    folds = [trial.user_attrs.get(fold_key(i)) for i in range(n_folds)]
    note = str(trial.user_attrs.get(STATUS_ATTR, ""))
    pruned = trial.user_attrs.get("pruned_at")
    if trial.state == TrialState.PRUNED and pruned:
        note = f"pruned in fold {pruned['fold'] + 1} after epoch {pruned['epoch']}"
    stats = {}
    for column in METRICS:
        # Only a complete trial has a score over all folds; a pruned one keeps its per-fold values alone.
        values = [f[column] for f in folds if f is not None] if trial.state == TrialState.COMPLETE else []
        if values:
            stats[f"mean_{column}"] = float(np.mean(values))
            stats[f"std_{column}"] = float(np.std(values))
    return TrialRow(number=trial.number, state=STATE_NAMES.get(trial.state, trial.state.name.lower()),
                    params=space.decode(trial.params), folds=folds,
                    score=trial.value if trial.state == TrialState.COMPLETE else None, note=note,
                    worker=worker_label(trial.user_attrs.get(WORKER_ATTR)) if WORKER_ATTR in trial.user_attrs else "",
                    slot_dir=f"trials/{root_number(trial):04d}", stats=stats)


def best_row(rows: Sequence[TrialRow]) -> TrialRow | None:
    return next((r for r in rows if r.rank == 1), None)


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return format_value(value)


def write_trials_csv(rows: Sequence[TrialRow], space: SearchSpace, n_folds: int, path: Path) -> None:
    fold_columns = [f"fold{i}_{column}" for i in range(n_folds) for column in ("val_top1", "val_loss", "epochs")]
    header = (["rank", "trial", "state", *space.keys, "mean_val_top1", "std_val_top1", "mean_val_loss",
               "std_val_loss", *fold_columns, "seconds", "worker", "folder", "note"])
    def lines():
        for row in rows:
            folds = []
            for i in range(n_folds):
                folds += [row.fold_value(i, "val_top1"), row.fold_value(i, "val_loss"), row.fold_value(i, "epochs_run")]
            seconds = sum(f.get("seconds") or 0.0 for f in row.folds if f)
            yield [_cell(v) for v in (
                row.rank, row.number, row.state, *(row.params.get(k) for k in space.keys),
                row.stats.get("mean_val_top1"), row.stats.get("std_val_top1"), row.stats.get("mean_val_loss"),
                row.stats.get("std_val_loss"), *folds, round(seconds, 1) if seconds else None, row.worker,
                row.slot_dir, row.note)]

    write_csv_rows(path, header, lines(), lineterminator="\r\n")


def write_curves_csv(rows: Sequence[TrialRow], path: Path) -> None:
    """Every epoch of every fold of every trial (the learning curves as data), long format."""
    def lines():
        for row in sorted(rows, key=lambda r: r.number):
            for index, fold in enumerate(row.folds):
                if not fold:
                    continue
                curve = fold["curve"]
                for i in range(len(curve["epoch"])):
                    yield [row.number, index] + [_cell(int(curve[c][i]) if c == "epoch" else curve[c][i])
                                                 if c in curve else "" for c in CURVE_COLUMNS]

    write_csv_rows(path, ["trial", "fold", *CURVE_COLUMNS], lines(), lineterminator="\r\n")


@dataclass
class Effect:
    """The objective of the finished settings grouped by one parameter's value (or range of values)."""

    key: str
    value: str
    trials: int
    mean: float
    best: float


def parameter_effects(rows: Sequence[TrialRow], space: SearchSpace, metric: str, max_levels: int = 6) -> list[Effect]:
    """Marginal means: for each parameter, each of its values (numeric ranges in quartile bins) with the mean and
    best objective of the complete settings that have it. A crude but assumption-free view of what mattered."""
    complete = [r for r in rows if r.state == "complete"]
    maximize = METRICS[metric] == "maximize"
    effects = []
    for key, param in space.params.items():
        values = [r.params.get(key) for r in complete]
        labels: list[str]
        distinct = sorted({format_value(v) for v in values})
        numeric = param.kind != "categorical" and len(distinct) > max_levels
        if numeric:
            array = np.asarray(values, dtype=float)
            edges = np.quantile(np.log(array) if param.log else array, [0, 0.25, 0.5, 0.75, 1.0])
            edges = np.exp(edges) if param.log else edges
            bins = np.searchsorted(edges[1:-1], array, side="right")  # quartile 0..3 of each value
            names = [f"{format_value(float(edges[b]))} .. {format_value(float(edges[b + 1]))}" for b in range(4)]
            labels = [names[b] for b in bins]
            order = list(dict.fromkeys(names))
        else:
            labels = [format_value(v) for v in values]
            order = [format_value(v) for v in param.choices] if param.kind == "categorical" else distinct
        for label in order:
            scores = [r.score for r, lab in zip(complete, labels) if lab == label]
            if scores:
                effects.append(Effect(key, label, len(scores), float(np.mean(scores)),
                                      float(max(scores) if maximize else min(scores))))
    return effects


def write_effects_csv(effects: Sequence[Effect], metric: str, path: Path) -> None:
    write_csv_rows(path, ["parameter", "value", "trials", f"mean_{metric}", f"best_{metric}"],
                   ([e.key, e.value, e.trials, _cell(e.mean), _cell(e.best)] for e in effects), lineterminator="\r\n")


def write_best_json(study: optuna.Study, rows: Sequence[TrialRow], best_config: dict[str, Any] | None, metric: str,
                    path: Path) -> dict[str, Any] | None:
    """The winning setting: its parameters, fold scores, full config and, once done, the refit's test result."""
    best = best_row(rows)
    if best is None:
        return None
    record = {
        "trial": best.number,
        "params": best.params,
        "metric": metric,
        "mean": best.score,
        "std": best.stats.get(f"std_{metric}"),
        "folds": [{k: v for k, v in (f or {}).items() if k != "curve"} for f in best.folds],
        "folder": best.slot_dir,
        "config": best_config,
        "refit": study.user_attrs.get(REFIT_ATTR),
    }
    write_json(path, record)
    return record
