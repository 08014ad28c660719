"""Calibrated confidences and "unknown" answers in predict, export, serve and the Python API (issue 19).

The model is a small untrained CNN saved as a checkpoint here (no training: the behaviour under test is what happens
to its logits), with its classifier scaled up so that its answers range from sure to unsure, and a calibration record
fitted on its own outputs with noisy labels, so that the temperature is far from 1.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnetlab.checkpoint import load_checkpoint, model_from_checkpoint, store_calibration
from resnetlab.cli.main import main
from resnetlab.config import RunConfig
from resnetlab.deployment.export import export_checkpoint
from resnetlab.deployment.export_cache import export_cache_dir
from resnetlab.deployment.predictor import AnswerOptions, load_predictor
from resnetlab.deployment.records import RECORD_FILE, read_export_record, record_from_meta
from resnetlab.errors import CheckpointError, ConfigError
from resnetlab.evaluation.selective import choose_operating_point, fit_calibration
from resnetlab.jobs.calibrate import operating_rule

PARITY = 1e-4
CLASSES = ("stop", "yield", "priority", "no entry")


def _save_checkpoint(path):
    from resnetlab.checkpoint import build_meta, save_checkpoint
    from resnetlab.config import RunConfig
    from resnetlab.data.preprocessing import Preprocessing
    from resnetlab.models import create_model

    torch.manual_seed(0)
    model = create_model("simple_cnn", len(CLASSES)).eval()
    state = model.state_dict()
    classifier = [key for key in state if key.endswith("weight")][-1]
    state[classifier] = state[classifier] * 40  # logits of several units: some answers sure, some not
    meta = build_meta(model_name="simple_cnn", model_kwargs={}, class_ids=list(range(len(CLASSES))),
                      class_names=list(CLASSES), prep=Preprocessing(input_size=32), config=RunConfig().to_dict(),
                      data={"spec": "synthetic-signs", "fingerprint": "0123456789abcdef"}, epoch=1,
                      monitor="val_top1", best_metric=0.5)
    save_checkpoint(path, {"model": state, "meta": meta})
    return path


def _eager_logits(checkpoint, batch_uint8):
    from resnetlab.data.preprocessing import normalize

    model, meta = model_from_checkpoint(load_checkpoint(checkpoint))
    prep = meta["preprocessing"]
    with torch.no_grad():
        return model(normalize(batch_uint8, torch.as_tensor(prep["mean"]), torch.as_tensor(prep["std"]))).double()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Twelve random 40x36 RGB images (resized to the model's 32 px by the recorded preprocessing)."""
    folder = tmp_path_factory.mktemp("calibration-images")
    generator = np.random.default_rng(7)
    paths = []
    for index in range(12):
        pixels = generator.integers(0, 256, (36, 40, 3), dtype=np.uint8)
        if index % 2:
            pixels[:, :, index % 3] = 255  # some with a flat channel, for a spread of logits
        Image.fromarray(pixels).save(folder / f"img{index:02d}.png")
        paths.append(str(folder / f"img{index:02d}.png"))
    return paths


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory):
    """The checkpoint without calibration, as written before it was stored."""
    return _save_checkpoint(tmp_path_factory.mktemp("plain") / "model.pt")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """(checkpoint with meta.calibration, the calibration record) fitted on its own logits of 400 random images
    whose labels are the model's answer only 60% of the time: an overconfident model, so T is well above 1."""
    checkpoint = _save_checkpoint(tmp_path_factory.mktemp("calibrated") / "model.pt")
    generator = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 256, (400, 3, 32, 32), dtype=torch.uint8, generator=generator)
    logits = _eager_logits(checkpoint, batch)
    targets = logits.argmax(dim=1)
    noisy = torch.rand(len(targets), generator=generator) < 0.4
    targets[noisy] = torch.randint(0, len(CLASSES), (int(noisy.sum()),), generator=generator)
    record = fit_calibration(logits, targets, coverage=0.9)
    assert record["temperature"] > 1.5, record["temperature"]  # a temperature that visibly changes confidences
    store_calibration(checkpoint, record)
    return checkpoint, record


@pytest.fixture(scope="module")
def onnx_default(calibrated, tmp_path_factory):
    return export_checkpoint(calibrated[0], tmp_path_factory.mktemp("onnx") / "calibrated", fmt="onnx",
                             dynamic_batch=True, log=lambda m: None)


@pytest.fixture(scope="module")
def onnx_raw(calibrated, tmp_path_factory):
    return export_checkpoint(calibrated[0], tmp_path_factory.mktemp("onnx") / "raw", fmt="onnx",
                             dynamic_batch=True, raw=True, log=lambda m: None)


def _stack(predictor, paths):
    return torch.stack([predictor.prepare(path) for path in paths])


# ---------------------------------------------------------------------------------------------------------------
# The predictor: calibrated by default, raw on request, never twice
# ---------------------------------------------------------------------------------------------------------------


def test_default_confidences_are_softmax_of_logits_over_t_and_raw_ones_are_not(calibrated, images):
    checkpoint, record = calibrated
    temperature = record["temperature"]
    default = load_predictor(checkpoint, backend="torch")
    raw = load_predictor(checkpoint, backend="torch", answers=AnswerOptions(raw=True))
    assert default.temperature == pytest.approx(temperature) and raw.temperature is None
    batch = _stack(default, images)
    logits = _eager_logits(checkpoint, batch)
    expected = torch.softmax(logits / temperature, dim=1)
    np.testing.assert_allclose(default.probabilities(batch).numpy(), expected.numpy(), atol=1e-6)
    np.testing.assert_allclose(raw.probabilities(batch).numpy(), torch.softmax(logits, dim=1).numpy(), atol=1e-6)
    # the two differ by exactly the temperature: the default's logits times T are the raw ones
    x = _normalized(default, batch)
    np.testing.assert_allclose((raw.outputs(x) / temperature).numpy(), default.outputs(x).numpy(), rtol=1e-6,
                               atol=1e-6)
    predictions = default.predict_tensors(batch, images, topk=len(CLASSES))
    for prediction, row, row_logits in zip(predictions, expected, logits):
        assert prediction.confidence == pytest.approx(float(row.max()), abs=1e-6)
        assert prediction.classes[0] == CLASSES[int(row.argmax())]  # the best guess first
        assert prediction.confidences == sorted(prediction.confidences, reverse=True)
        energy = -temperature * torch.logsumexp(row_logits / temperature, dim=0)
        assert prediction.energy == pytest.approx(float(energy), abs=1e-5)
    raw_energy = raw.predict_tensors(batch, images)[0].energy
    assert raw_energy == pytest.approx(float(-torch.logsumexp(logits[0], dim=0)), abs=1e-5)
    assert not np.allclose(default.probabilities(batch).numpy(), raw.probabilities(batch).numpy(), atol=1e-3)


def _normalized(predictor, batch):
    from resnetlab.data.preprocessing import normalize

    return normalize(batch, predictor.mean, predictor.std)


def test_stored_operating_point_and_the_flags_that_choose_another(calibrated, images):
    checkpoint, record = calibrated
    stored = load_predictor(checkpoint, backend="torch")
    assert stored.operating_point.rule == "coverage" and stored.operating_point.target == 0.9
    assert stored.operating_point.threshold == record["operating_point"]["threshold"]
    chosen = load_predictor(checkpoint, backend="torch", answers=AnswerOptions(max_error=0.2))
    expected = choose_operating_point(record["risk_coverage"], max_error=0.2)
    assert chosen.operating_point == expected
    batch = _stack(stored, images)
    for prediction in stored.predict_tensors(batch, images):
        assert prediction.unknown == (prediction.confidence < stored.operating_point.threshold)
        assert (prediction.reason is None) == (not prediction.unknown)
    # a per-call override through the same options
    everything = stored.predict_tensors(batch, images, answers=AnswerOptions(threshold=1.0))
    assert all(p.unknown and "1.000" in p.reason for p in everything)


def test_answer_options_refuse_what_cannot_mean_anything(plain_checkpoint):
    with pytest.raises(ConfigError, match="--coverage and --threshold"):
        AnswerOptions(coverage=0.9, threshold=0.5)
    with pytest.raises(ConfigError, match="--threshold and --accept-all"):
        AnswerOptions(threshold=0.5, accept_all=True)
    with pytest.raises(ConfigError, match="--raw with --coverage"):
        AnswerOptions(raw=True, coverage=0.9)
    with pytest.raises(ConfigError, match=r"--coverage 1.5"):
        AnswerOptions(coverage=1.5)
    with pytest.raises(ConfigError, match=r"--threshold -0.1"):
        AnswerOptions(threshold=-0.1)
    # the same range check, in the same words, for calibrate's rule and for a curve asked directly
    with pytest.raises(ConfigError, match=r"--max-error 1.0: give the error rate allowed among accepted answers"):
        AnswerOptions(max_error=1.0)
    with pytest.raises(ConfigError, match=r"--max-error 1.0: give the error rate allowed among accepted answers"):
        operating_rule(None, RunConfig(), coverage=None, max_error=1.0)
    with pytest.raises(ConfigError, match=r"--coverage 0: give the fraction of in-domain images to accept"):
        choose_operating_point({"threshold": [0.9], "coverage": [1.0], "error": [0.0]}, coverage=0)
    # choosing from a validation curve the model does not have: one line naming the model and what to run
    with pytest.raises(ConfigError, match=r"--max-error with '.*model.pt'.*resnetlab calibrate"):
        load_predictor(plain_checkpoint, backend="torch", answers=AnswerOptions(max_error=0.1))


# ---------------------------------------------------------------------------------------------------------------
# Exports: T inside the graph by default, recorded; --raw leaves it to the runtime
# ---------------------------------------------------------------------------------------------------------------


def test_record_carries_the_calibration_and_what_the_graph_applies(calibrated, onnx_default, onnx_raw):
    checkpoint, record = calibrated
    meta = load_checkpoint(checkpoint)["meta"]
    assert record_from_meta(meta)["calibration"]["temperature"] == record["temperature"]
    assert record_from_meta(meta)["output"]["temperature_applied"] is None  # the checkpoint's model: raw logits
    default = read_export_record(onnx_default.out_dir)
    assert default["output"]["temperature_applied"] == pytest.approx(record["temperature"])
    assert onnx_default.temperature_applied == pytest.approx(record["temperature"])
    assert default["calibration"]["operating_point"] == record["operating_point"]
    assert "divided by the same temperature" in default["artifact"]["parity"]["reference"]
    raw = read_export_record(onnx_raw.out_dir)
    assert raw["output"]["temperature_applied"] is None and onnx_raw.temperature_applied is None
    assert raw["calibration"]["temperature"] == pytest.approx(record["temperature"])  # for the runtime to apply


def test_a_record_whose_temperature_disagrees_with_its_calibration_is_refused(onnx_default, tmp_path):
    import shutil

    folder = tmp_path / "tampered"
    shutil.copytree(onnx_default.out_dir, folder)
    record = json.loads((folder / RECORD_FILE).read_text())
    record["output"]["temperature_applied"] = record["calibration"]["temperature"] * 2
    (folder / RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="temperature_applied .* differs from calibration.temperature"):
        read_export_record(folder)
    record["calibration"] = None
    (folder / RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="no calibration record"):
        read_export_record(folder)


def test_onnx_applies_t_once_and_the_predictor_applies_it_to_a_raw_export(calibrated, onnx_default, onnx_raw,
                                                                          images):
    checkpoint, record = calibrated
    temperature = record["temperature"]
    eager = load_predictor(checkpoint, backend="torch")
    batch = _stack(eager, images)
    x = _normalized(eager, batch)
    logits = _eager_logits(checkpoint, batch).float()
    in_graph = load_predictor(onnx_default.out_dir)
    given_raw = load_predictor(onnx_raw.out_dir)
    # the graphs themselves: one divides by T, the other does not
    np.testing.assert_allclose(in_graph.backend_outputs(x).numpy(), (logits / temperature).numpy(), atol=PARITY)
    np.testing.assert_allclose(given_raw.backend_outputs(x).numpy(), logits.numpy(), atol=PARITY * logits.abs().max())
    # ...and every path gives the checkpoint's calibrated confidences, T applied exactly once
    reference = eager.predict_tensors(batch, images, topk=len(CLASSES))
    for predictor in (in_graph, given_raw):
        assert predictor.temperature == pytest.approx(temperature)
        for expected, actual in zip(reference, predictor.predict_tensors(batch, images, topk=len(CLASSES))):
            assert actual.classes[0] == expected.classes[0]
            np.testing.assert_allclose(actual.confidences, expected.confidences, atol=PARITY)
            assert actual.energy == pytest.approx(expected.energy, abs=1e-3)
            assert actual.unknown == expected.unknown
    # raw answers from a graph that divides by T: multiplied back, the checkpoint's raw confidences
    raw_reference = torch.softmax(logits, dim=1)
    undone = load_predictor(onnx_default.out_dir, answers=AnswerOptions(raw=True)).probabilities(batch)
    np.testing.assert_allclose(undone.numpy(), raw_reference.numpy(), atol=PARITY)


def test_export_cache_keeps_raw_and_calibrated_graphs_apart(calibrated, images, tmp_path):
    checkpoint, record = calibrated
    assert export_cache_dir(checkpoint, tmp_path) != export_cache_dir(checkpoint, tmp_path, raw=True)
    default = load_predictor(checkpoint, backend="onnxruntime", cache_root=tmp_path)
    raw = load_predictor(checkpoint, backend="onnxruntime", cache_root=tmp_path, answers=AnswerOptions(raw=True))
    assert default.graph_temperature == pytest.approx(record["temperature"]) and raw.graph_temperature is None
    assert default.artifact_dir == export_cache_dir(checkpoint, tmp_path)
    assert raw.artifact_dir == export_cache_dir(checkpoint, tmp_path, raw=True)


def test_cli_export_raw_flag(calibrated, tmp_path, capsys):
    checkpoint, record = calibrated
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "raw"), "--raw"]) == 0
    assert "the graph outputs raw logits" in capsys.readouterr().out
    assert read_export_record(tmp_path / "raw")["output"]["temperature_applied"] is None
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "scaled"), "--format", "torchscript"]) == 0
    assert "logits / temperature" in capsys.readouterr().out
    scaled = load_predictor(tmp_path / "scaled")
    assert scaled.graph_temperature == pytest.approx(record["temperature"])


# ---------------------------------------------------------------------------------------------------------------
# The CLI and the Python API
# ---------------------------------------------------------------------------------------------------------------


def _predict_json(capsys, *argv):
    code = main(["predict", *argv, "--format", "json"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def test_cli_predict_threshold_accept_all_and_raw(calibrated, onnx_default, images, capsys):
    checkpoint, record = calibrated
    everything = _predict_json(capsys, str(onnx_default.out_dir), *images, "--threshold", "1.0")
    assert all(p["unknown"] and "below the operating point 1.000" in p["reason"] for p in everything)
    assert all(p["top"][0]["class"] in CLASSES and p["confidence"] == p["top"][0]["confidence"] for p in everything)
    nothing = _predict_json(capsys, str(onnx_default.out_dir), *images, "--accept-all")
    assert not any(p["unknown"] or p["reason"] for p in nothing)
    raw = _predict_json(capsys, str(checkpoint), *images, "--raw", "--backend", "torch")
    default = _predict_json(capsys, str(checkpoint), *images, "--backend", "torch")
    assert all(r["confidence"] > d["confidence"] for r, d in zip(raw, default))  # T > 1 softens every answer
    assert all(isinstance(p["energy"], float) for p in default)

    # the table names a withheld answer with its best guess and the threshold; exit code 0 all the same
    assert main(["predict", str(onnx_default.out_dir), images[0], "--threshold", "1.0"]) == 0
    table = capsys.readouterr().out
    assert "unknown (best guess:" in table and "unknown below 1.000 (threshold given directly)" in " ".join(table.split())
    from resnetlab.cli.render import prediction_label

    withheld = load_predictor(onnx_default.out_dir, answers=AnswerOptions(threshold=0.99)).predict_paths(images[:1])[0]
    assert prediction_label(withheld, 0.99) == (f"unknown (best guess: {withheld.classes[0]} "
                                                f"{withheld.confidence:.2f} < 0.99)")
    assert main(["predict", str(onnx_default.out_dir), *images[:3], "--format", "csv", "--topk", "2",
                 "--threshold", "1.0"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 3 and all(row["unknown"] == "1" and "1.000" in row["reason"] and row["energy"] for row in rows)
    assert list(rows[0])[:4] == ["path", "class1", "class_id1", "confidence1"]  # the old columns first

    code = main(["predict", str(checkpoint), images[0], "--coverage", "0.9", "--threshold", "0.5"])
    assert code == 2 and "at most one way" in capsys.readouterr().err


def test_api_load_and_predict_options(calibrated, images):
    import resnetlab as rl

    checkpoint, record = calibrated
    clf = rl.load(checkpoint, backend="torch", threshold=1.0)
    prediction = clf.predict(images[0])
    assert prediction.unknown and "1.000" in prediction.reason and prediction.label in CLASSES
    assert prediction.energy is not None and "unknown=True" in repr(prediction)
    accepted = clf.predict(images[:2], accept_all=True)
    assert not any(p.unknown for p in accepted)
    raw = clf.predict(images[0], raw=True)  # raw, and the threshold given to load() still applies
    assert raw.unknown and raw.confidence > prediction.confidence
    with pytest.raises(ConfigError, match="--raw with --coverage"):
        rl.load(checkpoint, raw=True, coverage=0.9)


# ---------------------------------------------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------------------------------------------


def _client(predictor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette's TestClient warns that it will move to httpx2
        from fastapi.testclient import TestClient
    from resnetlab.deployment.service import create_app

    return TestClient(create_app(predictor))


def test_serve_json_and_model_describe_the_answers(calibrated, onnx_default, images):
    checkpoint, record = calibrated
    client = _client(load_predictor(onnx_default.out_dir, answers=AnswerOptions(threshold=1.0)))
    model = client.get("/model").json()
    assert model["answers"]["temperature"] == pytest.approx(record["temperature"])
    assert model["answers"]["temperature_in_graph"] == pytest.approx(record["temperature"])
    assert model["answers"]["operating_point"]["rule"] == "threshold"
    assert model["calibration"]["risk_coverage"] == {"points": len(record["risk_coverage"]["threshold"])}
    files = [("files", (f"{i}.png", open(path, "rb").read(), "image/png")) for i, path in enumerate(images[:2])]
    body = client.post("/predict", files=files).json()
    assert body["temperature"] == pytest.approx(record["temperature"])
    assert body["operating_point"]["threshold"] == 1.0 and body["operating_point"]["description"]
    eager = load_predictor(checkpoint, backend="torch").predict_paths(images[:2])
    for item, expected in zip(body["predictions"], eager):
        assert item["unknown"] is True and "1.000" in item["reason"]
        assert item["confidence"] == pytest.approx(expected.confidence, abs=PARITY)
        assert item["energy"] == pytest.approx(expected.energy, abs=1e-3)
        assert item["operating_point"]["threshold"] == 1.0
        assert item["top"][0]["class"] == expected.classes[0]
    page = client.get("/").text
    assert "unknown (best guess" in page and "withheld" in page

    default = _client(load_predictor(onnx_default.out_dir)).post("/predict", files=files[:1]).json()
    assert default["operating_point"]["rule"] == "coverage"
    item = default["predictions"][0]
    assert item["unknown"] == (item["confidence"] < record["operating_point"]["threshold"])


# ---------------------------------------------------------------------------------------------------------------
# A model without calibration: as before
# ---------------------------------------------------------------------------------------------------------------


def test_a_model_without_calibration_behaves_as_before(plain_checkpoint, images, tmp_path, capsys):
    result = export_checkpoint(plain_checkpoint, tmp_path / "plain", fmt="onnx", dynamic_batch=True,
                               log=lambda m: None)
    record = read_export_record(result.out_dir)
    assert record["output"]["temperature_applied"] is None and record["calibration"] is None
    eager = load_predictor(plain_checkpoint, backend="torch")
    exported = load_predictor(result.out_dir)
    batch = _stack(eager, images)
    logits = _eager_logits(plain_checkpoint, batch)
    for predictor in (eager, exported):
        assert predictor.temperature is None and predictor.operating_point.rule == "accept_all"
        np.testing.assert_allclose(predictor.probabilities(batch).numpy(), torch.softmax(logits, 1).numpy(),
                                   atol=PARITY)
        assert not any(p.unknown for p in predictor.predict_tensors(batch, images))
    answers = _predict_json(capsys, str(result.out_dir), *images)
    assert not any(p["unknown"] for p in answers)
    # a threshold given directly still works without a calibration record
    assert all(p["unknown"] for p in _predict_json(capsys, str(result.out_dir), *images, "--threshold", "1.0"))


def test_serve_options_reach_the_workers_and_bad_ones_stop_before_binding(calibrated, capsys):
    checkpoint, _ = calibrated
    for options in (AnswerOptions(), AnswerOptions(raw=True, threshold=0.25), AnswerOptions(coverage=0.8),
                    AnswerOptions(max_error=0.05), AnswerOptions(accept_all=True)):
        environment = options.to_environment()
        assert AnswerOptions.from_environment(environment.get) == options
    assert main(["serve", str(checkpoint), "--raw", "--coverage", "0.9"]) == 2
    assert "--raw with --coverage" in capsys.readouterr().err


def test_real_server_with_two_workers_withholds_and_the_page_shows_it(calibrated, images, tmp_path):
    """`serve --threshold 1.0 --workers 2`: both worker processes apply the option, and the page says "unknown"."""
    import httpx

    from tests.test_deploy_service import DevTools, _chromium
    from tests.test_service_load import running_server

    checkpoint, _ = calibrated
    with running_server(checkpoint, tmp_path / "serve.log", "--threshold", "1.0", "--workers", "2") as (url, _):
        with httpx.Client(timeout=60) as http:
            bodies = [http.post(f"{url}/predict", files={"file": ("a.png", open(images[i % 3], "rb").read(),
                                                                   "image/png")}).json() for i in range(6)]
        for body in bodies:
            assert body["operating_point"]["rule"] == "threshold" and body["predictions"][0]["unknown"] is True
        binary = _chromium()
        if binary is None:
            pytest.skip("no Chromium found (install Debian's chromium or set RESNETLAB_CHROMIUM)")
        browser = DevTools(binary, tmp_path / "profile")
        try:
            browser.open(f"{url}/")
            browser.wait_for("document.getElementById('model').textContent.includes('temperature')")
            model_line = browser.evaluate("document.getElementById('model').textContent")
            browser.choose_file("#file", Path(images[0]))
            browser.wait_for("!document.getElementById('result').hidden")
            verdict = browser.evaluate("document.getElementById('verdict').textContent")
            greyed = browser.evaluate("document.getElementById('classes').className")
        finally:
            browser.close()
    assert 'answers below 100.0 % are "unknown"' in model_line
    assert verdict.startswith("unknown (best guess: ") and "below the operating point 1.000" in verdict
    assert greyed == "withheld"
