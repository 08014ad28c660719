"""Calibration: expected calibration error, reliability-diagram bins and temperature scaling.

The binning follows Guo et al., "On Calibration of Modern Neural Networks" (ICML 2017,
https://arxiv.org/abs/1706.04599): ``n_bins`` equal-width bins over the confidence (the top-1 probability), bin
``b`` holding confidences in ``(b / n_bins, (b + 1) / n_bins]``, and
``ECE = sum_b |B_b| / N * |accuracy(B_b) - mean_confidence(B_b)|``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_NUM_BINS = 15

# A temperature outside this range means the validation split gave no usable signal (e.g. every prediction correct
# with a huge margin drives T towards 0); clamping keeps the calibrated probabilities meaningful.
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 100.0


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics behind a reliability diagram; empty bins have count 0 and NaN statistics."""

    lower: np.ndarray
    upper: np.ndarray
    count: np.ndarray
    mean_confidence: np.ndarray
    accuracy: np.ndarray

    @property
    def ece(self) -> float:
        total = self.count.sum()
        if total == 0:
            return float("nan")
        filled = self.count > 0
        gaps = np.abs(self.accuracy[filled] - self.mean_confidence[filled])
        return float(np.sum(self.count[filled] / total * gaps))

    def rows(self) -> list[dict[str, float]]:
        return [
            {
                "bin_lower": float(lo),
                "bin_upper": float(hi),
                "count": int(n),
                "mean_confidence": float(conf),
                "accuracy": float(acc),
            }
            for lo, hi, n, conf, acc in zip(self.lower, self.upper, self.count, self.mean_confidence, self.accuracy)
        ]


def _as_1d(values, dtype) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=dtype)
    if array.ndim != 1:
        raise ValueError(f"expected a 1-D array, got shape {array.shape}")
    return array


def reliability_bins(confidences, correct, n_bins: int = DEFAULT_NUM_BINS) -> ReliabilityBins:
    """Bin predictions by confidence into ``n_bins`` equal-width bins ``(lo, hi]`` over ``[0, 1]``."""
    confidences = _as_1d(confidences, np.float64)
    correct = _as_1d(correct, np.float64)
    if confidences.shape != correct.shape:
        raise ValueError(f"confidences {confidences.shape} and correct {correct.shape} differ in length")
    if n_bins < 1:
        raise ValueError(f"n_bins must be positive, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" on the inner edges puts a confidence equal to an edge into the bin that edge closes: (lo, hi].
    bin_index = np.searchsorted(edges[1:-1], confidences, side="left")
    count = np.bincount(bin_index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(bin_index, weights=confidences, minlength=n_bins) / count
        accuracy = np.bincount(bin_index, weights=correct, minlength=n_bins) / count
    return ReliabilityBins(edges[:-1], edges[1:], count, mean_confidence, accuracy)


def expected_calibration_error(confidences, correct, n_bins: int = DEFAULT_NUM_BINS) -> float:
    """ECE of top-1 predictions: ``confidences`` are max probabilities, ``correct`` is 1 where top-1 was right.

    From probabilities ``probs [N, C]`` and ``targets [N]``: ``expected_calibration_error(probs.max(1),
    probs.argmax(1) == targets)``.
    """
    return reliability_bins(confidences, correct, n_bins).ece


def fit_temperature(val_logits, val_targets, max_iter: int = 200) -> float:
    """Temperature ``T`` minimising the validation NLL of ``softmax(logits / T)`` (Guo et al., 2017).

    Optimises ``log T`` with L-BFGS so that T stays positive; the result is clamped to
    ``[MIN_TEMPERATURE, MAX_TEMPERATURE]`` and falls back to 1.0 if it would not lower the validation NLL.
    """
    logits = torch.as_tensor(val_logits).detach().to(device="cpu", dtype=torch.float64)
    targets = torch.as_tensor(val_targets).detach().to(device="cpu", dtype=torch.long)
    if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0] or logits.shape[0] == 0:
        raise ValueError(f"need logits [N, C] and targets [N] with N > 0, got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_temperature.exp(), targets)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    temperature = float(log_temperature.detach().exp())
    if not math.isfinite(temperature):
        return 1.0
    temperature = min(max(temperature, MIN_TEMPERATURE), MAX_TEMPERATURE)
    with torch.no_grad():
        nll_fitted = float(F.cross_entropy(logits / temperature, targets))
        nll_identity = float(F.cross_entropy(logits, targets))
    return temperature if nll_fitted <= nll_identity else 1.0


@dataclass(frozen=True)
class TemperatureScaling:
    """A temperature fitted on the validation split and its effect on validation and test calibration."""

    temperature: float
    val_nll_before: float
    val_nll_after: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    bins_before: ReliabilityBins
    bins_after: ReliabilityBins

    def as_metrics(self) -> dict[str, float]:
        return {
            "temperature": self.temperature,
            "val_nll_before_temperature": self.val_nll_before,
            "val_nll_after_temperature": self.val_nll_after,
            "nll_after_temperature": self.nll_after,
            "ece_after_temperature": self.ece_after,
        }


def _nll(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    scaled = torch.as_tensor(logits, dtype=torch.float64) / temperature
    return float(F.cross_entropy(scaled, torch.as_tensor(targets, dtype=torch.long)))


def _top1_confidence_and_correct(logits: np.ndarray, targets: np.ndarray, temperature: float):
    probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float64) / temperature, dim=1).numpy()
    return probs.max(axis=1), probs.argmax(axis=1) == targets


def temperature_scaling(val_logits, val_targets, test_logits, test_targets,
                        n_bins: int = DEFAULT_NUM_BINS) -> TemperatureScaling:
    """Fit ``T`` on validation logits and report NLL/ECE on validation and test before and after scaling."""
    val_logits = np.asarray(val_logits, dtype=np.float64)
    val_targets = np.asarray(val_targets, dtype=np.int64)
    test_logits = np.asarray(test_logits, dtype=np.float64)
    test_targets = np.asarray(test_targets, dtype=np.int64)
    temperature = fit_temperature(val_logits, val_targets)
    bins_before = reliability_bins(*_top1_confidence_and_correct(test_logits, test_targets, 1.0), n_bins)
    bins_after = reliability_bins(*_top1_confidence_and_correct(test_logits, test_targets, temperature), n_bins)
    return TemperatureScaling(
        temperature=temperature,
        val_nll_before=_nll(val_logits, val_targets),
        val_nll_after=_nll(val_logits, val_targets, temperature),
        nll_before=_nll(test_logits, test_targets),
        nll_after=_nll(test_logits, test_targets, temperature),
        ece_before=bins_before.ece,
        ece_after=bins_after.ece,
        bins_before=bins_before,
        bins_after=bins_after,
    )
