"""``tune_report.md`` and ``tune_report.html``: the ranked settings, what each parameter did, the best setting's fold
curves and the refit's test result, rendered from the tune folder's data files and the study."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from resnetlab.reporting import plots
from resnetlab.reporting.document import Document
from resnetlab.tuning.results import Effect, TrialRow, best_row
from resnetlab.tuning.space import SearchSpace, format_value
from resnetlab.tuning.trial import METRICS
from resnetlab.utils.io import atomic_write

MAX_RANKED_ROWS = 50


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.2%}"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _metric_text(metric: str, value: float | None) -> str:
    return _pct(value) if metric == "val_top1" else _num(value)


def _save_png(figure: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return path


def effects_figure(rows: Sequence[TrialRow], space: SearchSpace, metric: str, path: Path) -> Path | None:
    """The objective of every finished setting against each parameter's value, with the mean per value."""
    complete = [r for r in rows if r.state == "complete"]
    if not complete:
        return None
    keys = space.keys
    columns = min(3, len(keys))
    lines = (len(keys) + columns - 1) // columns
    figure = Figure(figsize=(4.2 * columns, 3.3 * lines))
    axes = np.atleast_1d(figure.subplots(lines, columns)).ravel()
    scores = np.asarray([r.score for r in complete], dtype=float)
    for axis, key in zip(axes, keys):
        param = space.params[key]
        values = [r.params.get(key) for r in complete]
        if param.kind == "categorical":
            labels = [format_value(v) for v in param.choices]
            positions = np.asarray([labels.index(format_value(v)) for v in values], dtype=float)
            jitter = (np.arange(len(positions)) % 5 - 2) * 0.04
            axis.scatter(positions + jitter, scores, alpha=0.7, s=22)
            means = [scores[positions == i].mean() if (positions == i).any() else np.nan for i in range(len(labels))]
            axis.plot(range(len(labels)), means, color="#c62828", marker="_", markersize=18, linestyle="none",
                      label="mean")
            axis.set_xticks(range(len(labels)), [plots.short_label(text, 14) for text in labels],
                            rotation=30 if len(labels) > 3 else 0)
            axis.set_xlim(-0.5, len(labels) - 0.5)
        else:
            axis.scatter(np.asarray(values, dtype=float), scores, alpha=0.7, s=22)
            if param.log:
                axis.set_xscale("log")
        axis.set_title(key, fontsize=10)
        axis.set_ylabel(f"mean fold {metric}", fontsize=8)
        axis.grid(alpha=0.3)
    for axis in axes[len(keys):]:
        axis.set_visible(False)
    figure.tight_layout()
    return _save_png(figure, path)


def history_figure(rows: Sequence[TrialRow], metric: str, path: Path) -> Path | None:
    """The objective of each trial in the order trials were started, with the best so far."""
    complete = sorted((r for r in rows if r.state == "complete"), key=lambda r: r.number)
    if len(complete) < 2:
        return None
    maximize = METRICS[metric] == "maximize"
    numbers = [r.number for r in complete]
    scores = np.asarray([r.score for r in complete], dtype=float)
    best = np.maximum.accumulate(scores) if maximize else np.minimum.accumulate(scores)
    figure = Figure(figsize=(7, 3.6))
    axis = figure.subplots()
    axis.scatter(numbers, scores, s=22, alpha=0.8, label="complete trial")
    axis.step(numbers, best, where="post", color="#c62828", label="best so far")
    pruned = [r for r in rows if r.state == "pruned"]
    for r in pruned:
        axis.axvline(r.number, color="0.85", linewidth=0.8, zorder=0)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("trial number" + (" (grey lines: pruned trials)" if pruned else ""))
    axis.set_ylabel(f"mean fold {metric}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return _save_png(figure, path)


def render_tune_report(out: Path, *, rows: Sequence[TrialRow], space: SearchSpace, effects: Sequence[Effect],
                       setup: dict[str, Any], metric: str, cv_text: str, storage_text: str, study_name: str,
                       refit: dict[str, Any] | None, settled: bool, importances: dict[str, float] | None = None
                       ) -> tuple[Path, Path]:
    doc = Document("Hyperparameter tuning report")
    complete = [r for r in rows if r.state == "complete"]
    counts = {state: sum(r.state == state for r in rows) for state in ("complete", "pruned", "failed", "running",
                                                                      "waiting")}
    best = best_row(rows)
    n_folds = setup["folds"]
    search = "grid search (Optuna GridSampler)" if setup["search"] == "grid" else (
        f"Optuna TPE search of {setup.get('n_trials')} trials")

    doc.heading("Summary")
    items = [
        f"Search: {search}; pruning: {setup['pruner']['name']}"
        + (f" (median of the same fold and epoch, after {setup['pruner']['warmup_epochs']} epoch(s) of each fold and "
           f"{setup['pruner']['startup_trials']} finished trial(s))" if setup["pruner"]["name"] != "none" else ""),
        f"Data: {cv_text}",
        f"Score of a setting: the mean over the {n_folds} folds of `{metric}` after each fold's last epoch "
        f"({METRICS[metric]}); the standard deviation over folds is shown beside it.",
        f"Trials: {counts['complete']} complete, {counts['pruned']} pruned, {counts['failed']} failed"
        + (f", {counts['running']} running, {counts['waiting']} queued"
           if counts["running"] or counts["waiting"] else ""),
        f"Study `{study_name}` in {storage_text}",
    ]
    if setup.get("trial_budget"):
        items.append(f"Time budget per trial: {setup['trial_budget']:g} min (split evenly over the folds)")
    doc.bullets(items)
    if not settled:
        doc.paragraph("**The study is not finished**: trials are still running or queued in other workers; this "
                      "report shows it as it stood when written and is rewritten by each worker that finishes.")
    if best is not None:
        doc.paragraph(f"**Best setting** (trial {best.number}): "
                      + ", ".join(f"`{k}={format_value(v)}`" for k, v in best.params.items())
                      + f", mean {metric} {_metric_text(metric, best.score)} "
                        f"+/- {_metric_text(metric, best.stats.get(f'std_{metric}'))} over {n_folds} folds.")

    doc.heading("Search space")
    doc.table(["parameter", "values"], [[f"`{k}`", p.describe()] for k, p in space.params.items()])

    doc.heading("Ranked settings")
    headers = ["rank", "trial", *space.keys, f"mean {metric}", "std", *(f"fold {i + 1}" for i in range(n_folds)),
               "state"]
    table_rows = []
    for row in list(rows)[:MAX_RANKED_ROWS]:
        folds = [_metric_text(metric, row.fold_value(i, metric)) for i in range(n_folds)]
        table_rows.append([row.rank or "", row.number, *(format_value(row.params.get(k, "")) for k in space.keys),
                           _metric_text(metric, row.score), _metric_text(metric, row.stats.get(f"std_{metric}")),
                           *folds,
                           row.state + (f": {row.note}" if row.note else "")])
    doc.table(headers, table_rows, align=["right", "right", *["left"] * len(space.keys), "right", "right",
                                          *["right"] * n_folds, "left"])
    if len(rows) > MAX_RANKED_ROWS:
        doc.paragraph(f"The first {MAX_RANKED_ROWS} of {len(rows)} settings; all are in `trials.csv`.")
    doc.paragraph("Every setting with its per-fold validation accuracy and loss is in `trials.csv`; every epoch of "
                  "every fold in `curves.csv`.")
    doc.figure(history_figure(rows, metric, out / "plots" / "history.png"), "Score of each trial in order, and the "
               "best so far", "history")

    doc.heading("Effect of each parameter")
    if effects:
        doc.paragraph(f"For each value of a parameter: the mean and best score of the complete settings that have "
                      f"it (ranges in quartile bins). With {len(complete)} complete setting(s) these are marginal "
                      "means, not controlled comparisons; they are in `effects.csv`.")
        doc.table(["parameter", "value", "settings", f"mean {metric}", f"best {metric}"],
                  [[f"`{e.key}`", e.value, e.trials, _metric_text(metric, e.mean), _metric_text(metric, e.best)]
                   for e in effects], align=["left", "left", "right", "right", "right"])
        if importances:
            doc.paragraph("Parameter importance (Optuna's fANOVA estimate; shares of the score's variance): "
                          + ", ".join(f"`{k}` {v:.0%}" for k, v in importances.items()))
        doc.figure(effects_figure(rows, space, metric, out / "plots" / "param_effects.png"),
                   "Score of each complete setting against each parameter (red: mean per value)", "param-effects")
    else:
        doc.paragraph("No setting has finished yet.")

    if best is not None:
        doc.heading("Fold curves of the best setting")
        histories = {f"fold {i + 1}": fold["curve"] for i, fold in enumerate(best.folds) if fold}
        if histories:
            doc.figure(plots.compare_curves(histories, out / "plots" / "best_fold_curves.png"),
                       f"Trial {best.number}: validation accuracy and loss, and training loss, per epoch of each fold",
                       "best-fold-curves")
        doc.table(["fold", "val top-1", "val loss", "epochs", "best epoch", "stopped"],
                  [[i + 1, _pct(f.get("val_top1")), _num(f.get("val_loss")), f.get("epochs_run"),
                    f.get("best_epoch") or "", f.get("stopped_because", "")] for i, f in enumerate(best.folds) if f],
                  align=["right", "right", "right", "right", "right", "left"])
        doc.paragraph(f"Each fold's run (checkpoints, `metrics.csv`, `splits.csv`, `train.log`) is in "
                      f"`{best.slot_dir}/fold<k>/` on the machine that ran it.")

    doc.heading("Refit on the training split and test")
    if refit:
        test = refit.get("test", {})
        doc.paragraph(f"The best setting (trial {refit['trial']}) was trained again as an ordinary run on the whole "
                      "training split (the data the folds were cut from) and evaluated once on the test split, which "
                      "no trial ever loaded. Its full report: "
                      f"`{refit.get('report', 'refit/report.md')}` (on {refit.get('host', 'this machine')}).")
        doc.table(["metric", "test"],
                  [["Top-1 accuracy", _pct(test.get("top1"))], ["Top-5 accuracy", _pct(test.get("top5"))],
                   ["Balanced accuracy", _pct(test.get("balanced_accuracy"))],
                   ["Macro F1", _pct(test.get("macro_f1"))], ["Images", test.get("num_samples", "")],
                   [f"Mean fold {metric} of this setting (cross-validation)",
                    _metric_text(metric, refit.get("cv_mean"))]],
                  align=["left", "right"])
        doc.paragraph("How the refit trains: as any `resnetlab train` run, it holds out the data's own validation "
                      "split (which the folds never used) and uses it only to pick the best epoch and to fit the "
                      "temperature for calibration; it trains for the setting's epoch count.")
    else:
        doc.paragraph("Not run: add `--refit` to retrain the best setting on the training split and test it once "
                      "(a finished study goes straight to the refit).")

    doc.heading("How leaks are kept out")
    doc.bullets([
        "Folds are stratified by class and, where the data has groups (GTSRB tracks), keep every group whole: no "
        "frame of a validation sign is in that fold's training part (each fold's `splits.csv` lists who went where).",
        "Normalization statistics (mean/std) are computed on each fold's training part alone.",
        "The test split is not loaded by any trial; it is evaluated once, by the refit.",
        "A fold's score is its last epoch, not its best: the best epoch would be picked on the same data it is "
        "scored on, which favours longer and noisier settings.",
        "Every setting is scored on the same folds (data keys that change the folds cannot be searched).",
    ])
    if setup.get("command"):
        doc.heading("Reproduce")
        doc.paragraph(f"`{setup['command']}`")
    doc.paragraph("Every trial starts from the base configuration in `base_config.yaml` and sets the searched keys "
                  "on it; `best.json` holds the winning setting's full configuration.")
    return doc.write(out / "tune_report.md", out / "tune_report.html")
