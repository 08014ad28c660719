"""``resnetlab export`` and ``resnetlab serve``: a checkpoint to a deployable file, and to an HTTP service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from resnetlab.cli.options import (
    BACKEND_HELP,
    PRECISION_HELP,
    AcceptAllOption,
    CoverageOption,
    MaxErrorOption,
    RawOption,
    ThresholdOption,
    answer_options,
    fail,
)
from resnetlab.deployment.service_settings import (
    API_KEY_ENVIRONMENT,
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_REQUEST_TIMEOUT_S,
)


def register(app: typer.Typer) -> None:
    app.command("export")(export)
    app.command("serve")(serve)


def export(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint (.pt) or a run directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Export folder: model file + preprocessing.json")],
    export_format: Annotated[str, typer.Option("--format", "-f", help="onnx, torchscript or aoti (an AOTInductor package compiled for this CPU)")] = "onnx",
    precision: Annotated[str, typer.Option("--precision", help="float32, or bf16 (--format aoti): its accuracy change is measured on real images")] = "float32",
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Accept any batch size (ONNX; TorchScript always does)")] = False,
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (default 18)")] = None,
    parity_batch: Annotated[int, typer.Option("--parity-batch", help="Batch N of the parity check besides batch 1")] = 8,
    quantize: Annotated[Optional[str], typer.Option("--quantize", help="int8: static quantization through ONNX Runtime")] = None,
    calibration_data: Annotated[Optional[str], typer.Option("--calibration-data", help="Dataset spec for int8 calibration and the int8 or bf16 accuracy check (default: the training data)")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Export raw logits; by default a calibrated model's graph outputs logits / temperature (the calibration is recorded either way)")] = False,
) -> None:
    """Export a checkpoint to ONNX, TorchScript or an AOTInductor package, checked against the eager float32 model
    at batch 1 and N (float32: fails when confidences differ by more than 1e-4, or logits by more than 1e-4 of the
    largest logit; bf16: 0.1, and its accuracy change is measured). A calibrated model's graph outputs calibrated
    logits (logits / temperature) unless --raw."""
    from resnetlab.api.functions import export as export_model

    result = export_model(checkpoint, export_format, out, dynamic_batch=dynamic_batch, quantize=quantize,
                          precision=precision, opset=opset, parity_batch=parity_batch,
                          calibration_data=calibration_data, raw=raw).result
    probabilities = max(p.max_abs_probabilities for p in result.parity)
    logits = max(p.max_abs_logits for p in result.parity)
    scale = (f"logits / temperature {result.temperature_applied:.4g}" if result.temperature_applied is not None
             else "raw logits")
    typer.echo(f"largest difference from the eager model: probabilities {probabilities:.2e}, logits {logits:.2e} "
               f"(batch {', '.join(str(p.batch_size) for p in result.parity)}; the graph outputs {scale}) -> "
               f"{result.out_dir}")


def serve(
    source: Annotated[Path, typer.Argument(help="A checkpoint (.pt), a run directory or an export folder")],
    host: Annotated[str, typer.Option("--host", help="Address to bind; other than loopback exposes the service")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p")] = 8000,
    workers: Annotated[int, typer.Option("--workers", "-w", help="Worker processes (the cores are shared among them)")] = 1,
    backend: Annotated[str, typer.Option("--backend", help=BACKEND_HELP)] = "auto",
    precision: Annotated[str, typer.Option("--precision", help=PRECISION_HELP)] = "auto",
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest request body; larger ones get 413")] = 10.0,
    max_image_pixels: Annotated[int, typer.Option("--max-image-pixels", help="Largest image (width x height), read from its header before decoding; larger ones get 413")] = DEFAULT_MAX_IMAGE_PIXELS,
    max_concurrency: Annotated[int, typer.Option("--max-concurrency", help="Predictions decoding or running at once, per worker (each may hold one decoded image)")] = DEFAULT_MAX_CONCURRENCY,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Predictions waiting for a slot, per worker; beyond them a request gets 503 with Retry-After")] = DEFAULT_MAX_QUEUE,
    request_timeout: Annotated[float, typer.Option("--request-timeout", help="Seconds a prediction may take, waiting included; then 504")] = DEFAULT_REQUEST_TIMEOUT_S,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar=API_KEY_ENVIRONMENT, show_envvar=True, help="Require this key (Authorization: Bearer KEY or X-API-Key: KEY) on /predict, /model and /metrics; prefer the environment variable, which other users cannot read in the process list")] = None,
    cors_origin: Annotated[Optional[list[str]], typer.Option("--cors-origin", help="An origin (https://host:port) whose pages may call the API from a browser; repeatable; CORS is off without it")] = None,
    docs: Annotated[bool, typer.Option("--docs", help="Serve FastAPI's /docs, /redoc and /openapi.json")] = False,
    raw: RawOption = False,
    coverage: CoverageOption = None,
    max_error: MaxErrorOption = None,
    threshold: ThresholdOption = None,
    accept_all: AcceptAllOption = False,
) -> None:
    """Serve the model over HTTP: a web page at /, POST /predict, GET /health, GET /model and GET /metrics. Answers
    below the operating point are returned as unknown, with their best guess and the reason."""
    from resnetlab.deployment.service import serve as run_service
    from resnetlab.deployment.service_settings import ServiceSettings

    if workers < 1:
        fail("--workers must be at least 1")
    if not 0 < port < 65536:
        fail(f"--port {port}: choose 1-65535")
    if max_upload_mb <= 0:
        fail("--max-upload-mb must be positive")
    answers = answer_options(raw, coverage, max_error, threshold, accept_all)
    settings = ServiceSettings(max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_image_pixels=max_image_pixels,
                               max_concurrency=max_concurrency, max_queue=max_queue, request_timeout=request_timeout,
                               api_key=api_key, cors_origins=tuple(cors_origin or ()), docs=docs)
    run_service(source, host=host, port=port, workers=workers, backend=backend, precision=precision,
                settings=settings, answers=answers, log=lambda m: typer.echo(m, err=True))
