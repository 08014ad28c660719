"""Knowing when the model does not know: calibrated confidences, an operating point and out-of-distribution scores.

A model that answers every image is wrong, and often confidently wrong, on what its training set never showed
(another country's signs, a camera it never saw). Three pieces let it say "unknown" instead:

* a **temperature** ``T`` fitted on the in-domain validation split (:func:`~resnetlab.evaluation.calibration.
  fit_temperature`), so that the confidence ``max softmax(logits / T)`` means what it says;
* an **operating point**: the confidence threshold below which an answer is withheld, chosen on that validation
  split by a rule, either "keep at least this fraction of in-domain images" (``coverage``) or "at most this error
  among the accepted ones" (``max_error``), from the validation risk-coverage curve (Geifman and El-Yaniv,
  "Selective Classification for Deep Neural Networks", NeurIPS 2017);
* per-image **out-of-distribution scores**: the maximum calibrated probability (Hendrycks and Gimpel, ICLR 2017)
  and the energy score ``-T logsumexp(logits / T)`` (Liu et al., "Energy-based Out-of-distribution Detection",
  NeurIPS 2020; lower energy means more familiar), and the AUROC with which a score separates one dataset from
  another.

:func:`fit_calibration` computes the record stored as ``meta["calibration"]`` in a checkpoint and carried into every
export's ``preprocessing.json``; :class:`OperatingPoint` is what `predict`, `serve` and `evaluate` apply.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from resnetlab.errors import ConfigError
from resnetlab.evaluation.calibration import expected_calibration_error, fit_temperature

DEFAULT_COVERAGE = 0.99
# The stored validation risk-coverage curve is thinned to at most this many points: enough to place an operating
# point to a tenth of a percent of coverage, small enough to travel in every checkpoint and export record.
MAX_CURVE_POINTS = 1000


def _as_array(values, dtype) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64 if dtype == np.float64 else torch.int64).numpy()
    return np.asarray(values, dtype=dtype)


def calibrated_probabilities(logits, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` as float64 numpy, row per image."""
    scaled = torch.as_tensor(_as_array(logits, np.float64)) / float(temperature)
    return torch.softmax(scaled, dim=1).numpy()


def energy_score(logits, temperature: float = 1.0) -> np.ndarray:
    """The energy ``-T * logsumexp(logits / T)`` per image: lower is more in-distribution (Liu et al., 2020)."""
    scaled = torch.as_tensor(_as_array(logits, np.float64)) / float(temperature)
    return (-float(temperature) * torch.logsumexp(scaled, dim=1)).numpy()


def risk_coverage_curve(confidences, correct) -> dict[str, np.ndarray]:
    """Selective risk (error rate among the accepted) against coverage when accepting most-confident first.

    Returns ``coverage``, ``risk`` and ``confidence`` (the confidence of the last accepted prediction) arrays of
    length N; the area under the curve (AURC) is ``risk.mean()``.
    """
    confidences = _as_array(confidences, np.float64)
    correct = _as_array(correct, np.float64)
    order = np.argsort(-confidences, kind="stable")
    errors = 1.0 - correct[order]
    accepted = np.arange(1, len(order) + 1, dtype=np.float64)
    return {
        "coverage": accepted / len(order),
        "risk": np.cumsum(errors) / accepted,
        "confidence": confidences[order],
    }


def _thinned(curve: dict[str, np.ndarray], max_points: int = MAX_CURVE_POINTS) -> dict[str, list[float]]:
    """The curve at the last accepted image of each run of equal confidences (where a threshold can sit), thinned
    to ``max_points`` evenly spaced in coverage, the full-coverage end always kept."""
    confidence = curve["confidence"]
    # Images with equal confidence are accepted or rejected together: only the last of each run is a real point.
    last_of_run = np.append(confidence[1:] != confidence[:-1], True)
    index = np.flatnonzero(last_of_run)
    if len(index) > max_points:
        index = index[np.unique(np.round(np.linspace(0, len(index) - 1, max_points)).astype(int))]
    return {"threshold": confidence[index].tolist(), "coverage": curve["coverage"][index].tolist(),
            "error": curve["risk"][index].tolist()}


@dataclass(frozen=True)
class OperatingPoint:
    """Accept an answer when its calibrated confidence is at least ``threshold``.

    ``rule`` and ``target`` say how it was chosen ("coverage" 0.99: keep at least 99% of in-domain validation
    images; "max_error" 0.005: at most 0.5% error among the accepted ones; "threshold": given directly);
    ``coverage`` and ``error`` are what it gave on the validation split (None for a threshold given directly).
    """

    rule: str
    target: float
    threshold: float
    coverage: float | None
    error: float | None

    def accepts(self, confidence: float) -> bool:
        return confidence >= self.threshold

    def reason(self, confidence: float) -> str:
        """Why an answer below the threshold is withheld, in words."""
        return (f"confidence {confidence:.3f} is below the operating point {self.threshold:.3f} "
                f"({self.describe()})")

    def describe(self) -> str:
        if self.rule == "coverage":
            text = f"chosen to keep {self.target:.2%} of in-domain validation images"
        elif self.rule == "max_error":
            text = f"chosen for at most {self.target:.2%} error among accepted validation images"
        elif self.rule == "accept_all":
            return "every answer accepted"
        else:
            return "threshold given directly"
        if self.coverage is not None and self.error is not None:
            text += f"; on validation it keeps {self.coverage:.2%} with {self.error:.2%} error"
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ACCEPT_ALL = OperatingPoint(rule="accept_all", target=0.0, threshold=0.0, coverage=1.0, error=None)


def check_operating_rule(coverage: float | None, max_error: float | None) -> None:
    """One ConfigError naming the flag for a rule out of range, whichever command or call gave it (calibrate,
    predict, serve, the API)."""
    if coverage is not None and not 0 < coverage <= 1:
        raise ConfigError(f"--coverage {coverage}: give the fraction of in-domain images to accept, in (0, 1]")
    if max_error is not None and not 0 <= max_error < 1:
        raise ConfigError(f"--max-error {max_error}: give the error rate allowed among accepted answers, in [0, 1)")


def choose_operating_point(curve: dict[str, Any], *, coverage: float | None = None,
                           max_error: float | None = None) -> OperatingPoint:
    """The threshold that meets one rule on a validation risk-coverage ``curve`` (thinned or full).

    ``coverage=c``: the highest threshold that still accepts at least a fraction ``c`` of the images.
    ``max_error=e``: the lowest threshold (so the highest coverage) whose error among the accepted is at most
    ``e``; when no threshold reaches it, the most confident point is taken (it is the least wrong there is).
    """
    if (coverage is None) == (max_error is None):
        raise ValueError("choose an operating point by exactly one of coverage and max_error")
    check_operating_rule(coverage, max_error)
    thresholds = np.asarray(curve["threshold"] if "threshold" in curve else curve["confidence"], dtype=np.float64)
    coverages = np.asarray(curve["coverage"], dtype=np.float64)
    errors = np.asarray(curve["error"] if "error" in curve else curve["risk"], dtype=np.float64)
    if len(thresholds) == 0:
        raise ValueError("the risk-coverage curve is empty")
    if coverage is not None:
        # points are ordered by falling threshold, rising coverage: the first that keeps enough is the highest one
        index = int(np.searchsorted(coverages, coverage - 1e-12, side="left"))
        index = min(index, len(coverages) - 1)
        return OperatingPoint("coverage", float(coverage), float(thresholds[index]), float(coverages[index]),
                              float(errors[index]))
    meeting = np.flatnonzero(errors <= max_error + 1e-12)
    index = int(meeting[-1]) if len(meeting) else 0
    return OperatingPoint("max_error", float(max_error), float(thresholds[index]), float(coverages[index]),
                          float(errors[index]))


def operating_point_from_record(calibration: dict[str, Any] | None, *, coverage: float | None = None,
                                max_error: float | None = None, threshold: float | None = None) -> OperatingPoint:
    """The operating point to apply: one chosen now from the stored validation curve (``coverage``/``max_error``),
    a ``threshold`` given directly, or else the one stored at training time; :data:`ACCEPT_ALL` without a record."""
    if threshold is not None:
        return OperatingPoint("threshold", float(threshold), float(threshold), None, None)
    if coverage is not None or max_error is not None:
        if not calibration:
            raise ValueError("no calibration record to choose an operating point from; run `resnetlab calibrate` "
                             "on the model first")
        return choose_operating_point(calibration["risk_coverage"], coverage=coverage, max_error=max_error)
    stored = (calibration or {}).get("operating_point")
    if not stored:
        return ACCEPT_ALL
    return OperatingPoint(**{key: stored.get(key) for key in ("rule", "target", "threshold", "coverage", "error")})


def fit_calibration(val_logits, val_targets, *, coverage: float | None = DEFAULT_COVERAGE,
                    max_error: float | None = None, fitted_on: str = "val") -> dict[str, Any]:
    """The calibration record of a model from its validation outputs: temperature, ECE before and after, the
    thinned validation risk-coverage curve of calibrated confidences and the operating point chosen on it.

    ``max_error`` takes precedence over ``coverage`` when both are given.
    """
    logits = _as_array(val_logits, np.float64)
    targets = _as_array(val_targets, np.int64).reshape(-1)
    temperature = fit_temperature(logits, targets)
    raw = calibrated_probabilities(logits, 1.0)
    scaled = calibrated_probabilities(logits, temperature)
    correct = scaled.argmax(axis=1) == targets
    confidence = scaled.max(axis=1)
    curve = risk_coverage_curve(confidence, correct)
    thinned = _thinned(curve)
    if max_error is not None:
        point = choose_operating_point(curve, max_error=max_error)
    else:
        point = choose_operating_point(curve, coverage=coverage if coverage is not None else DEFAULT_COVERAGE)
    return {
        "temperature": float(temperature),
        "fitted_on": fitted_on,
        "num_images": int(len(targets)),
        "ece_before": float(expected_calibration_error(raw.max(axis=1), raw.argmax(axis=1) == targets)),
        "ece_after": float(expected_calibration_error(confidence, correct)),
        "risk_coverage": thinned,
        "operating_point": point.to_dict(),
    }


def auroc(in_domain_scores, shifted_scores) -> float:
    """How well a score separates two sets: the probability that a random in-domain image scores higher than a
    random image of the other set (0.5: no separation, 1: perfect). Scores must grow with familiarity (use the
    maximum probability, or the negated energy)."""
    from sklearn.metrics import roc_auc_score

    positives = _as_array(in_domain_scores, np.float64)
    negatives = _as_array(shifted_scores, np.float64)
    if len(positives) == 0 or len(negatives) == 0:
        return math.nan
    labels = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    return float(roc_auc_score(labels, np.concatenate([positives, negatives])))
