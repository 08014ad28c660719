"""Where the library's log goes when it runs as the ``resnetlab`` command: stderr, one plain line per record.

The library only logs (loggers under ``resnetlab.``); a command shows those records on the console, as
:func:`console_logging` sets up for the duration of one command. The lines look as they always did (the message
alone, no time or level column, nothing wrapped), so that they can be read, grepped and copied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from rich.console import Console

LIBRARY_LOGGER = "resnetlab"


class ConsoleHandler(logging.Handler):
    """Prints each record's message on stderr through rich (so it appears above a live progress bar)."""

    def __init__(self, level: int = logging.INFO):
        super().__init__(level)
        # No file given: rich looks sys.stderr up at each print, so a redirected stderr (pytest, a Live display) is
        # the one written to.
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno >= logging.WARNING and not message.startswith(("warning", "error")):
                message = f"{record.levelname.lower()}: {message}"
            self.console.print(message, markup=False)
        except Exception:  # logging must never break the command: report it the standard way
            self.handleError(record)


def console_logging(level: int = logging.INFO) -> Callable[[], None]:
    """Show the library's log records of ``level`` and above on stderr; returns the function that undoes it.

    Calling it again replaces the earlier console handler instead of adding a second one.

    Example:
        >>> undo = console_logging()
        >>> logging.getLogger("resnetlab.jobs").info("shown on stderr")  # doctest: +SKIP
        >>> undo()
    """
    logger = logging.getLogger(LIBRARY_LOGGER)
    for handler in [h for h in logger.handlers if isinstance(h, ConsoleHandler)]:
        logger.removeHandler(handler)
    handler = ConsoleHandler(level)
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level, previous_level) if previous_level else level)

    def undo() -> None:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)

    return undo
