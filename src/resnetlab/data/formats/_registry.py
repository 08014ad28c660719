"""The registry of dataset readers: each format module registers its reader here, under its ``--data`` prefix.

Apart from the package's ``__init__`` so that a format module can register itself without importing the package
that imports it.
"""

from __future__ import annotations

from collections.abc import Callable

from resnetlab.config import DataConfig
from resnetlab.data.records import DatasetSource

DatasetReader = Callable[[str, DataConfig], DatasetSource]
_READERS: dict[str, DatasetReader] = {}
_READER_HELP: dict[str, str] = {}


def register_format(prefix: str, help_text: str) -> Callable[[DatasetReader], DatasetReader]:
    def decorate(reader: DatasetReader) -> DatasetReader:
        _READERS[prefix] = reader
        _READER_HELP[prefix] = help_text
        return reader

    return decorate
