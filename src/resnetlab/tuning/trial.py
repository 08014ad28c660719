"""One trial: train a setting on each fold, report every epoch to the pruner, and score it.

A fold is an ordinary training run (``train_job``) in ``trials/<slot>/fold<k>/`` with a ready-made split and no test
evaluation; its ``metrics.csv`` is the fold's learning curve. What a fold contributes to the trial's score is its
validation metric after the **last** epoch it trained, not its best epoch: the maximum over epochs is picked on
the very data it is scored on, which favours longer and noisier settings. The per-epoch values still go to the
pruner and are kept as data.

A trial picks up where a killed one left off: folds whose result is already stored are not trained again, and a
fold with a checkpoint of the same config resumes from it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from resnetlab.config import RunConfig, load_yaml
from resnetlab.tuning.folds import CrossValidation, fold_config

#: Intermediate values are reported at step ``fold * FOLD_STEP_STRIDE + epoch``, so the pruner compares a trial's
#: epoch ``e`` of fold ``k`` with the same fold and epoch of other trials.
FOLD_STEP_STRIDE = 10_000
CURVE_COLUMNS = ("epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "epoch_seconds")
METRICS = {"val_top1": "maximize", "val_loss": "minimize"}


@dataclass
class PruneRule:
    enabled: bool
    warmup_epochs: int  # epochs of each fold that always run before the pruner may stop it


class TrialPruned(Exception):
    def __init__(self, fold: int, epoch: int):
        super().__init__(f"pruned in fold {fold + 1} after epoch {epoch}")
        self.fold = fold
        self.epoch = epoch


def config_digest(cfg: RunConfig) -> str:
    return hashlib.sha1(cfg.to_yaml().encode()).hexdigest()[:16]


def fold_key(index: int) -> str:
    return f"fold{index}"


def read_curve(metrics_csv: Path) -> dict[str, list[float]]:
    """A fold's ``metrics.csv`` as columns of floats (the columns of :data:`CURVE_COLUMNS` that it has)."""
    with open(metrics_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    curve: dict[str, list[float]] = {}
    for column in CURVE_COLUMNS:
        if rows and column in rows[0]:
            curve[column] = [float(r[column]) if r[column] not in ("", None) else math.nan for r in rows]
    return curve


def fold_result(run_dir: Path, digest: str, seconds: float) -> dict[str, Any]:
    """What a finished fold contributes: the last epoch's validation metrics, and its curve."""
    curve = read_curve(run_dir / "metrics.csv")
    info_path = run_dir / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return {
        "val_top1": curve["val_top1"][-1],
        "val_loss": curve["val_loss"][-1],
        "epochs_run": len(curve["epoch"]),
        "best_epoch": info.get("best_epoch"),
        "stopped_because": info.get("stopped_because", ""),
        "train_seconds": info.get("train_seconds"),
        "seconds": round(seconds, 2),
        "config_digest": digest,
        "curve": curve,
    }


def run_trial(trial: optuna.Trial, cfg: RunConfig, cv: CrossValidation, trial_dir: Path, *, metric: str,
              prune: PruneRule, trial_budget_minutes: float | None, log: Callable[[str], None]) -> dict[str, Any]:
    """Train ``cfg`` on every fold; returns ``{mean, std, folds}``. Raises :class:`TrialPruned` when pruned."""
    from resnetlab.jobs.train import train_job

    results: list[dict[str, Any]] = []
    for index in range(cv.n_folds):
        fcfg = fold_config(cfg, n_folds=cv.n_folds, trial_budget_minutes=trial_budget_minutes)
        digest = config_digest(fcfg)
        run_dir = trial_dir / f"fold{index}"
        stored = trial.user_attrs.get(fold_key(index))
        if stored and stored.get("config_digest") == digest:
            # Finished by an earlier worker of this trial (which then died): keep it, replay its curve to the pruner.
            _report_curve(trial, index, stored["curve"], metric)
            results.append(stored)
            log(f"  fold {index + 1}/{cv.n_folds}: kept from the earlier attempt ({metric} {stored[metric]:.4f})")
            continue
        resume = can_resume(run_dir, fcfg)
        if resume:
            _report_curve(trial, index, read_curve(run_dir / "metrics.csv"), metric)
        started = time.time()
        pruned_at: list[int] = []

        def on_epoch_end(epoch: int, row: dict[str, Any], fold: int = index) -> bool:
            _report(trial, float(row[metric]), fold * FOLD_STEP_STRIDE + epoch)
            if prune.enabled and epoch > prune.warmup_epochs and trial.should_prune():
                pruned_at.append(epoch)
                return False  # stop this fold now; the trial is recorded as pruned
            return True

        train_job(fcfg, run_dir, overwrite=not resume, resume=resume, source=cv.source, plan=cv.fold_plan(index),
                  evaluate=False, report=False, on_epoch_end=on_epoch_end)
        result = fold_result(run_dir, digest, time.time() - started)
        if pruned_at:
            trial.set_user_attr(fold_key(index), {**result, "pruned": True})
            raise TrialPruned(index, pruned_at[0])
        trial.set_user_attr(fold_key(index), result)
        results.append(result)
        log(f"  fold {index + 1}/{cv.n_folds}: {metric} {result[metric]:.4f} after {result['epochs_run']} epoch(s)"
            f" ({result['seconds']:.0f}s; {result['stopped_because']})")
    values = [r[metric] for r in results]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {"mean": mean, "std": std, "folds": results}


def _report_curve(trial: optuna.Trial, fold: int, curve: dict[str, list[float]], metric: str) -> None:
    for epoch, value in zip(curve["epoch"], curve[metric]):
        _report(trial, value, fold * FOLD_STEP_STRIDE + int(epoch))


def _report(trial: optuna.Trial, value: float, step: int) -> None:
    if math.isfinite(value):  # a diverged epoch (NaN loss) tells the pruner nothing
        trial.report(float(value), step)


def can_resume(run_dir: Path, cfg: RunConfig) -> bool:
    """A fold folder left by a killed attempt of this trial, with a checkpoint of exactly this config."""
    if not (run_dir / "checkpoints" / "last.pt").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    try:
        return load_yaml(run_dir / "config.yaml") == cfg.to_dict()
    except Exception:  # an unreadable config from a half-written folder: train the fold afresh
        return False
