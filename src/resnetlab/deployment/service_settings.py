"""The settings of ``resnetlab serve`` (:class:`ServiceSettings`), in a module light enough for the CLI to import
for its defaults without loading the service (FastAPI, torch)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from resnetlab.errors import ConfigError

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_FILES = 32
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# Each running prediction may hold one decoded image of up to max_image_pixels (120 MB of RGB at 40 MP), so the
# memory a worker can take is about this many of those; the model itself runs one batch at a time anyway.
DEFAULT_MAX_CONCURRENCY = 2
DEFAULT_MAX_QUEUE = 16
DEFAULT_REQUEST_TIMEOUT_S = 30.0
ENVIRONMENT_PREFIX = "RESNETLAB_SERVE_"
API_KEY_ENVIRONMENT = "RESNETLAB_API_KEY"


@dataclass(frozen=True)
class ServiceSettings:
    """How the service protects itself; every field is a ``resnetlab serve`` flag (named in the error messages)."""

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES  # --max-upload-mb: the whole request body
    max_files: int = DEFAULT_MAX_FILES  # images in one request
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # --max-image-pixels: width x height, read from the header
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY  # --max-concurrency: predictions decoding or running at once
    max_queue: int = DEFAULT_MAX_QUEUE  # --max-queue: predictions waiting for a slot; more get 503
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S  # --request-timeout (seconds): 504 after it
    api_key: str | None = field(default=None, repr=False)  # --api-key / RESNETLAB_API_KEY
    cors_origins: tuple[str, ...] = ()  # --cors-origin (repeatable): origins whose pages may call the API
    docs: bool = False  # --docs: FastAPI's /docs, /redoc and /openapi.json

    def __post_init__(self) -> None:
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        for name, flag, least in (("max_upload_bytes", "--max-upload-mb", 1), ("max_files", "max_files", 1),
                                  ("max_image_pixels", "--max-image-pixels", 1),
                                  ("max_concurrency", "--max-concurrency", 1), ("max_queue", "--max-queue", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{flag} {value!r}: give a whole number of at least {least}")
        from resnetlab.data.preprocessing import MAX_IMAGE_PIXELS  # here: it imports torch

        if self.max_image_pixels > MAX_IMAGE_PIXELS:
            raise ConfigError(f"--max-image-pixels {self.max_image_pixels:,} is above the decompression-bomb limit "
                              f"of {MAX_IMAGE_PIXELS:,} pixels every resnetlab reader keeps; choose at most that")
        if not (isinstance(self.request_timeout, (int, float)) and math.isfinite(self.request_timeout)
                and self.request_timeout > 0):
            raise ConfigError(f"--request-timeout {self.request_timeout!r}: give a positive number of seconds")
        if self.api_key is not None and (not self.api_key or not self.api_key.isascii() or not self.api_key.isprintable()
                                         or any(ch.isspace() for ch in self.api_key)):
            raise ConfigError(f"the API key (--api-key or {API_KEY_ENVIRONMENT}) must be non-empty printable ASCII "
                              "without spaces: it travels in an HTTP header")
        for origin in self.cors_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ConfigError(f"--cors-origin '{origin}': give an origin such as https://example.org (scheme, "
                                  "host and port, no path), or * for any")

    def to_environment(self) -> dict[str, str]:
        """The settings as the environment of a uvicorn worker process (``--workers N``)."""
        values = {"MAX_UPLOAD_BYTES": str(self.max_upload_bytes), "MAX_FILES": str(self.max_files),
                  "MAX_IMAGE_PIXELS": str(self.max_image_pixels), "MAX_CONCURRENCY": str(self.max_concurrency),
                  "MAX_QUEUE": str(self.max_queue), "REQUEST_TIMEOUT": repr(float(self.request_timeout)),
                  "CORS_ORIGINS": json.dumps(list(self.cors_origins)), "DOCS": "1" if self.docs else "0"}
        if self.api_key is not None:
            values["API_KEY"] = self.api_key
        return {ENVIRONMENT_PREFIX + key: value for key, value in values.items()}

    @classmethod
    def from_environment(cls, environ: dict[str, str] | os._Environ = os.environ) -> ServiceSettings:
        """The settings :meth:`to_environment` wrote; a missing entry keeps its default."""
        def get(key: str) -> str | None:
            return environ.get(ENVIRONMENT_PREFIX + key)

        parsed: dict[str, Any] = {}
        for name, key in (("max_upload_bytes", "MAX_UPLOAD_BYTES"), ("max_files", "MAX_FILES"),
                          ("max_image_pixels", "MAX_IMAGE_PIXELS"), ("max_concurrency", "MAX_CONCURRENCY"),
                          ("max_queue", "MAX_QUEUE")):
            if get(key) is not None:
                parsed[name] = int(get(key))
        if get("REQUEST_TIMEOUT") is not None:
            parsed["request_timeout"] = float(get("REQUEST_TIMEOUT"))
        if get("CORS_ORIGINS") is not None:
            parsed["cors_origins"] = tuple(json.loads(get("CORS_ORIGINS")))
        if get("DOCS") is not None:
            parsed["docs"] = get("DOCS") == "1"
        parsed["api_key"] = get("API_KEY")
        return cls(**parsed)

    def limits(self) -> dict[str, Any]:
        """What a client may send (for ``GET /model``)."""
        return {"max_upload_bytes": self.max_upload_bytes, "max_files": self.max_files,
                "max_pixels": self.max_image_pixels, "max_concurrency": self.max_concurrency,
                "max_queue": self.max_queue, "request_timeout_s": self.request_timeout}
