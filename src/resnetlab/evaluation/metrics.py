"""Classification metrics from logits: data first (JSON/CSV in the evaluation directory), rendering elsewhere.

:func:`evaluate_predictions` turns test logits (and optionally validation logits, for temperature scaling) into an
:class:`EvaluationResult`; :meth:`EvaluationResult.save` writes ``metrics.json``, ``per_class.csv``,
``confusion.csv``, ``predictions.csv``, ``most_confused.csv``, ``risk_coverage.csv`` and ``reliability.csv``.

Counting metrics come from scikit-learn; the ECE binning and the selective-prediction figures are computed here.
A model's stored calibration (``meta["calibration"]``) enters as ``temperature`` (every probability, confidence and
probability metric is of ``softmax(logits / T)``, what ``predict`` and ``serve`` answer with) and
``operating_point`` (which answers would be withheld as "unknown": the ``accepted`` column and
``accepted_fraction``/``error_among_accepted``).
A test set from another source whose classes are a subset of the model's is evaluated with ``labels_present``:
per-class and macro/balanced figures then cover those classes only, while a prediction of any model class still
counts (predicting a class the set does not contain is simply wrong).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from resnetlab.evaluation.calibration import (
    DEFAULT_NUM_BINS,
    ReliabilityBins,
    TemperatureScaling,
    reliability_bins,
    temperature_scaling,
)
from resnetlab.evaluation.selective import (
    ACCEPT_ALL,
    OperatingPoint,
    calibrated_probabilities,
    energy_score,
    risk_coverage_curve,
)
from resnetlab.utils.io import write_csv, write_csv_rows, write_json

#: Fractions of least-confident predictions rejected for the ``error_at_reject_*`` metrics.
REJECT_FRACTIONS: tuple[float, ...] = (0.01, 0.02, 0.05)

#: The first four columns of ``predictions.csv``; other commands rely on these names and this order.
PREDICTION_LEADING_FIELDS: tuple[str, ...] = ("path", "true", "pred", "confidence")

PER_CLASS_FIELDS: tuple[str, ...] = (
    "index", "class", "precision", "recall", "f1", "support", "accuracy", "predicted", "mean_confidence",
)
MOST_CONFUSED_FIELDS: tuple[str, ...] = ("true", "pred", "count", "fraction_of_true", "true_index", "pred_index")
CONFUSION_CORNER = "true \\ pred"


def reject_key(fraction: float) -> str:
    """Metric name for the error rate left after rejecting ``fraction`` of least-confident predictions."""
    return f"error_at_reject_{round(fraction * 100):d}pct"


def _to_numpy(values, dtype) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64 if dtype == np.float64 else torch.int64).numpy()
    return np.asarray(values, dtype=dtype)


def _softmax_and_log_softmax(logits: np.ndarray, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    scaled = torch.as_tensor(logits, dtype=torch.float64) / temperature
    log_probs = torch.log_softmax(scaled, dim=1)
    return log_probs.exp().numpy(), log_probs.numpy()


def selective_error(confidences: np.ndarray, correct: np.ndarray, reject_fraction: float) -> float:
    """Error rate on the predictions kept after rejecting ``floor(reject_fraction * N)`` least confident ones."""
    num_samples = len(confidences)
    num_rejected = math.floor(reject_fraction * num_samples + 1e-9)
    order = np.argsort(-confidences, kind="stable")
    kept = order[: num_samples - num_rejected]
    if len(kept) == 0:
        return float("nan")
    return float(1.0 - correct[kept].mean())


@dataclass
class EvaluationResult:
    """Everything :func:`evaluate_predictions` computed; :meth:`save` writes it as the evaluation directory."""

    metrics: dict[str, Any]
    class_names: list[str]
    evaluated_labels: list[int]
    per_class: list[dict[str, Any]]
    #: Counts over all model classes, rows true and columns predicted ([C, C]).
    confusion: np.ndarray
    predictions: list[dict[str, Any]]
    prediction_fields: list[str]
    most_confused: list[dict[str, Any]]
    risk_coverage: dict[str, np.ndarray]
    #: Reliability of the confidences as written (calibrated when a temperature was applied).
    reliability: ReliabilityBins
    temperature: TemperatureScaling | None = None
    #: Reliability of the raw confidences (T = 1), kept only when a temperature was applied.
    raw_reliability: ReliabilityBins | None = None
    files: dict[str, Path] = field(default_factory=dict)

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write the evaluation files into ``out_dir`` (created if needed); returns their paths by name."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        files = {"metrics": write_json(out_dir / "metrics.json", self.metrics)}
        files["per_class"] = write_csv(out_dir / "per_class.csv", self.per_class, PER_CLASS_FIELDS)
        # Rows are the classes evaluated (all of them, or those a foreign test set has); columns every model class,
        # because a foreign set's images may be predicted as any class the model knows.
        files["confusion"] = write_csv_rows(
            out_dir / "confusion.csv",
            [CONFUSION_CORNER, *self.class_names],
            ([self.class_names[label], *self.confusion[label].tolist()] for label in self.evaluated_labels),
        )
        files["predictions"] = write_csv(out_dir / "predictions.csv", self.predictions, self.prediction_fields)
        files["most_confused"] = write_csv(out_dir / "most_confused.csv", self.most_confused, MOST_CONFUSED_FIELDS)
        files["risk_coverage"] = write_csv_rows(
            out_dir / "risk_coverage.csv",
            ["coverage", "risk", "confidence"],
            zip(*(self.risk_coverage[key].tolist() for key in ("coverage", "risk", "confidence"))),
        )
        if self.raw_reliability is not None:
            # The confidences are calibrated with the model's own temperature: before = raw, after = as written.
            reliability_rows = [dict(variant="uncalibrated", **row) for row in self.raw_reliability.rows()]
            reliability_rows += [dict(variant="temperature_scaled", **row) for row in self.reliability.rows()]
        else:
            reliability_rows = [dict(variant="uncalibrated", **row) for row in self.reliability.rows()]
        if self.raw_reliability is None and self.temperature is not None:
            reliability_rows += [dict(variant="temperature_scaled", **row)
                                 for row in self.temperature.bins_after.rows()]
        files["reliability"] = write_csv(
            out_dir / "reliability.csv",
            reliability_rows,
            ["variant", "bin_lower", "bin_upper", "count", "mean_confidence", "accuracy"],
        )
        self.files = files
        return files


def _validate(logits: np.ndarray, targets: np.ndarray, class_names: Sequence[str], paths, labels_present):
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, C], got shape {logits.shape}")
    num_samples, num_classes = logits.shape
    if num_samples == 0:
        raise ValueError("cannot evaluate an empty set of predictions")
    if targets.shape != (num_samples,):
        raise ValueError(f"targets must be [N]={num_samples}, got shape {targets.shape}")
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} logit columns")
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ValueError(f"targets must index class_names (0..{num_classes - 1}), got {targets.min()}..{targets.max()}")
    if paths is not None and len(paths) != num_samples:
        raise ValueError(f"{len(paths)} paths for {num_samples} predictions")
    if labels_present is not None:
        missing = sorted(set(np.unique(targets).tolist()) - set(labels_present))
        if missing:
            raise ValueError(f"targets contain classes {missing} that are not in labels_present")
        if min(labels_present) < 0 or max(labels_present) >= num_classes:
            raise ValueError(f"labels_present must index class_names (0..{num_classes - 1})")


def evaluate_predictions(
    logits,
    targets,
    class_names: Sequence[str],
    paths: Sequence[str] | None = None,
    *,
    val_logits=None,
    val_targets=None,
    topk: int = 5,
    labels_present: Sequence[int] | None = None,
    n_bins: int = DEFAULT_NUM_BINS,
    temperature: float | None = None,
    operating_point: OperatingPoint | None = None,
) -> EvaluationResult:
    """Compute every evaluation metric from ``logits [N, C]`` and ``targets [N]`` (indices into ``class_names``).

    Args:
        paths: image path per sample for ``predictions.csv`` (store absolute paths so galleries can find them).
        val_logits, val_targets: validation-split outputs; when given, a temperature is fitted on them and the
            test ECE/NLL before and after scaling are reported.
        topk: ``k`` of the top-k accuracy (``metrics["top5"]`` for the default); capped at C.
        labels_present: model class indices a foreign test set contains (its classes mapped through the
            checkpoint's class list). Per-class rows, the confusion rows, macro/weighted and balanced figures then
            cover these classes only. ``None`` evaluates all model classes.
        n_bins: equal-width confidence bins for ECE and the reliability diagram.
        temperature: the model's stored temperature ``T``; logits are divided by it before every probability,
            confidence and probability metric (``metrics["ece_raw"]``/``["nll_raw"]`` keep the raw figures).
            ``None`` (a model without calibration, or ``--raw``) leaves the logits as they are.
        operating_point: the confidence threshold below which an answer counts as "unknown" (the ``accepted``
            column, ``accepted_fraction``, ``error_among_accepted``); ``None`` accepts every answer.
    """
    logits = _to_numpy(logits, np.float64)
    targets = _to_numpy(targets, np.int64).reshape(-1)
    class_names = [str(name) for name in class_names]
    if labels_present is not None:
        labels_present = sorted({int(label) for label in labels_present})
    _validate(logits, targets, class_names, paths, labels_present)
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    operating_point = operating_point or ACCEPT_ALL
    num_samples, num_model_classes = logits.shape
    all_labels = np.arange(num_model_classes)
    evaluated = np.asarray(labels_present if labels_present is not None else all_labels)

    applied = 1.0 if temperature is None else float(temperature)
    probs, log_probs = _softmax_and_log_softmax(logits, applied)
    preds = probs.argmax(axis=1)
    confidences = probs.max(axis=1)
    correct = preds == targets
    sample_losses = -log_probs[np.arange(num_samples), targets]
    energies = energy_score(logits, applied)
    accepted = confidences >= operating_point.threshold

    k = min(topk, num_model_classes)
    if k == 1:
        topk_accuracy = float(accuracy_score(targets, preds))
    elif k >= num_model_classes:
        topk_accuracy = 1.0  # every class is among the top k
    else:
        topk_accuracy = float(top_k_accuracy_score(targets, probs, k=k, labels=all_labels))

    precision, recall, f1, support = precision_recall_fscore_support(
        targets, preds, labels=evaluated, zero_division=0
    )
    # Macro averages over the classes the split holds or the model predicted (scikit-learn's default label set). A
    # class with neither test images nor predictions has no precision, recall or F1 to average; counting it as 0
    # put a 96%-accurate GTSRB model at 0.70 macro F1 when a track-grouped test split lacked 11 of the 43 classes.
    macro_labels = evaluated[np.isin(evaluated, np.union1d(targets, preds))]
    macro = precision_recall_fscore_support(targets, preds, labels=macro_labels, average="macro", zero_division=0)
    weighted = precision_recall_fscore_support(targets, preds, labels=evaluated, average="weighted", zero_division=0)
    with warnings.catch_warnings():
        # Predictions of classes without test samples are errors already counted in recall; sklearn warns about
        # them but they do not change the mean recall over the classes present.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = float(balanced_accuracy_score(targets, preds))
    confusion = confusion_matrix(targets, preds, labels=all_labels)

    bins = reliability_bins(confidences, correct, n_bins)
    onehot = np.eye(num_model_classes)[targets]
    risk_coverage = risk_coverage_curve(confidences, correct)

    metrics: dict[str, Any] = {
        "num_samples": int(num_samples),
        "num_classes": int(len(evaluated)),
        "num_model_classes": int(num_model_classes),
        "macro_classes": int(len(macro_labels)),
        "top1": float(accuracy_score(targets, preds)),
        f"top{topk}": topk_accuracy,
        "balanced_accuracy": balanced,
        "macro_precision": float(macro[0]),
        "macro_recall": float(macro[1]),
        "macro_f1": float(macro[2]),
        "weighted_precision": float(weighted[0]),
        "weighted_recall": float(weighted[1]),
        "weighted_f1": float(weighted[2]),
        "nll": float(sample_losses.mean()),
        "ece": bins.ece,
        "ece_bins": int(n_bins),
        # Multi-class Brier score (Brier, 1950): squared distance between the probability vector and the one-hot
        # target, summed over classes (range 0..2).
        "brier": float(np.mean(np.sum((probs - onehot) ** 2, axis=1))),
        "error_rate": float(1.0 - correct.mean()),
        "mean_confidence": float(confidences.mean()),
        "mean_confidence_correct": float(confidences[correct].mean()) if correct.any() else float("nan"),
        "mean_confidence_incorrect": float(confidences[~correct].mean()) if (~correct).any() else float("nan"),
        "aurc": float(risk_coverage["risk"].mean()),
    }
    if k != topk:
        metrics["topk_effective"] = k
    metrics["confidence_gap"] = metrics["mean_confidence_correct"] - metrics["mean_confidence_incorrect"]
    for fraction in REJECT_FRACTIONS:
        metrics[reject_key(fraction)] = selective_error(confidences, correct, fraction)
    if labels_present is not None:
        metrics["class_subset"] = True
        metrics["evaluated_classes"] = [class_names[label] for label in evaluated]
    if (support == 0).any():
        # Left out of the macro averages unless the model predicted them (then their precision is 0).
        metrics["classes_without_support"] = [class_names[label] for label in evaluated[support == 0]]

    # The calibration the confidences carry, and what the operating point makes of them on this set.
    metrics["temperature_applied"] = None if temperature is None else applied
    raw_bins = None
    if temperature is not None:
        raw_probs, raw_log_probs = _softmax_and_log_softmax(logits)
        raw_bins = reliability_bins(raw_probs.max(axis=1), raw_probs.argmax(axis=1) == targets, n_bins)
        metrics["ece_raw"] = raw_bins.ece
        metrics["nll_raw"] = float(-raw_log_probs[np.arange(num_samples), targets].mean())
    metrics["operating_point"] = operating_point.to_dict()
    metrics["accepted_fraction"] = float(accepted.mean())
    metrics["error_among_accepted"] = float(1.0 - correct[accepted].mean()) if accepted.any() else float("nan")

    scaling = None
    calibrated_confidences = None
    if val_logits is not None and val_targets is not None:
        val_logits = _to_numpy(val_logits, np.float64)
        val_targets = _to_numpy(val_targets, np.int64).reshape(-1)
        scaling = temperature_scaling(val_logits, val_targets, logits, targets, n_bins)
        metrics.update(scaling.as_metrics())
        calibrated_confidences = calibrated_probabilities(logits, scaling.temperature).max(axis=1)

    per_class = []
    for row, label in enumerate(evaluated):
        members = targets == label
        per_class.append({
            "index": int(label),
            "class": class_names[label],
            "precision": float(precision[row]),
            "recall": float(recall[row]),
            "f1": float(f1[row]),
            "support": int(support[row]),
            # The fraction of this class's images classified correctly; by definition equal to recall.
            "accuracy": float(correct[members].mean()) if members.any() else float("nan"),
            "predicted": int((preds == label).sum()),
            "mean_confidence": float(confidences[members].mean()) if members.any() else float("nan"),
        })

    most_confused = []
    for true_label in evaluated:
        row_support = confusion[true_label].sum()
        for pred_label in np.flatnonzero(confusion[true_label]):
            if pred_label == true_label:
                continue
            count = int(confusion[true_label, pred_label])
            most_confused.append({
                "true": class_names[true_label],
                "pred": class_names[pred_label],
                "count": count,
                "fraction_of_true": count / row_support,
                "true_index": int(true_label),
                "pred_index": int(pred_label),
            })
    most_confused.sort(key=lambda pair: (-pair["count"], pair["true_index"], pair["pred_index"]))

    shown_k = min(topk, num_model_classes)
    prediction_fields = [*PREDICTION_LEADING_FIELDS, "true_index", "pred_index", "correct", "loss"]
    prediction_fields += [f"top{rank}_{kind}" for rank in range(1, shown_k + 1) for kind in ("class", "prob")]
    prediction_fields += ["energy", "accepted"]
    if calibrated_confidences is not None:
        prediction_fields.append("calibrated_confidence")
    top_indices = np.argsort(-probs, axis=1, kind="stable")[:, :shown_k]
    predictions = []
    for i in range(num_samples):
        row = {
            "path": "" if paths is None else str(paths[i]),
            "true": class_names[targets[i]],
            "pred": class_names[preds[i]],
            "confidence": float(confidences[i]),
            "true_index": int(targets[i]),
            "pred_index": int(preds[i]),
            "correct": int(correct[i]),
            "loss": float(sample_losses[i]),
        }
        for rank, label in enumerate(top_indices[i], start=1):
            row[f"top{rank}_class"] = class_names[label]
            row[f"top{rank}_prob"] = float(probs[i, label])
        row["energy"] = float(energies[i])
        row["accepted"] = int(accepted[i])
        if calibrated_confidences is not None:
            row["calibrated_confidence"] = float(calibrated_confidences[i])
        predictions.append(row)

    return EvaluationResult(
        metrics=metrics,
        class_names=class_names,
        evaluated_labels=[int(label) for label in evaluated],
        per_class=per_class,
        confusion=confusion,
        predictions=predictions,
        prediction_fields=prediction_fields,
        most_confused=most_confused,
        risk_coverage=risk_coverage,
        reliability=bins,
        temperature=scaling,
        raw_reliability=raw_bins,
    )
