"""Helpers shared by the format readers."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from resnetlab.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def require_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{what} '{path}' does not exist; check the path in --data")
    if not path.is_dir():
        raise DataError(f"{what} '{path}' is not a folder; check the path in --data")
    return path


def is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


@dataclass
class IgnoredFiles:
    """What a folder scan passed over, so that the log can say so (nothing is left out silently)."""

    hidden: int = 0
    non_image: int = 0

    def add(self, other: IgnoredFiles) -> None:
        self.hidden += other.hidden
        self.non_image += other.non_image

    def note(self, where: Path) -> str | None:
        parts = []
        if self.non_image:
            parts.append(f"{self.non_image} non-image file(s)")
        if self.hidden:
            parts.append(f"{self.hidden} hidden file(s) or folder(s)")
        return f"ignored {' and '.join(parts)} under {where}" if parts else None


def scan_images(folder: Path) -> tuple[list[Path], IgnoredFiles]:
    """Image files below ``folder`` (recursively, sorted by path) and a count of what was passed over.

    Hidden entries (``.DS_Store``, ``.ipynb_checkpoints/``, AppleDouble ``._x.jpg``) are skipped with everything
    below them; files whose suffix is not an image format are skipped. Whether an image file can actually be
    decoded is checked later, where ``data.on_bad_image`` decides what happens.
    """
    images, ignored = [], IgnoredFiles()
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).parts
        if any(part.startswith(".") for part in relative):
            # Count each hidden entry once: the top-most hidden part, not every file inside a hidden folder.
            if relative[-1].startswith(".") and not any(part.startswith(".") for part in relative[:-1]):
                ignored.hidden += 1
            continue
        if path.is_file():
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(path)
            else:
                ignored.non_image += 1
    return images, ignored


def resolve_listed(base: Path, listed: str) -> Path | None:
    """A path cell of an annotation CSV, resolved against ``base``; None when it cannot name a file (a NUL
    character, a symlink loop)."""
    if "\x00" in listed:
        return None
    try:
        return (base / listed).resolve()
    except (OSError, ValueError, RuntimeError):  # RuntimeError: a symlink loop, on Pythons before 3.13
        return None


# Box coordinates are pixel positions: anything outside this range is not one (and would overflow an int64 table).
COORDINATE_LIMIT = 2**31


def list_images(folder: Path) -> tuple[list[Path], int]:
    """Image files below ``folder`` (recursively, sorted) and the number of files that were ignored."""
    images, ignored = scan_images(folder)
    return images, ignored.hidden + ignored.non_image


def describe_paths(paths: list[str], limit: int = 5) -> str:
    shown = "; ".join(paths[:limit])
    return shown + (f"; and {len(paths) - limit} more" if len(paths) > limit else "")


def sniff_delimiter(header_line: str) -> str:
    """``,`` (Kaggle GTSRB, most CSVs), ``;`` (official GTSRB) or a tab, from the header line."""
    try:
        return csv.Sniffer().sniff(header_line, delimiters=",;\t").delimiter
    except csv.Error:
        return ","


def read_csv_rows(path: Path, *, delimiter: str | None = None) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a small annotation CSV, with a :class:`DataError` naming the file when it is unusable."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: Excel writes a byte-order mark before the header
    except FileNotFoundError:
        raise DataError(f"CSV file '{path}' does not exist; check the path") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text CSV file (it is not UTF-8)") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"{path}: the file is empty; it needs a header row and one row per image")
    reader = csv.DictReader(lines, delimiter=delimiter or sniff_delimiter(lines[0]), skipinitialspace=True)
    try:
        columns = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        rows = [row for row in reader if any((v or "").strip() for v in row.values() if isinstance(v, str))]
    except csv.Error as err:  # a field over the csv module's size limit, a stray NUL ...
        raise DataError(f"{path}: not a readable CSV file after line {reader.line_num} ({err}); fix the file") from None
    if not rows:
        raise DataError(f"{path}: has a header but no rows")
    return columns, rows
