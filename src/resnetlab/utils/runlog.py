"""The run's log: every line goes to ``train.log`` and, unless quiet, to the console (stderr, through rich)."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console


class RunLog:
    def __init__(self, path: Path | None = None, *, quiet: bool = False, enabled: bool = True):
        self.path = path
        self.quiet = quiet
        self.enabled = enabled  # False on non-zero ranks of a distributed run
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self._handle = None
        if path is not None and enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(path, "a", buffering=1)

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        if self._handle is not None:
            self._handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        if not self.quiet:
            self.console.print(message, markup=False)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

