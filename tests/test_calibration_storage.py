"""The calibration a model carries: fitted and stored at the end of training, refitted by `calibrate`, applied by
`evaluate` (temperature on every confidence, the operating point's accepted column), and left out by `--raw`."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

import resnetlab as rl
from resnetlab.cli.main import main
from resnetlab.errors import CheckpointError, ConfigError, DataError
from resnetlab.evaluation.selective import choose_operating_point

TINY = {"model": "simple_cnn", "batch_size": 32, "train__threads": 1, "eval__gradcam": False,
        "eval__deployment_check": False}


@pytest.fixture(scope="module")
def trained(tiny_signs, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrated") / "run"
    return rl.train(f"gtsrb:{tiny_signs}", epochs=1, out=out, progress=False,
                    overrides={"train.max_steps_per_epoch": 3}, **TINY)


def _meta(checkpoint) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["meta"]


def _rows(folder) -> list[dict[str, str]]:
    with open(folder / "predictions.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def checkpoint_copy(trained, tmp_path):
    """The run's best checkpoint, copied: `calibrate` rewrites the file it is given."""
    copy = tmp_path / "model.pt"
    shutil.copy(trained.checkpoint, copy)
    return copy


def test_training_stores_calibration_and_evaluates_with_it(trained):
    record = _meta(trained.checkpoint)["calibration"]
    info = json.loads((trained.dir / "run_info.json").read_text())
    assert record["temperature"] > 0 and record["fitted_on"] == "val"
    assert record["num_images"] == info["split_sizes"]["val"]
    point = record["operating_point"]
    # the run's eval.coverage (0.99 by default) chose the highest threshold that keeps at least 99% on validation
    assert point["rule"] == "coverage" and point["target"] == 0.99 and point["coverage"] >= 0.99
    assert point == choose_operating_point(record["risk_coverage"], coverage=0.99).to_dict()
    assert "calibration on" in (trained.dir / "train.log").read_text()

    # the run's own test evaluation applied the same temperature and operating point
    metrics = trained.metrics
    assert metrics["temperature_applied"] == pytest.approx(record["temperature"])
    assert metrics["operating_point"] == pytest.approx(point)
    assert metrics["ece_raw"] is not None and metrics["ece"] is not None
    rows = _rows(trained.dir / "eval")
    assert {"energy", "accepted"} <= set(rows[0])
    assert metrics["accepted_fraction"] == pytest.approx(np.mean([int(row["accepted"]) for row in rows]))
    for row in rows:
        assert int(row["accepted"]) == int(float(row["confidence"]) >= point["threshold"])


def test_stored_threshold_keeps_the_stored_coverage_of_the_validation_split(trained, tmp_path):
    record = _meta(trained.checkpoint)["calibration"]
    val = rl.evaluate(trained, split="val", out=tmp_path / "val")
    # evaluate --split val rebuilds the very images the calibration was fitted on: same fraction accepted
    assert val.metrics["num_samples"] == record["num_images"]
    assert val.metrics["accepted_fraction"] == pytest.approx(record["operating_point"]["coverage"],
                                                             abs=1.5 / record["num_images"])
    assert val.metrics["error_among_accepted"] == pytest.approx(record["operating_point"]["error"], abs=0.02)


def test_calibrate_refits_on_the_validation_split_and_rewrites_the_record(trained, checkpoint_copy, capsys):
    stored = _meta(trained.checkpoint)["calibration"]
    strict = rl.calibrate(checkpoint_copy, max_error=0.0)
    assert _meta(checkpoint_copy)["calibration"] == strict
    # the same validation split as training, rebuilt: the same temperature
    assert strict["temperature"] == pytest.approx(stored["temperature"], rel=1e-3)
    assert strict["num_images"] == stored["num_images"] and strict["fitted_on"] == "val"
    point = strict["operating_point"]
    assert point["rule"] == "max_error" and point["target"] == 0.0
    assert point == choose_operating_point(strict["risk_coverage"], max_error=0.0).to_dict()
    assert point["threshold"] > stored["operating_point"]["threshold"]  # a barely trained model errs often

    assert main(["calibrate", str(checkpoint_copy), "--coverage", "0.5"]) == 0
    half = _meta(checkpoint_copy)["calibration"]["operating_point"]
    assert half["rule"] == "coverage" and half["target"] == 0.5 and half["coverage"] >= 0.5
    assert half["threshold"] != point["threshold"]
    out = capsys.readouterr().out
    assert "temperature" in out and f"{half['threshold']:.4f}" in out

    # without a rule, the stored operating point's rule is kept
    again = rl.calibrate(checkpoint_copy)
    assert again["operating_point"]["rule"] == "coverage" and again["operating_point"]["target"] == 0.5


def test_calibrate_refuses_classes_the_model_does_not_have(trained, tiny_signs, checkpoint_copy, tmp_path):
    folder = tmp_path / "foreign"
    with open(tiny_signs / "Test.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    known = rows[0]["ClassId"]
    for name, chosen in ((known, [r for r in rows if r["ClassId"] == known][:4]), ("not_a_sign", rows[:4])):
        (folder / name).mkdir(parents=True)
        for row in chosen:
            shutil.copy(tiny_signs / row["Path"], folder / name / row["Path"].split("/")[-1])
    before = checkpoint_copy.read_bytes()
    with pytest.raises(DataError, match=r"class\(es\) the model does not have \(not_a_sign\)"):
        rl.calibrate(checkpoint_copy, f"folder:{folder}", split="all")
    assert checkpoint_copy.read_bytes() == before  # nothing stored
    assert main(["calibrate", str(checkpoint_copy), "--data", f"folder:{folder}", "--split", "all"]) == 2


def test_calibrate_refuses_bad_rules(checkpoint_copy):
    with pytest.raises(ConfigError, match="pass one of them"):
        rl.calibrate(checkpoint_copy, coverage=0.9, max_error=0.1)
    with pytest.raises(ConfigError, match=r"--coverage 1.5"):
        rl.calibrate(checkpoint_copy, coverage=1.5)
    with pytest.raises(ConfigError, match="--split 'train'"):
        rl.calibrate(checkpoint_copy, split="train")


def test_evaluate_default_applies_the_temperature_and_raw_does_not(trained, checkpoint_copy, tmp_path):
    # a temperature far from 1 so that calibrated and raw confidences must differ
    state = torch.load(checkpoint_copy, map_location="cpu", weights_only=True)
    from resnetlab.checkpoint import store_calibration

    store_calibration(checkpoint_copy, {**state["meta"]["calibration"], "temperature": 3.0})
    default = rl.evaluate(checkpoint_copy, out=tmp_path / "default")
    raw = rl.evaluate(checkpoint_copy, out=tmp_path / "raw", raw=True)
    assert default.metrics["temperature_applied"] == 3.0
    assert raw.metrics["temperature_applied"] is None and "ece_raw" not in raw.metrics
    assert raw.metrics["operating_point"]["rule"] == "accept_all" and raw.metrics["accepted_fraction"] == 1.0
    # the raw figures of the calibrated evaluation are those of the raw one; the answers are the same
    assert default.metrics["ece_raw"] == pytest.approx(raw.metrics["ece"])
    assert default.metrics["nll_raw"] == pytest.approx(raw.metrics["nll"])
    assert default.metrics["top1"] == raw.metrics["top1"]
    calibrated, uncalibrated = _rows(default.dir), _rows(raw.dir)
    assert [r["pred"] for r in calibrated] == [r["pred"] for r in uncalibrated]
    # T = 3 softens every confidence
    assert all(float(c["confidence"]) < float(u["confidence"]) for c, u in zip(calibrated, uncalibrated))
    assert default.metrics["accepted_fraction"] == pytest.approx(
        np.mean([int(row["accepted"]) for row in calibrated]))
    report = (default.dir / "report.md").read_text()
    assert "Operating point" in report and "T = 3.0000" in report
    assert "Temperature the model deploys with" in report

    chosen = rl.evaluate(checkpoint_copy, out=tmp_path / "chosen", coverage=0.5)
    assert chosen.metrics["operating_point"]["rule"] == "coverage"
    assert chosen.metrics["operating_point"]["target"] == 0.5
    with pytest.raises(ConfigError, match="--raw"):
        rl.evaluate(checkpoint_copy, out=tmp_path / "bad", raw=True, max_error=0.1)


def test_a_checkpoint_without_calibration_evaluates_as_before(checkpoint_copy, tmp_path):
    state = torch.load(checkpoint_copy, map_location="cpu", weights_only=True)
    state["meta"].pop("calibration")
    torch.save(state, checkpoint_copy)
    evaluation = rl.evaluate(checkpoint_copy, out=tmp_path / "old")
    metrics = evaluation.metrics
    assert metrics["temperature_applied"] is None and "ece_raw" not in metrics
    assert metrics["operating_point"]["rule"] == "accept_all" and metrics["accepted_fraction"] == 1.0
    assert metrics["error_among_accepted"] == pytest.approx(metrics["error_rate"])
    assert all(row["accepted"] == "1" for row in _rows(evaluation.dir))
    with pytest.raises(ConfigError, match="stores no calibration"):
        rl.evaluate(checkpoint_copy, out=tmp_path / "no-curve", max_error=0.1)
    # calibrate gives it one
    record = rl.calibrate(checkpoint_copy)
    assert _meta(checkpoint_copy)["calibration"] == record


def test_a_run_without_validation_split_stores_no_calibration(tiny_signs, tmp_path):
    run = rl.train(f"gtsrb:{tiny_signs}", epochs=1, out=tmp_path / "noval", progress=False,
                   overrides={"train.max_steps_per_epoch": 2, "data.val_fraction": 0}, **TINY)
    assert _meta(run.checkpoint).get("calibration") is None
    assert "no validation split, so no temperature" in (run.dir / "train.log").read_text()
    assert run.metrics["temperature_applied"] is None and run.metrics["accepted_fraction"] == 1.0


def test_graph_temperature_of_an_export_record_is_undone():
    from resnetlab.jobs.evaluate import ExportedModel, graph_temperature

    assert graph_temperature({"output": {"kind": "logits"}}) == 1.0
    assert graph_temperature({"output": {"temperature_applied": None}}) == 1.0
    assert graph_temperature({"output": {"temperature_applied": 2.5}}) == 2.5
    assert graph_temperature({"output": {"temperature_applied": True}}, {"temperature": 1.7}) == 1.7
    with pytest.raises(CheckpointError, match="temperature_applied"):
        graph_temperature({"output": {"temperature_applied": "hot"}})

    class Backend:  # an export whose graph divides by T = 2
        def run(self, x):
            return x / 2.0

    x = torch.randn(3, 4)
    assert torch.allclose(ExportedModel(Backend(), 2.0)(x), x)


def test_calibrate_answers_bad_input_with_one_line(checkpoint_copy, tmp_path, capsys):
    assert main(["calibrate", str(tmp_path / "missing.pt")]) == 2
    state = torch.load(checkpoint_copy, map_location="cpu", weights_only=True)
    state["meta"]["calibration"]["temperature"] = -1.0
    torch.save(state, checkpoint_copy)
    assert main(["calibrate", str(checkpoint_copy)]) == 2
    assert main(["calibrate", str(checkpoint_copy.parent), "--coverage", "0.5", "--max-error", "0.1"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), lines
    assert "missing.pt" in lines[0]
    assert "meta.calibration.temperature" in lines[1]
