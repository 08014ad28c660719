"""``resnetlab data split SRC --out DST``: turn a class-folder dataset into ``DST/train`` and ``DST/test``.

Each class's images are shuffled with the seed and ``round(n * test_fraction)`` of them go to ``test`` (at least one
on each side for a class of two or more images), so every class keeps its proportion. Files are hard-linked where
the file system allows it (no extra disk space, instant) and copied otherwise. ``classes.txt`` and
``class_names.tsv`` are carried over. The new folder appears in one rename when complete; an existing non-empty
``DST`` is never touched.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from resnetlab.data.formats.folder import find_split_dirs, read_class_folders
from resnetlab.errors import DataError

CARRIED_FILES = ("classes.txt", "class_names.tsv")


@dataclass
class FolderSplit:
    out: Path
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # class -> {"train": n, "test": n}
    linked: int = 0
    copied: int = 0
    notes: list[str] = field(default_factory=list)


def _place(source: Path, target: Path, result: FolderSplit) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
        result.linked += 1
    except OSError:  # another file system, or one without hard links: copy instead
        shutil.copy2(source, target)
        result.copied += 1


def split_class_folders(src: Path, dst: Path, *, test_fraction: float = 0.2, seed: int = 0) -> FolderSplit:
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not 0 < test_fraction < 1:
        raise DataError(f"--test-fraction {test_fraction}: give a fraction between 0 and 1, e.g. 0.2")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise DataError(f"--out '{dst}' exists and is not an empty folder; choose a new folder")
    if src.is_dir() and find_split_dirs(src):
        raise DataError(f"'{src}' is already split ({', '.join(p.name for p in find_split_dirs(src).values())}/); "
                        "point SRC at a folder with one sub-folder per class")
    source = read_class_folders(src, f"folder:{src}")
    if source.all_rejected():
        first = source.all_rejected()[0]
        raise DataError(f"'{src}': {len(source.all_rejected())} problem(s), e.g. {first.path}: {first.reason}; "
                        "fix them before splitting")
    table = source.splits["train"]
    root = Path(source.root).resolve()
    partial = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    result = FolderSplit(out=dst, notes=list(source.notes))
    rng = np.random.default_rng(seed)
    try:
        for index, class_id in enumerate(source.class_ids):
            members = np.flatnonzero(table.labels == index)
            order = members[rng.permutation(len(members))]
            n_test = int(round(len(order) * test_fraction))
            if len(order) >= 2:
                n_test = min(max(n_test, 1), len(order) - 1)
            else:
                n_test = 0
                result.notes.append(f"class '{class_id}' has a single image: it goes to train only")
            test_set = set(order[:n_test].tolist())
            for i in order.tolist():
                file = Path(table.paths[i])
                split = "test" if i in test_set else "train"
                try:
                    relative = file.relative_to(root)
                except ValueError:  # a class folder that is a link to elsewhere
                    relative = Path(str(class_id)) / file.name
                _place(file, partial / split / relative, result)
            result.counts[str(class_id)] = {"train": len(order) - n_test, "test": n_test}
        for name in CARRIED_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, partial / name)
        if dst.is_dir():
            dst.rmdir()  # empty (checked above): the rename needs the name free
        os.replace(partial, dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return result
