"""Evaluation: metrics, calibration and Grad-CAM computed from model outputs (no data loading here)."""

from resnetlab.evaluation.calibration import expected_calibration_error, fit_temperature, reliability_bins
from resnetlab.evaluation.gradcam import grad_cam, load_gradcam_npz, save_gradcam_npz
from resnetlab.evaluation.metrics import EvaluationResult, evaluate_predictions

__all__ = [
    "EvaluationResult",
    "evaluate_predictions",
    "expected_calibration_error",
    "fit_temperature",
    "grad_cam",
    "load_gradcam_npz",
    "reliability_bins",
    "save_gradcam_npz",
]
