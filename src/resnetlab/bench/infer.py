"""``resnetlab bench infer``: inference latency and throughput of every backend of one checkpoint, in one run.

Every variant is measured through :meth:`Predictor.probabilities` on the same uint8 images, so each number includes
normalization and softmax, as a real prediction does:

* batch-1 latency: single-image calls timed one by one; p50 and p99 over all calls;
* batch throughput: whole batches of ``batch_size`` images; images per second, median over rounds.

How, and why so:

* **One process per variant.** Each backend keeps its own thread pool (OpenMP for torch, ONNX Runtime's own), and
  idle pools keep spinning for a while after each call. On a machine with few cores two pools in one process steal
  each other's cores, and a variant measured right after another's calls runs at a fraction of its speed alone. So
  each variant lives in its own worker process, as it would in deployment.
* **Interleaved rounds.** The machines we run on are shared and noisy, so the workers take turns: in each round every
  worker does its share of latency calls and one throughput measurement while the others wait (blocked, their
  threads asleep after a short pause). Load from elsewhere then hits all variants alike, and the ratios to plain
  eager float32 are more trustworthy than the absolute numbers. The load average before and after is recorded.

Variants: ``eager`` (float32, NCHW: the baseline), ``eager_bf16_cl`` (bf16 autocast + channels_last),
``compile`` (torch.compile with frozen weights, float32), ``compile_bf16_cl``, ``onnxruntime`` (float32 ONNX),
``onnxruntime_int8`` (static int8, with its accuracy change), ``torchscript``, ``aoti`` and ``aoti_bf16``
(AOTInductor packages), ``deployment``: exactly what ``predict`` and ``serve`` run for this checkpoint by default,
batching included (float32 ONNX Runtime or the bf16 package, as :mod:`resnetlab.deployment.policy` chooses for the
model here), and ``deployment_float32`` / ``deployment_bf16``: what they run with ``--precision float32`` / ``bf16``.
"""

from __future__ import annotations

import logging
import multiprocessing
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

from resnetlab._version import __version__
from resnetlab.errors import ResnetlabError

_logger = logging.getLogger(__name__)  # the default log of functions that take a `log` callable

VARIANTS = {
    "eager": "eager float32, NCHW (plain PyTorch: the baseline)",
    "eager_bf16_cl": "eager, bf16 autocast + channels_last",
    "compile": "torch.compile (inductor, frozen weights), float32",
    "compile_bf16_cl": "torch.compile (frozen weights), bf16 autocast + channels_last",
    "onnxruntime": "ONNX Runtime, float32",
    "onnxruntime_int8": "ONNX Runtime, int8 static quantization",
    "torchscript": "TorchScript trace + freeze, float32",
    "aoti": "AOTInductor package (frozen weights), float32",
    "aoti_bf16": "AOTInductor package (frozen weights), bf16 body + float32 classifier, channels_last",
    "deployment": "the default deployment path of predict and serve (precision auto)",
    "deployment_float32": "predict and serve with --precision float32",
    "deployment_bf16": "predict and serve with --precision bf16",
}
DEFAULT_VARIANTS = ("eager", "eager_bf16_cl", "compile", "compile_bf16_cl", "onnxruntime", "onnxruntime_int8",
                    "aoti_bf16", "deployment", "deployment_float32", "deployment_bf16")
SETTLE_SECONDS = 0.1  # pause between two workers' turns, for the previous one's spinning threads to go to sleep


@dataclass
class VariantResult:
    name: str
    description: str
    backend: dict[str, Any] = field(default_factory=dict)
    setup_seconds: float | None = None  # building the backend (export, compile) and warming it up at both shapes
    latency_ms_p50: float | None = None
    latency_ms_p99: float | None = None
    latency_ms_p50_rounds: list[float] = field(default_factory=list)  # per round: the least disturbed is the best
    latency_calls: int = 0
    throughput: float | None = None  # images per second at batch_size, median over rounds
    throughput_rounds: list[float] = field(default_factory=list)
    max_abs_probability_difference: float | None = None  # against eager float32, on the same images
    max_relative_logit_difference: float | None = None  # max |logit difference| / largest |logit| of eager
    top1_agreement: float | None = None
    accuracy: dict[str, Any] | None = None  # int8: the accuracy change on real images
    skipped: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# Worker process: one variant
# ---------------------------------------------------------------------------------------------------------------


def _build(spec: dict[str, Any]):
    """The variant's predictor (and, for int8, its accuracy report)."""
    from resnetlab.deployment.backends import (
        AotInductorBackend,
        OnnxRuntimeBackend,
        TorchBackend,
        TorchScriptBackend,
    )
    from resnetlab.deployment.export import export_checkpoint
    from resnetlab.deployment.predictor import Predictor, load_predictor
    from resnetlab.deployment.records import record_from_meta
    from resnetlab.checkpoint import load_checkpoint, model_from_checkpoint

    name, checkpoint, threads = spec["name"], spec["checkpoint"], spec["threads"]
    plain = {"micro_batch": spec["batch_size"], "source": checkpoint}  # the baselines run a batch in one call
    workdir = Path(spec["workdir"]) / name
    if name in ("eager", "eager_bf16_cl", "compile", "compile_bf16_cl"):
        model, meta = model_from_checkpoint(load_checkpoint(checkpoint))
        bf16 = name.endswith("bf16_cl")
        backend = TorchBackend(model, precision="bf16" if bf16 else "float32", channels_last=bf16,
                               compile=name.startswith("compile"))
        return Predictor(backend, record_from_meta(meta), **plain), None
    if name in ("onnxruntime", "onnxruntime_int8"):
        int8 = name.endswith("int8")
        out = export_checkpoint(checkpoint, workdir, fmt="onnx", dynamic_batch=True, quantize="int8" if int8 else None,
                                calibration_data=spec["calibration_data"], log=lambda m: None)
        backend = OnnxRuntimeBackend(out.model_path, threads=threads, precision="int8" if int8 else "float32")
        return Predictor(backend, out.record, **plain), out.quantization
    if name == "torchscript":
        out = export_checkpoint(checkpoint, workdir, fmt="torchscript", log=lambda m: None)
        return Predictor(TorchScriptBackend(out.model_path), out.record, **plain), None
    if name in ("aoti", "aoti_bf16"):
        precision = "bf16" if name.endswith("bf16") else "float32"
        out = export_checkpoint(checkpoint, workdir, fmt="aoti", precision=precision, measure_accuracy=False,
                                log=lambda m: None)
        return Predictor(AotInductorBackend(out.model_path, precision=precision), out.record, **plain), None
    precision = {"deployment_bf16": "bf16", "deployment_float32": "float32"}.get(name, "auto")
    return load_predictor(checkpoint, backend="auto", threads=threads, precision=precision), None


def _worker(connection, spec: dict[str, Any]) -> None:
    from resnetlab.data.preprocessing import Preprocessing, normalize
    from resnetlab.deployment.export import parity_images

    torch.set_num_threads(spec["threads"])
    try:
        began = time.perf_counter()
        predictor, accuracy = _build(spec)
        prep = Preprocessing.from_dict(predictor.record["preprocessing"])
        single, batch = parity_images(prep, 1, seed=1), parity_images(prep, spec["batch_size"], seed=2)
        # Warm-up at both shapes: compiles (torch.compile) and allocates (ONNX Runtime) before timing.
        for _ in range(3):
            predictor.probabilities(single)
        predictor.probabilities(batch)
        setup = time.perf_counter() - began
    except ResnetlabError as err:
        connection.send(("skipped", str(err)))
        return
    except Exception as err:  # a bug or an unsupported platform: report it, let the other variants go on
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        connection.send(("skipped", f"{type(err).__name__}: {first_line}"))
        return
    describe = predictor.backend.describe() | {"micro_batch": predictor.micro_batch}
    connection.send(("ready", setup, describe, accuracy))
    while True:
        command, argument = connection.recv()
        if command == "latency":
            times = []
            for _ in range(argument):
                began = time.perf_counter()
                predictor.probabilities(single)
                times.append(time.perf_counter() - began)
            connection.send(times)
        elif command == "throughput":
            calls, began = 0, time.perf_counter()
            while True:
                predictor.probabilities(batch)
                calls += 1
                elapsed = time.perf_counter() - began
                if elapsed >= argument:
                    break
            connection.send(calls * len(batch) / elapsed)
        elif command == "outputs":
            mean, std = torch.as_tensor(prep.mean), torch.as_tensor(prep.std)
            connection.send(predictor.outputs(normalize(batch, mean, std)).numpy())
        else:
            return


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


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
            "resnetlab": __version__, "load_average_start": list(os.getloadavg()),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}


class _Worker:
    def __init__(self, context, spec: dict[str, Any]):
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, spec), daemon=True)
        self.process.start()
        child.close()

    def receive(self):
        while not self.connection.poll(1.0):
            if not self.process.is_alive():
                raise RuntimeError(f"the benchmark worker died (exit code {self.process.exitcode})")
        return self.connection.recv()

    def ask(self, command: str, argument=None):
        self.connection.send((command, argument))
        return self.receive()

    def stop(self) -> None:
        try:
            self.connection.send(("stop", None))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def bench_infer(checkpoint: str | Path, *, variants: tuple[str, ...] | list[str] = DEFAULT_VARIANTS,
                batch_size: int = 32, latency_calls: int = 200, rounds: int = 5, threads: int | None = None,
                calibration_data: str | None = None, min_round_seconds: float = 0.5,
                log: Callable[[str], None] = _logger.info) -> dict[str, Any]:
    """Measure the variants of one checkpoint side by side; see the module docstring. Returns a JSON-able dict."""
    from resnetlab.checkpoint import load_checkpoint
    from resnetlab.deployment.backends import default_threads
    from resnetlab.deployment.records import checkpoint_file_of

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ResnetlabError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if batch_size < 1 or latency_calls < 1 or rounds < 1:
        raise ResnetlabError("--batch-size, --latency-calls and --rounds must be at least 1")
    threads = threads or default_threads()
    checkpoint_file = checkpoint_file_of(checkpoint)
    meta = load_checkpoint(checkpoint_file)["meta"]  # checks the file before any worker starts
    size = meta["preprocessing"]["input_size"]
    environment = _environment(threads)
    log(f"{meta['model']['name']} at {size}x{size}, {len(meta['classes']['names'])} classes; batch {batch_size}; "
        f"{threads} thread(s); load average {environment['load_average_start'][0]:.2f}")
    results = {name: VariantResult(name=name, description=VARIANTS[name]) for name in variants}
    workers: dict[str, _Worker] = {}
    context = multiprocessing.get_context("spawn")  # a clean interpreter per variant: no inherited thread pools
    per_round = max(1, latency_calls // rounds)
    try:
        with tempfile.TemporaryDirectory(prefix="resnetlab-bench-") as scratch:
            for name in variants:  # one at a time, so that setup times are not measured against each other
                spec = {"name": name, "checkpoint": str(checkpoint_file), "threads": threads,
                        "batch_size": batch_size, "calibration_data": calibration_data, "workdir": scratch}
                worker = _Worker(context, spec)
                reply = worker.receive()
                if reply[0] == "skipped":
                    results[name].skipped = reply[1]
                    log(f"{name}: skipped ({reply[1]})")
                    worker.stop()
                    continue
                _, setup, describe, accuracy = reply
                results[name].setup_seconds = round(setup, 2)
                results[name].backend, results[name].accuracy = describe, accuracy
                workers[name] = worker
                log(f"{name}: ready in {setup:.1f} s")

            _parity(workers, results)
            latencies: dict[str, list[float]] = {name: [] for name in workers}
            for round_index in range(rounds):
                for name, worker in workers.items():
                    time.sleep(SETTLE_SECONDS)
                    times = worker.ask("latency", per_round)
                    latencies[name] += times
                    results[name].latency_ms_p50_rounds.append(round(float(np.median(times)) * 1000, 4))
                    time.sleep(SETTLE_SECONDS)
                    results[name].throughput_rounds.append(round(worker.ask("throughput", min_round_seconds), 2))
                log(f"round {round_index + 1}/{rounds} done")
    finally:
        for worker in workers.values():
            worker.stop()

    for name, times in latencies.items():
        result = results[name]
        result.latency_calls = len(times)
        result.latency_ms_p50 = round(float(np.percentile(times, 50)) * 1000, 4)
        result.latency_ms_p99 = round(float(np.percentile(times, 99)) * 1000, 4)
        result.throughput = round(statistics.median(result.throughput_rounds), 2)
    environment["load_average_end"] = list(os.getloadavg())
    environment["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {
        "checkpoint": str(checkpoint_file),
        "model": meta["model"]["name"],
        "input_size": size,
        "num_classes": len(meta["classes"]["names"]),
        "batch_size": batch_size,
        "latency_calls": per_round * rounds,
        "rounds": rounds,
        "method": "one worker process per variant; interleaved rounds; Predictor.probabilities on random uint8 "
                  "images (normalization and softmax included)",
        "environment": environment,
        "variants": [asdict(results[name]) for name in variants],
        "ratios_to_eager": _ratios(results),
    }


def _parity(workers: dict[str, _Worker], results: dict[str, VariantResult]) -> None:
    """Each variant's outputs on the same batch against eager float32 (probabilities and relative logits)."""
    if "eager" not in workers:
        return
    reference = torch.from_numpy(workers["eager"].ask("outputs"))
    scale = max(1.0, float(reference.abs().max()))
    for name, worker in workers.items():
        outputs = torch.from_numpy(worker.ask("outputs"))
        result = results[name]
        result.max_abs_probability_difference = float((outputs.softmax(1) - reference.softmax(1)).abs().max())
        result.max_relative_logit_difference = float((outputs - reference).abs().max()) / scale
        result.top1_agreement = float((outputs.argmax(1) == reference.argmax(1)).float().mean())


def _ratios(results: dict[str, VariantResult]) -> dict[str, dict[str, float]]:
    """Speed-ups over eager float32 of batch-1 latency (p50) and batch throughput: typical (all calls, median round)
    and best (each variant's least disturbed round: on a noisy machine, noise only ever slows a round down)."""
    base = results.get("eager")
    if base is None or base.latency_ms_p50 is None:
        return {}
    return {name: {"latency_speedup": round(base.latency_ms_p50 / result.latency_ms_p50, 3),
                   "throughput_speedup": round(result.throughput / base.throughput, 3),
                   "latency_speedup_best": round(min(base.latency_ms_p50_rounds) / min(result.latency_ms_p50_rounds), 3),
                   "throughput_speedup_best": round(max(result.throughput_rounds) / max(base.throughput_rounds), 3)}
            for name, result in results.items() if result.latency_ms_p50 is not None}
