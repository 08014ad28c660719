"""Export and prediction parity: a checkpoint, its ONNX and TorchScript exports and the default path agree."""

from __future__ import annotations

import copy
import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from resnetlab.cli.main import main
from resnetlab.deployment.export import ExportError, export_checkpoint
from resnetlab.deployment.export_cache import export_cache_dir
from resnetlab.deployment.predictor import load_predictor
from resnetlab.deployment.records import RECORD_FILE, read_export_record
from resnetlab.errors import CheckpointError

PARITY = 1e-4


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_signs, tmp_path_factory):
    """A resnet20 trained for one short epoch on the synthetic signs, shared by the deploy test modules of a session."""
    run = tmp_path_factory.getbasetemp() / "deploy-tiny-run"
    checkpoint = run / "checkpoints" / "best.pt"
    if not checkpoint.is_file():
        code = main(["train", "--data", f"gtsrb:{tiny_signs}", "--epochs", "1", "--batch-size", "32", "--out", str(run),
                     "--quiet", "--overwrite", "train.threads=1", "eval.gradcam=false"])
        assert code == 0
    return checkpoint


@pytest.fixture(scope="module")
def onnx_export(tiny_checkpoint, tmp_path_factory):
    return export_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("export") / "onnx", fmt="onnx",
                             dynamic_batch=True, log=lambda m: None)


@pytest.fixture(scope="module")
def mixed_images(tiny_signs, tmp_path_factory):
    """One test sign saved in the image modes users send: RGB, grey, palette, RGBA, CMYK JPEG, 16-bit grey."""
    folder = tmp_path_factory.mktemp("modes")
    source = Image.open(sorted((tiny_signs / "Test").glob("*.png"))[0]).convert("RGB")
    grey16 = Image.fromarray(np.asarray(source.convert("L"), dtype=np.uint16) * 257)
    variants = {"rgb.png": source, "grey.png": source.convert("L"), "palette.gif": source.convert("P"),
                "alpha.png": source.convert("RGBA"), "cmyk.jpg": source.convert("CMYK"), "grey16.png": grey16,
                "photo.jpg": source.resize((96, 80))}
    paths = []
    for name, image in variants.items():
        image.save(folder / name)
        paths.append(str(folder / name))
    return paths


def _by_path(predictions):
    return {p.path: p for p in predictions}


def _assert_same(reference, other):
    assert reference.keys() == other.keys()
    for path, expected in reference.items():
        actual = other[path]
        assert actual.error is None, actual.error
        assert actual.indices[0] == expected.indices[0], path
        np.testing.assert_allclose(actual.confidences, expected.confidences, atol=PARITY, err_msg=path)


def test_onnx_export_writes_model_and_record_and_checks_parity(onnx_export, tiny_checkpoint):
    folder = onnx_export.out_dir
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", RECORD_FILE]  # no staging left behind
    record = read_export_record(folder)
    state = torch.load(tiny_checkpoint, weights_only=True)
    meta = state["meta"]
    assert record["classes"] == {"ids": meta["classes"]["ids"], "names": meta["classes"]["names"]}
    prep = record["preprocessing"]
    for key in ("input_size", "resize", "crop_pct", "interpolation", "roi_crop", "mean", "std", "channel_order",
                "contrast"):
        assert prep[key] == meta["preprocessing"][key], key
    assert record["output"]["kind"] == "logits"
    assert record["resnetlab_version"]
    assert record["test_time_flip"] is False  # the signs preset never mirrors (keep-left vs keep-right)
    artifact = record["artifact"]
    assert artifact["format"] == "onnx" and artifact["dynamic_batch"] and artifact["precision"] == "float32"
    assert artifact["opset"] >= 13
    checks = artifact["parity"]["checks"]
    assert [c["batch_size"] for c in checks] == [1, 8]
    assert all(c["max_abs_probabilities"] <= PARITY for c in checks)
    assert all(c["max_abs_logits"] <= PARITY * max(1.0, c["largest_logit"]) for c in checks)


def test_checkpoint_exports_and_default_path_predict_the_same(tiny_checkpoint, onnx_export, mixed_images,
                                                                 tmp_path):
    ts_dir = tmp_path / "ts"
    export_checkpoint(tiny_checkpoint, ts_dir, fmt="torchscript", log=lambda m: None)
    eager = load_predictor(tiny_checkpoint, backend="torch")
    assert eager.backend.name == "torch"
    reference = _by_path(eager.predict_paths(mixed_images, topk=5, batch_size=4))
    for source, backend, expected in [(onnx_export.out_dir, "auto", "onnxruntime"), (ts_dir, "auto", "torchscript"),
                                      (tiny_checkpoint, "auto", "onnxruntime"),
                                      (tiny_checkpoint, "onnxruntime", "onnxruntime")]:
        predictor = load_predictor(source, backend=backend)
        assert predictor.backend.name == expected
        _assert_same(reference, _by_path(predictor.predict_paths(mixed_images, topk=5, batch_size=4)))
    # the default path exported the checkpoint once, into the cache keyed by its hash
    assert (export_cache_dir(tiny_checkpoint) / "model.onnx").is_file()


def test_tta_matches_evaluate_and_agrees_across_backends(tiny_checkpoint, onnx_export, mixed_images):
    from resnetlab.data.preprocessing import normalize
    from resnetlab.evaluation.tta import tta_log_probabilities

    eager = load_predictor(tiny_checkpoint, backend="torch")
    batch = torch.stack([eager.prepare(path) for path in mixed_images])
    with torch.no_grad():  # what `evaluate --tta` computes for this model (signs: crops, no mirror images)
        # calibrated: the temperature applies to the log of the views' mean softmax
        expected = (tta_log_probabilities(eager.backend.model, normalize(batch, eager.mean, eager.std), flip=False,
                                          crops=True) / eager.temperature).softmax(dim=1)
    averaged = eager.probabilities(batch, tta=True)
    torch.testing.assert_close(averaged, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(averaged, eager.probabilities(batch), atol=1e-4)  # the views do change the answer
    exported = load_predictor(onnx_export.out_dir).probabilities(batch, tta=True)
    torch.testing.assert_close(exported, averaged, atol=PARITY, rtol=0)


def test_parity_failure_stops_the_export_and_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    from resnetlab.deployment import export as export_module

    real_export = export_module.export_torchscript

    def faulty_exporter(model, path, input_size):
        # an exporter that gets one class's logit wrong, as a dropped or misplaced layer would
        altered = copy.deepcopy(model)
        with torch.no_grad():
            [p for name, p in altered.named_parameters() if name.endswith("bias")][-1][0] += 0.5
        real_export(altered, path, input_size)

    monkeypatch.setattr(export_module, "export_torchscript", faulty_exporter)
    out = tmp_path / "faulty"
    with pytest.raises(ExportError, match="parity check at batch 1"):
        export_checkpoint(tiny_checkpoint, out, fmt="torchscript", log=lambda m: None)
    assert list(out.iterdir()) == []


def test_int8_export_reports_its_accuracy_change(tiny_checkpoint, tiny_signs, mixed_images, tmp_path):
    result = export_checkpoint(tiny_checkpoint, tmp_path / "int8", fmt="onnx", dynamic_batch=True, quantize="int8",
                               calibration_data=f"gtsrb:{tiny_signs}", log=lambda m: None)
    report = json.loads((result.out_dir / RECORD_FILE).read_text())["artifact"]["quantization"]
    assert report == result.quantization
    assert report["calibration"]["images"] > 0 and "train" in report["calibration"]["source"]
    assert "test" in report["evaluated_on"]
    assert report["top1_change"] == pytest.approx(report["int8_top1"] - report["float32_top1"], abs=1e-6)
    assert 0.0 <= report["top1_agreement"] <= 1.0 and report["speedup_vs_onnxruntime_float32"] > 0
    predictor = load_predictor(result.out_dir)
    assert predictor.backend.precision == "int8"
    predictions = predictor.predict_paths(mixed_images)
    assert all(p.error is None and 0 < sum(p.confidences) <= 1 + 1e-5 for p in predictions)


def test_static_batch_export_and_predict_from_the_cli(tiny_checkpoint, mixed_images, tmp_path, capsys):
    out = tmp_path / "cli-onnx"
    assert main(["export", str(tiny_checkpoint), "--format", "onnx", "--out", str(out), "--opset", "18"]) == 0
    captured = capsys.readouterr()
    assert "largest difference from the eager model" in captured.out and str(out) in captured.out
    assert "parity at batch 1" in captured.err and "parity at batch 8" not in captured.err  # batch fixed at 1
    record = read_export_record(out)
    assert record["artifact"]["batch_size"] == 1 and not record["artifact"]["dynamic_batch"]
    assert load_predictor(out).backend.fixed_batch == 1
    # a fixed-batch model still predicts a batch of files (image by image), with the checkpoint's answers
    code = main(["predict", str(out), *mixed_images, "--format", "json", "--topk", "3", "--batch-size", "8"])
    exported = json.loads(capsys.readouterr().out)
    assert code == 0
    code = main(["predict", str(tiny_checkpoint), *mixed_images, "--format", "json", "--topk", "3",
                 "--backend", "torch"])
    eager = json.loads(capsys.readouterr().out)
    assert code == 0
    assert len(exported) == len(eager) == len(mixed_images)
    for a, b in zip(exported, eager):
        assert a["path"] == b["path"] and a["top"][0]["class"] == b["top"][0]["class"]
        np.testing.assert_allclose([t["confidence"] for t in a["top"]], [t["confidence"] for t in b["top"]],
                                   atol=PARITY)


def test_predict_reports_a_bad_file_and_goes_on_with_an_export(onnx_export, mixed_images, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    code = main(["predict", str(onnx_export.out_dir), mixed_images[0], str(broken), "--format", "csv"])
    captured = capsys.readouterr()
    assert code == 1
    assert mixed_images[0] in captured.out and "broken.jpg" not in captured.out
    assert "broken.jpg" in captured.err


@pytest.mark.parametrize("argv, fragment", [
    (["--backend", "torch"], "needs a checkpoint"),
    (["--backend", "torchscript"], "torchscript"),
    (["--backend", "tensorrt"], "tensorrt"),
])
def test_wrong_backend_for_an_export_is_one_line_exit_2(onnx_export, mixed_images, argv, fragment, capsys):
    code = main(["predict", str(onnx_export.out_dir), mixed_images[0], *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert fragment in err and len(err.splitlines()) == 1


def test_export_refuses_bad_options(tiny_checkpoint, tmp_path, capsys):
    assert main(["export", str(tiny_checkpoint), "--format", "tflite", "--out", str(tmp_path / "x")]) == 2
    assert "tflite" in capsys.readouterr().err
    assert main(["export", str(tiny_checkpoint), "--format", "torchscript", "--quantize", "int8",
                 "--out", str(tmp_path / "y")]) == 2
    assert "--format onnx" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "z")]) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_a_damaged_export_record_is_a_clear_error(onnx_export, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    shutil.copy(onnx_export.out_dir / "model.onnx", damaged / "model.onnx")
    (damaged / RECORD_FILE).write_text("{not json")
    assert main(["predict", str(damaged), str(damaged / "model.onnx")]) == 2
    assert RECORD_FILE in capsys.readouterr().err


def test_the_records_contrast_step_is_applied_when_predicting(onnx_export, mixed_images, tmp_path):
    from resnetlab.data.preprocessing import Preprocessing, prepare_image

    equalized = tmp_path / "equalized"
    shutil.copytree(onnx_export.out_dir, equalized)
    record = json.loads((equalized / RECORD_FILE).read_text())
    assert record["preprocessing"]["contrast"] == "none"
    record["preprocessing"]["contrast"] = "equalize"
    (equalized / RECORD_FILE).write_text(json.dumps(record))
    plain, stretched = load_predictor(onnx_export.out_dir), load_predictor(equalized)
    path = mixed_images[0]
    expected = prepare_image(path, Preprocessing.from_dict(record["preprocessing"]), None)
    assert torch.equal(stretched.prepare(path), expected)
    assert not torch.equal(plain.prepare(path), expected)


def test_bf16_precision_on_the_torch_backend_stays_close(tiny_checkpoint, onnx_export, mixed_images, capsys):
    """Eager bf16 autocast (`--backend torch --precision bf16`); the default bf16 path is tests/test_deploy_aoti.py."""
    fp32 = load_predictor(tiny_checkpoint, backend="torch")
    bf16 = load_predictor(tiny_checkpoint, backend="torch", precision="bf16")
    assert bf16.backend.name == "torch" and bf16.backend.precision == "bf16" and bf16.backend.channels_last
    assert bf16.describe()["runtime"]["precision"] == "bf16"
    reference = fp32.probabilities(torch.stack([fp32.prepare(p) for p in mixed_images]))
    fast = bf16.probabilities(torch.stack([bf16.prepare(p) for p in mixed_images]))
    assert fast.dtype == torch.float32
    np.testing.assert_allclose(fast.sum(dim=1).numpy(), 1.0, atol=1e-5)
    # bf16 keeps 8 bits of mantissa: close to float32, not equal to it
    assert (fast - reference).abs().max() < 0.05
    for precision, source, fragment in [("bf16", onnx_export.out_dir, "an export runs in the precision it was made in"),
                                        ("fp16", tiny_checkpoint, "--precision 'fp16'")]:
        with pytest.raises(CheckpointError, match=fragment):
            load_predictor(source, precision=precision)
    with pytest.raises(CheckpointError, match="ONNX Runtime has no fast bf16"):
        load_predictor(tiny_checkpoint, precision="bf16", backend="onnxruntime")
    assert main(["predict", str(tiny_checkpoint), mixed_images[0], "--precision", "bf16", "--backend", "torch",
                 "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["top"]) == 5


def test_onnxruntime_predictions_keep_torch_off_its_cores_and_restore_the_thread_count(onnx_export, tiny_checkpoint,
                                                                                        mixed_images):
    """torch's pre/post-processing runs on one thread beside ONNX Runtime's pool (their spinning threads collide),
    and the caller's thread count comes back afterwards, even when the model call fails."""
    onnx = load_predictor(onnx_export.out_dir, threads=1)
    eager = load_predictor(tiny_checkpoint, backend="torch")
    batch = torch.stack([onnx.prepare(p) for p in mixed_images])
    seen = {}
    for name, predictor in (("onnx", onnx), ("torch", eager)):
        run = predictor.backend.run

        def recording_run(x, run=run, name=name):
            seen[name] = torch.get_num_threads()
            return run(x)

        predictor.backend.run = recording_run
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        reference = eager.probabilities(batch)
        np.testing.assert_allclose(onnx.probabilities(batch).numpy(), reference.numpy(), atol=PARITY)
        assert seen == {"onnx": 1, "torch": 2} and torch.get_num_threads() == 2
        onnx.backend.run = lambda x: (_ for _ in ()).throw(RuntimeError("model failed"))
        with pytest.raises(RuntimeError, match="model failed"):
            onnx.probabilities(batch, tta=True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(original)


def test_evaluate_wrote_the_confidences_the_default_deployment_path_gives(tiny_checkpoint):
    """Training may run under bf16 autocast, but validation and test run in float32 (eval.precision=fp32), so
    eval/predictions.csv holds what `predict` and `serve` (ONNX Runtime, float32) answer for the same inputs."""
    from resnetlab.data.preprocessing import prepare_image

    run = tiny_checkpoint.parent.parent
    assert json.loads((run / "run_info.json").read_text())["eval_precision"] == "fp32"
    with open(run / "splits.csv", newline="") as handle:
        rois = {row["path"]: [int(v) for v in row["roi"].split()] for row in csv.DictReader(handle)
                if row["split"] == "test"}
    with open(run / "eval" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[:32]
    predictor = load_predictor(tiny_checkpoint)
    assert predictor.backend.name == "onnxruntime"
    batch = torch.stack([prepare_image(row["path"], predictor.prep, rois[row["path"]]) for row in rows])
    values, indices = predictor.probabilities(batch).max(dim=1)
    assert [int(row["pred_index"]) for row in rows] == indices.tolist()
    np.testing.assert_allclose([float(row["confidence"]) for row in rows], values.numpy(), atol=PARITY)
