"""What the command line takes as images: files, folders (every image below them) and glob patterns."""

from __future__ import annotations

import glob
from pathlib import Path

from resnetlab.data.formats.common import IMAGE_EXTENSIONS, list_images


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files, folders (every image below them) and glob patterns -> a list of paths, in the order given."""
    paths: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += [str(p) for p in list_images(path)[0]]
        elif any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            paths += [m for m in matches if Path(m).suffix.lower() in IMAGE_EXTENSIONS]
        else:
            paths.append(item)  # a missing file is reported per file, not here
    return paths
