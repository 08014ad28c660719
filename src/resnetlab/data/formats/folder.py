"""``folder:PATH``: one sub-folder per class, or split sub-folders (train/val/test and aliases) holding them.

Class order follows ``classes.txt`` when the folder has one (one name per line), else sorted folder names as in
torchvision's ``ImageFolder``. ``class_names.tsv`` supplies readable names: ``folder<TAB>name`` per line, or
``index<TAB>folder<TAB>name`` (imagenette's file). Hidden files and folders and files that are not images are
skipped and counted in the log. A class without images (an empty folder, or a ``classes.txt`` line without a
folder) and images of a class the train split lacks are rejected: ``data.on_bad_image`` decides whether that
stops the run or leaves them out with a record.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from resnetlab.config import DataConfig
from resnetlab.data.formats._registry import register_format
from resnetlab.data.formats.common import IMAGE_EXTENSIONS, IgnoredFiles, require_dir, scan_images
from resnetlab.data.records import BadImage, DatasetSource, SampleTable
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


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_listing(path: Path) -> str:
    """The text of classes.txt or class_names.tsv, or a DataError naming the file."""
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: editors on Windows write a byte-order mark
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file; save it as UTF-8 text, one class per line") from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror})") from None


def _class_order(root: Path, class_dirs: list[str]) -> list[str]:
    listing = root / "classes.txt"
    if listing.is_file():
        order = [line.strip() for line in _read_listing(listing).splitlines() if line.strip()]
        unknown = sorted(set(class_dirs) - set(order))
        if unknown:
            raise DataError(f"{listing}: does not list the class folder(s) {unknown}; add them or remove the file")
        if len(set(order)) != len(order):
            raise DataError(f"{listing}: lists a class twice; one line per class")
        return order
    return sorted(class_dirs)


def readable_names(root: Path, class_ids: list[str]) -> list[str]:
    """Names from ``class_names.tsv`` (``folder<TAB>name`` or ``index<TAB>folder<TAB>name``), else the ids."""
    table = root / "class_names.tsv"
    if not table.is_file():
        return list(class_ids)
    wanted = set(class_ids)
    mapping: dict[str, str] = {}
    for line in _read_listing(table).splitlines():
        cells = [c.strip() for c in line.split("\t")]
        # The folder is the cell that names a class folder; the readable name is the cell after it.
        for position, cell in enumerate(cells[:-1]):
            if cell in wanted and cells[position + 1]:
                mapping[cell] = cells[position + 1]
                break
    return [mapping.get(cid, cid) for cid in class_ids]


def read_class_folders(root: Path, spec: str) -> DatasetSource:
    root = require_dir(root, "image folder")
    split_dirs = find_split_dirs(root)
    if split_dirs and "train" not in split_dirs:
        raise DataError(f"'{root}' has {'/'.join(p.name for p in split_dirs.values())} but no train/ folder; "
                        "add train/ (or training/) with one sub-folder per class")
    per_split_roots = split_dirs or {"train": root}
    train_dirs = [p.name for p in _class_dirs(per_split_roots["train"])]
    if not train_dirs:
        raise DataError(f"'{per_split_roots['train']}' has no class sub-folders; put each class's images in its own folder")
    listed = _class_order(root, train_dirs)
    ignored, rejected, notes = IgnoredFiles(), {}, []
    found: dict[str, dict[str, list[Path]]] = {}
    for split, split_root in per_split_roots.items():
        found[split] = {}
        for class_dir in _class_dirs(split_root):
            images, passed_over = scan_images(class_dir)
            ignored.add(passed_over)
            found[split][class_dir.name] = images
        loose = [p for p in split_root.iterdir() if p.is_file() and not p.name.startswith(".")]
        loose_images = [p for p in loose if p.suffix.lower() in IMAGE_EXTENSIONS]
        if loose_images:
            notes.append(f"ignored {len(loose_images)} image(s) directly in {split_root} (outside any class folder)")
        ignored.non_image += len(loose) - len(loose_images)
    # A class with no training image cannot be learned: reject it (stop, or drop it with a record).
    class_ids = []
    for name in listed:
        if found["train"].get(name):
            class_ids.append(name)
            continue
        where = per_split_roots["train"] / name
        reason = "class folder holds no images" if where.is_dir() else "class listed in classes.txt has no folder"
        rejected.setdefault("train", []).append(BadImage(str(where), reason))
        for split in found:
            for path in found[split].get(name, []) if split != "train" else []:
                rejected.setdefault(split, []).append(BadImage(str(path.resolve()), f"class '{name}' has no training images"))
    if not class_ids:
        raise DataError(f"'{per_split_roots['train']}': no class folder holds an image file "
                        f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
    index_of = {name: i for i, name in enumerate(class_ids)}
    tables = {}
    for split, classes in found.items():
        paths, labels = [], []
        for name, images in classes.items():
            if name not in index_of:
                if name not in listed:  # a class the train split does not have at all
                    for path in images:
                        rejected.setdefault(split, []).append(
                            BadImage(str(path.resolve()), f"class folder '{name}' is not in the train split"))
                continue
            paths += [str(p.resolve()) for p in images]
            labels += [index_of[name]] * len(images)
        tables[split] = SampleTable(paths, np.asarray(labels, dtype=np.int64))
    note = ignored.note(root)
    if note:
        notes.append(note)
    return DatasetSource(spec=spec, root=root, class_ids=list(class_ids), class_names=readable_names(root, class_ids),
                         splits=tables, notes=notes, rejected=rejected)


@register_format("folder", "class sub-folders, or train/val/test sub-folders holding class sub-folders")
def open_folder(argument: str, cfg: DataConfig) -> DatasetSource:
    return read_class_folders(Path(argument).expanduser(), f"folder:{argument}")
