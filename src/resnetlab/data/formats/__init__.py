"""Readers, one per dataset format, each turning a folder or file into a :class:`DatasetSource`.

A reader is registered under the prefix of the ``--data`` spec it handles (``gtsrb:PATH``, ``folder:PATH`` ...)
and is called as ``reader(argument, data_config)``.
"""

from __future__ import annotations

from resnetlab.data.formats._registry import _READER_HELP, _READERS, DatasetReader, register_format

__all__ = ["DatasetReader", "dataset_formats", "get_reader", "register_format"]


def dataset_formats() -> dict[str, str]:
    _import_all()
    return dict(_READER_HELP)


def get_reader(prefix: str) -> DatasetReader | None:
    _import_all()
    return _READERS.get(prefix)


def _import_all() -> None:
    # Importing a format module registers it; done lazily so that `resnetlab --help` stays fast.
    from resnetlab.data.formats import cifar, csvfile, folder, gtsrb, synthetic  # noqa: F401
