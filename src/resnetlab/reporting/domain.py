"""Domain shift: one model's evaluation on its own test set against its evaluations on other datasets.

An evaluation of the same checkpoint on images from elsewhere (another country's signs, another camera) is a
*shifted domain*; the evaluation on the data the model was trained for is the *reference*. For each shifted domain
this module computes, from the evaluation folders' files alone:

* per-class accuracy on the reference and on the shifted images (classes both sets hold), sorted by the drop;
* calibration on each (ECE of the confidences as written, and the temperature that was applied);
* coverage and error among the accepted answers at the operating point on each (from ``metrics.json`` when the
  evaluation recorded them, else recomputed from ``predictions.csv`` at the operating point's threshold);
* how well the model's own scores tell the shifted images from the reference ones: the AUROC of the maximum
  probability and of the negated energy, over all shifted images and over the misclassified shifted images only
  (the ones that matter: can the model flag its own errors?).

:func:`domain_pairs` finds (reference, shifted) pairs among compared evaluations by the checkpoint they evaluated;
:func:`domain_shift` computes one pair; :func:`add_domain_shift_section` renders the results into a report
document. ``resnetlab compare`` and the run report (for ``RUN/evaluations/*``) both use them.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resnetlab.evaluation.selective import auroc
from resnetlab.reporting.document import Document
from resnetlab.reporting.runfiles import RunFiles

#: The classes with the largest accuracy drops, highlighted in each per-class table.
WORST_CLASSES = 3

#: The AUROC figures of a domain, ``(key, label)``, in table order.
AUROC_KEYS: tuple[tuple[str, str], ...] = (
    ("auroc_max_probability", "max probability, all shifted images"),
    ("auroc_max_probability_errors", "max probability, misclassified shifted images"),
    ("auroc_energy", "negated energy, all shifted images"),
    ("auroc_energy_errors", "negated energy, misclassified shifted images"),
)


# ---------------------------------------------------------------------------------------------------- identity
def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """The file's sha256, hashed once per file version (path, size, modification time) in a process: a comparison
    asks for a run's checkpoint more than once, and a ResNet-50 checkpoint is 100 MB."""
    stat = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, chunk)


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int, chunk: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_identity(run: RunFiles) -> str | None:
    """The sha256 of the checkpoint file an evaluation evaluated, or None when nothing records it.

    ``resnetlab evaluate`` writes ``checkpoint_sha256`` into ``metrics.json``. A run directory's own ``eval/`` was
    written by training from ``checkpoints/best.pt``, so that file's hash stands for it. (A checkpoint rewritten
    after the evaluation, e.g. with a calibration record stored into it, hashes differently: its evaluations no
    longer match, which is right, since its confidences changed.)
    """
    recorded = (run.metrics or {}).get("checkpoint_sha256")
    if recorded:
        return str(recorded)
    best = run.root / "checkpoints" / "best.pt"
    if run.eval_dir is not None and run.eval_dir == run.root / "eval" and best.is_file():
        return file_sha256(best)
    return None


def image_set(run: RunFiles) -> frozenset[str] | None:
    """The image paths an evaluation scored (None when ``predictions.csv`` is absent or lacks paths)."""
    paths = [row.get("path") or "" for row in run.predictions or []]
    if not paths or not all(paths):
        return None
    return frozenset(paths)


@dataclass
class DomainPlan:
    """Which compared evaluations are shifted domains of which reference (indices into the compared list)."""

    pairs: list[tuple[int, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def domain_pairs(runs: Sequence[RunFiles], labels: Sequence[str], reference: int | None = None) -> DomainPlan:
    """(reference, shifted) index pairs: evaluations of one checkpoint on different images.

    Evaluations are grouped by :func:`checkpoint_identity`; in each group of two or more, ``reference`` (an index)
    is the reference when it belongs to the group, else the group's first evaluation. A member scored on exactly
    the reference's images (test-time augmentation, a repeated evaluation) is the same domain and left out, with a note.
    """
    plan = DomainPlan()
    groups: dict[str, list[int]] = {}
    unknown = []
    for index, run in enumerate(runs):
        identity = checkpoint_identity(run) if run.metrics else None
        exported = (run.metrics or {}).get("evaluated_model")
        if identity is not None and exported:
            # An export of the checkpoint (int8, bf16) answers differently: it is its own model here.
            identity += f"|{exported.get('format')}-{exported.get('precision')}"
        if identity is None:
            unknown.append(index)
        else:
            groups.setdefault(identity, []).append(index)
    for identity, members in groups.items():
        if len(members) < 2:
            continue
        ref = reference if reference in members else members[0]
        ref_images = image_set(runs[ref])
        for index in members:
            if index == ref:
                continue
            images = image_set(runs[index])
            if ref_images is not None and images == ref_images:
                plan.notes.append(f"`{labels[index]}` scored the same images as `{labels[ref]}` with the same "
                                  f"checkpoint: not a shifted domain, left out of this section.")
                continue
            plan.pairs.append((ref, index))
    if plan.pairs and unknown:
        plan.notes.append("No checkpoint is recorded for " + ", ".join(f"`{labels[i]}`" for i in unknown)
                          + " (evaluated before resnetlab wrote `checkpoint_sha256` into metrics.json), so it is "
                            "not matched to a reference; re-evaluate it to include it.")
    return plan


# ---------------------------------------------------------------------------------------------------- numbers
def _number(value: Any) -> float | None:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        value = float(value)
        return value if math.isfinite(value) else None
    return None


def _column(run: RunFiles, name: str) -> np.ndarray | None:
    """A numeric column of ``predictions.csv``; None when the file or the column is absent or has empty cells."""
    rows = run.predictions or []
    if not rows or name not in rows[0]:
        return None
    try:
        return np.array([float(row[name]) for row in rows], dtype=np.float64)
    except (TypeError, ValueError):
        return None


def _per_class_accuracy(run: RunFiles) -> dict[str, tuple[float, int]]:
    """Class name -> (accuracy, support) for classes with test images."""
    table = {}
    for row in run.per_class or []:
        accuracy = row.get("accuracy")
        if accuracy is None or not math.isfinite(accuracy):
            accuracy = row.get("recall")  # equal by definition; older per_class.csv files lack the column
        support = row.get("support")
        if accuracy is not None and support and math.isfinite(accuracy) and math.isfinite(support) and support > 0:
            table[str(row["class"])] = (float(accuracy), int(support))
    return table


def per_class_drops(reference: RunFiles, shifted: RunFiles) -> list[dict[str, Any]]:
    """Clean-versus-shifted accuracy of the classes both evaluations hold, largest drop first."""
    clean, shift = _per_class_accuracy(reference), _per_class_accuracy(shifted)
    rows = [{"class": name, "reference_accuracy": clean[name][0], "shifted_accuracy": shift[name][0],
             "drop": clean[name][0] - shift[name][0], "reference_support": clean[name][1],
             "shifted_support": shift[name][1]}
            for name in clean if name in shift]
    rows.sort(key=lambda row: (-row["drop"], row["class"]))
    return rows


def _operating_point(run: RunFiles) -> dict[str, Any] | None:
    point = (run.metrics or {}).get("operating_point")
    return point if isinstance(point, Mapping) and _number(point.get("threshold")) is not None else None


def selective_figures(run: RunFiles, partner: RunFiles, label: str, partner_label: str) -> tuple[dict, str | None]:
    """Coverage and error among the accepted answers at the operating point, and a note when they could not be had.

    Taken from ``metrics.json`` when the evaluation recorded them; otherwise from ``predictions.csv``: its
    ``accepted`` column, or its ``confidence`` at the threshold of the evaluation's operating point, or else of the
    partner evaluation's (same checkpoint) when both applied the same temperature, so the confidences compare.
    """
    metrics = run.metrics or {}
    point = _operating_point(run)
    figures: dict[str, Any] = {"operating_point": dict(point) if point else None}
    coverage, error = _number(metrics.get("accepted_fraction")), metrics.get("error_among_accepted")
    if coverage is not None:
        figures.update(accepted_fraction=coverage, error_among_accepted=_number(error), source="metrics.json")
        return figures, None
    correct = _column(run, "correct")
    if correct is None:
        return figures, (f"`{label}`: no coverage at the operating point (neither recorded in metrics.json nor a "
                         f"`correct` column in predictions.csv).")
    accepted = _column(run, "accepted")
    source = "predictions.csv accepted"
    if accepted is None:
        source = "predictions.csv confidence at the threshold"
        if point is None:
            other = _operating_point(partner)
            # A threshold is a confidence: it carries over only to confidences computed at the same temperature.
            if other is not None and (partner.metrics or {}).get("temperature_applied") == metrics.get(
                    "temperature_applied"):
                point, source = other, f"predictions.csv confidence at the threshold of `{partner_label}`"
                figures["operating_point"] = dict(other)
        confidence = _column(run, "confidence")
        if point is None or confidence is None:
            return figures, (f"`{label}`: coverage at the operating point skipped: the evaluation records no "
                             f"operating point (made before resnetlab applied one); re-evaluate it to get it.")
        accepted = (confidence >= float(point["threshold"])).astype(np.float64)
    kept = accepted > 0.5
    figures.update(accepted_fraction=float(kept.mean()),
                   error_among_accepted=float(1.0 - correct[kept].mean()) if kept.any() else None, source=source)
    return figures, None


def ood_aurocs(reference: RunFiles, shifted: RunFiles, shifted_label: str) -> tuple[dict[str, float | None], list]:
    """AUROC of the maximum probability and of the negated energy for telling reference from shifted images,
    over all shifted images and over the misclassified ones; notes for the scores that could not be had."""
    figures: dict[str, float | None] = {key: None for key, _ in AUROC_KEYS}
    notes = []
    correct = _column(shifted, "correct")
    wrong = correct < 0.5 if correct is not None else None
    figures["shifted_errors"] = int(wrong.sum()) if wrong is not None else None
    for name, column, sign in (("max_probability", "confidence", 1.0), ("energy", "energy", -1.0)):
        ref_scores, shift_scores = _column(reference, column), _column(shifted, column)
        if ref_scores is None or shift_scores is None:
            missing = [lbl for lbl, scores in (("the reference", ref_scores), (f"`{shifted_label}`", shift_scores))
                       if scores is None]
            notes.append(f"`{shifted_label}`: {name.replace('_', ' ')} AUROC skipped: no `{column}` column in the "
                         f"predictions.csv of {' and '.join(missing)}"
                         + (" (evaluations made before resnetlab wrote energy scores; re-evaluate to get it)."
                            if column == "energy" else "."))
            continue
        # Scores must grow with familiarity: the maximum probability does, the energy falls.
        figures[f"auroc_{name}"] = _number(auroc(sign * ref_scores, sign * shift_scores))
        if wrong is not None and wrong.any():
            figures[f"auroc_{name}_errors"] = _number(auroc(sign * ref_scores, sign * shift_scores[wrong]))
    return figures, notes


def domain_shift(reference: RunFiles, shifted: RunFiles, reference_label: str, shifted_label: str) -> dict[str, Any]:
    """Every figure of one shifted domain against its reference, as plain JSON-able data (see the module doc)."""
    ref_metrics, shift_metrics = reference.metrics or {}, shifted.metrics or {}
    notes: list[str] = []
    result: dict[str, Any] = {
        "reference": reference_label,
        "shifted": shifted_label,
        "checkpoint_sha256": checkpoint_identity(shifted),
        "num_images": {"reference": ref_metrics.get("num_samples"), "shifted": shift_metrics.get("num_samples")},
        "top1": {"reference": _number(ref_metrics.get("top1")), "shifted": _number(shift_metrics.get("top1"))},
    }
    top1 = result["top1"]
    top1["drop"] = (top1["reference"] - top1["shifted"]
                    if top1["reference"] is not None and top1["shifted"] is not None else None)
    per_class = per_class_drops(reference, shifted)
    if not per_class:
        notes.append(f"`{shifted_label}` shares no class with test images with `{reference_label}`: no per-class "
                     f"comparison.")
    result["per_class"] = per_class
    result["worst_classes"] = [row["class"] for row in per_class[:WORST_CLASSES] if row["drop"] > 0]
    result["calibration"] = {
        side: {"ece": _number(metrics.get("ece")), "temperature_applied": _number(metrics.get("temperature_applied"))}
        for side, metrics in (("reference", ref_metrics), ("shifted", shift_metrics))}
    if ref_metrics.get("temperature_applied") != shift_metrics.get("temperature_applied"):
        notes.append(f"`{reference_label}` and `{shifted_label}` applied different temperatures "
                     f"({ref_metrics.get('temperature_applied')} and {shift_metrics.get('temperature_applied')}): "
                     f"their confidences are on different scales, which biases the max-probability AUROC; evaluate "
                     f"both with the same model calibration.")
    selective = {}
    for side, run, label, partner, partner_label in (
            ("reference", reference, reference_label, shifted, shifted_label),
            ("shifted", shifted, shifted_label, reference, reference_label)):
        selective[side], note = selective_figures(run, partner, label, partner_label)
        if note:
            notes.append(note)
    result["selective"] = selective
    result["ood"], ood_notes = ood_aurocs(reference, shifted, shifted_label)
    notes += ood_notes
    if result["ood"].get("shifted_errors") == 0:
        notes.append(f"`{shifted_label}`: every shifted image was classified correctly, so the AUROC over "
                     f"misclassified images is undefined.")
    result["notes"] = notes
    return result


# ---------------------------------------------------------------------------------------------------- rendering
def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value + 0.0:+.2f} pts"  # + 0.0: no "-0.00"


def _temperature(value: float | None) -> str:
    return "none (raw softmax)" if value is None else f"{value:.3f}"


def _coverage_cell(figures: Mapping[str, Any]) -> str:
    return _pct(figures.get("accepted_fraction")) if "accepted_fraction" in figures else "n/a"


def summary_rows(results: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = ["shifted", "reference", "top-1 ref", "top-1 shifted", "top-1 change", "ECE ref", "ECE shifted",
               "coverage ref", "coverage shifted", "error accepted shifted", "AUROC max prob",
               "AUROC max prob, errors", "AUROC energy", "AUROC energy, errors"]
    rows = []
    for result in results:
        ood, cal, sel = result["ood"], result["calibration"], result["selective"]
        rows.append([f"`{result['shifted']}`", f"`{result['reference']}`", _pct(result["top1"]["reference"]),
                     _pct(result["top1"]["shifted"]),
                     _points(None if result["top1"]["drop"] is None else -result["top1"]["drop"]),
                     _num(cal["reference"]["ece"]), _num(cal["shifted"]["ece"]),
                     _coverage_cell(sel["reference"]), _coverage_cell(sel["shifted"]),
                     _pct(sel["shifted"].get("error_among_accepted")),
                     *(_num(ood.get(key), 3) for key, _ in AUROC_KEYS)])
    return headers, rows


def add_domain_shift_section(doc: Document, results: Sequence[Mapping[str, Any]], notes: Sequence[str] = (),
                             *, level: int = 2) -> None:
    """A "Domain shift" section: a summary table, then a table per shifted domain, then the notes."""
    if not results and not notes:
        return
    doc.heading("Domain shift", level)
    doc.paragraph("Evaluations of one checkpoint on other datasets (shifted domains) against its reference "
                  "evaluation. AUROC: how well a score of the model tells the reference images (familiar) from the "
                  "shifted ones; 0.5 is chance, 1.0 perfect. The errors figures count only the shifted images the "
                  "model got wrong: whether the model can flag its own mistakes on the new domain. Energy is "
                  "negated so that, like the maximum probability, higher means more familiar. Coverage is the "
                  "fraction of answers the operating point accepts.")
    if results:
        headers, rows = summary_rows(results)
        doc.table(headers, rows, ["left", "left"] + ["right"] * (len(headers) - 2))
    for result in results:
        _domain_tables(doc, result, level + 1)
    if notes:
        doc.heading("Notes", level + 1)
        doc.bullets(list(notes))


def _domain_tables(doc: Document, result: Mapping[str, Any], level: int) -> None:
    ref, shift = result["reference"], result["shifted"]
    doc.heading(f"{shift} against {ref}", level)
    sha = result.get("checkpoint_sha256")
    images = result["num_images"]
    doc.paragraph(f"Checkpoint sha256 `{str(sha)[:12]}`; {images['reference']} reference and {images['shifted']} "
                  f"shifted images; top-1 {_pct(result['top1']['reference'])} -> {_pct(result['top1']['shifted'])} "
                  f"({_points(None if result['top1']['drop'] is None else -result['top1']['drop'])}).")
    cal, sel = result["calibration"], result["selective"]

    def point_text(figures):
        point = figures.get("operating_point")
        if not point:
            return "none recorded"
        return f"{point.get('rule')} {point.get('target')}, threshold {_num(_number(point.get('threshold')), 3)}"

    doc.table(["", f"reference `{ref}`", f"shifted `{shift}`"], [
        ["ECE (confidences as written)", _num(cal["reference"]["ece"]), _num(cal["shifted"]["ece"])],
        ["temperature applied", _temperature(cal["reference"]["temperature_applied"]),
         _temperature(cal["shifted"]["temperature_applied"])],
        ["operating point", point_text(sel["reference"]), point_text(sel["shifted"])],
        ["coverage (accepted fraction)", _coverage_cell(sel["reference"]), _coverage_cell(sel["shifted"])],
        ["error among accepted", _pct(sel["reference"].get("error_among_accepted")),
         _pct(sel["shifted"].get("error_among_accepted"))],
        ["coverage figures from", sel["reference"].get("source", "n/a"), sel["shifted"].get("source", "n/a")],
    ], ["left", "right", "right"])
    ood = result["ood"]
    errors = ood.get("shifted_errors")
    doc.table(["out-of-distribution score", "AUROC"],
              [[label + (f" ({errors})" if key.endswith("_errors") and errors is not None else ""),
                _num(ood.get(key), 3)] for key, label in AUROC_KEYS], ["left", "right"])
    if result["per_class"]:
        worst = set(result["worst_classes"])
        doc.paragraph(f"Per-class accuracy on the classes both sets hold, largest drop first; the "
                      f"{len(worst)} worst in bold." if worst else
                      "Per-class accuracy on the classes both sets hold: no class dropped.")
        rows = []
        for row in result["per_class"]:
            name = f"**{row['class']}**" if row["class"] in worst else row["class"]
            rows.append([name, _pct(row["reference_accuracy"]), _pct(row["shifted_accuracy"]),
                         _points(-row["drop"]), str(row["reference_support"]), str(row["shifted_support"])])
        doc.table(["class", "accuracy ref", "accuracy shifted", "change", "images ref", "images shifted"], rows,
                  ["left"] + ["right"] * 5)


# ---------------------------------------------------------------------------------------------------- flat rows
#: compare.csv rows (``domain_shift.<key>``): per-evaluation figures first, then the pairwise ones.
CSV_KEYS: tuple[str, ...] = ("reference", "top1_drop", "ece", "temperature_applied", "accepted_fraction",
                             "error_among_accepted", *(key for key, _ in AUROC_KEYS), "shifted_errors")


def csv_values(results: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[list[Any]]:
    """``compare.csv`` rows ``[domain_shift.<key>, value per label...]``: an evaluation's own figures in its
    column (reference and shifted alike), the pairwise ones (AUROC, drop) in the shifted evaluation's column."""
    cells: dict[str, dict[str, Any]] = {key: {} for key in CSV_KEYS}
    for result in results:
        for side in ("reference", "shifted"):
            label = result[side]
            cells["ece"][label] = result["calibration"][side]["ece"]
            cells["temperature_applied"][label] = result["calibration"][side]["temperature_applied"]
            cells["accepted_fraction"][label] = result["selective"][side].get("accepted_fraction")
            cells["error_among_accepted"][label] = result["selective"][side].get("error_among_accepted")
        shifted = result["shifted"]
        cells["reference"][shifted] = result["reference"]
        cells["top1_drop"][shifted] = result["top1"]["drop"]
        for key, _ in AUROC_KEYS:
            cells[key][shifted] = result["ood"].get(key)
        cells["shifted_errors"][shifted] = result["ood"].get("shifted_errors")
    return [[f"domain_shift.{key}", *(cells[key].get(label) for label in labels)] for key in CSV_KEYS]


PER_CLASS_CSV_FIELDS = ("shifted", "reference", "class", "reference_accuracy", "shifted_accuracy", "drop",
                        "reference_support", "shifted_support", "worst")


def per_class_csv_rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{"shifted": result["shifted"], "reference": result["reference"], **row,
             "worst": int(row["class"] in result["worst_classes"])}
            for result in results for row in result["per_class"]]


# ---------------------------------------------------------------------------------------------------- run report
def run_evaluations(run: RunFiles) -> list[Path]:
    """The evaluation folders under a run's ``evaluations/`` (written by ``resnetlab evaluate RUN``), oldest name
    first."""
    folder = run.root / "evaluations"
    if run.eval_dir != run.root / "eval" or not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if (path / "metrics.json").is_file())


def run_domain_shift(run: RunFiles) -> tuple[list[dict[str, Any]], list[str]]:
    """The domain-shift figures of a run's ``evaluations/*`` against its own ``eval/``, and notes on the folders
    left out (another checkpoint, the same images, unreadable files)."""
    from resnetlab.errors import ResnetlabError
    from resnetlab.reporting.runfiles import load_run

    folders = run_evaluations(run)
    if not folders or not run.metrics:
        return [], []
    reference_sha = checkpoint_identity(run)
    reference_images = image_set(run)
    results, notes = [], []
    for folder in folders:
        label = f"evaluations/{folder.name}"
        try:
            evaluation = load_run(folder)
        except ResnetlabError as error:
            notes.append(f"`{label}` left out: {error}")
            continue
        recorded = (evaluation.metrics or {}).get("checkpoint_sha256")
        if recorded and reference_sha and recorded != reference_sha:
            notes.append(f"`{label}` evaluated another checkpoint file (sha256 `{str(recorded)[:12]}`) than "
                         f"checkpoints/best.pt as it is now (`{reference_sha[:12]}`), which `eval` stands for: left "
                         f"out. If best.pt was rewritten since (e.g. a calibration stored into it), re-evaluate.")
            continue
        if reference_images is not None and image_set(evaluation) == reference_images:
            notes.append(f"`{label}` scored the same images as `eval`: not a shifted domain, left out.")
            continue
        result = domain_shift(run, evaluation, "eval", label)
        if not recorded:
            result["notes"].insert(0, f"`{label}` records no checkpoint (evaluated before resnetlab wrote "
                                      f"`checkpoint_sha256`): assumed to be checkpoints/best.pt.")
        results.append(result)
    for result in results:
        notes += result["notes"]
    return results, notes
