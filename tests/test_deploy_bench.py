"""`resnetlab bench infer`: every variant measured side by side, with its parity to eager float32 (no timing
assertions: the numbers depend on the machine)."""

from __future__ import annotations

import json

import pytest

from resnetlab.cli.main import main
from resnetlab.bench.infer import DEFAULT_VARIANTS, bench_infer
from tests.test_deploy_export import tiny_checkpoint  # noqa: F401  (the shared trained model)


def _check_measured(variant: dict, batch_size: int) -> None:
    assert variant["skipped"] is None, variant["skipped"]
    assert 0 < variant["latency_ms_p50"] <= variant["latency_ms_p99"]
    assert variant["throughput"] > 0 and variant["throughput_rounds"]
    assert variant["setup_seconds"] >= 0


def test_bench_measures_variants_side_by_side(tiny_checkpoint):
    """Each variant in its own worker process, taking turns; the report has every number and the parity."""
    report = bench_infer(tiny_checkpoint, variants=["eager", "onnxruntime", "deployment"],
                         batch_size=8, latency_calls=8, rounds=2, min_round_seconds=0.01, log=lambda m: None)
    assert report["model"] == "resnet20" and report["input_size"] == 32 and report["batch_size"] == 8
    variants = {v["name"]: v for v in report["variants"]}
    assert list(variants) == ["eager", "onnxruntime", "deployment"]
    for variant in variants.values():
        _check_measured(variant, 8)
        assert variant["latency_calls"] == 8 and len(variant["throughput_rounds"]) == 2
    # float32 backends agree with eager; the deployment default is ONNX Runtime
    for name in ("onnxruntime", "deployment"):
        variant = variants[name]
        assert variant["max_abs_probability_difference"] < 1e-4 and variant["max_relative_logit_difference"] < 1e-4
        assert variant["top1_agreement"] == 1.0
    assert variants["deployment"]["backend"]["backend"] == "onnxruntime"
    assert variants["eager"]["backend"]["micro_batch"] == 8  # the baseline runs each batch in one call
    ratios = report["ratios_to_eager"]
    assert set(ratios["eager"].values()) == {1.0}
    assert ratios["onnxruntime"]["latency_speedup"] == pytest.approx(
        variants["eager"]["latency_ms_p50"] / variants["onnxruntime"]["latency_ms_p50"], rel=1e-2)
    env = report["environment"]
    assert env["threads"] >= 1 and len(env["load_average_start"]) == 3 and "load_average_end" in env


def test_bench_cli_json_and_unknown_variant(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "infer", str(tiny_checkpoint), "--json", "--variants", "eager_bf16_cl",
                 "--latency-calls", "4", "--rounds", "1", "--batch-size", "4", "--out", str(out)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text())["variants"] == report["variants"]
    assert [v["name"] for v in report["variants"]] == ["eager_bf16_cl"]
    assert report["ratios_to_eager"] == {}  # no baseline measured, no ratios
    bf16 = report["variants"][0]
    assert bf16["backend"]["precision"] == "bf16" and bf16["backend"]["channels_last"]
    assert main(["bench", "infer", str(tiny_checkpoint), "--variants", "eager,tensorrt"]) == 2
    assert "tensorrt" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_all_default_variants(tiny_checkpoint, tiny_signs):
    """The full default set, compile and int8 included (torch.compile takes tens of seconds per variant)."""
    report = bench_infer(tiny_checkpoint, batch_size=8, latency_calls=4, rounds=1, min_round_seconds=0.01,
                         calibration_data=f"gtsrb:{tiny_signs}", log=lambda m: None)
    variants = {v["name"]: v for v in report["variants"]}
    assert tuple(variants) == DEFAULT_VARIANTS
    for variant in variants.values():
        _check_measured(variant, 8)
    assert variants["compile"]["max_abs_probability_difference"] < 1e-4
    accuracy = variants["onnxruntime_int8"]["accuracy"]
    assert accuracy["top1_change"] == pytest.approx(accuracy["int8_top1"] - accuracy["float32_top1"], abs=1e-6)
