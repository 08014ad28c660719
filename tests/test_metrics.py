"""Evaluation metrics, calibration and Grad-CAM checked against independent computations."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    recall_score,
    top_k_accuracy_score,
)

from resnetlab.evaluation.calibration import expected_calibration_error, fit_temperature, reliability_bins
from resnetlab.evaluation.gradcam import grad_cam, load_gradcam_npz, save_gradcam_npz
from resnetlab.evaluation.metrics import evaluate_predictions, risk_coverage_curve, selective_error

torch.set_num_threads(1)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _noisy_logits(rng, num_samples: int, num_classes: int, signal: float = 2.0, scale: float = 1.0):
    targets = rng.integers(0, num_classes, num_samples)
    logits = rng.normal(size=(num_samples, num_classes))
    logits[np.arange(num_samples), targets] += signal
    return logits * scale, targets


@pytest.fixture
def evaluated(tmp_path):
    rng = np.random.default_rng(7)
    logits, targets = _noisy_logits(rng, 400, 7)
    names = [f"class {i}" for i in range(7)]
    paths = [f"/data/img_{i}.png" for i in range(400)]
    result = evaluate_predictions(logits, targets, names, paths)
    result.save(tmp_path / "eval")
    return logits, targets, names, result, tmp_path / "eval"


def test_metrics_match_sklearn(evaluated):
    logits, targets, names, result, _ = evaluated
    probs = _softmax(logits)
    preds = probs.argmax(1)
    metrics = result.metrics
    assert metrics["top1"] == pytest.approx(accuracy_score(targets, preds))
    assert metrics["top5"] == pytest.approx(top_k_accuracy_score(targets, probs, k=5, labels=np.arange(7)))
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(targets, preds))
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(targets, preds, average=average)
        assert metrics[f"{average}_precision"] == pytest.approx(precision)
        assert metrics[f"{average}_recall"] == pytest.approx(recall)
        assert metrics[f"{average}_f1"] == pytest.approx(f1)
    assert metrics["nll"] == pytest.approx(log_loss(targets, probs, labels=np.arange(7)), rel=1e-6)
    # sklearn's multiclass Brier score is the same sum over classes of squared probability errors.
    assert metrics["brier"] == pytest.approx(brier_score_loss(targets, probs, labels=np.arange(7)), rel=1e-9)
    assert metrics["num_samples"] == 400 and metrics["num_classes"] == 7
    np.testing.assert_array_equal(result.confusion, confusion_matrix(targets, preds))

    precision, recall, f1, support = precision_recall_fscore_support(targets, preds)
    for row in result.per_class:
        i = row["index"]
        assert row["class"] == names[i]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (precision[i], recall[i], f1[i], support[i]))
        assert row["accuracy"] == pytest.approx(np.mean(preds[targets == i] == i))


def test_confidence_and_selective_metrics(evaluated):
    logits, targets, _, result, _ = evaluated
    probs = _softmax(logits)
    confidence, correct = probs.max(1), probs.argmax(1) == targets
    metrics = result.metrics
    assert metrics["mean_confidence_correct"] == pytest.approx(confidence[correct].mean())
    assert metrics["mean_confidence_incorrect"] == pytest.approx(confidence[~correct].mean())
    assert metrics["confidence_gap"] == pytest.approx(confidence[correct].mean() - confidence[~correct].mean())
    order = np.argsort(confidence)  # least confident first
    for fraction, key in ((0.01, "error_at_reject_1pct"), (0.02, "error_at_reject_2pct"),
                          (0.05, "error_at_reject_5pct")):
        kept = order[int(fraction * 400):]
        assert metrics[key] == pytest.approx(1 - correct[kept].mean())
    assert metrics["error_at_reject_5pct"] <= metrics["error_rate"]
    assert result.risk_coverage["risk"][-1] == pytest.approx(metrics["error_rate"])
    assert metrics["aurc"] == pytest.approx(result.risk_coverage["risk"].mean())


def test_saved_files_round_trip(evaluated):
    logits, targets, names, result, eval_dir = evaluated
    expected = {"metrics.json", "per_class.csv", "confusion.csv", "predictions.csv", "most_confused.csv",
                "risk_coverage.csv", "reliability.csv"}
    assert expected <= {path.name for path in eval_dir.iterdir()}
    assert not [path for path in eval_dir.iterdir() if path.name.endswith(".tmp")]
    saved = json.loads((eval_dir / "metrics.json").read_text())
    assert saved.pop("operating_point") == result.metrics["operating_point"]  # nested: approx compares flat dicts
    assert saved == pytest.approx({key: value for key, value in result.metrics.items() if key != "operating_point"})

    with open(eval_dir / "predictions.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames[:4] == ["path", "true", "pred", "confidence"]
        rows = list(reader)
    probs = _softmax(logits)
    for i in (0, 17, 399):
        assert rows[i]["path"] == f"/data/img_{i}.png"
        assert rows[i]["true"] == names[targets[i]] and int(rows[i]["true_index"]) == targets[i]
        assert rows[i]["pred"] == names[probs[i].argmax()] and int(rows[i]["pred_index"]) == probs[i].argmax()
        assert float(rows[i]["confidence"]) == pytest.approx(probs[i].max())
        assert float(rows[i]["loss"]) == pytest.approx(-math.log(probs[i, targets[i]]))
        top5 = np.argsort(-probs[i])[:5]
        assert [rows[i][f"top{r}_class"] for r in range(1, 6)] == [names[j] for j in top5]
        assert float(rows[i]["top2_prob"]) == pytest.approx(probs[i, top5[1]])

    with open(eval_dir / "confusion.csv", newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0][1:] == names
    np.testing.assert_array_equal(np.array([[int(c) for c in row[1:]] for row in table[1:]]), result.confusion)

    with open(eval_dir / "most_confused.csv", newline="") as handle:
        pairs = list(csv.DictReader(handle))
    off_diagonal = result.confusion.copy()
    np.fill_diagonal(off_diagonal, 0)
    assert int(pairs[0]["count"]) == off_diagonal.max()
    assert len(pairs) == np.count_nonzero(off_diagonal)
    counts = [int(pair["count"]) for pair in pairs]
    assert counts == sorted(counts, reverse=True)
    first = pairs[0]
    assert off_diagonal[names.index(first["true"]), names.index(first["pred"])] == int(first["count"])


def test_ece_hand_computed_case():
    # 15 bins of width 1/15: 0.95 falls in (14/15, 1], 0.55 in (8/15, 9/15], 0.30 in (4/15, 5/15].
    confidences = [0.95, 0.95, 0.55, 0.55, 0.30]
    correct = [1, 0, 1, 1, 0]
    # bin accuracies 0.5, 1.0, 0.0 against mean confidences 0.95, 0.55, 0.30, weighted 2/5, 2/5, 1/5
    hand = 2 / 5 * 0.45 + 2 / 5 * 0.45 + 1 / 5 * 0.30
    assert expected_calibration_error(confidences, correct) == pytest.approx(hand)
    bins = reliability_bins(confidences, correct)
    assert bins.count.tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 2]

    # The same case through evaluate_predictions, with log-probabilities as logits.
    probs = np.array([[0.95, 0.02, 0.02, 0.01], [0.95, 0.02, 0.02, 0.01], [0.55, 0.15, 0.15, 0.15],
                      [0.55, 0.15, 0.15, 0.15], [0.30, 0.25, 0.25, 0.20]])
    targets = np.array([0, 1, 0, 0, 1])
    result = evaluate_predictions(np.log(probs), targets, ["a", "b", "c", "d"])
    assert result.metrics["ece"] == pytest.approx(hand)
    assert result.metrics["top5"] == 1.0  # k is capped at the four classes


def test_ece_bins_are_closed_on_the_right():
    edges = np.linspace(0, 1, 16)
    bins = reliability_bins([edges[3], edges[3] + 1e-9, 1.0], [1, 1, 1])
    assert bins.count[2] == 1 and bins.count[3] == 1 and bins.count[14] == 1


def test_temperature_scaling_lowers_nll_of_overconfident_logits():
    rng = np.random.default_rng(3)
    val_logits, val_targets = _noisy_logits(rng, 600, 10, signal=1.5, scale=4.0)
    test_logits, test_targets = _noisy_logits(rng, 600, 10, signal=1.5, scale=4.0)

    def nll(logits, targets, temperature):
        return log_loss(targets, _softmax(logits / temperature), labels=np.arange(10))

    temperature = fit_temperature(val_logits, val_targets)
    assert temperature > 1.5  # logits were inflated 4x, so the fit must soften them
    # An independent 1-D optimiser (Brent, scipy) on the same objective must find the same temperature.
    brent = minimize_scalar(lambda t: nll(val_logits, val_targets, t), bounds=(0.5, 10.0), method="bounded",
                            options={"xatol": 1e-5})
    assert temperature == pytest.approx(brent.x, rel=1e-3)

    result = evaluate_predictions(test_logits, test_targets, [str(i) for i in range(10)],
                                  val_logits=val_logits, val_targets=val_targets)
    metrics = result.metrics
    assert metrics["temperature"] == pytest.approx(temperature)
    assert metrics["nll_after_temperature"] < metrics["nll"]
    assert metrics["nll_after_temperature"] == pytest.approx(nll(test_logits, test_targets, temperature), rel=1e-6)
    assert metrics["val_nll_after_temperature"] < metrics["val_nll_before_temperature"]
    assert metrics["ece_after_temperature"] < metrics["ece"]
    assert metrics["top1"] == pytest.approx(accuracy_score(test_targets, test_logits.argmax(1)))


def test_class_subset_of_a_foreign_test_set(tmp_path):
    rng = np.random.default_rng(11)
    present = [2, 5, 7]
    targets = rng.choice(present, 300)
    logits = rng.normal(size=(300, 10))
    logits[np.arange(300), targets] += 2.0
    logits[:20, 9] += 6.0  # some images predicted as a class the foreign set does not have
    preds = logits.argmax(1)
    names = [f"c{i}" for i in range(10)]
    result = evaluate_predictions(logits, targets, names, labels_present=present)
    metrics = result.metrics
    assert metrics["num_classes"] == 3 and metrics["num_model_classes"] == 10 and metrics["class_subset"]
    assert metrics["top1"] == pytest.approx(np.mean(preds == targets))
    assert metrics["macro_f1"] == pytest.approx(f1_score(targets, preds, labels=present, average="macro"))
    assert metrics["weighted_f1"] == pytest.approx(f1_score(targets, preds, labels=present, average="weighted"))
    assert metrics["balanced_accuracy"] == pytest.approx(recall_score(targets, preds, labels=present,
                                                                      average="macro"))
    assert [row["index"] for row in result.per_class] == present
    result.save(tmp_path)
    with open(tmp_path / "confusion.csv", newline="") as handle:
        table = list(csv.reader(handle))
    assert [row[0] for row in table[1:]] == ["c2", "c5", "c7"] and len(table[0]) == 11
    assert sum(int(row[10]) for row in table[1:]) == np.sum(preds == 9)


@pytest.mark.parametrize("bad", ["targets_range", "names", "labels_present"])
def test_invalid_inputs_are_rejected(bad):
    logits, targets, names, present = np.zeros((4, 3)), np.array([0, 1, 2, 1]), ["a", "b", "c"], None
    if bad == "targets_range":
        targets = np.array([0, 1, 3, 1])
    elif bad == "names":
        names = ["a", "b"]
    else:
        present = [0, 1]
    with pytest.raises(ValueError):
        evaluate_predictions(logits, targets, names, labels_present=present)


def test_selective_error_and_risk_coverage_small_case():
    confidences = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    correct = np.array([1, 1, 0, 1, 1, 1, 0, 1, 0, 0], dtype=bool)
    # Rejecting 20% drops the two least confident (both wrong): 2 errors left among 8.
    assert selective_error(confidences, correct, 0.2) == pytest.approx(2 / 8)
    curve = risk_coverage_curve(confidences, correct)
    assert curve["coverage"].tolist() == pytest.approx([k / 10 for k in range(1, 11)])
    assert curve["risk"][:3].tolist() == pytest.approx([0, 0, 1 / 3])


class TinyCamModel(torch.nn.Module):
    """forward_features: fixed 1x1 conv (identity on 3 channels); forward_head: global average pool + linear."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Conv2d(3, 3, 1, bias=False)
        self.fc = torch.nn.Linear(3, 2)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(3)[:, :, None, None])
            self.fc.weight.copy_(torch.tensor([[1.0, -0.5, 0.0], [-1.0, 0.0, 2.0]]))
            self.fc.bias.zero_()

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, features):
        return self.fc(features.mean(dim=(2, 3)))


def test_grad_cam_matches_class_activation_map():
    model = TinyCamModel().train()
    images = torch.zeros(2, 3, 8, 8)
    images[0, 0, :3, :3] = 1.0  # class 0 evidence (channel 0) in the top-left corner
    images[1, 2, 5:, 5:] = 1.0  # class 1 evidence (channel 2) in the bottom-right corner
    images[1, 0, :2, :2] = 0.5
    targets = [0, 1]
    cams = grad_cam(model, images, targets)
    assert cams.shape == (2, 8, 8)
    assert float(cams.min()) >= 0.0 and float(cams.max()) <= 1.0
    # For an average-pool + linear head Grad-CAM equals CAM: relu(sum_k w[c, k] * A_k), normalised to max 1.
    weights = model.fc.weight.detach()
    for index, target in enumerate(targets):
        expected = torch.relu(torch.einsum("k,khw->hw", weights[target], images[index]))
        torch.testing.assert_close(cams[index], expected / expected.max())
    assert model.training, "grad_cam must restore the model's training mode"
    assert all(parameter.grad is None for parameter in model.parameters())


def test_gradcam_npz_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    heatmaps = np.random.default_rng(1).random((3, 16, 16)).astype(np.float32)
    path = save_gradcam_npz(tmp_path / "gradcam.npz", images, heatmaps, ["a", "b", "c"], ["b", "a", "a"],
                            [0.9, 0.8, 0.7], paths=["/x/1.png", "/x/2.png", "/x/3.png"])
    data = load_gradcam_npz(path)
    np.testing.assert_array_equal(data["images"], images)
    np.testing.assert_allclose(data["heatmaps"], heatmaps)
    assert data["pred_names"].tolist() == ["b", "a", "a"] and data["target_names"].tolist() == ["b", "a", "a"]
    with pytest.raises(ValueError):
        save_gradcam_npz(tmp_path / "bad.npz", images, heatmaps[:2], ["a"] * 3, ["a"] * 3, [1.0] * 3)


def test_macro_averages_leave_out_classes_with_neither_test_images_nor_predictions():
    """A track-grouped test split can lack whole classes; they have no F1 to average. Classes the model predicts
    without test images stay in (precision 0), as in scikit-learn's default label set."""
    rng = np.random.default_rng(4)
    targets = rng.choice([0, 1, 2, 3], 400)
    logits = rng.normal(size=(400, 8))
    logits[np.arange(400), targets] += 2.5
    logits[:, 4:] -= 3.0  # classes 4-7: no test images
    logits[:10, 6] += 12.0  # a few predictions of class 6, which has no test images; 4, 5 and 7 are never predicted
    preds = logits.argmax(1)
    assert set(preds) == {0, 1, 2, 3, 6}
    metrics = evaluate_predictions(logits, targets, [f"c{i}" for i in range(8)]).metrics
    for key, score in (("macro_f1", f1_score), ("macro_recall", recall_score)):
        assert metrics[key] == pytest.approx(score(targets, preds, average="macro", zero_division=0))
        assert metrics[key] > score(targets, preds, labels=np.arange(8), average="macro", zero_division=0) + 0.2
    assert metrics["macro_classes"] == 5 and metrics["num_classes"] == 8
    assert metrics["classes_without_support"] == ["c4", "c5", "c6", "c7"]


def test_stored_temperature_and_operating_point_are_applied(tmp_path):
    from scipy.special import logsumexp

    from resnetlab.evaluation.selective import OperatingPoint

    rng = np.random.default_rng(5)
    logits, targets = _noisy_logits(rng, 300, 6, signal=1.5, scale=3.0)
    temperature = 2.5
    point = OperatingPoint("threshold", 0.6, 0.6, None, None)
    result = evaluate_predictions(logits, targets, [f"c{i}" for i in range(6)], temperature=temperature,
                                  operating_point=point)
    result.save(tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    with open(tmp_path / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))

    scaled = _softmax(logits / temperature)
    confidence = scaled.max(1)
    correct = scaled.argmax(1) == targets
    # every probability figure is of softmax(logits / T); the raw ones are kept beside them
    assert metrics["temperature_applied"] == temperature
    assert [float(r["confidence"]) for r in rows] == pytest.approx(confidence.tolist())
    assert [float(r["top1_prob"]) for r in rows] == pytest.approx(confidence.tolist())
    assert metrics["nll"] == pytest.approx(log_loss(targets, scaled, labels=np.arange(6)))
    assert metrics["nll_raw"] == pytest.approx(log_loss(targets, _softmax(logits), labels=np.arange(6)))
    assert metrics["ece"] == pytest.approx(expected_calibration_error(confidence, correct))
    assert metrics["ece_raw"] == pytest.approx(expected_calibration_error(_softmax(logits).max(1),
                                                                          _softmax(logits).argmax(1) == targets))
    assert metrics["top1"] == pytest.approx(accuracy_score(targets, logits.argmax(1)))  # T never changes answers
    # energy at the applied temperature (Liu et al., 2020)
    assert [float(r["energy"]) for r in rows] == pytest.approx(
        (-temperature * logsumexp(logits / temperature, axis=1)).tolist())
    # the operating point: accepted where the calibrated confidence reaches the threshold
    accepted = np.array([int(r["accepted"]) for r in rows])
    assert accepted.tolist() == (confidence >= 0.6).astype(int).tolist()
    assert 0 < accepted.sum() < len(rows)
    assert metrics["accepted_fraction"] == pytest.approx(accepted.mean())
    assert metrics["error_among_accepted"] == pytest.approx(1 - correct[accepted == 1].mean())
    assert metrics["operating_point"] == point.to_dict()
    with open(tmp_path / "reliability.csv", newline="") as handle:
        variants = {row["variant"] for row in csv.DictReader(handle)}
    assert variants == {"uncalibrated", "temperature_scaled"}


def test_without_calibration_every_answer_is_accepted_at_temperature_one(evaluated):
    logits, targets, _, result, folder = evaluated
    metrics = result.metrics
    assert metrics["temperature_applied"] is None and "ece_raw" not in metrics
    assert metrics["operating_point"]["rule"] == "accept_all" and metrics["accepted_fraction"] == 1.0
    assert metrics["error_among_accepted"] == pytest.approx(metrics["error_rate"])
    with open(folder / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["energy"]) for r in rows] == pytest.approx((-np.log(np.exp(logits).sum(1))).tolist())
    assert {r["accepted"] for r in rows} == {"1"}
    with pytest.raises(ValueError, match="temperature must be a positive"):
        evaluate_predictions(logits, targets, [f"class {i}" for i in range(7)], temperature=0.0)
