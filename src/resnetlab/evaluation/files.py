"""Atomic writers and plain readers for the JSON/CSV/NPZ files of a run or evaluation directory.

Every file is first written to a temporary file in the destination folder and then moved over the target with
``os.replace``, so an interrupted run never leaves a half-written ``metrics.json`` that a later ``report`` or
``compare`` would misread.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# mkstemp creates files readable by the owner only; results should get the permissions of any other new file.
_FILE_MODE = 0o666 & ~_current_umask()


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.chmod(tmp_name, _FILE_MODE)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return _atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_safe(value: Any) -> Any:
    """Numpy scalars/arrays to Python types; NaN/inf to None so the file stays strict JSON."""
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    text = json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _format_cell(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        # repr keeps full precision, so numbers read back from the CSV equal the ones computed.
        return "" if not math.isfinite(value) else repr(value)
    return "" if value is None else value


def write_csv(path: Path, rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str]) -> Path:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({name: _format_cell(row.get(name)) for name in fieldnames})
    return atomic_write_text(path, buffer.getvalue())


def write_csv_rows(path: Path, header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> Path:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_format_cell(value) for value in row])
    return atomic_write_text(path, buffer.getvalue())


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def to_float(text: str | None) -> float:
    """A CSV cell as a float; empty or missing cells become NaN."""
    if text is None or text == "":
        return float("nan")
    return float(text)


def read_csv_columns(path: Path) -> dict[str, np.ndarray]:
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


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    # np.savez appends ".npz" to string paths; writing through a file handle keeps the exact temp name.
    return _atomic_write(path, lambda handle: np.savez_compressed(handle, **arrays))
