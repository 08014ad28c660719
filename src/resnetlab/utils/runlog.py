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
        self._pending: list[str] = []  # lines logged before a file was attached
        if path is not None:
            self.attach(path)

    def attach(self, path: Path) -> None:
        """Write to ``path`` from now on, starting with the lines logged so far: a run checks its config and data
        (and logs what it finds) before it creates its directory."""
        self.path = path
        if not self.enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "a", buffering=1)
        self._handle.writelines(self._pending)
        self._pending = []

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n"
        if self._handle is not None:
            self._handle.write(line)
        elif self.path is None:
            self._pending.append(line)
        if not self.quiet:
            self.console.print(message, markup=False)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

