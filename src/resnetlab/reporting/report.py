"""``report.md`` and ``report.html`` for a run (or evaluation) directory, rendered from its files alone.

:func:`render_report` reads ``config.yaml``, ``run_info.json``, ``metrics.csv`` and ``eval/*``, redraws every plot
into ``plots/`` and writes both report files from one :class:`~resnetlab.reporting.document.Document`. Sections
whose files are missing (no training history for an evaluation-only directory, no validation split for
temperature scaling, no Grad-CAM file) are left out.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from resnetlab._version import __version__
from resnetlab.evaluation.metrics import REJECT_FRACTIONS, reject_key
from resnetlab.reporting import plots
from resnetlab.reporting.document import Document
from resnetlab.reporting.domain import add_domain_shift_section, run_domain_shift
from resnetlab.reporting.runfiles import RunFiles, load_run

#: Classes whose test F1 is below this are listed as findings.
F1_FINDING_THRESHOLD = 0.9
#: Final-epoch train top-1 minus val top-1 above this is reported as overfitting.
OVERFITTING_GAP_THRESHOLD = 0.05
#: Test ECE above this is reported as poor calibration.
ECE_FINDING_THRESHOLD = 0.05
#: Best-epoch validation top-1 above test top-1 by more than this suggests an optimistic validation split.
VAL_TEST_GAP_THRESHOLD = 0.03
GALLERY_SIZE = 16
TABLE_PAIRS = 10

CONFIG_SECTIONS: tuple[tuple[str, str], ...] = (
    ("Model", "model"), ("Data", "data"), ("Augmentation", "augment"), ("Optimizer", "optim"),
    ("Schedule", "schedule"), ("Loss", "loss"), ("Training", "train"), ("Evaluation", "eval"),
    ("Logging", "logging"),
)

# (label, metrics.json key, format): the test-results table; keys absent from metrics.json are skipped.
RESULT_ROWS: tuple[tuple[str, str, str], ...] = (
    ("Top-1 accuracy", "top1", "pct"),
    ("Top-5 accuracy", "top5", "pct"),
    ("Balanced accuracy", "balanced_accuracy", "pct"),
    ("Macro precision", "macro_precision", "pct"),
    ("Macro recall", "macro_recall", "pct"),
    ("Macro F1", "macro_f1", "pct"),
    ("Weighted precision", "weighted_precision", "pct"),
    ("Weighted recall", "weighted_recall", "pct"),
    ("Weighted F1", "weighted_f1", "pct"),
    ("Negative log-likelihood", "nll", "float"),
    ("Expected calibration error (15 bins)", "ece", "float"),
    ("Brier score", "brier", "float"),
    ("Error rate", "error_rate", "pct"),
    *((f"Error rate after rejecting the {f:.0%} least confident", reject_key(f), "pct") for f in REJECT_FRACTIONS),
    ("Samples", "num_samples", "int"),
    ("Classes", "num_classes", "int"),
)

CALIBRATION_ROWS: tuple[tuple[str, str, str], ...] = (
    ("Mean confidence", "mean_confidence", "float"),
    ("Mean confidence, correct predictions", "mean_confidence_correct", "float"),
    ("Mean confidence, incorrect predictions", "mean_confidence_incorrect", "float"),
    ("Confidence gap (correct minus incorrect)", "confidence_gap", "float"),
    ("Area under the risk-coverage curve (AURC)", "aurc", "float"),
    ("ECE before temperature scaling", "ece", "float"),
    ("ECE after temperature scaling", "ece_after_temperature", "float"),
    ("Temperature (fitted on the validation split)", "temperature", "float"),
    ("Test NLL before temperature scaling", "nll", "float"),
    ("Test NLL after temperature scaling", "nll_after_temperature", "float"),
    ("Validation NLL before temperature scaling", "val_nll_before_temperature", "float"),
    ("Validation NLL after temperature scaling", "val_nll_after_temperature", "float"),
)

# The rows when the evaluation applied the model's stored temperature: the confidences (and "ece", "nll") are then
# the calibrated ones, and "ece_raw"/"nll_raw" are the figures before.
DEPLOYED_CALIBRATION_ROWS: tuple[tuple[str, str, str], ...] = (
    ("Mean confidence", "mean_confidence", "float"),
    ("Mean confidence, correct predictions", "mean_confidence_correct", "float"),
    ("Mean confidence, incorrect predictions", "mean_confidence_incorrect", "float"),
    ("Confidence gap (correct minus incorrect)", "confidence_gap", "float"),
    ("Area under the risk-coverage curve (AURC)", "aurc", "float"),
    ("Temperature the model deploys with (stored in the checkpoint)", "temperature_applied", "float"),
    ("ECE of the raw confidences (T = 1)", "ece_raw", "float"),
    ("ECE at the deployed temperature", "ece", "float"),
    ("Test NLL of the raw logits", "nll_raw", "float"),
    ("Test NLL at the deployed temperature", "nll", "float"),
    ("Validation NLL before temperature scaling", "val_nll_before_temperature", "float"),
    ("Validation NLL after temperature scaling", "val_nll_after_temperature", "float"),
)


# ---------------------------------------------------------------------------------------------------- formatting
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def format_value(value: Any, kind: str = "auto") -> str:
    """``pct``: 97.12%; ``float``: 4 decimals; ``int``: thousands separators; ``auto`` picks by type."""
    if value is None or (_is_number(value) and isinstance(value, (float, np.floating)) and not math.isfinite(value)):
        return "n/a"
    if kind == "pct":
        return f"{100 * float(value):.2f}%"
    if kind == "float":
        return f"{float(value):.4f}"
    if kind == "int":
        return f"{int(value):,}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(item) for item in value) if value else "none"
    if isinstance(value, Mapping):
        return ", ".join(f"{key}={format_value(item)}" for key, item in value.items()) or "none"
    return str(value)


def format_duration(seconds: float) -> str:
    seconds = int(round(float(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            items += _flatten(value, name + ".")
        else:
            items.append((name, value))
    return items


def _history_column_kind(column: str) -> str:
    if "top" in column or "acc" in column:
        return "pct"
    if column == "lr":
        return "lr"
    if column in ("epoch", "best", "train_input_size"):
        return "int"
    return "float" if "loss" in column else "auto"


def _format_history_cell(value: float, kind: str) -> str:
    if not math.isfinite(value):
        return ""
    if kind == "lr":
        return f"{value:.3g}"
    if kind == "int":
        return f"{value:.0f}"
    if kind == "auto":
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.4g}"
    return format_value(value, kind)


# ---------------------------------------------------------------------------------------------------- analysis
def monitor_mode(monitor: str, run_info: Mapping[str, Any] | None = None) -> str:
    """"min" for loss-like monitors, "max" otherwise, unless run_info names a ``monitor_mode``."""
    if run_info and run_info.get("monitor_mode") in ("min", "max"):
        return run_info["monitor_mode"]
    return "min" if "loss" in monitor else "max"


def best_epoch_of(run: RunFiles) -> tuple[int | None, str]:
    """The best epoch (from run_info, else the monitor's optimum in metrics.csv) and the monitor's name."""
    info = run.run_info or {}
    monitor = str(info.get("monitor") or "val_top1")
    if info.get("best_epoch") is not None:
        return int(info["best_epoch"]), monitor
    if run.history is not None and monitor in run.history:
        values = run.history[monitor]
        if np.isfinite(values).any():
            index = np.nanargmin(values) if monitor_mode(monitor, info) == "min" else np.nanargmax(values)
            return int(run.history["epoch"][index]), monitor
    return None, monitor


def _history_row(run: RunFiles, epoch: int) -> int | None:
    if run.history is None:
        return None
    matches = np.flatnonzero(run.history["epoch"] == epoch)
    return int(matches[0]) if len(matches) else None


def derive_findings(run: RunFiles, f1_threshold: float = F1_FINDING_THRESHOLD) -> list[str]:
    """Short statements drawn from the numbers: weak classes, confusable pairs, overfitting, calibration, ..."""
    findings: list[str] = []
    metrics = run.metrics or {}
    if run.per_class:
        scored = [row for row in run.per_class if math.isfinite(row["f1"])]
        weak = sorted((row for row in scored if row["f1"] < f1_threshold), key=lambda row: row["f1"])
        if weak:
            listed = ", ".join(f"{row['class']} ({row['f1']:.3f})" for row in weak[:8])
            more = f" and {len(weak) - 8} more" if len(weak) > 8 else ""
            findings.append(f"{len(weak)} of {len(scored)} classes have test F1 below {f1_threshold:g}: "
                            f"{listed}{more}.")
        elif scored:
            lowest = min(scored, key=lambda row: row["f1"])
            findings.append(f"All {len(scored)} classes reach test F1 of at least {f1_threshold:g} (lowest: "
                            f"{lowest['class']}, {lowest['f1']:.3f}).")
    if run.most_confused:
        pairs = [f"{row['true']} predicted as {row['pred']} {int(row['count'])} "
                 f"time{'s' if int(row['count']) != 1 else ''} "
                 f"({100 * row['fraction_of_true']:.1f}% of {row['true']})" for row in run.most_confused[:3]]
        findings.append("Most confused pairs: " + "; ".join(pairs) + ".")
    if run.history is not None and "train_top1" in run.history and "val_top1" in run.history:
        gap = float(run.history["train_top1"][-1] - run.history["val_top1"][-1])
        if gap > OVERFITTING_GAP_THRESHOLD:
            findings.append(f"Overfitting: at the last epoch train top-1 exceeds validation top-1 by "
                            f"{100 * gap:.1f} points (threshold {100 * OVERFITTING_GAP_THRESHOLD:.0f}).")
        elif math.isfinite(gap):
            findings.append(f"No overfitting gap: last-epoch train minus validation top-1 is {100 * gap:+.1f} "
                            f"points (train accuracy is measured on augmented images, so it can sit below "
                            f"validation).")
    best_epoch, monitor = best_epoch_of(run)
    if run.history is not None and best_epoch is not None:
        epochs = run.history["epoch"]
        last_epoch, num_epochs = int(epochs[-1]), len(epochs)
        if last_epoch - best_epoch >= max(3, math.ceil(0.25 * num_epochs)):
            findings.append(f"The best epoch ({best_epoch}) is {last_epoch - best_epoch} epochs before the last "
                            f"({last_epoch}): `{monitor}` stopped improving, so a shorter schedule or early "
                            f"stopping would save that time.")
        row = _history_row(run, best_epoch)
        if row is not None and "val_top1" in run.history and "top1" in metrics:
            val_top1 = float(run.history["val_top1"][row])
            if val_top1 - metrics["top1"] > VAL_TEST_GAP_THRESHOLD:
                findings.append(f"Validation top-1 at the best epoch ({100 * val_top1:.2f}%) is "
                                f"{100 * (val_top1 - metrics['top1']):.1f} points above test top-1 "
                                f"({100 * metrics['top1']:.2f}%): the validation split is easier than the test "
                                f"set, e.g. near-duplicate images shared between training and validation.")
    ece = metrics.get("ece")
    if ece is not None:
        direction = ""
        if metrics.get("mean_confidence") is not None and metrics.get("top1") is not None:
            direction = (" (overconfident)" if metrics["mean_confidence"] > metrics["top1"] else " (underconfident)")
        verdict = (f"Poorly calibrated{direction}: ECE {ece:.4f} is above {ECE_FINDING_THRESHOLD:g}."
                   if ece > ECE_FINDING_THRESHOLD else f"Well calibrated: ECE {ece:.4f} is at most "
                                                       f"{ECE_FINDING_THRESHOLD:g}.")
        if metrics.get("temperature_applied") is not None:
            raw_ece = metrics.get("ece_raw")
            verdict += (f" That is at the temperature the model deploys with (T = "
                        f"{metrics['temperature_applied']:.3f}"
                        + (f"; the raw confidences have ECE {raw_ece:.4f})." if raw_ece is not None else ")."))
        elif metrics.get("temperature") is not None and metrics.get("ece_after_temperature") is not None:
            verdict += (f" Temperature scaling (T = {metrics['temperature']:.3f}, fitted on validation) changes it to "
                        f"{metrics['ece_after_temperature']:.4f}.")
        findings.append(verdict)
    rejected_key = reject_key(REJECT_FRACTIONS[-1])
    if metrics.get(rejected_key) is not None and metrics.get("error_rate") is not None:
        findings.append(f"Rejecting the {REJECT_FRACTIONS[-1]:.0%} least confident predictions lowers the error "
                        f"rate from {100 * metrics['error_rate']:.2f}% to {100 * metrics[rejected_key]:.2f}%.")
    return findings


# ---------------------------------------------------------------------------------------------------- sections
def _key_value_table(doc: Document, rows: list[tuple[str, Any]]) -> None:
    if rows:
        doc.table(["Setting", "Value"], [[f"`{key}`", format_value(value)] for key, value in rows])


def _metric_label(label: str, key: str, metrics: Mapping[str, Any]) -> str:
    if key == "top5" and metrics.get("topk_effective"):
        # With fewer than 5 classes the top-5 figure is the top-k over every class, trivially 100 %.
        return f"Top-{metrics['topk_effective']} accuracy (k capped at the class count)"
    return label


def _metric_table(doc: Document, metrics: Mapping[str, Any], spec) -> None:
    rows = [[_metric_label(label, key, metrics), format_value(metrics[key], kind), f"`{key}`"]
            for label, key, kind in spec if key in metrics]
    if rows:
        doc.table(["Metric", "Value", "metrics.json key"], rows, ["left", "right", "left"])


def _summary(doc: Document, run: RunFiles, findings: list[str]) -> None:
    config, info, metrics = run.config or {}, run.run_info or {}, run.metrics or {}
    rows: list[list[str]] = []
    model_section = config.get("model") if isinstance(config.get("model"), Mapping) else {}
    model = model_section.get("name") or model_section.get("arch")
    if model:
        rows.append(["Model", str(model)])
    if config.get("recipe"):
        rows.append(["Recipe", str(config["recipe"])])
    if info.get("num_params") is not None:
        rows.append(["Parameters", format_value(info["num_params"], "int")])
    if info.get("model_origin"):
        rows.append(["Initial weights", str(info["model_origin"])])
    for label, key, kind in (("Test top-1", "top1", "pct"), ("Test macro F1", "macro_f1", "pct"),
                             ("Test ECE", "ece", "float")):
        if key in metrics:
            rows.append([label, format_value(metrics[key], kind)])
    best_epoch, monitor = best_epoch_of(run)
    if best_epoch is not None and run.history is not None:
        rows.append(["Best epoch", f"{best_epoch} of {len(run.history['epoch'])} (by `{monitor}`)"])
    if info.get("train_seconds") is not None:
        rows.append(["Training time", format_duration(info["train_seconds"])])
    if info.get("stopped_because"):
        rows.append(["Training stopped", str(info["stopped_because"])])
    if rows:
        doc.heading("Summary")
        doc.table(["Item", "Value"], rows, ["left", "right"])
    if findings:
        doc.heading("Findings")
        doc.bullets(findings)


def _configuration(doc: Document, run: RunFiles) -> None:
    config, info = run.config, run.run_info or {}
    if not config:
        return
    doc.heading("Configuration")
    if config.get("recipe"):
        doc.paragraph(f"Recipe: `{config['recipe']}`.")
    known = {key for _, key in CONFIG_SECTIONS} | {"recipe"}
    sections = list(CONFIG_SECTIONS) + [(key.capitalize(), key) for key in config if key not in known]
    table: list[list[str]] = []
    for title, key in sections:
        section = config.get(key)
        rows = _flatten(section) if isinstance(section, Mapping) else ([(key, section)] if section is not None else [])
        if key == "model" and info.get("num_params") is not None:
            rows.append(("parameters", format_value(info["num_params"], "int")))
        if key == "model" and info.get("model_origin"):
            rows.append(("initial weights", info["model_origin"]))
        if key == "data":
            rows += [(name, value) for name, value in _flatten(info) if "split" in name.lower()]
        # The section name only on its first row keeps the single table easy to scan.
        table += [[title if index == 0 else "", f"`{name}`", format_value(value)]
                  for index, (name, value) in enumerate(rows)]
    if table:
        doc.table(["Section", "Setting", "Value"], table)


def _training(doc: Document, run: RunFiles, plots_dir: Path) -> None:
    history = run.history
    if history is None or "epoch" not in history or len(history["epoch"]) == 0:
        return
    doc.heading("Training")
    best_epoch, monitor = best_epoch_of(run)
    epochs = history["epoch"]
    text = f"{len(epochs)} epochs were run (epochs {int(epochs[0])} to {int(epochs[-1])})."
    row = _history_row(run, best_epoch) if best_epoch is not None else None
    if row is not None and monitor in history and np.isfinite(history[monitor]).any():
        mode = monitor_mode(monitor, run.run_info)
        values = history[monitor]
        kind = _history_column_kind(monitor)
        best_of, superlative = (np.nanmin, "lowest") if mode == "min" else (np.nanmax, "highest")
        optimum = best_of(values)
        keep_last = ((run.config or {}).get("train") or {}).get("keep") == "last"
        ema_column = f"ema_{monitor}"
        ema_kept = (run.run_info or {}).get("best_weights") == "ema" and ema_column in history
        kept = values[row]
        if keep_last:
            text += f" The last epoch ({best_epoch}) was kept (`train.keep=last`: the schedule anneals to the end), "
            if ema_kept:
                text += (f"its EMA weights, with `{ema_column}` {_format_history_cell(history[ema_column][row], kind)} "
                         f"(raw weights {_format_history_cell(values[row], kind)})")
            else:
                text += f"with `{monitor}` {_format_history_cell(values[row], kind)}"
        elif ema_kept:
            # each epoch's candidate was the better of its raw and EMA weights (train.ema_keep_best)
            optimum = best_of(np.stack([values, history[ema_column]]))
            kept = history[ema_column][row]
            text += (f" The checkpoint of epoch {best_epoch} was kept as best: its EMA weights have the "
                     f"{superlative} `{monitor}` of the raw and EMA weights of all epochs "
                     f"({_format_history_cell(kept, kind)}; raw weights {_format_history_cell(values[row], kind)})")
        else:
            text += (f" The checkpoint of epoch {best_epoch} was kept as best because it has the {superlative} "
                     f"`{monitor}` ({_format_history_cell(values[row], kind)})")
        if kept != optimum:
            text += f"; the optimum over all epochs was {_format_history_cell(optimum, kind)}"
        text += "." if keep_last else f"; the last epoch reached {_format_history_cell(values[-1], kind)}."
    elif best_epoch is not None and monitor in history:
        text += (f" There was no validation split, so nothing was monitored and the last epoch ({best_epoch}) was "
                 "kept.")
    elif best_epoch is not None:
        text += f" The best epoch by `{monitor}` was {best_epoch}."
    doc.paragraph(text)
    doc.figure(plots.training_curves(history, plots_dir / "training_curves.png", best_epoch=best_epoch),
               "Training curves: loss, accuracy, learning rate and train-minus-val accuracy gap "
               "(dashed line: best epoch).", "training-curves")
    curves = plots.time_to_accuracy_curves(history)
    if curves and np.isfinite(curves["validation top-1"]["top1"]).any():
        doc.figure(plots.time_to_accuracy(curves, plots_dir / "time_to_accuracy.png"),
                   "Time to accuracy: validation top-1 against cumulative training time (epoch_seconds in "
                   "metrics.csv; validation passes not counted).", "time-to-accuracy")
    columns = [column for column in history if column != "epoch" and history[column].dtype != object]
    kinds = {column: _history_column_kind(column) for column in columns}
    rows = [[str(int(epoch)) + (" (best)" if best_epoch is not None and int(epoch) == best_epoch else "")]
            + [_format_history_cell(history[column][i], kinds[column]) for column in columns]
            for i, epoch in enumerate(epochs)]
    doc.heading("Epochs", 3)
    doc.table(["epoch", *columns], rows, ["left"] + ["right"] * len(columns))


def _test_results(doc: Document, run: RunFiles) -> None:
    metrics = run.metrics
    if not metrics:
        return
    doc.heading("Test results")
    described = [f"`{key}` = {format_value(metrics[key])}" for key in ("data", "split", "checkpoint", "tta")
                 if key in metrics]
    if described:
        doc.paragraph("Evaluated: " + ", ".join(described) + ".")
    deployed = metrics.get("deployment")
    if deployed:
        doc.paragraph(f"Deployment: on the machine that trained it, `predict` and `serve` run this model as a "
                      f"{deployed['precision']} AOTInductor package ({deployed['chosen_because']}). On these "
                      f"{deployed['images']} test images it scores top-1 {deployed['top1']:.4f} against "
                      f"{deployed['float32_top1']:.4f} in float32, with {deployed['top1_agreement']:.1%} of the answers "
                      f"the same and confidences moved by at most {deployed['max_abs_confidence_change']:.3f}; "
                      f"`--precision float32` serves the float32 model these results describe.")
    exported = metrics.get("evaluated_model")
    if exported:
        doc.paragraph(f"These figures are those of the {exported['precision']} {exported['format']} export "
                      f"`{exported['export']}` on {exported['backend']}, not of the checkpoint itself.")
    if metrics.get("class_subset"):
        doc.paragraph(f"This test set holds {metrics['num_classes']} of the model's {metrics['num_model_classes']} "
                      f"classes: per-class, macro, weighted and balanced figures cover those classes, while a "
                      f"prediction of any model class counts (predicting a class the set lacks is an error).")
    if metrics.get("classes_without_support"):
        doc.paragraph("Classes without test images (left out of the macro averages unless the model predicted "
                      "them, which then counts as precision 0): " + ", ".join(metrics["classes_without_support"]) + ".")
    _metric_table(doc, metrics, RESULT_ROWS)


FINETUNE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("Top-1 accuracy", "top1", "pct"),
    ("Balanced accuracy", "balanced_accuracy", "pct"),
    ("Expected calibration error", "ece", "float"),
)


def _fine_tuning(doc: Document, run: RunFiles) -> None:
    """Before and after fine-tuning (``eval/finetune.json``, written by a run with ``model.init_from``): the
    original and the fine-tuned model on the new domain's test split, and on the original dataset's."""
    from resnetlab.utils.io import read_json

    path = run.eval_dir / "finetune.json" if run.eval_dir is not None else None
    if path is None or not path.is_file():
        return
    record = read_json(path)
    doc.heading("Fine-tuning")
    origin = record.get("init_from") or {}
    doc.paragraph(f"Fine-tuned from `{origin.get('checkpoint')}` (sha256 `{str(origin.get('sha256'))[:12]}`), "
                  "keeping its classes, head and preprocessing. *Before* is that checkpoint, *after* this run's "
                  f"model, on the same images ({record.get('confidence', 'softmax')} confidences for the ECE).")
    rows = []
    for title, key in (("New domain", "new_domain"), ("Original dataset", "original")):
        entry = record.get(key)
        if not entry:
            continue
        before, after = entry["before"], entry["after"]
        where = f"{title}: `{entry['data']}`, {entry['split']}, {format_value(after['num_images'], 'int')} images"
        for label, metric, kind in FINETUNE_ROWS:
            change = after[metric] - before[metric]
            shown = f"{100 * change:+.2f} points" if kind == "pct" else f"{change:+.4f}"
            rows.append([where, label, format_value(before[metric], kind), format_value(after[metric], kind), shown])
            where = ""
    if rows:
        doc.table(["Data", "Metric", "Before", "After", "Change"], rows, ["left", "left", "right", "right", "right"])
    if not record.get("original"):
        doc.paragraph(f"Not evaluated on the original dataset: {record.get('original_skipped') or 'not available'}. "
                      "`--original-data SPEC` names it.")
    else:
        forgot = record["original"]["before"]["top1"] - record["original"]["after"]["top1"]
        gained = record["new_domain"]["after"]["top1"] - record["new_domain"]["before"]["top1"]
        doc.paragraph(f"Fine-tuning {'gained' if gained >= 0 else 'lost'} {100 * abs(gained):.2f} points of top-1 on "
                      f"the new domain and {'forgot' if forgot > 0 else 'gained'} {100 * abs(forgot):.2f} on the "
                      "original dataset.")


def _per_class_rows(rows):
    return [[str(int(row["index"])), row["class"], format_value(row["precision"], "float"),
             format_value(row["recall"], "float"), format_value(row["f1"], "float"),
             format_value(row["support"], "int"), format_value(row["predicted"], "int"),
             format_value(row["mean_confidence"], "float")] for row in rows]


PER_CLASS_HEADERS = ["#", "class", "precision", "recall (= accuracy)", "F1", "support", "predicted",
                     "mean confidence"]
PER_CLASS_ALIGN = ["right", "left"] + ["right"] * 6


def _per_class(doc: Document, run: RunFiles, plots_dir: Path, f1_threshold: float) -> None:
    if not run.per_class:
        return
    doc.heading("Per-class results")
    names = [row["class"] for row in run.per_class]
    doc.figure(plots.per_class_f1(names, [row["f1"] for row in run.per_class],
                                  [row["support"] for row in run.per_class], plots_dir / "per_class_f1.png",
                                  threshold=f1_threshold),
               f"Per-class F1, worst first (red: below {f1_threshold:g}).", "per-class-f1")
    ranked = sorted(run.per_class, key=lambda row: (row["f1"], row["support"]))
    count = min(5, len(ranked))
    doc.heading("Best classes", 3)
    doc.table(PER_CLASS_HEADERS, _per_class_rows(ranked[::-1][:count]), PER_CLASS_ALIGN)
    doc.heading("Worst classes", 3)
    doc.table(PER_CLASS_HEADERS, _per_class_rows(ranked[:count]), PER_CLASS_ALIGN)
    doc.heading("All classes", 3)
    doc.table(PER_CLASS_HEADERS, _per_class_rows(run.per_class), PER_CLASS_ALIGN)


def _confusion(doc: Document, run: RunFiles, plots_dir: Path) -> None:
    if run.confusion is None and not run.most_confused:
        return
    doc.heading("Confusion")
    if run.confusion is not None:
        confusion = run.confusion
        columns = list(range(len(confusion.col_names)))
        if len(confusion.row_names) < len(confusion.col_names):
            # A foreign test set: show its classes plus any other class the model actually predicted.
            present = set(confusion.row_names)
            columns = [j for j, name in enumerate(confusion.col_names)
                       if name in present or confusion.counts[:, j].any()]
        index_of = {name: j for j, name in enumerate(confusion.col_names)}
        # Model class indices in the tick labels tie the cells to the class ids users know (e.g. GTSRB ClassId).
        doc.figure(plots.confusion_matrix(confusion.counts[:, columns],
                                          [f"({index_of.get(name, '?')}) {name}" for name in confusion.row_names],
                                          [f"({j}) {confusion.col_names[j]}" for j in columns],
                                          plots_dir / "confusion_matrix.png"),
                   "Confusion matrix, each row normalised by the true class's support; cells show percent.",
                   "confusion-matrix", full_size=len(confusion.col_names) > 20)
    if run.most_confused:
        doc.heading("Most confused pairs", 3)
        doc.table(["true class", "predicted as", "count", "% of true class"],
                  [[row["true"], row["pred"], format_value(row["count"], "int"),
                    format_value(row["fraction_of_true"], "pct")] for row in run.most_confused[:TABLE_PAIRS]],
                  ["left", "left", "right", "right"])


def _calibration(doc: Document, run: RunFiles, plots_dir: Path) -> None:
    metrics = run.metrics or {}
    if not metrics:
        return
    doc.heading("Confidence and calibration")
    deployed = metrics.get("temperature_applied")
    if deployed is not None:
        doc.paragraph(f"Confidence is the top-1 probability of softmax(logits / T) with T = {deployed:.4f}, the "
                      "temperature stored in the checkpoint (fitted by minimising the NLL of the validation split at "
                      "the end of training, or of the split `resnetlab calibrate` was given) that `predict` and "
                      "`serve` apply too; every confidence, probability and probability metric "
                      "here is at that temperature, and the raw figures (T = 1) are given beside them. ECE uses 15 "
                      "equal-width confidence bins.")
        _metric_table(doc, metrics, DEPLOYED_CALIBRATION_ROWS)
    else:
        uncalibrated = (" These confidences are uncalibrated: the model deploys without a stored temperature (or "
                        "the evaluation ran with `--raw`)." if "temperature_applied" in metrics else "")
        doc.paragraph("Confidence is the top-1 softmax probability. ECE uses 15 equal-width confidence bins; the "
                      "temperature is fitted on the validation split by minimising its NLL and applied to the test "
                      "logits." + uncalibrated)
        _metric_table(doc, metrics, CALIBRATION_ROWS)
    if run.reliability:
        labels = {"uncalibrated": "uncalibrated", "temperature_scaled": "temperature-scaled"}
        curves = {labels.get(variant, variant): bins for variant, bins in run.reliability.items()}
        doc.figure(plots.reliability_diagram(curves, plots_dir / "reliability_diagram.png"),
                   "Reliability diagram: accuracy per confidence bin against the diagonal of perfect calibration; "
                   "below, predictions per bin.", "reliability-diagram")
    if run.risk_coverage and len(run.risk_coverage.get("coverage", [])):
        doc.figure(plots.risk_coverage(run.risk_coverage["coverage"], run.risk_coverage["risk"],
                                       plots_dir / "risk_coverage.png", reject_fractions=REJECT_FRACTIONS),
                   "Risk-coverage curve: error rate among the accepted predictions when the least confident are "
                   "rejected.", "risk-coverage")
    _operating_point(doc, metrics)


def operating_point_text(metrics: Mapping[str, Any]) -> str | None:
    """The "Operating point" paragraph: the rule, its threshold, and what it did on the evaluated split."""
    point = metrics.get("operating_point")
    fraction = metrics.get("accepted_fraction")
    if not isinstance(point, Mapping) or fraction is None:
        return None
    split = metrics.get("split", "test")
    error = metrics.get("error_among_accepted")
    error_text = "no answer was accepted" if error is None else f"the error among them is {100 * error:.2f}%"
    if point.get("rule") == "accept_all":
        return (f"No operating point: every answer is accepted, none is reported as \"unknown\" (the model stores "
                f"no calibration, or the evaluation ran with `--raw`); on the {split} split {error_text}. Fit one with "
                "`resnetlab calibrate`.")
    if point.get("rule") == "coverage":
        rule = f"keep at least {100 * point['target']:.2f}% of the in-domain validation images"
    elif point.get("rule") == "max_error":
        rule = f"at most {100 * point['target']:.2f}% error among the accepted validation images"
    else:
        rule = "a threshold given directly"
    on_val = ""
    if point.get("coverage") is not None and point.get("error") is not None:
        on_val = (f" (on validation it keeps {100 * point['coverage']:.2f}% with {100 * point['error']:.2f}% "
                  "error)")
    return (f"Answers whose confidence is below {point['threshold']:.4f} are reported as \"unknown\" (the best "
            f"guess is still given). The threshold was chosen for the rule \"{rule}\"{on_val}. On the {split} split "
            f"it accepts {100 * fraction:.2f}% of the images and {error_text}; "
            f"{100 * (1 - fraction):.2f}% become \"unknown\".")


def _operating_point(doc: Document, metrics: Mapping[str, Any]) -> None:
    text = operating_point_text(metrics)
    if text is not None:
        doc.heading("Operating point", 3)
        doc.paragraph(text)


def _gallery_items(rows) -> list[plots.GalleryItem]:
    return [plots.GalleryItem(path=row["path"], true=row["true"], pred=row["pred"],
                              confidence=float(row["confidence"]),
                              loss=float(row["loss"]) if row.get("loss") not in (None, "") else None)
            for row in rows]


def _galleries(doc: Document, run: RunFiles, plots_dir: Path,
               load_image: Callable[[str], Image.Image]) -> None:
    predictions = run.predictions or []
    wrong = [row for row in predictions if row["true"] != row["pred"]]
    if not predictions or (not wrong and run.gradcam is None):
        return
    doc.heading("Misclassified images")
    if not wrong:
        doc.paragraph("Every test image was classified correctly.")
    else:
        has_loss = all(row.get("loss") not in (None, "") for row in wrong)
        hardest = sorted(wrong, key=lambda row: -float(row["loss"] if has_loss else row["confidence"]))
        hardest = hardest[:GALLERY_SIZE]
        gallery_path = None
        if any(row["path"] for row in hardest):
            gallery_path = plots.image_gallery(_gallery_items(hardest), plots_dir / "misclassified.png",
                                               load_image=load_image,
                                               title="Misclassified test images with the highest loss")
        if gallery_path is None:
            doc.paragraph("The images could not be loaded from the paths in `predictions.csv`, so only the table "
                          "is shown.")
        doc.figure(gallery_path, f"The {len(hardest)} misclassified test images with the highest loss "
                                 f"(true class, prediction, confidence).", "misclassified-gallery")
        doc.table(["image", "true class", "predicted", "confidence", "loss"],
                  [[Path(row["path"]).name or "-", row["true"], row["pred"],
                    format_value(float(row["confidence"]), "float"),
                    format_value(float(row["loss"]), "float") if has_loss else "n/a"]
                   for row in hardest[:TABLE_PAIRS]], ["left", "left", "left", "right", "right"])
    if run.gradcam is not None and len(run.gradcam.get("images", [])):
        cam = run.gradcam
        doc.figure(plots.gradcam_overlays(cam["images"], cam["heatmaps"], cam["true_names"].tolist(),
                                          cam["pred_names"].tolist(), cam["confidences"],
                                          plots_dir / "gradcam.png",
                                          target_names=cam["target_names"].tolist() if "target_names" in cam
                                          else None),
                   "Grad-CAM overlays for misclassified images: the regions that drove the explained class's "
                   "score.", "gradcam")
    if any(row["path"] for row in predictions):
        # A fixed seed keeps the sample the same across re-renders of the same run.
        chosen = np.sort(np.random.default_rng(0).choice(len(predictions), min(GALLERY_SIZE, len(predictions)),
                                                         replace=False))
        sample_path = plots.image_gallery(_gallery_items([predictions[i] for i in chosen]),
                                          plots_dir / "sample_predictions.png", load_image=load_image,
                                          title="Random test predictions")
        if sample_path is not None:
            doc.heading("Sample predictions", 3)
            doc.figure(sample_path, "A random sample of test predictions (green: correct, red: wrong).",
                       "sample-predictions")


def _domain_shift(doc: Document, run: RunFiles) -> None:
    """The run's evaluations on other datasets (``evaluations/*``, from ``resnetlab evaluate RUN --data ...``)
    against its own test results in ``eval/``: accuracy per class, calibration, coverage and OOD AUROC."""
    results, notes = run_domain_shift(run)
    add_domain_shift_section(doc, results, notes)


def _environment(doc: Document, run: RunFiles) -> None:
    info = run.run_info
    if not info:
        return
    doc.heading("Hardware, versions and run time")
    skip = {"class_names"}
    rows = [(name, value) for name, value in _flatten(info)
            if name.split(".")[0] not in skip and "split" not in name.lower()]
    for name in ("train_seconds", "eval_seconds", "total_seconds"):
        if info.get(name) is not None and _is_number(info[name]):
            rows.append((name.replace("_seconds", "_time"), format_duration(info[name])))
    _key_value_table(doc, rows)


# ---------------------------------------------------------------------------------------------------- entry point
def build_report(run: RunFiles, plots_dir: Path, *, load_image: Callable[[str], Image.Image] = plots.open_image,
                 f1_threshold: float = F1_FINDING_THRESHOLD) -> Document:
    """The report of ``run`` as a document, drawing its plots into ``plots_dir``."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    doc = Document(title=f"resnetlab report: {run.name}")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc.paragraph(f"Rendered {stamp} by resnetlab {__version__} (Python {platform.python_version()}) "
                  f"from the files in `{run.root}`.")
    _summary(doc, run, derive_findings(run, f1_threshold))
    _configuration(doc, run)
    _training(doc, run, plots_dir)
    _test_results(doc, run)
    _fine_tuning(doc, run)
    _per_class(doc, run, plots_dir, f1_threshold)
    _confusion(doc, run, plots_dir)
    _calibration(doc, run, plots_dir)
    _galleries(doc, run, plots_dir, load_image)
    _domain_shift(doc, run)
    _environment(doc, run)
    return doc


def render_report(run_dir: str | Path, *, load_image: Callable[[str], Image.Image] | None = None,
                  f1_threshold: float = F1_FINDING_THRESHOLD) -> tuple[Path, Path]:
    """Re-render ``plots/*.png``, ``report.md`` and ``report.html`` in ``run_dir`` from its files alone.

    ``run_dir`` is a training run directory or an evaluation directory (``metrics.json`` inside). ``load_image``
    opens gallery images from the paths in ``predictions.csv``; pass one that applies the dataset's ROI crop to
    show what the model saw (default: the file as is).
    """
    run = load_run(run_dir)
    doc = build_report(run, run.root / "plots", load_image=load_image or plots.open_image,
                       f1_threshold=f1_threshold)
    return doc.write(run.root / "report.md", run.root / "report.html")
