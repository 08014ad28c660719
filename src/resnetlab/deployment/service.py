"""``resnetlab serve``: the model behind a small HTTP API (FastAPI on uvicorn) and a web page.

=================  =================================================================================================
``GET /``          a page: choose or drop an image, see the top-5 classes with confidence bars and the latency
``POST /predict``  images as multipart (``file``, or several ``files``; any field name works) or JSON
                   (``{"image": BASE64}`` or ``{"images": [BASE64 | {"filename": ..., "data": BASE64}, ...]}``, data
                   URLs accepted); ``?topk=N`` (default 5). Returns per image the top-k (best guess first), the
                   calibrated ``confidence``, the ``energy`` score, ``unknown`` and its ``reason`` (an answer below
                   the operating point is withheld, its best guess still listed), and the server-side latency.
``GET /health``    liveness: ``{"status": "ok", ...}``
``GET /model``     the deployment record: model, classes, preprocessing, output kind, export parity, runtime, limits,
                   and ``answers``: the temperature applied and the operating point
``GET /metrics``   Prometheus text format: requests by path and status, a latency histogram, rejects by reason,
                   requests in flight, predictions running and queued
=================  =================================================================================================

Bad requests never take the server down and always get a one-line ``detail``: a body above the upload limit (default
10 MB, whole request) gets 413 before it is parsed; an image of more pixels than ``max_image_pixels`` (default 40
megapixels) gets 413 once its header is read, before any pixel is decoded; a file that is not an image gets 415; a
truncated one 400. Images are decoded by :mod:`resnetlab.deployment.decode`: an ordinary image by the loader evaluation
and ``predict`` use, so the service answers what ``predict`` answers for the same bytes, and a large one without
full-size copies (a large JPEG at reduced scale).

What a production service needs is built in and set by :class:`ServiceSettings` (``resnetlab serve`` flags):

* bounded work: at most ``max_concurrency`` predictions decode or run at once, ``max_queue`` more wait; beyond that a
  request gets 503 with ``Retry-After`` at once, before its body is kept, so a burst cannot pile up memory. After a
  large image the memory is handed back to the operating system (``gc`` and glibc's ``malloc_trim``);
* ``request_timeout``: a prediction not answered in time gets 504; a queued one never starts, a running one stops at
  its next step (between images, before the model) and frees its slot then;
* an optional API key (``api_key``): ``/predict``, ``/model`` and ``/metrics`` then need ``Authorization: Bearer KEY``
  or ``X-API-Key: KEY`` (401 otherwise); ``/`` and ``/health`` stay open;
* CORS off unless ``cors_origins`` names origins; FastAPI's ``/docs``, ``/redoc`` and ``/openapi.json`` off unless
  ``docs``;
* one JSON access-log line per request on the ``resnetlab.service.access`` logger (method, path, status, latency,
  client address, bytes in and out; never image contents or headers), and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import ctypes
import gc
import hmac
import ipaddress
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from resnetlab._version import __version__
from resnetlab.data.preprocessing import pil_to_uint8, resize_to_input
from resnetlab.deployment.decode import UploadRejected, decode_upload
from resnetlab.deployment.predictor import AnswerOptions, Predictor, load_predictor
from resnetlab.deployment.service_settings import ENVIRONMENT_PREFIX, ServiceSettings

_logger = logging.getLogger(__name__)  # the default log of functions that take a `log` callable

RETRY_AFTER_S = 1
MAX_TOPK = 100
# How much of an oversized body is read and thrown away before answering 413: a client that is still sending when
# the server answers and closes gets a connection reset instead of the 413, so small excesses are drained.
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
# A request body this large is worth handing its memory back to the operating system after it is served.
LARGE_BODY_BYTES = 4 * 1024 * 1024
ACCESS_LOGGER = "resnetlab.service.access"
REJECT_REASONS = ("too_large", "too_many_pixels", "busy", "timeout", "unauthorized", "bad_image", "bad_request")
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

access_log = logging.getLogger(ACCESS_LOGGER)


# ---------------------------------------------------------------------------------------------------------------
# Metrics and the access log
# ---------------------------------------------------------------------------------------------------------------


class ServiceMetrics:
    """The service's Prometheus metrics, in a registry of their own (one per app, never the process-wide one)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("resnetlab_http_requests", "HTTP requests answered, by path and status",
                                ["path", "status"], registry=self.registry)
        self.latency = Histogram("resnetlab_http_request_duration_seconds", "Time from request to the end of the "
                                 "response, by path", ["path"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.rejected = Counter("resnetlab_rejected_requests", "Requests refused, by reason", ["reason"],
                                registry=self.registry)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)  # every reason shows, at 0 until it happens
        self.in_flight = Gauge("resnetlab_http_requests_in_flight", "HTTP requests being served now",
                               registry=self.registry)
        self.running = Gauge("resnetlab_predictions_running", "Predictions decoding or running the model now",
                             registry=self.registry)
        self.queued = Gauge("resnetlab_predictions_queued", "Predictions admitted and waiting for a slot",
                            registry=self.registry)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class AccessLog:
    """ASGI middleware: one JSON line per request on the ``resnetlab.service.access`` logger, and the request
    metrics. Paths outside the app's own are counted as ``other``, so a scanner cannot grow the metrics."""

    def __init__(self, app, metrics: ServiceMetrics, known_paths: frozenset[str]):
        self.app, self.metrics, self.known_paths = app, metrics, known_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status, bytes_in, bytes_out = 500, 0, 0

        async def counting_receive():
            nonlocal bytes_in
            message = await receive()
            if message["type"] == "http.request":
                bytes_in += len(message.get("body", b""))
            return message

        async def counting_send(message):
            nonlocal status, bytes_out
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                bytes_out += len(message.get("body", b""))
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            self.metrics.in_flight.dec()
            seconds = time.perf_counter() - began
            path = scope.get("path", "")
            label = path if path in self.known_paths else "other"
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.latency.labels(label).observe(seconds)
            client = scope.get("client")
            entry = {"method": scope.get("method"), "path": path[:300], "status": status,
                     "latency_ms": round(seconds * 1000, 3), "client": client[0] if client else None,
                     "bytes_in": bytes_in, "bytes_out": bytes_out}
            reason = scope.get("state", {}).get("reject_reason")
            if reason:
                entry["rejected"] = reason
            access_log.info(json.dumps(entry))


# ---------------------------------------------------------------------------------------------------------------
# Uploads
# ---------------------------------------------------------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware: 413 for a request body above ``max_bytes``, announced (Content-Length) or streamed."""

    def __init__(self, app, max_bytes: int, on_reject: Callable[[], None] = lambda: None):
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

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
        self.on_reject()
        body = json.dumps({"detail": f"request body is larger than the upload limit of {_megabytes(self.max_bytes)}"
                                     " (resnetlab serve --max-upload-mb)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _megabytes(n: int) -> str:
    return f"{n / (1024 * 1024):.3g} MB"


async def _discard_body(request: Request, timeout_s: float) -> None:
    """Read and drop a body that will not be used (the upload limit still applies), so that a client still sending
    gets the answer instead of a connection reset; a client sending slower than ``timeout_s`` allows is cut off."""
    async def drain() -> None:
        async for _ in request.stream():
            pass

    # a client gone, a body already read (RuntimeError), or a client too slow: answer without the rest
    with contextlib.suppress(ClientDisconnect, RuntimeError, asyncio.TimeoutError):
        await asyncio.wait_for(drain(), timeout_s)


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


# ---------------------------------------------------------------------------------------------------------------
# Bounded work
# ---------------------------------------------------------------------------------------------------------------


class _Admission:
    """Predictions admitted (running or waiting for one of ``slots``), at most ``slots + queue`` at a time."""

    def __init__(self, slots: int, queue: int):
        self.capacity = slots + queue
        self._lock = threading.Lock()
        self.admitted = self.running = 0

    def try_enter(self) -> bool:
        with self._lock:
            if self.admitted >= self.capacity:
                return False
            self.admitted += 1
            return True

    def start(self) -> None:
        with self._lock:
            self.running += 1

    def finish(self, started: bool) -> None:
        with self._lock:
            self.admitted -= 1
            self.running -= started

    @property
    def waiting(self) -> int:
        return self.admitted - self.running


@dataclass
class _Job:
    uploads: list[tuple[str, bytes]]  # emptied as the images are decoded, so their bytes go early
    topk: int
    body_bytes: int
    abandoned: threading.Event = field(default_factory=threading.Event)
    started: bool = False


class _Abandoned(Exception):
    """The request behind a job timed out: stop at the next step."""


def _load_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc; musl and others have none
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim: Callable[[int], int] | None = None
_malloc_trim_loaded = False


def return_memory_to_os() -> None:
    """Collect young garbage and hand the allocator's free pages back to the operating system (glibc's
    ``malloc_trim``; elsewhere just the collection). Decoding a large image leaves hundreds of MB free in the
    allocator's arenas, which glibc keeps (one arena per thread) unless asked; without this the service stays near its
    peak while idle. Image buffers go when their last reference does; the collection only catches a cycle made during
    the request, so it is limited to the young generations: a full one walks torch's half a million objects, a
    blocking half second."""
    global _malloc_trim, _malloc_trim_loaded
    gc.collect(1)
    if not _malloc_trim_loaded:
        _malloc_trim, _malloc_trim_loaded = _load_malloc_trim(), True
    if _malloc_trim is not None:
        _malloc_trim(0)


# ---------------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------------


def _presented_key(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.headers.get("x-api-key")


def create_app(predictor: Predictor, settings: ServiceSettings | None = None, **overrides: Any) -> FastAPI:
    """The service for one predictor, with ``settings`` (any field of :class:`ServiceSettings` may also be given
    by name). The model runs one batch at a time (its backend already uses every core it was given); up to
    ``max_concurrency`` predictions decode at once."""
    settings = replace(settings or ServiceSettings(), **overrides)
    executor = ThreadPoolExecutor(max_workers=settings.max_concurrency, thread_name_prefix="resnetlab-predict")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="resnetlab", version=__version__, lifespan=lifespan,
                  description="Image classification with a resnetlab model", **docs)
    metrics = ServiceMetrics()
    admission = _Admission(settings.max_concurrency, settings.max_queue)
    metrics.running.set_function(lambda: admission.running)
    metrics.queued.set_function(lambda: admission.waiting)
    # Innermost first: the last middleware added sees the request first.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes,
                       on_reject=lambda: metrics.rejected.labels("too_large").inc())
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"],
                           expose_headers=["Retry-After"], max_age=600)
    known_paths = {"/", "/predict", "/health", "/model", "/metrics"}
    if settings.docs:
        known_paths |= {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
    app.add_middleware(AccessLog, metrics=metrics, known_paths=frozenset(known_paths))

    model_lock = threading.Lock()
    description = predictor.describe()
    description["runtime"].pop("source", None)  # a path on the server: nothing a client needs to know
    if description.get("calibration"):
        # the validation curve (up to a thousand points) is the export's business; a client needs the summary
        curve = description["calibration"].get("risk_coverage") or {}
        description["calibration"] = {**description["calibration"],
                                      "risk_coverage": {"points": len(curve.get("threshold", []))}}
    answers = predictor.describe_answers()
    point_summary = predictor.operating_point.to_dict()
    model_name = description["model"]["name"]
    expected_key = settings.api_key.encode() if settings.api_key else None

    async def authorized(request: Request) -> None:
        if expected_key is None:
            return
        presented = _presented_key(request)
        # compare_digest: the time taken does not tell how much of a guess was right
        if presented is not None and hmac.compare_digest(presented.encode(), expected_key):
            return
        await _discard_body(request, settings.request_timeout)
        raise UploadRejected(401, "this service needs an API key: send 'Authorization: Bearer KEY' or "
                                  "'X-API-Key: KEY'", "unauthorized", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(UploadRejected)
    async def _rejected(request: Request, err: UploadRejected):
        metrics.rejected.labels(err.reason).inc()
        request.state.reject_reason = err.reason
        return JSONResponse({"detail": err.detail}, status_code=err.status, headers=err.headers)

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
                "classes": len(predictor.class_names), "resnetlab_version": __version__}

    @app.get("/model", dependencies=[Depends(authorized)])
    def model() -> dict[str, Any]:
        return {**description, "limits": settings.limits(), "api_key_required": expected_key is not None}

    @app.get("/metrics", dependencies=[Depends(authorized)])
    def metrics_page() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def run_prediction(job: _Job) -> dict[str, Any]:
        admission.start()
        job.started = True
        large = job.body_bytes >= LARGE_BODY_BYTES
        try:
            began = time.perf_counter()
            names = [name for name, _ in job.uploads]
            tensors, sizes = [], []
            while job.uploads:
                if job.abandoned.is_set():
                    raise _Abandoned
                name, data = job.uploads.pop(0)
                decoded = decode_upload(data, name, predictor.prep, settings.max_image_pixels)
                large = large or decoded.large
                # Predictor.prepare_pil without its convert("RGB"): the image is RGB already, and a large one is
                # not worth copying.
                tensors.append(pil_to_uint8(resize_to_input(decoded.image, predictor.prep)))
                sizes.append((decoded.width, decoded.height))
                del decoded, data
            batch = torch.stack(tensors)
            del tensors
            decoded_at = time.perf_counter()
            if job.abandoned.is_set():
                raise _Abandoned
            with model_lock:
                started = time.perf_counter()
                predictions = predictor.predict_tensors(batch, names, topk=job.topk)
                finished = time.perf_counter()
        finally:
            job.uploads.clear()
            if large:
                return_memory_to_os()
        return {
            "model": model_name,
            "backend": predictor.backend.name,
            "precision": predictor.backend.precision,
            "topk": job.topk,
            "temperature": answers["temperature"],
            "operating_point": answers["operating_point"],
            "latency_ms": {"total": round((finished - began) * 1000, 3),
                           "decode": round((decoded_at - began) * 1000, 3),
                           "queue": round((started - decoded_at) * 1000, 3),
                           "inference": round((finished - started) * 1000, 3)},
            "predictions": [{"filename": p.path, "width": width, "height": height, "unknown": p.unknown,
                             "reason": p.reason, "confidence": p.confidence, "energy": p.energy,
                             "operating_point": point_summary, "top": p.to_dict()["top"]}
                            for p, (width, height) in zip(predictions, sizes)],
        }

    def timed_out() -> UploadRejected:
        return UploadRejected(504, f"the prediction took longer than the request timeout of "
                                   f"{settings.request_timeout:g} s (resnetlab serve --request-timeout)", "timeout")

    @app.post("/predict", dependencies=[Depends(authorized)])
    async def predict(request: Request, topk: int = Query(5, ge=1, le=MAX_TOPK)) -> dict[str, Any]:
        # Admission comes before the body is kept: a rejected request costs no memory.
        if not admission.try_enter():
            await _discard_body(request, settings.request_timeout)
            raise UploadRejected(503, f"the service is busy ({settings.max_concurrency} predictions running and "
                                      f"{settings.max_queue} waiting); retry in {RETRY_AFTER_S} s",
                                 "busy", headers={"Retry-After": str(RETRY_AFTER_S)})
        deadline = time.monotonic() + settings.request_timeout
        handed_over = False
        try:
            try:
                uploads = await asyncio.wait_for(_read_uploads(request, settings.max_files), settings.request_timeout)
            except asyncio.TimeoutError:
                raise timed_out() from None
            if not uploads:
                raise UploadRejected(400, "no image in the request: send a file field (multipart) or an 'image' "
                                          "(JSON)")
            if len(uploads) > settings.max_files:
                raise UploadRejected(413, f"too many images in one request; the limit is {settings.max_files}",
                                     "too_large")
            job = _Job(uploads, topk, body_bytes=sum(len(data) for _, data in uploads))
            del uploads
            future = executor.submit(run_prediction, job)
            # The slot is freed when the work has really stopped (or was cancelled before it began), so the bound
            # on memory holds even for requests that timed out.
            future.add_done_callback(lambda _: admission.finish(job.started))
            handed_over = True
            try:
                return await asyncio.wait_for(asyncio.wrap_future(future), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                job.abandoned.set()
                future.cancel()
                raise timed_out() from None
        finally:
            if not handed_over:
                admission.finish(False)

    return app


# ---------------------------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------------------------


def app_from_environment() -> FastAPI:
    """The app of one uvicorn worker process (``--workers N``); the parent passes its settings in the environment."""
    get = lambda key: os.environ[ENVIRONMENT_PREFIX + key]  # noqa: E731
    predictor = load_predictor(get("SOURCE"), backend=get("BACKEND"), threads=int(get("THREADS")),
                               precision=get("PRECISION"),
                               answers=AnswerOptions.from_environment(lambda key: os.environ.get(
                                   ENVIRONMENT_PREFIX + "ANSWERS_" + key)))
    return create_app(predictor, ServiceSettings.from_environment())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's logging, with the access log as this service's JSON lines (uvicorn's own access log is off)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["resnetlab_access"] = {"format": "%(message)s"}
    config["handlers"]["resnetlab_access"] = {"formatter": "resnetlab_access", "class": "logging.StreamHandler",
                                              "stream": "ext://sys.stdout"}
    config["loggers"][ACCESS_LOGGER] = {"handlers": ["resnetlab_access"], "level": "INFO", "propagate": False}
    return config


def serve(source: str | Path, *, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, backend: str = "auto",
          precision: str = "auto", settings: ServiceSettings | None = None, log: Callable[[str], None] = _logger.info,
          answers: AnswerOptions | None = None, **overrides: Any) -> None:
    """Serve ``source`` (checkpoint, run directory or export folder) until interrupted, with ``settings`` (or any of
    their fields by name, e.g. ``max_upload_bytes=...``, ``api_key=...``); ``answers``: calibrated or raw
    confidences and the operating point below which an answer is "unknown" (default: the stored one)."""
    import uvicorn

    from resnetlab.deployment.backends import default_threads

    settings = replace(settings or ServiceSettings(), **overrides)
    if not is_loopback(host):
        if settings.api_key is None:
            log(f"warning: serving on {host}, reachable from other machines, without an API key (--api-key)")
        else:
            log(f"warning: serving on {host}, reachable from other machines; plain HTTP carries the API key in the "
                "clear, so put a TLS proxy in front")
    threads = default_threads(workers)
    # Load once here: a bad source fails before uvicorn starts, and a checkpoint is exported once, not per worker.
    answers = answers or AnswerOptions()
    predictor = load_predictor(source, backend=backend, threads=threads, precision=precision, log=log,
                               answers=answers)
    log(f"serving {predictor.source} with {predictor.backend.name} ({predictor.backend.precision}), "
        f"{workers} worker(s) x {threads} thread(s), on http://{host}:{port}/"
        f"{' (API key required)' if settings.api_key else ''}")
    temperature = predictor.temperature
    log(("confidences calibrated at temperature " + f"{temperature:.4g}" if temperature else
         "raw confidences (no temperature applied)") + f"; operating point {predictor.operating_point.threshold:.3f}"
        f" ({predictor.operating_point.describe()})")
    options = {"host": host, "port": port, "log_level": "info", "access_log": False,
               "log_config": uvicorn_log_config()}
    if workers == 1:
        uvicorn.run(create_app(predictor, settings), **options)
        return
    # A checkpoint's cached export was made above: the workers load that folder instead of exporting again.
    worker_source = str(predictor.artifact_dir or source)
    for key in ("COVERAGE", "MAX_ERROR", "THRESHOLD"):  # absent means "not given": no value of an earlier call
        os.environ.pop(ENVIRONMENT_PREFIX + "ANSWERS_" + key, None)
    os.environ.update({ENVIRONMENT_PREFIX + "SOURCE": worker_source,
                       ENVIRONMENT_PREFIX + "BACKEND": "auto" if worker_source != str(source) else backend,
                       ENVIRONMENT_PREFIX + "THREADS": str(threads),
                       ENVIRONMENT_PREFIX + "PRECISION": precision, **settings.to_environment(),
                       **{ENVIRONMENT_PREFIX + "ANSWERS_" + key: value
                          for key, value in answers.to_environment().items()}})
    uvicorn.run("resnetlab.deployment.service:app_from_environment", factory=True, workers=workers, **options)
