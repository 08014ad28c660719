"""Reading and writing a run's files. Every write is atomic: a temporary file in the same folder, then a rename.

A rename within one file system is atomic, so a reader (or a run killed mid-write) sees either the old file or the
complete new one, never a truncated ``metrics.json`` or checkpoint that a later ``report`` or ``--resume`` would
misread.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# mkstemp creates files readable by the owner only; results get the permissions of any other new file.
_FILE_MODE = 0o666 & ~_current_umask()


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success it is synced and renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_write(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


write_text = atomic_write_text


def _json_safe(value: Any) -> Any:
    """Numpy scalars/arrays to Python types, paths to strings, NaN/inf to None so the file stays strict JSON."""
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")


def read_json(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _format_cell(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        # repr keeps full precision, so numbers read back from the CSV equal the ones computed.
        return "" if not math.isfinite(value) else repr(value)
    return "" if value is None else value


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str], *,
              lineterminator: str = "\n") -> Path:
    """Rows (dicts; missing keys and None are empty cells, other keys ignored) under a header, written atomically."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames), lineterminator=lineterminator)
    writer.writeheader()
    for row in rows:
        writer.writerow({name: _format_cell(row.get(name)) for name in fieldnames})
    return atomic_write_text(path, buffer.getvalue())


def write_csv_rows(path: str | Path, header: Sequence[Any], rows: Iterable[Sequence[Any]], *,
                   lineterminator: str = "\n") -> Path:
    """Rows (sequences) under a header, written atomically. ``lineterminator="\r\n"`` keeps the files that were
    written with the csv module's default line ending byte for byte as they were."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator=lineterminator)
    writer.writerow(header)
    for row in rows:
        writer.writerow([_format_cell(value) for value in row])
    return atomic_write_text(path, buffer.getvalue())


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def to_float(text: str | None) -> float:
    """A CSV cell as a float; empty or missing cells become NaN."""
    if text is None or text == "":
        return float("nan")
    return float(text)


def read_csv_columns(path: str | Path) -> dict[str, np.ndarray]:
    """A numeric CSV (e.g. ``metrics.csv``) as float arrays keyed by column; non-numeric columns stay strings."""
    rows = read_csv(path)
    if not rows:
        return {}
    columns: dict[str, np.ndarray] = {}
    for name in rows[0]:
        cells = [row.get(name) for row in rows]
        try:
            columns[name] = np.array([to_float(cell) for cell in cells], dtype=np.float64)
        except ValueError:
            columns[name] = np.array(["" if cell is None else cell for cell in cells], dtype=object)
    return columns


def write_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    # np.savez appends ".npz" to string paths; writing through the handle keeps the exact temporary name.
    with atomic_write(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return Path(path)


def torch_save(obj: Any, path: str | Path) -> None:
    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)
