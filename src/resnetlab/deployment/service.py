"""``resnetlab serve``: the model behind a small HTTP API (FastAPI on uvicorn) and a web page.

=============  =====================================================================================================
``GET /``       a page: choose or drop an image, see the top-5 classes with confidence bars and the latency
``POST /predict``  images as multipart (``file``, or several ``files``; any field name works) or JSON
               (``{"image": BASE64}`` or ``{"images": [BASE64 | {"filename": ..., "data": BASE64}, ...]}``, data URLs
               accepted); ``?topk=N`` (default 5). Returns the top-k per image and the server-side latency.
``GET /health``  liveness: ``{"status": "ok", ...}``
``GET /model``   the deployment record: model, classes, preprocessing, output kind, export parity, runtime
=============  =====================================================================================================

Bad requests never take the server down and always get a 4xx with a one-line ``detail``: a body above the upload
limit (default 10 MB, whole request) gets 413 before it is parsed; a file that is not an image gets 415; a
decompression bomb (a small file that decodes to more pixels than Pillow's limit) gets 413 before it is decoded; a
truncated image gets 400. Images are decoded by :func:`resnetlab.data.preprocessing.load_image`, the code that
evaluation and ``predict`` use, so the service answers what ``predict`` answers for the same bytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import json
import os
import threading
import time
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

import resnetlab
from resnetlab.data.preprocessing import load_image
from resnetlab.deployment.predictor import Predictor, load_predictor
from resnetlab.errors import DataError

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_FILES = 32
MAX_TOPK = 100
# How much of an oversized body is read and thrown away before answering 413: a client that is still sending when
# the server answers and closes gets a connection reset instead of the 413, so small excesses are drained.
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
ENVIRONMENT_PREFIX = "RESNETLAB_SERVE_"


class UploadRejected(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware: 413 for a request body above ``max_bytes``, announced (Content-Length) or streamed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if int(declared) <= DRAIN_LIMIT_BYTES:
                await self._drain(receive, DRAIN_LIMIT_BYTES)
            await self._reject(send)
            return
        received = 0
        started = body_complete = False

        async def limited_receive():
            nonlocal received, body_complete
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_complete = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                if not body_complete:
                    await self._drain(receive, DRAIN_LIMIT_BYTES - received)
                await self._reject(send)

    @staticmethod
    async def _drain(receive, budget: int) -> None:
        """Read and drop the rest of the body, up to ``budget`` bytes (then the connection is closed on the client)."""
        while budget > 0:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            budget -= len(message.get("body", b""))

    async def _reject(self, send) -> None:
        body = json.dumps({"detail": f"request body is larger than the upload limit of {_megabytes(self.max_bytes)}"
                                     " (resnetlab serve --max-upload-mb)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _megabytes(n: int) -> str:
    return f"{n / (1024 * 1024):.3g} MB"


class _NamedBytes(io.BytesIO):
    """Upload bytes that print as their file name, so the shared loader's error messages name the upload."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self._display_name = name

    def __str__(self) -> str:
        return self._display_name


def decode_upload(data: bytes, name: str) -> Image.Image:
    """Upload bytes -> RGB image, through the evaluation's loader; :class:`UploadRejected` with a 4xx otherwise."""
    if not data:
        raise UploadRejected(400, f"'{name}' is empty")
    try:
        # Image.open reads only the header: the size is known before a single pixel is decoded.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise UploadRejected(413, f"'{name}' would decode to more than {Image.MAX_IMAGE_PIXELS:,} pixels; "
                                  "refusing a possible decompression bomb") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise UploadRejected(415, f"'{name}' is not an image Pillow can read (PNG, JPEG, BMP, GIF, TIFF, WebP, PPM)") from None
    if width * height > Image.MAX_IMAGE_PIXELS:
        raise UploadRejected(413, f"'{name}' is {width}x{height} pixels, over the limit of "
                                  f"{Image.MAX_IMAGE_PIXELS:,} pixels")
    try:
        return load_image(_NamedBytes(data, name), None, roi_crop=False)
    except DataError as err:
        raise UploadRejected(400, str(err)) from None


def _base64_image(value: Any, index: int) -> tuple[str, bytes]:
    name = f"image {index + 1}"
    if isinstance(value, dict):
        name = str(value.get("filename") or name)
        value = value.get("data")
    if not isinstance(value, str):
        raise UploadRejected(400, f"{name}: expected a base64 string (or {{'filename': ..., 'data': BASE64}})")
    if value.startswith("data:"):
        value = value.partition(",")[2]  # data:image/png;base64,....
    try:
        return name, base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise UploadRejected(400, f"{name}: not valid base64") from None


async def _read_uploads(request: Request, max_files: int) -> list[tuple[str, bytes]]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=max_files + 1, max_fields=max_files + 16)
        uploads = []
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                uploads.append((value.filename or f"image {len(uploads) + 1}", await value.read()))
        await form.close()
        return uploads
    if content_type.startswith("application/json"):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UploadRejected(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise UploadRejected(400, "send a JSON object: {'image': BASE64} or {'images': [BASE64, ...]}")
        if "images" in body and isinstance(body["images"], list):
            items = body["images"]
        elif "image" in body:
            items = [{"filename": body.get("filename"), "data": body["image"]}]
        else:
            raise UploadRejected(400, "the JSON has no 'image' or 'images' entry")
        return [_base64_image(item, i) for i, item in enumerate(items[: max_files + 1])]
    raise UploadRejected(415, "send images as multipart/form-data (field 'file' or 'files') or as JSON "
                              "{'image': BASE64}")


def create_app(predictor: Predictor, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_files: int = DEFAULT_MAX_FILES) -> FastAPI:
    """The service for one predictor. The model runs one request at a time (its backend already uses every core
    it was given); uploads are read and decoded concurrently."""
    app = FastAPI(title="resnetlab", version=resnetlab.__version__,
                  description="Image classification with a resnetlab model")
    app.add_middleware(BodySizeLimit, max_bytes=max_upload_bytes)
    model_lock = threading.Lock()
    description = predictor.describe()
    description["runtime"].pop("source", None)  # a path on the server: nothing a client needs to know
    model_name = description["model"]["name"]
    limits = {"max_upload_bytes": max_upload_bytes, "max_files": max_files, "max_pixels": Image.MAX_IMAGE_PIXELS}

    @app.exception_handler(UploadRejected)
    async def _rejected(request: Request, err: UploadRejected):
        return JSONResponse({"detail": err.detail}, status_code=err.status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        # A bug, not the client's fault: answer 500 with one line and keep serving.
        return JSONResponse({"detail": f"internal error: {type(err).__name__}: {err}"[:500]}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return resources.files("resnetlab.deployment").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "backend": predictor.backend.name,
                "classes": len(predictor.class_names), "resnetlab_version": resnetlab.__version__}

    @app.get("/model")
    def model() -> dict[str, Any]:
        return {**description, "limits": limits}

    def run_prediction(uploads: list[tuple[str, bytes]], topk: int) -> dict[str, Any]:
        began = time.perf_counter()
        images = [decode_upload(data, name) for name, data in uploads]
        batch = torch.stack([predictor.prepare_pil(image) for image in images])
        decoded = time.perf_counter()
        with model_lock:
            started = time.perf_counter()
            predictions = predictor.predict_tensors(batch, [name for name, _ in uploads], topk=topk)
            finished = time.perf_counter()
        return {
            "model": model_name,
            "backend": predictor.backend.name,
            "precision": predictor.backend.precision,
            "topk": topk,
            "latency_ms": {"total": round((finished - began) * 1000, 3),
                           "decode": round((decoded - began) * 1000, 3),
                           "queue": round((started - decoded) * 1000, 3),
                           "inference": round((finished - started) * 1000, 3)},
            "predictions": [{"filename": p.path, "width": image.width, "height": image.height,
                             "top": p.to_dict()["top"]} for p, image in zip(predictions, images)],
        }

    @app.post("/predict")
    async def predict(request: Request, topk: int = Query(5, ge=1, le=MAX_TOPK)) -> dict[str, Any]:
        uploads = await _read_uploads(request, max_files)
        if not uploads:
            raise HTTPException(400, "no image in the request: send a file field (multipart) or an 'image' (JSON)")
        if len(uploads) > max_files:
            raise HTTPException(413, f"too many images in one request; the limit is {max_files}")
        return await run_in_threadpool(run_prediction, uploads, topk)

    return app


# ---------------------------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------------------------


def app_from_environment() -> FastAPI:
    """The app of one uvicorn worker process (``--workers N``); the parent passes its settings in the environment."""
    get = lambda key: os.environ[ENVIRONMENT_PREFIX + key]  # noqa: E731
    predictor = load_predictor(get("SOURCE"), backend=get("BACKEND"), threads=int(get("THREADS")),
                               precision=get("PRECISION"))
    return create_app(predictor, max_upload_bytes=int(get("MAX_UPLOAD_BYTES")), max_files=int(get("MAX_FILES")))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(source: str | Path, *, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, backend: str = "auto",
          precision: str = "auto", max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
          max_files: int = DEFAULT_MAX_FILES, log: Callable[[str], None] = print) -> None:
    """Serve ``source`` (checkpoint, run directory or export folder) until interrupted."""
    import uvicorn

    from resnetlab.deployment.backends import default_threads

    if not is_loopback(host):
        log(f"warning: serving on {host}, reachable from other machines; the service has no authentication")
    threads = default_threads(workers)
    # Load once here: a bad source fails before uvicorn starts, and a checkpoint is exported once, not per worker.
    predictor = load_predictor(source, backend=backend, threads=threads, precision=precision, log=log)
    log(f"serving {predictor.source} with {predictor.backend.name} ({predictor.backend.precision}), "
        f"{workers} worker(s) x {threads} thread(s), on http://{host}:{port}/")
    if workers == 1:
        uvicorn.run(create_app(predictor, max_upload_bytes=max_upload_bytes, max_files=max_files), host=host,
                    port=port, log_level="info")
        return
    # A checkpoint's cached export was made above: the workers load that folder instead of exporting again.
    worker_source = str(predictor.artifact_dir or source)
    os.environ.update({ENVIRONMENT_PREFIX + "SOURCE": worker_source,
                       ENVIRONMENT_PREFIX + "BACKEND": "auto" if worker_source != str(source) else backend,
                       ENVIRONMENT_PREFIX + "THREADS": str(threads),
                       ENVIRONMENT_PREFIX + "PRECISION": precision,
                       ENVIRONMENT_PREFIX + "MAX_UPLOAD_BYTES": str(max_upload_bytes),
                       ENVIRONMENT_PREFIX + "MAX_FILES": str(max_files)})
    uvicorn.run("resnetlab.deployment.service:app_from_environment", factory=True, host=host, port=port,
                workers=workers, log_level="info")
