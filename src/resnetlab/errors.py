"""User-facing errors.

Anything a user can cause (a missing folder, a corrupt image, an unknown config key, a checkpoint from another
model) is raised as a :class:`ResnetlabError` whose message is one line naming the file, field or value at fault
and saying what to do. The CLI prints that line to stderr and exits with code 2; it never shows a traceback for
these. Bugs in resnetlab itself stay ordinary exceptions so that they do show a traceback.
"""


class ResnetlabError(Exception):
    """An error caused by the user's input; ``str(err)`` is the one line to show them."""


class ConfigError(ResnetlabError):
    """A bad recipe, flag or ``KEY=VALUE`` override."""


class DataError(ResnetlabError):
    """A dataset that cannot be found, parsed or decoded."""


class CheckpointError(ResnetlabError):
    """A checkpoint that is missing, unreadable or does not match what it is used for."""


class ExportError(ResnetlabError):
    """An export that could not be made or failed its parity check."""


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when it has none), for a one-line error."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:limit]
