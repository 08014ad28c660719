"""bf16 AOTInductor packages: the fast deployment path for large models, with parity between its checkpoint, export
and service, and errors that say which combination to use instead.

Each AOTInductor compilation of the tiny ResNet-20 takes about 15 s here, so this module compiles three times: once
through `resnetlab export`, once through the prediction cache (which is what proves that two builds answer alike),
and once in a training run whose default path is made bf16.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fastapi.testclient import TestClient

from resnetlab.cli.main import main
from resnetlab.deployment.export import PARITY_ATOL_BF16, export_checkpoint
from resnetlab.deployment.policy import cpp_compiler_available
from resnetlab.deployment.export_cache import export_cache_dir
from resnetlab.deployment.predictor import load_predictor
from resnetlab.deployment.records import RECORD_FILE
from resnetlab.errors import CheckpointError, ResnetlabError
from tests.test_deploy_export import tiny_checkpoint  # noqa: F401  (the shared trained model)

# Two builds of one package, and one package at different batch sizes, run the same kernels on the same numbers.
SAME_COMPUTATION = 1e-6
# AOTInductor compiles C++ (inductor's default compiler is g++); without one the export fails with a clear message,
# which the fallback test below checks, and the tests that build a package have nothing to test.
needs_compiler = pytest.mark.skipif(not cpp_compiler_available(),
                                    reason="AOTInductor needs a C++ compiler (g++), and there is none on this machine")


@pytest.fixture(scope="module")
def bf16_export(tiny_checkpoint, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("aoti") / "bf16"
    assert main(["export", str(tiny_checkpoint), "--format", "aoti", "--precision", "bf16", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def test_images(tiny_signs):
    return [str(p) for p in sorted((tiny_signs / "Test").glob("*.png"))[:24]]


@needs_compiler
def test_bf16_export_records_its_precision_parity_and_accuracy_change(bf16_export):
    record = json.loads((bf16_export / RECORD_FILE).read_text())
    artifact = record["artifact"]
    assert (bf16_export / artifact["file"]).is_file() and artifact["file"] == "model.pt2"
    assert artifact["format"] == "aoti" and artifact["precision"] == "bf16" and artifact["dynamic_batch"]
    assert artifact["cpu_isa"]  # the package runs only where this instruction set does
    checks = artifact["parity"]["checks"]
    assert [c["batch_size"] for c in checks] == [1, 8]
    assert artifact["parity"]["tolerance"]["probabilities"] == PARITY_ATOL_BF16
    # bf16 rounding is there (the package is not secretly float32) and within the bf16 tolerance
    assert all(0 < c["max_abs_probabilities"] <= PARITY_ATOL_BF16 for c in checks)
    change = artifact["accuracy_change"]  # measured on the test split of the synthetic training data
    assert " test images of gtsrb:" in change["evaluated_on"]
    assert change["top1_change"] == pytest.approx(change["bf16_top1"] - change["float32_top1"], abs=1e-6)
    assert 0.0 <= change["top1_agreement"] <= 1.0 and change["max_abs_probability_difference"] > 0
    assert artifact["quantization"] is None


@needs_compiler
def test_checkpoint_export_and_service_agree_in_bf16(tiny_checkpoint, bf16_export, test_images):  # noqa: F811
    from resnetlab.deployment.service import create_app

    exported = load_predictor(bf16_export)
    assert exported.backend.name == "aoti" and exported.backend.precision == "bf16"
    from_checkpoint = load_predictor(tiny_checkpoint, precision="bf16")  # a second build, through the cache
    assert from_checkpoint.backend.name == "aoti"
    assert from_checkpoint.artifact_dir == export_cache_dir(tiny_checkpoint, fmt="aoti", precision="bf16")
    a = {p.path: p for p in exported.predict_paths(test_images, topk=3)}
    b = {p.path: p for p in from_checkpoint.predict_paths(test_images, topk=3)}
    for path in test_images:
        assert a[path].classes == b[path].classes
        assert max(abs(x - y) for x, y in zip(a[path].confidences, b[path].confidences)) <= SAME_COMPUTATION

    client = TestClient(create_app(exported))
    assert client.get("/model").json()["artifact"]["precision"] == "bf16"
    for path in test_images[:4]:  # one image per request: batch 1, where the predictions above ran in batches
        with open(path, "rb") as handle:
            reply = client.post("/predict?topk=3", files={"file": (path, handle.read(), "image/png")}).json()
        top = reply["predictions"][0]["top"]
        assert [t["class"] for t in top] == a[path].classes
        assert max(abs(t["confidence"] - c) for t, c in zip(top, a[path].confidences)) <= SAME_COMPUTATION


@needs_compiler
def test_bf16_package_answers_alike_in_any_batch(bf16_export, test_images):
    predictor = load_predictor(bf16_export)
    batch = torch.stack([predictor.prepare(p) for p in test_images])
    together = predictor.probabilities(batch)
    one_by_one = torch.cat([predictor.probabilities(batch[i : i + 1]) for i in range(len(batch))])
    assert (together - one_by_one).abs().max() <= SAME_COMPUTATION


@needs_compiler
def test_bf16_is_refused_where_it_cannot_run(tiny_checkpoint, bf16_export, tmp_path, capsys):  # noqa: F811
    with pytest.raises(ResnetlabError, match="--format aoti"):
        export_checkpoint(tiny_checkpoint, tmp_path / "onnx-bf16", fmt="onnx", precision="bf16", log=lambda m: None)
    assert not (tmp_path / "onnx-bf16" / RECORD_FILE).exists()
    with pytest.raises(CheckpointError, match="AOTInductor export, which runs on --backend aoti"):
        load_predictor(bf16_export, backend="onnxruntime")
    assert main(["export", str(tiny_checkpoint), "--precision", "fp8", "--out", str(tmp_path / "x")]) == 2
    assert "--precision 'fp8'" in capsys.readouterr().err


@needs_compiler
def test_damaged_package_is_a_clear_error(bf16_export, tmp_path):
    copy = tmp_path / "damaged"
    shutil.copytree(bf16_export, copy)
    (copy / "model.pt2").write_bytes(b"not a package")
    with pytest.raises(CheckpointError, match="cannot load AOTInductor package .*re-export it here"):
        load_predictor(copy)


@needs_compiler
@pytest.mark.slow
def test_float32_package_keeps_float32_parity(tiny_checkpoint, tmp_path):  # noqa: F811
    result = export_checkpoint(tiny_checkpoint, tmp_path / "f32", fmt="aoti", log=lambda m: None)
    assert result.record["artifact"]["precision"] == "float32"
    assert all(p.passes(1e-4) for p in result.parity) and [p.batch_size for p in result.parity] == [1, 8]
    assert result.accuracy_change is None


def test_without_a_compiler_bf16_falls_back_to_eager_and_says_so(tiny_checkpoint, tmp_path, monkeypatch):  # noqa: F811
    from resnetlab.deployment import export

    def no_compiler(*args, **kwargs):
        raise export.ExportError("AOTInductor export failed: g++ not found")

    monkeypatch.setattr(export, "export_aotinductor", no_compiler)
    messages = []
    predictor = load_predictor(tiny_checkpoint, precision="bf16", cache_root=tmp_path, log=messages.append)
    assert predictor.backend.name == "torch" and predictor.backend.precision == "bf16"
    assert any("g++ not found" in m and "eager torch instead" in m for m in messages)
    assert not list(tmp_path.glob("exports/*/" + RECORD_FILE))  # nothing half-made was cached
    with pytest.raises(ResnetlabError, match="g\\+\\+ not found"):  # asked for by name: no quiet fallback
        load_predictor(tiny_checkpoint, backend="aoti", precision="bf16", cache_root=tmp_path)


def _predictions(folder):
    import csv

    with open(folder / "predictions.csv", newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


@needs_compiler
def test_evaluate_an_export_on_the_whole_split(tiny_checkpoint, bf16_export, tmp_path):  # noqa: F811
    """`evaluate --export DIR` measures what is deployed: a float32 export scores as the checkpoint does (its
    confidences equal to the float32 parity), a bf16 package gets its own full evaluation and says so."""
    onnx = export_checkpoint(tiny_checkpoint, tmp_path / "onnx", fmt="onnx", dynamic_batch=True, log=lambda m: None)
    # evaluations of their own, beside (not in) the export folders
    outs = {name: tmp_path / f"evaluation-{name}" for name in ("checkpoint", "onnx", "bf16")}
    assert main(["evaluate", str(tiny_checkpoint), "--out", str(outs["checkpoint"])]) == 0
    assert main(["evaluate", str(tiny_checkpoint), "--export", str(onnx.out_dir), "--out", str(outs["onnx"])]) == 0
    assert main(["evaluate", str(tiny_checkpoint.parent.parent), "--export", str(bf16_export),
                 "--out", str(outs["bf16"])]) == 0
    metrics = {name: json.loads((out / "metrics.json").read_text()) for name, out in outs.items()}
    assert "evaluated_model" not in metrics["checkpoint"]
    assert metrics["onnx"]["evaluated_model"]["backend"] == "onnxruntime"
    assert metrics["bf16"]["evaluated_model"] == {"export": str(bf16_export), "format": "aoti",
                                                  "precision": "bf16", "backend": "aoti",
                                                  # the calibrated package divides by the stored temperature
                                                  "graph_temperature": pytest.approx(metrics["checkpoint"]
                                                                                     ["temperature_applied"])}
    reference, through_onnx = _predictions(outs["checkpoint"]), _predictions(outs["onnx"])
    assert reference.keys() == through_onnx.keys() == _predictions(outs["bf16"]).keys()
    for path, row in reference.items():
        assert through_onnx[path]["pred_index"] == row["pred_index"]
        assert abs(float(through_onnx[path]["confidence"]) - float(row["confidence"])) <= 1e-4
    assert metrics["onnx"]["top1"] == metrics["checkpoint"]["top1"]
    assert abs(metrics["bf16"]["top1"] - metrics["checkpoint"]["top1"]) <= 0.1
    assert "bf16 aoti export" in (outs["bf16"] / "report.md").read_text()
    assert not (outs["bf16"] / "gradcam.npz").exists()  # Grad-CAM needs the torch model


@needs_compiler
def test_evaluate_refuses_an_export_of_another_checkpoint(tiny_checkpoint, bf16_export, tmp_path, capsys):  # noqa: F811
    other = tmp_path / "other"
    shutil.copytree(bf16_export, other)
    record = json.loads((other / RECORD_FILE).read_text())
    record["source"]["checkpoint_sha256"] = "0" * 64
    (other / RECORD_FILE).write_text(json.dumps(record))
    assert main(["evaluate", str(tiny_checkpoint), "--export", str(other), "--out", str(tmp_path / "e")]) == 2
    assert "was not exported from" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_checkpoint), "--export", str(tmp_path), "--out", str(tmp_path / "f")]) == 2
    assert "is not an export folder" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["simple_cnn", "resnet20", "preact_resnet20", "resnet44v2", "wrn16_8", "resnet18",
                                  "resnet50_small"])
def test_every_model_family_has_a_bf16_form(name):
    """Bf16Inference needs only the shared interface (a final `fc`); each family's bf16 form stays near float32."""
    from resnetlab.deployment.export import Bf16Inference
    from resnetlab.models import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference, fast = model(x), Bf16Inference(model)(x)
    assert fast.dtype == torch.float32 and fast.shape == reference.shape
    assert (fast.softmax(1) - reference.softmax(1)).abs().max() < PARITY_ATOL_BF16
    assert next(model.parameters()).dtype == torch.float32  # the checkpoint's model is left as it was


def _meta(name: str, size: int) -> dict:
    return {"model": {"name": name, "num_classes": 43, "kwargs": {}}, "preprocessing": {"input_size": size}}


def test_the_default_precision_follows_the_models_size(monkeypatch):
    from resnetlab.deployment import policy
    from resnetlab import hardware as runtime

    monkeypatch.setattr(policy, "cpp_compiler_available", lambda: True)
    monkeypatch.setattr(runtime, "native_bf16_cpu", lambda: True)
    small, large = policy.choose_precision(_meta("resnet20", 32)), policy.choose_precision(_meta("resnet50", 224))
    assert small.precision == "float32" and small.gmacs == pytest.approx(0.0406, abs=1e-3)
    assert large.precision == "bf16" and large.gmacs == pytest.approx(4.09, abs=0.01)  # torchvision's 4.09 GFLOPS
    assert policy.choose_precision(_meta("resnet50", 64)).precision == "float32"  # 0.33 GMAC
    monkeypatch.setattr(runtime, "native_bf16_cpu", lambda: False)
    assert "no bf16 matrix instructions" in policy.choose_precision(_meta("resnet50", 224)).reason
    monkeypatch.setattr(runtime, "native_bf16_cpu", lambda: True)
    monkeypatch.setattr(policy, "cpp_compiler_available", lambda: False)
    assert "no C++ compiler" in policy.choose_precision(_meta("resnet50", 224)).reason


@needs_compiler
def test_a_run_whose_default_path_is_bf16_reports_what_bf16_costs(tiny_signs, tmp_path, monkeypatch):
    """With the size threshold lowered, the tiny model counts as large: the run evaluates the bf16 package on its
    test split, reports it, and `predict` then runs that very package from the cache."""
    import csv

    from resnetlab.deployment import policy
    from resnetlab.hardware import native_bf16_cpu

    if not native_bf16_cpu():
        pytest.skip("this CPU has no bf16 instructions, so the default path is float32 for every model")
    monkeypatch.setattr(policy, "BF16_MIN_GMACS", 0.0)
    run = tmp_path / "run"
    assert main(["train", "--data", f"gtsrb:{tiny_signs}", "--epochs", "1", "--batch-size", "32", "--out", str(run),
                 "--quiet", "train.threads=1", "eval.gradcam=false"]) == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    deployment = metrics["deployment"]
    assert deployment["precision"] == "bf16" and deployment["images"] == metrics["num_samples"]
    assert deployment["float32_top1"] == pytest.approx(metrics["top1"], abs=1e-6)
    assert deployment["top1_change"] == pytest.approx(deployment["top1"] - deployment["float32_top1"], abs=1e-5)
    assert 0 < deployment["max_abs_confidence_change"] < PARITY_ATOL_BF16
    assert "run this model as a bf16 AOTInductor package" in (run / "report.md").read_text()
    predictor = load_predictor(run)
    assert predictor.backend.precision == "bf16" and str(predictor.artifact_dir) == deployment["package"]
    assert "GMAC per image" in predictor.describe()["runtime"]["precision_chosen_because"]
    # what the served package answers on the test split is what the run reported for it
    from resnetlab.data.preprocessing import prepare_image

    with open(run / "splits.csv", newline="") as handle:
        rois = {row["path"]: [int(v) for v in row["roi"].split()] for row in csv.DictReader(handle)
                if row["split"] == "test"}
    with open(run / "eval" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    batch = torch.stack([prepare_image(row["path"], predictor.prep, rois[row["path"]]) for row in rows])
    answers = predictor.probabilities(batch).argmax(dim=1)
    served_top1 = float((answers == torch.tensor([int(row["true_index"]) for row in rows])).float().mean())
    assert served_top1 == pytest.approx(deployment["top1"], abs=1e-6)
    assert load_predictor(run, precision="float32").backend.precision == "float32"
