"""Readers, one per dataset format, each turning a folder or file into a :class:`DatasetSource`.

A reader is registered under the prefix of the ``--data`` spec it handles (``gtsrb:PATH``, ``folder:PATH`` ...)
and is called as ``reader(argument, data_config)``.
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


def dataset_formats() -> dict[str, str]:
    _import_all()
    return dict(_READER_HELP)


def get_reader(prefix: str) -> DatasetReader | None:
    _import_all()
    return _READERS.get(prefix)


def _import_all() -> None:
    # Importing a format module registers it; done lazily so that `resnetlab --help` stays fast.
    from resnetlab.data.formats import cifar, csvfile, folder, gtsrb, synthetic  # noqa: F401
