"""``resnetlab bench infer``: inference latency and throughput of every backend of one checkpoint, in one run.

Every variant is measured through :meth:`Predictor.probabilities` on the same uint8 batch, so each number includes
normalization and softmax, as a real prediction does:

* batch-1 latency: single-image calls timed one by one; p50 and p99 over all calls;
* batch throughput: whole batches of ``batch_size`` images; images per second, median over rounds.

The machines we run on are shared and noisy, so variants are measured **interleaved**: each round gives every
variant its share of calls in turn, and load from elsewhere hits all of them alike. Ratios to plain eager float32
are therefore more trustworthy than absolute numbers; the load average before and after is recorded with them.

Variants: ``eager`` (float32, NCHW: the baseline), ``eager_bf16_cl`` (bf16 autocast + channels_last),
``compile`` (torch.compile with frozen weights, float32), ``compile_bf16_cl``, ``onnxruntime`` (float32 ONNX),
``onnxruntime_int8`` (static int8, with its accuracy change), ``torchscript``, and ``deployment``: exactly what
``predict`` and ``serve`` run for this checkpoint by default (including their batching).
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

import resnetlab
from resnetlab.data.preprocessing import Preprocessing
from resnetlab.deployment.backends import OnnxRuntimeBackend, TorchBackend, TorchScriptBackend
from resnetlab.deployment.export import ExportError, export_checkpoint, parity_images
from resnetlab.deployment.predictor import Predictor, load_predictor, resolve_checkpoint_file
from resnetlab.deployment.records import record_from_meta
from resnetlab.errors import ResnetlabError

VARIANTS = {
    "eager": "eager float32, NCHW (plain PyTorch: the baseline)",
    "eager_bf16_cl": "eager, bf16 autocast + channels_last",
    "compile": "torch.compile (inductor, frozen weights), float32",
    "compile_bf16_cl": "torch.compile (frozen weights), bf16 autocast + channels_last",
    "onnxruntime": "ONNX Runtime, float32",
    "onnxruntime_int8": "ONNX Runtime, int8 static quantization",
    "torchscript": "TorchScript trace + freeze, float32",
    "deployment": "the default deployment path of predict and serve",
}
DEFAULT_VARIANTS = ("eager", "eager_bf16_cl", "compile", "compile_bf16_cl", "onnxruntime", "onnxruntime_int8",
                    "deployment")


@dataclass
class VariantResult:
    name: str
    description: str
    backend: dict[str, Any] = field(default_factory=dict)
    setup_seconds: float | None = None
    latency_ms_p50: float | None = None
    latency_ms_p99: float | None = None
    latency_calls: int = 0
    throughput: float | None = None  # images per second at batch_size
    throughput_rounds: list[float] = field(default_factory=list)
    max_abs_probability_difference: float | None = None  # against eager float32, same images
    top1_agreement: float | None = None
    accuracy: dict[str, Any] | None = None  # int8: the accuracy change on real images
    skipped: str | None = None


def _environment(threads: int) -> dict[str, Any]:
    import onnxruntime

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": str(torch.__version__), "onnxruntime": onnxruntime.__version__,
            "resnetlab": resnetlab.__version__, "load_average_start": list(os.getloadavg()),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench_infer(checkpoint: str | Path, *, variants: tuple[str, ...] | list[str] = DEFAULT_VARIANTS,
                batch_size: int = 32, latency_calls: int = 200, rounds: int = 5, threads: int | None = None,
                calibration_data: str | None = None, min_round_seconds: float = 0.2,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure the variants of one checkpoint side by side; see the module docstring. Returns a JSON-able dict."""
    from resnetlab.engine.checkpoint import load_checkpoint, model_from_checkpoint

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ResnetlabError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if batch_size < 1 or latency_calls < 1 or rounds < 1:
        raise ResnetlabError("--batch-size, --latency-calls and --rounds must be at least 1")
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    checkpoint_file = resolve_checkpoint_file(checkpoint)
    model, meta = model_from_checkpoint(load_checkpoint(checkpoint_file))
    record = record_from_meta(meta)
    environment = _environment(threads)
    with tempfile.TemporaryDirectory(prefix="resnetlab-bench-") as scratch:
        return _run(checkpoint_file, model, meta, record, environment, Path(scratch), variants=variants,
                    batch_size=batch_size, latency_calls=latency_calls, rounds=rounds, threads=threads,
                    calibration_data=calibration_data, min_round_seconds=min_round_seconds, log=log)


def _run(checkpoint_file: Path, model, meta: dict, record: dict, environment: dict, workdir: Path, *, variants,
         batch_size: int, latency_calls: int, rounds: int, threads: int, calibration_data: str | None,
         min_round_seconds: float, log: Callable[[str], None]) -> dict[str, Any]:
    results: dict[str, VariantResult] = {}
    predictors: dict[str, Predictor] = {}

    def build(name: str) -> Predictor:
        plain = {"micro_batch": batch_size}  # the baselines run the whole batch in one call
        if name in ("eager", "eager_bf16_cl", "compile", "compile_bf16_cl"):
            bf16 = name.endswith("bf16_cl")
            backend = TorchBackend(copy.deepcopy(model), precision="bf16" if bf16 else "float32", channels_last=bf16,
                                   compile=name.startswith("compile"))
            return Predictor(backend, record, source=str(checkpoint_file), **plain)
        if name in ("onnxruntime", "onnxruntime_int8"):
            int8 = name.endswith("int8")
            out = export_checkpoint(checkpoint_file, workdir / name, fmt="onnx", dynamic_batch=True,
                                    quantize="int8" if int8 else None, calibration_data=calibration_data,
                                    log=lambda m: None)
            results[name].accuracy = out.quantization
            backend = OnnxRuntimeBackend(out.model_path, threads=threads, precision="int8" if int8 else "float32")
            return Predictor(backend, out.record, source=str(checkpoint_file), **plain)
        if name == "torchscript":
            out = export_checkpoint(checkpoint_file, workdir / name, fmt="torchscript", log=lambda m: None)
            return Predictor(TorchScriptBackend(out.model_path), out.record, source=str(checkpoint_file), **plain)
        return load_predictor(checkpoint_file, backend="auto", threads=threads)

    size = record["preprocessing"]["input_size"]
    prep = Preprocessing.from_dict(record["preprocessing"])
    single, batch = parity_images(prep, 1, seed=1), parity_images(prep, batch_size, seed=2)
    log(f"{meta['model']['name']} at {size}x{size}, {len(record['classes']['names'])} classes; batch {batch_size}; "
        f"{threads} thread(s); load average {environment['load_average_start'][0]:.2f}")

    for name in variants:
        results[name] = VariantResult(name=name, description=VARIANTS[name])
        began = time.perf_counter()
        try:
            predictor = build(name)
            # Warm-up at both shapes: compiles (torch.compile) and allocates (ONNX Runtime) before timing.
            for _ in range(3):
                predictor.probabilities(single)
            predictor.probabilities(batch)
        except (ResnetlabError, ExportError) as err:
            results[name].skipped = str(err)
            log(f"{name}: skipped ({err})")
            continue
        results[name].setup_seconds = round(time.perf_counter() - began, 2)
        results[name].backend = predictor.backend.describe() | {"micro_batch": predictor.micro_batch}
        predictors[name] = predictor
        log(f"{name}: ready in {results[name].setup_seconds:.1f} s")

    # Parity with the baseline on the same batch (softmax probabilities, what users see).
    reference = predictors["eager"].probabilities(batch) if "eager" in predictors else None
    for name, predictor in predictors.items():
        if reference is not None:
            probs = predictor.probabilities(batch)
            results[name].max_abs_probability_difference = float((probs - reference).abs().max())
            results[name].top1_agreement = float((probs.argmax(1) == reference.argmax(1)).float().mean())

    latencies: dict[str, list[float]] = {name: [] for name in predictors}
    per_round = max(1, latency_calls // rounds)
    for round_index in range(rounds):
        for name, predictor in predictors.items():
            for _ in range(per_round):
                began = time.perf_counter()
                predictor.probabilities(single)
                latencies[name].append(time.perf_counter() - began)
            calls, began = 0, time.perf_counter()
            while True:
                predictor.probabilities(batch)
                calls += 1
                elapsed = time.perf_counter() - began
                if elapsed >= min_round_seconds:
                    break
            results[name].throughput_rounds.append(round(calls * batch_size / elapsed, 2))
        log(f"round {round_index + 1}/{rounds} done")

    for name in predictors:
        result = results[name]
        result.latency_calls = len(latencies[name])
        result.latency_ms_p50 = round(_percentile(latencies[name], 50) * 1000, 4)
        result.latency_ms_p99 = round(_percentile(latencies[name], 99) * 1000, 4)
        result.throughput = round(statistics.median(result.throughput_rounds), 2)

    environment["load_average_end"] = list(os.getloadavg())
    environment["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report = {
        "checkpoint": str(checkpoint_file),
        "model": meta["model"]["name"],
        "input_size": size,
        "num_classes": len(record["classes"]["names"]),
        "batch_size": batch_size,
        "latency_calls": per_round * rounds,
        "rounds": rounds,
        "environment": environment,
        "variants": [asdict(results[name]) for name in variants],
        "ratios_to_eager": _ratios(results),
    }
    return report


def _ratios(results: dict[str, VariantResult]) -> dict[str, dict[str, float]]:
    """Speed-ups over eager float32: batch-1 latency (eager p50 / variant p50) and batch throughput."""
    base = results.get("eager")
    if base is None or base.latency_ms_p50 is None:
        return {}
    ratios = {}
    for name, result in results.items():
        if result.latency_ms_p50 is None:
            continue
        ratios[name] = {"latency_speedup": round(base.latency_ms_p50 / result.latency_ms_p50, 3),
                        "throughput_speedup": round(result.throughput / base.throughput, 3)}
    return ratios
