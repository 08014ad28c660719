"""Domain shift in `compare` and the run report: per-class drops, calibration, coverage and OOD AUROC.

Evaluation folders are written through `evaluation.metrics.evaluate_predictions` on synthetic logits, so their
formats are the real ones; the columns and keys evaluate adds for selective prediction (`energy`, `accepted`,
`temperature_applied`, `operating_point`, ...) are written here by hand where a test needs them. The last tests
train a tiny model and evaluate it on the synthetic set and on a shifted copy of it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re

import numpy as np
import pytest
import torch

from resnetlab.errors import ConfigError
from resnetlab.evaluation.metrics import evaluate_predictions
from resnetlab.evaluation.selective import energy_score
from resnetlab.reporting import compare_runs, render_report
from resnetlab.reporting.domain import domain_shift
from resnetlab.reporting.runfiles import load_run

torch.set_num_threads(1)

CLASSES = ["Stop", "Yield", "No entry", "Keep right"]
SHA = "a" * 64


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


SELECTIVE_KEYS = ("temperature_applied", "operating_point", "accepted_fraction", "error_among_accepted", "ece_raw",
                  "nll_raw")


def make_eval(folder, logits, targets, *, sha=SHA, energy=True, metrics_extra=None, accepted_threshold=None):
    """An evaluation folder of ``logits``: the real files, plus the checkpoint hash and, as asked, an energy column,
    an accepted column and extra metrics.json keys."""
    paths = [str(folder / "images" / f"{i:04d}.png") for i in range(len(targets))]  # distinct per folder
    evaluate_predictions(logits, targets, CLASSES, paths).save(folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    # as an evaluation from before selective prediction wrote them: the test adds back what it asks for
    for key in SELECTIVE_KEYS:
        metrics.pop(key, None)
    metrics.update({"checkpoint_sha256": sha, **(metrics_extra or {})})
    (folder / "metrics.json").write_text(json.dumps(metrics))
    rows = [{key: value for key, value in row.items() if key not in ("energy", "accepted")}
            for row in _read_csv(folder / "predictions.csv")]
    energies = energy_score(logits)
    for row, value in zip(rows, energies):
        if energy:
            row["energy"] = repr(float(value))
        if accepted_threshold is not None:
            row["accepted"] = int(float(row["confidence"]) >= accepted_threshold)
    _write_csv(folder / "predictions.csv", rows)
    return folder


def _logits(rng, targets, margin, noise=1.0):
    logits = rng.normal(scale=noise, size=(len(targets), len(CLASSES)))
    logits[np.arange(len(targets)), targets] += margin
    return logits


def test_perfectly_separated_confidences_give_auroc_one(tmp_path):
    rng = np.random.default_rng(0)
    targets = rng.integers(0, len(CLASSES), 200)
    confident = _logits(rng, targets, margin=30.0, noise=0.1)  # every confidence ~1
    unsure = rng.normal(scale=0.05, size=(200, len(CLASSES)))  # every confidence ~1/4
    reference = load_run(make_eval(tmp_path / "ref", confident, targets))
    shifted = load_run(make_eval(tmp_path / "shift", unsure, targets))
    result = domain_shift(reference, shifted, "ref", "shift")
    ood = result["ood"]
    assert ood["auroc_max_probability"] == pytest.approx(1.0)
    assert ood["auroc_energy"] == pytest.approx(1.0)
    # Nearly all near-uniform answers are wrong; they are all less familiar than any reference image.
    assert ood["shifted_errors"] > 100
    assert ood["auroc_max_probability_errors"] == pytest.approx(1.0)
    assert ood["auroc_energy_errors"] == pytest.approx(1.0)
    assert not [note for note in result["notes"] if "AUROC" in note]


def test_identical_distributions_give_auroc_near_one_half(tmp_path):
    targets = np.random.default_rng(1).integers(0, len(CLASSES), 3000)
    reference = load_run(make_eval(tmp_path / "ref", _logits(np.random.default_rng(2), targets, 2.0), targets))
    shifted = load_run(make_eval(tmp_path / "shift", _logits(np.random.default_rng(3), targets, 2.0), targets))
    ood = domain_shift(reference, shifted, "ref", "shift")["ood"]
    assert abs(ood["auroc_max_probability"] - 0.5) < 0.03
    assert abs(ood["auroc_energy"] - 0.5) < 0.03
    # The misclassified ones of the same distribution are less confident than the average reference image.
    assert ood["auroc_max_probability_errors"] > 0.6


def test_per_class_drops_are_clean_minus_shifted_accuracy_sorted_by_drop(tmp_path):
    rng = np.random.default_rng(4)
    clean_targets = rng.integers(0, len(CLASSES), 400)
    clean_logits = _logits(rng, clean_targets, 3.0)
    # The shifted set holds three of the four classes; "Yield" is mostly mistaken for "No entry" there.
    shift_targets = rng.choice([0, 1, 3], 300)
    shift_logits = _logits(rng, shift_targets, 2.0)
    shift_logits[shift_targets == 1, 2] += 4.0
    reference = load_run(make_eval(tmp_path / "ref", clean_logits, clean_targets))
    shifted = load_run(make_eval(tmp_path / "shift", shift_logits, shift_targets))
    result = domain_shift(reference, shifted, "ref", "shift")

    def accuracy(logits, targets, label):
        members = targets == label
        return float((logits[members].argmax(1) == label).mean())

    rows = {row["class"]: row for row in result["per_class"]}
    assert set(rows) == {"Stop", "Yield", "Keep right"}  # "No entry" has no shifted images
    for label in (0, 1, 3):
        row = rows[CLASSES[label]]
        clean, shift = accuracy(clean_logits, clean_targets, label), accuracy(shift_logits, shift_targets, label)
        assert row["reference_accuracy"] == pytest.approx(clean)
        assert row["shifted_accuracy"] == pytest.approx(shift)
        assert row["drop"] == pytest.approx(clean - shift)
        assert row["shifted_support"] == int((shift_targets == label).sum())
    drops = [row["drop"] for row in result["per_class"]]
    assert drops == sorted(drops, reverse=True)
    assert result["per_class"][0]["class"] == "Yield" and result["worst_classes"][0] == "Yield"
    assert result["top1"]["drop"] == pytest.approx(
        np.mean(clean_logits.argmax(1) == clean_targets) - np.mean(shift_logits.argmax(1) == shift_targets))


def test_missing_energy_column_is_skipped_with_a_note(tmp_path):
    rng = np.random.default_rng(5)
    targets = rng.integers(0, len(CLASSES), 100)
    reference = load_run(make_eval(tmp_path / "ref", _logits(rng, targets, 3.0), targets))
    shifted = load_run(make_eval(tmp_path / "shift", _logits(rng, targets, 1.0), targets, energy=False))
    result = domain_shift(reference, shifted, "ref", "shift")
    assert result["ood"]["auroc_energy"] is None and result["ood"]["auroc_energy_errors"] is None
    assert result["ood"]["auroc_max_probability"] is not None
    energy_notes = [note for note in result["notes"] if "energy" in note]
    assert len(energy_notes) == 1 and "`shift`" in energy_notes[0] and "`energy` column" in energy_notes[0]


def test_coverage_from_metrics_json_or_recomputed_at_the_operating_point(tmp_path):
    rng = np.random.default_rng(6)
    targets = rng.integers(0, len(CLASSES), 300)
    point = {"rule": "coverage", "target": 0.9, "threshold": 0.7, "coverage": 0.9, "error": 0.02}
    recorded = {"operating_point": point, "accepted_fraction": 0.123, "error_among_accepted": 0.045,
                "temperature_applied": 1.5}
    reference = load_run(make_eval(tmp_path / "ref", _logits(rng, targets, 3.0), targets, metrics_extra=recorded))
    # An evaluation made before the feature: no operating point, no coverage; confidences with the same temperature.
    shift_logits = _logits(rng, targets, 1.5)
    shifted = load_run(make_eval(tmp_path / "shift", shift_logits, targets,
                                 metrics_extra={"temperature_applied": 1.5}))
    result = domain_shift(reference, shifted, "ref", "shift")
    ref_sel, shift_sel = result["selective"]["reference"], result["selective"]["shifted"]
    assert (ref_sel["accepted_fraction"], ref_sel["error_among_accepted"]) == (0.123, 0.045)
    assert ref_sel["source"] == "metrics.json"
    confidence = np.array([float(row["confidence"]) for row in shifted.predictions])
    correct = np.array([int(row["correct"]) for row in shifted.predictions]).astype(bool)
    kept = confidence >= 0.7
    assert 0 < kept.sum() < len(kept)
    assert shift_sel["accepted_fraction"] == pytest.approx(kept.mean())
    assert shift_sel["error_among_accepted"] == pytest.approx(1 - correct[kept].mean())
    assert "`ref`" in shift_sel["source"] and shift_sel["operating_point"]["threshold"] == 0.7
    assert result["calibration"]["shifted"]["temperature_applied"] == 1.5

    # Another temperature: the reference's threshold does not apply to these confidences, so coverage is skipped.
    other = load_run(make_eval(tmp_path / "other", shift_logits, targets, metrics_extra={"temperature_applied": 2.0}))
    result = domain_shift(reference, other, "ref", "other")
    assert "accepted_fraction" not in result["selective"]["shifted"]
    assert any("coverage at the operating point skipped" in note for note in result["notes"])
    assert any("different temperatures" in note for note in result["notes"])

    # An `accepted` column written by evaluate is used as it is.
    marked = load_run(make_eval(tmp_path / "marked", shift_logits, targets, accepted_threshold=0.5))
    selective = domain_shift(reference, marked, "ref", "marked")["selective"]["shifted"]
    assert selective["accepted_fraction"] == pytest.approx((confidence_of(marked) >= 0.5).mean())
    assert selective["source"] == "predictions.csv accepted"


def confidence_of(run):
    return np.array([float(row["confidence"]) for row in run.predictions])


@pytest.fixture()
def three_evaluations(tmp_path):
    """clean and shifted of one checkpoint, and one of another checkpoint."""
    rng = np.random.default_rng(7)
    targets = rng.integers(0, len(CLASSES), 240)
    clean = make_eval(tmp_path / "clean", _logits(rng, targets, 4.0), targets)
    shift_logits = _logits(rng, targets, 1.0)
    shifted = make_eval(tmp_path / "shift", shift_logits, targets, energy=False)
    other = make_eval(tmp_path / "other", _logits(rng, targets, 3.0), targets, sha="b" * 64)
    return clean, shifted, other


def _section(markdown, title):
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", markdown, flags=re.M | re.S)
    assert match, f"section {title!r} missing"
    return match.group(1)


def test_compare_writes_the_domain_shift_section_json_and_csv(three_evaluations, tmp_path):
    clean, shifted, other = three_evaluations
    markdown = compare_runs([clean, shifted, other], tmp_path / "cmp").read_text()
    section = _section(markdown, "Domain shift")
    assert "### shift against clean" in section and "`other`" not in section
    assert "AUROC max prob, errors" in section  # the summary table
    assert "max probability, misclassified shifted images" in section  # the per-domain AUROC table
    assert "**" in section  # worst classes highlighted
    assert "no `energy` column" in section  # the skip, said
    html = (tmp_path / "cmp" / "compare.html").read_text()
    assert 'id="domain-shift"' in html and "<strong>" in html

    data = json.loads((tmp_path / "cmp" / "domain_shift.json").read_text())
    [result] = data["domain_shift"]
    assert (result["reference"], result["shifted"]) == ("clean", "shift")
    expected = domain_shift(load_run(clean), load_run(shifted), "clean", "shift")
    assert result["ood"]["auroc_max_probability"] == pytest.approx(expected["ood"]["auroc_max_probability"])
    assert result["ood"]["auroc_max_probability"] > 0.8  # the shifted images are much less confident
    table = {row["metric"]: row for row in _read_csv(tmp_path / "cmp" / "compare.csv")}
    row = table["domain_shift.auroc_max_probability"]
    assert float(row["shift"]) == pytest.approx(expected["ood"]["auroc_max_probability"])
    assert row["clean"] == "" and row["other"] == "" and row["delta_shift"] == ""
    assert table["domain_shift.reference"]["shift"] == "clean"
    assert float(table["domain_shift.ece"]["clean"]) == pytest.approx(json.loads(
        (clean / "metrics.json").read_text())["ece"])
    per_class = _read_csv(tmp_path / "cmp" / "domain_shift_per_class.csv")
    assert {row["class"] for row in per_class} == set(CLASSES)
    assert float(per_class[0]["drop"]) == max(float(row["drop"]) for row in per_class)


def test_reference_option_picks_the_in_domain_evaluation(three_evaluations, tmp_path):
    clean, shifted, other = three_evaluations
    compare_runs([shifted, clean], tmp_path / "cmp", reference="clean")
    [result] = json.loads((tmp_path / "cmp" / "domain_shift.json").read_text())["domain_shift"]
    assert (result["reference"], result["shifted"]) == ("clean", "shift")
    compare_runs([shifted, clean], tmp_path / "cmp2")  # default: the first of the checkpoint's evaluations
    [result] = json.loads((tmp_path / "cmp2" / "domain_shift.json").read_text())["domain_shift"]
    assert (result["reference"], result["shifted"]) == ("shift", "clean")
    with pytest.raises(ConfigError, match="--reference 'nothing'"):
        compare_runs([clean, shifted], tmp_path / "cmp3", reference="nothing")
    with pytest.raises(ConfigError, match="no other compared evaluation is of the same checkpoint"):
        compare_runs([clean, other], tmp_path / "cmp4", reference="other")


def test_the_api_comparison_reads_the_domain_shift_and_per_class_files(three_evaluations, tmp_path):
    import resnetlab as rl

    clean, shifted, other = three_evaluations
    comparison = rl.compare([clean, shifted, other], out=tmp_path / "cmp", reference="clean")
    [result] = comparison.domain_shift
    assert (result["reference"], result["shifted"]) == ("clean", "shift")
    assert result["ood"]["auroc_max_probability"] == pytest.approx(
        domain_shift(load_run(clean), load_run(shifted), "clean", "shift")["ood"]["auroc_max_probability"])
    assert {row["class"] for row in comparison.domain_shift_per_class} == set(CLASSES)
    assert all(isinstance(row["drop"], float) for row in comparison.domain_shift_per_class)
    assert [row["class"] for row in comparison.per_class] == [row["class"] for row in
                                                                _read_csv(tmp_path / "cmp" / "per_class_delta.csv")]
    # Folders of different checkpoints: no shift to measure, and the property says so with an empty list.
    assert rl.compare([clean, other], out=tmp_path / "cmp2").domain_shift == []


def test_no_domain_section_without_a_shared_checkpoint_or_on_the_same_images(three_evaluations, tmp_path):
    clean, _, other = three_evaluations
    markdown = compare_runs([clean, other], tmp_path / "cmp").read_text()
    assert "## Domain shift" not in markdown and not (tmp_path / "cmp" / "domain_shift.json").exists()
    # The same images scored again with the same checkpoint (e.g. an export's evaluation) is no shifted domain.
    twin = tmp_path / "twin"
    twin.mkdir()
    for path in clean.iterdir():
        if path.is_file():
            (twin / path.name).write_bytes(path.read_bytes())
    markdown = compare_runs([clean, twin], tmp_path / "cmp2").read_text()
    assert "## Domain shift" not in markdown


def test_run_report_lists_the_runs_evaluations_on_other_data(tmp_path):
    rng = np.random.default_rng(8)
    targets = rng.integers(0, len(CLASSES), 160)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.pt").write_bytes(b"the weights")
    sha = hashlib.sha256(b"the weights").hexdigest()
    make_eval(run / "eval", _logits(rng, targets, 4.0), targets, sha=None)  # training's eval/ records no hash
    make_eval(run / "evaluations" / "folder-snow-test-20260101-000000", _logits(rng, targets, 1.0), targets,
              sha=sha)
    make_eval(run / "evaluations" / "folder-night-test-20260101-000001", _logits(rng, targets, 1.0), targets,
              sha="c" * 64)
    markdown_path, html_path = render_report(run)
    section = _section(markdown_path.read_text(), "Domain shift")
    assert "### evaluations/folder-snow-test-20260101-000000 against eval" in section
    assert "folder-night" in section and "evaluated another checkpoint" in section
    assert 'id="domain-shift"' in html_path.read_text()


# ---------------------------------------------------------------------------------------------------------------
# A real tiny model: trained on the synthetic set, evaluated on it and on a shifted copy.
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run_and_shift(tiny_signs, tmp_path_factory):
    from PIL import Image, ImageFilter

    from resnetlab.cli.main import main

    root = tmp_path_factory.mktemp("domain")
    run = root / "run"
    assert main(["train", "--data", f"gtsrb:{tiny_signs}", "--epochs", "2", "--batch-size", "32", "--out", str(run),
                 "--quiet", "train.threads=1", "optim.lr=0.05", "train.max_steps_per_epoch=6",
                 "eval.gradcam=false"]) == 0
    # The shifted domain: the test images at dusk (dark, low contrast, blurred), under another folder.
    shifted = root / "dusk"
    shifted.mkdir()
    rows = []
    with open(tiny_signs / "Test.csv", newline="") as handle:
        for index, row in enumerate(csv.DictReader(handle)):
            image = Image.open(tiny_signs / row["Path"]).convert("RGB")
            image = Image.eval(image.filter(ImageFilter.GaussianBlur(1.5)), lambda v: 20 + v // 4)
            path = shifted / f"{index:04d}.png"
            image.save(path)
            rows.append({"Path": str(path), "ClassId": row["ClassId"]})
    _write_csv(root / "dusk.csv", rows)
    return run, root / "dusk.csv"


def test_compare_and_run_report_on_a_real_tiny_model(tiny_run_and_shift, tmp_path):
    from resnetlab.cli.main import main

    run, dusk = tiny_run_and_shift
    # Without --out the evaluation lands in the run's evaluations/, where the run report finds it.
    assert main(["evaluate", str(run), "--data", f"csv:{dusk}"]) == 0
    [evaluation] = list((run / "evaluations").iterdir())
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{64}", metrics["checkpoint_sha256"])

    assert main(["compare", str(run), str(evaluation), "--out", str(tmp_path / "cmp")]) == 0
    section = _section((tmp_path / "cmp" / "compare.md").read_text(), "Domain shift")
    assert f"### {evaluation.name} against run" in section
    [result] = json.loads((tmp_path / "cmp" / "domain_shift.json").read_text())["domain_shift"]
    assert 0.0 <= result["ood"]["auroc_max_probability"] <= 1.0
    assert result["per_class"] and result["top1"]["drop"] is not None

    assert main(["compare", str(evaluation), str(run), "--reference", "run", "--out", str(tmp_path / "cmp2")]) == 0
    [result] = json.loads((tmp_path / "cmp2" / "domain_shift.json").read_text())["domain_shift"]
    assert result["reference"] == "run"

    assert main(["report", str(run)]) == 0
    section = _section((run / "report.md").read_text(), "Domain shift")
    assert f"evaluations/{evaluation.name} against eval" in section
