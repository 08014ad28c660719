"""Where resnetlab keeps what it derives from datasets (decoded tensors, statistics, CIFAR images as PNG files).

Everything under it is keyed by a fingerprint of what it was made from, so a stale entry is never used, and any of
it may be deleted at any time: it is rebuilt on the next run. ``RESNETLAB_CACHE_DIR`` moves it (tests do).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("RESNETLAB_CACHE_DIR") or Path.home() / ".cache" / "resnetlab").expanduser()
