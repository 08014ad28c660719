"""The run's log: a sink on the standard :mod:`logging` tree that keeps ``train.log`` (or ``tune.log``).

Every line a run logs goes to its file, whatever the logging configuration, with the stamp it always had
(``2026-12-02 23:18:33 message``). The same line is handed to the ``resnetlab.run`` logger, so it is shown where
the application asked for it: the ``resnetlab`` command shows it on stderr, a notebook shows nothing unless it
asks (``logging.getLogger("resnetlab").setLevel(logging.INFO)`` and a handler). While the file is open, it also
receives the records of the library's own loggers (``resnetlab.*``), such as warnings, that reach that level.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger("resnetlab.run")
LIBRARY_LOGGER = "resnetlab"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
LINE_FORMAT = "%(asctime)s %(message)s"
_OWNER = "resnetlab_runlog"  # the record attribute naming the RunLog that wrote it


class _OthersOnly(logging.Filter):
    """Lets through the library's ordinary records and keeps out every RunLog's lines: a RunLog writes its own
    lines into its file itself, and a run nested in another (a tune's trials) keeps its lines out of the outer
    log, as each run always had its own file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not hasattr(record, _OWNER)


class RunLog:
    """Log lines of one run into ``path`` and, unless ``quiet``, onto the ``resnetlab.run`` logger.

    Example:
        >>> log = RunLog(None)
        >>> log("checking the data")            # kept until a file is attached
        >>> log.attach(Path("runs/x/train.log"))  # doctest: +SKIP
        >>> log.close()
    """

    def __init__(self, path: Path | None = None, *, quiet: bool = False, enabled: bool = True):
        self.path = path
        self.quiet = quiet
        self.enabled = enabled  # False on non-zero ranks of a distributed run
        self._handler: logging.FileHandler | None = None
        self._pending: list[logging.LogRecord] = []  # lines logged before a file was attached
        if path is not None:
            self.attach(path)

    def attach(self, path: Path) -> None:
        """Write to ``path`` from now on, starting with the lines logged so far: a run checks its config and data
        (and logs what it finds) before it creates its directory."""
        self.path = path
        if not self.enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter(LINE_FORMAT, TIME_FORMAT))
        handler.addFilter(_OthersOnly())
        self._handler = handler
        for record in self._pending:
            self._write(record)
        self._pending = []
        logging.getLogger(LIBRARY_LOGGER).addHandler(handler)

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        record = logger.makeRecord(logger.name, logging.INFO, "(run log)", 0, message, None, None,
                                   extra={_OWNER: id(self)})
        if self._handler is not None:
            self._write(record)
        elif self.path is None:
            self._pending.append(record)
        if not self.quiet and logger.isEnabledFor(logging.INFO):
            logger.handle(record)

    def _write(self, record: logging.LogRecord) -> None:
        # Past the handler's filter, which is there for the records that reach it through the logger.
        handler = self._handler
        handler.acquire()
        try:
            handler.emit(record)
        finally:
            handler.release()

    def close(self) -> None:
        if self._handler is not None:
            logging.getLogger(LIBRARY_LOGGER).removeHandler(self._handler)
            self._handler.close()
            self._handler = None
