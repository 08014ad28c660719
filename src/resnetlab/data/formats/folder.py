"""``folder:PATH``: one sub-folder per class, or split sub-folders (train/val/test and aliases) holding them.

Class order follows ``classes.txt`` when the folder has one (one name per line), else sorted folder names as in
torchvision's ``ImageFolder``. ``class_names.tsv`` (``folder<TAB>readable name``) supplies readable names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from resnetlab.config import DataConfig
from resnetlab.data.formats import register_format
from resnetlab.data.formats.common import list_images, require_dir
from resnetlab.data.records import DatasetSource, SampleTable
from resnetlab.errors import DataError

SPLIT_ALIASES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}


def find_split_dirs(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    children = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            if alias in children:
                found[split] = children[alias]
                break
    return found


def _class_order(root: Path, class_dirs: list[str]) -> list[str]:
    listing = root / "classes.txt"
    if listing.is_file():
        order = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        unknown = sorted(set(class_dirs) - set(order))
        if unknown:
            raise DataError(f"{listing}: does not list the class folder(s) {unknown}; add them or remove the file")
        return [name for name in order if name in class_dirs]
    return sorted(class_dirs)


def _readable_names(root: Path, class_ids: list[str]) -> list[str]:
    table = root / "class_names.tsv"
    if not table.is_file():
        return list(class_ids)
    mapping = dict(line.split("\t", 1) for line in table.read_text().splitlines() if "\t" in line)
    return [mapping.get(cid, cid).strip() for cid in class_ids]


def read_class_folders(root: Path, spec: str) -> DatasetSource:
    root = require_dir(root, "image folder")
    split_dirs = find_split_dirs(root)
    if split_dirs and "train" not in split_dirs:
        raise DataError(f"'{root}' has {'/'.join(p.name for p in split_dirs.values())} but no train/ folder; "
                        "add train/ (or training/) with one sub-folder per class")
    per_split_roots = split_dirs or {"train": root}
    class_dirs = sorted(p.name for p in per_split_roots["train"].iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"'{per_split_roots['train']}' has no class sub-folders; put each class's images in its own folder")
    class_ids = _class_order(root, class_dirs)
    index_of = {name: i for i, name in enumerate(class_ids)}
    tables, notes, ignored_total = {}, [], 0
    for split, split_root in per_split_roots.items():
        paths, labels = [], []
        for class_dir in sorted(p for p in split_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if class_dir.name not in index_of:
                raise DataError(f"'{class_dir}' is a class the train split does not have; rename or remove it")
            images, ignored = list_images(class_dir)
            ignored_total += ignored
            paths += [str(p.resolve()) for p in images]
            labels += [index_of[class_dir.name]] * len(images)
        tables[split] = SampleTable(paths, np.asarray(labels, dtype=np.int64))
    empty = [class_ids[i] for i, n in enumerate(tables["train"].class_counts(len(class_ids))) if n == 0]
    if empty:
        raise DataError(f"'{per_split_roots['train']}': class folder(s) {empty} hold no images; add images or remove them")
    if ignored_total:
        notes.append(f"ignored {ignored_total} non-image file(s) under {root}")
    return DatasetSource(spec=spec, root=root, class_ids=list(class_ids),
                         class_names=_readable_names(root, class_ids), splits=tables, notes=notes)


@register_format("folder", "class sub-folders, or train/val/test sub-folders holding class sub-folders")
def open_folder(argument: str, cfg: DataConfig) -> DatasetSource:
    return read_class_folders(Path(argument).expanduser(), f"folder:{argument}")
