"""Helpers shared by the format readers."""

from __future__ import annotations

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


def list_images(folder: Path) -> tuple[list[Path], int]:
    """Image files below ``folder`` (recursively, sorted) and the number of non-image files that were ignored."""
    images, ignored = [], 0
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.is_file():
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(path)
            else:
                ignored += 1
    return images, ignored
