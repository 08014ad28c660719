"""``resnetlab compare``: metrics of several runs or evaluations side by side, with per-class deltas.

Typical uses: two training recipes; one model on the original test set and on a shifted one (the per-class delta
is then "shift minus clean"); runs trained under an equal time budget (training time and the accuracy-over-time
curve are in the comparison). The first directory is the baseline every delta is taken against.

When two or more of the compared evaluations come from the same checkpoint on different images, a "Domain shift"
section compares each shifted domain with the reference evaluation (:mod:`resnetlab.reporting.domain`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resnetlab.errors import ConfigError, ResnetlabError
from resnetlab.utils.io import write_csv, write_csv_rows, write_json
from resnetlab.reporting import domain, plots
from resnetlab.reporting.document import Document
from resnetlab.reporting.report import CALIBRATION_ROWS, RESULT_ROWS, best_epoch_of, format_duration, format_value
from resnetlab.reporting.runfiles import RunFiles, load_run


def _unique_by_key(rows):
    seen: dict[str, tuple[str, str, str]] = {}
    for label, key, kind in rows:
        seen.setdefault(key, (label, key, kind))
    return tuple(seen.values())


# Evaluation metrics compared, in table order, without duplicates (ECE and NLL appear in both source tables).
COMPARED_METRICS: tuple[tuple[str, str, str], ...] = _unique_by_key((*RESULT_ROWS, *CALIBRATION_ROWS))
PER_CLASS_METRICS: tuple[str, ...] = ("f1", "recall", "precision")


def run_labels(dirs: Sequence[Path]) -> list[str]:
    """Short unique labels: the directory name, with parent folders added until the labels differ."""
    paths = [Path(d).resolve() for d in dirs]
    for depth in range(1, max(len(p.parts) for p in paths) + 1):
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    # The same directory given twice: number its occurrences.
    return [f"{path.name}#{index + 1}" for index, path in enumerate(paths)]


def _run_summary(run: RunFiles) -> dict[str, Any]:
    """Training-side figures of a run (empty for a bare evaluation directory)."""
    summary: dict[str, Any] = {}
    config, info, history = run.config or {}, run.run_info or {}, run.history
    model = config.get("model")
    if isinstance(model, dict) and model.get("name"):
        summary["model"] = model["name"]
    if config.get("recipe"):
        summary["recipe"] = config["recipe"]
    if run.metrics and run.metrics.get("data"):
        summary["test data"] = run.metrics["data"]
    for key in ("num_params", "train_seconds"):
        if info.get(key) is not None:
            summary[key] = info[key]
    if history is not None and len(history.get("epoch", [])):
        summary["epochs"] = len(history["epoch"])
        best_epoch, _ = best_epoch_of(run)
        if best_epoch is not None:
            summary["best_epoch"] = best_epoch
        if "val_top1" in history and np.isfinite(history["val_top1"]).any():
            summary["best_val_top1"] = float(np.nanmax(history["val_top1"]))
        if "images_per_second" in history:
            summary["mean_images_per_second"] = float(np.nanmean(history["images_per_second"]))
    return summary


SUMMARY_KINDS = {"num_params": "int", "train_seconds": "float", "epochs": "int", "best_epoch": "int",
                 "best_val_top1": "pct", "mean_images_per_second": "auto"}


def _delta(value: Any, baseline: Any) -> float | None:
    if isinstance(value, (int, float)) and isinstance(baseline, (int, float)) and not isinstance(value, bool) \
            and not isinstance(baseline, bool) and math.isfinite(value) and math.isfinite(baseline):
        return float(value) - float(baseline)
    return None


def _format_delta(delta: float | None, kind: str) -> str:
    if delta is None:
        return ""
    if kind == "pct":
        return f"{100 * delta:+.2f} pts"
    if kind == "int":
        return f"{delta:+,.0f}"
    return f"{delta:+.4f}"


def _per_class_table(runs: Sequence[RunFiles], labels: Sequence[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """One row per class name (baseline order first), per-run F1/recall/precision/support and deltas."""
    order: list[str] = []
    by_run: list[dict[str, dict[str, Any]]] = []
    for run in runs:
        rows = {row["class"]: row for row in (run.per_class or [])}
        by_run.append(rows)
        order += [name for name in rows if name not in order]
    fields = ["class"]
    for label in labels:
        fields += [f"{metric}_{label}" for metric in PER_CLASS_METRICS] + [f"support_{label}"]
    for label in labels[1:]:
        fields += [f"delta_{metric}_{label}" for metric in PER_CLASS_METRICS]
    table = []
    for name in order:
        row: dict[str, Any] = {"class": name}
        for label, rows in zip(labels, by_run):
            source = rows.get(name)
            for metric in (*PER_CLASS_METRICS, "support"):
                row[f"{metric}_{label}"] = source[metric] if source else None
        for label in labels[1:]:
            for metric in PER_CLASS_METRICS:
                row[f"delta_{metric}_{label}"] = _delta(row[f"{metric}_{label}"], row[f"{metric}_{labels[0]}"])
        table.append(row)
    return fields, table


def reference_index(reference: str | Path | None, dirs: Sequence[Path], labels: Sequence[str]) -> int | None:
    """The position of ``reference`` among the compared directories: by label, by the path as given or resolved,
    or by the folder name when only one folder has it."""
    if reference is None:
        return None
    text = str(reference)
    for index, label in enumerate(labels):
        if text == label or text == str(dirs[index]):
            return index
    resolved = Path(text).resolve()
    matches = [index for index, path in enumerate(dirs) if path.resolve() == resolved]
    if not matches:
        matches = [index for index, path in enumerate(dirs) if path.name == text]
    if len(matches) == 1:
        return matches[0]
    raise ConfigError(f"--reference '{text}' names {'more than one' if matches else 'none'} of the compared "
                      f"folders; give one of their labels: {', '.join(labels)}")


def compare_runs(dirs: Sequence[str | Path], out_dir: str | Path, *, reference: str | Path | None = None) -> Path:
    """Compare run directories (with ``eval/``) or evaluation directories; the first is the baseline.

    Writes ``compare.csv`` (metric table), ``per_class_delta.csv``, ``compare_curves.png`` (when runs have a
    training history), ``per_class_delta.png``, ``compare.md`` and ``compare.html`` into ``out_dir``; returns the
    path of ``compare.md``. When evaluations of one checkpoint on different datasets are among them, the
    reference of each such group (``reference``, a label or folder, when it belongs to the group; else the
    group's first) is compared with the others as shifted domains: ``domain_shift.json`` (every figure),
    ``domain_shift_per_class.csv`` and ``domain_shift.*`` rows in ``compare.csv``.
    """
    if len(dirs) < 2:
        raise ResnetlabError(f"compare needs at least two run or evaluation directories, got {len(dirs)}")
    dirs = [Path(d) for d in dirs]
    runs = [load_run(d) for d in dirs]
    labels = run_labels(dirs)
    reference_at = reference_index(reference, dirs, labels)
    plan = domain.domain_pairs(runs, labels, reference_at)
    if reference_at is not None and not any(reference_at in pair for pair in plan.pairs):
        raise ConfigError(f"--reference '{reference}': no other compared evaluation is of the same checkpoint "
                          f"(checkpoint_sha256 in metrics.json, or a run's checkpoints/best.pt) on different "
                          f"images, so there is no domain shift to measure against it; leave --reference out to "
                          f"compare the folders metric by metric")
    shifts = [domain.domain_shift(runs[ref], runs[index], labels[ref], labels[index]) for ref, index in plan.pairs]
    shift_notes = plan.notes + [note for result in shifts for note in result["notes"]]
    out_dir = Path(out_dir)
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    baseline = labels[0]

    summaries = [_run_summary(run) for run in runs]
    summary_keys = [key for key in ("model", "recipe", "test data", "num_params", "train_seconds", "epochs",
                                    "best_epoch", "best_val_top1", "mean_images_per_second")
                    if any(key in summary for summary in summaries)]
    metric_specs = [(label, key, kind) for label, key, kind in COMPARED_METRICS
                    if any(run.metrics and key in run.metrics for run in runs)]

    # ---- compare.csv: full-precision values, one column per run and one delta column per non-baseline run.
    csv_rows = []
    for key in summary_keys:
        values = [summary.get(key) for summary in summaries]
        csv_rows.append([key, *values, *(_delta(value, values[0]) for value in values[1:])])
    for _, key, _ in metric_specs:
        values = [(run.metrics or {}).get(key) for run in runs]
        csv_rows.append([key, *values, *(_delta(value, values[0]) for value in values[1:])])
    if shifts:
        # Pairwise figures (an AUROC, a drop) have no meaningful delta against the baseline: those cells stay empty.
        csv_rows += [[*row, *([None] * (len(labels) - 1))] for row in domain.csv_values(shifts, labels)]
        write_json(out_dir / "domain_shift.json", {"domain_shift": shifts, "notes": shift_notes})
        write_csv(out_dir / "domain_shift_per_class.csv", domain.per_class_csv_rows(shifts),
                  domain.PER_CLASS_CSV_FIELDS)
    else:  # a comparison written earlier into the same folder must not leave its figures behind
        for name in ("domain_shift.json", "domain_shift_per_class.csv"):
            (out_dir / name).unlink(missing_ok=True)
    write_csv_rows(out_dir / "compare.csv", ["metric", *labels, *(f"delta_{label}" for label in labels[1:])],
                   csv_rows)

    fields, per_class_rows = _per_class_table(runs, labels)
    write_csv(out_dir / "per_class_delta.csv", per_class_rows, fields)

    doc = Document(title="resnetlab comparison: " + " vs ".join(labels))
    doc.paragraph("Baseline: `" + baseline + "`; every delta is the run's value minus the baseline's. Directories: "
                  + ", ".join(f"`{label}` = `{path}`" for label, path in zip(labels, dirs)) + ".")
    findings = _comparison_findings(runs, labels, per_class_rows) + _domain_findings(shifts)
    if findings:
        doc.heading("Findings")
        doc.bullets(findings)

    doc.heading("Metrics")
    headers = ["metric", *labels, *(f"Δ {label}" for label in labels[1:])]
    rows = []
    for key in summary_keys:
        kind = SUMMARY_KINDS.get(key, "auto")
        values = [summary.get(key) for summary in summaries]
        shown = [format_duration(v) if key == "train_seconds" and v is not None else
                 (format_value(v, kind) if v is not None else "-") for v in values]
        deltas = [_format_delta(_delta(v, values[0]), kind) if key != "train_seconds" else
                  (f"{_delta(v, values[0]):+.0f} s" if _delta(v, values[0]) is not None else "")
                  for v in values[1:]]
        rows.append([key, *shown, *deltas])
    for label, key, kind in metric_specs:
        values = [(run.metrics or {}).get(key) for run in runs]
        rows.append([f"{label} (`{key}`)", *(format_value(v, kind) if v is not None else "-" for v in values),
                     *(_format_delta(_delta(v, values[0]), kind) for v in values[1:])])
    doc.table(headers, rows, ["left"] + ["right"] * (len(headers) - 1))

    histories = {label: run.history for label, run in zip(labels, runs) if run.history is not None}
    if histories:
        doc.heading("Training curves")
        doc.figure(plots.compare_curves(histories, plots_dir / "compare_curves.png"),
                   "Validation top-1 and loss, training loss per epoch, and validation top-1 against training "
                   "time.", "compare-curves")

    if per_class_rows and len(labels) > 1:
        doc.heading("Per-class deltas")
        first = labels[1]
        doc.paragraph(f"F1 and recall per class; rows sorted by the F1 change of `{first}` against `{baseline}`, "
                      f"largest drop first. Classes missing from a run are left blank.")
        # Only classes some run shares with the baseline: a shifted test set may hold a few of the classes.
        shared = [row for row in per_class_rows
                  if any(row[f"delta_f1_{label}"] is not None for label in labels[1:])]
        if shared:
            doc.figure(plots.per_class_delta(
                [row["class"] for row in shared],
                {label: [np.nan if row[f"delta_f1_{label}"] is None else row[f"delta_f1_{label}"]
                         for row in shared] for label in labels[1:]},
                plots_dir / "per_class_delta.png", baseline=baseline),
                f"Per-class F1 change against `{baseline}`.", "per-class-delta")

        def sort_key(row):
            delta = row[f"delta_f1_{first}"]
            return (delta is None, delta if delta is not None else 0.0)

        headers = ["class"]
        for label in labels:
            headers += [f"F1 {label}", f"recall {label}"]
        for label in labels[1:]:
            headers += [f"ΔF1 {label}", f"Δrecall {label}"]
        table = []
        for row in sorted(per_class_rows, key=sort_key):
            cells = [row["class"]]
            for label in labels:
                cells += [format_value(row[f"f1_{label}"], "float") if row[f"f1_{label}"] is not None else "",
                          format_value(row[f"recall_{label}"], "float") if row[f"recall_{label}"] is not None
                          else ""]
            for label in labels[1:]:
                cells += [_format_delta(row[f"delta_f1_{label}"], "float"),
                          _format_delta(row[f"delta_recall_{label}"], "float")]
            table.append(cells)
        doc.table(headers, table, ["left"] + ["right"] * (len(headers) - 1))

    domain.add_domain_shift_section(doc, shifts, shift_notes if shifts else [])
    doc.write(out_dir / "compare.md", out_dir / "compare.html")
    return out_dir / "compare.md"


def _domain_findings(shifts: Sequence[dict[str, Any]]) -> list[str]:
    findings = []
    for result in shifts:
        parts = []
        if result["top1"]["drop"] is not None:
            parts.append(f"top-1 {100 * -result['top1']['drop']:+.2f} points")
        for key, name in (("auroc_max_probability", "max-probability AUROC"),
                          ("auroc_max_probability_errors", "on its errors")):
            if result["ood"].get(key) is not None:
                parts.append(f"{name} {result['ood'][key]:.3f}")
        if result["worst_classes"]:
            parts.append("worst classes " + ", ".join(result["worst_classes"]))
        if parts:
            findings.append(f"Domain shift `{result['shifted']}` against `{result['reference']}`: "
                            + ", ".join(parts) + ".")
    return findings


def _comparison_findings(runs: Sequence[RunFiles], labels: Sequence[str],
                         per_class_rows: Sequence[dict[str, Any]]) -> list[str]:
    findings = []
    base = runs[0].metrics or {}
    for label, run in zip(labels[1:], runs[1:]):
        metrics = run.metrics or {}
        parts = []
        for key, name in (("top1", "top-1"), ("macro_f1", "macro F1")):
            delta = _delta(metrics.get(key), base.get(key))
            if delta is not None:
                parts.append(f"{name} {100 * delta:+.2f} points")
        delta_ece = _delta(metrics.get("ece"), base.get("ece"))
        if delta_ece is not None:
            parts.append(f"ECE {delta_ece:+.4f}")
        if parts:
            findings.append(f"`{label}` against `{labels[0]}`: " + ", ".join(parts) + ".")
        changes = [(row[f"delta_f1_{label}"], row["class"]) for row in per_class_rows
                   if row[f"delta_f1_{label}"] is not None]
        drops = sorted(change for change in changes if change[0] < 0)[:3]
        gains = sorted((change for change in changes if change[0] > 0), reverse=True)[:3]
        if drops:
            findings.append(f"Largest per-class F1 drops in `{label}`: "
                            + ", ".join(f"{name} ({delta:+.3f})" for delta, name in drops) + ".")
        if gains:
            findings.append(f"Largest per-class F1 gains in `{label}`: "
                            + ", ".join(f"{name} ({delta:+.3f})" for delta, name in gains) + ".")
    return findings
