"""``csv:FILE``: images listed in a CSV file, e.g. a second test set from another source.

Columns (names are matched ignoring case and ``._-`` and spaces, so ``ClassId``, ``class_id`` and ``classid`` are
the same):

=================  =====================================================================================
``Path``           the image file, relative to the CSV's folder or absolute (also ``Filename``, ``File``)
``ClassId``        an integer class id (also ``label_id``, ``target``)
``ClassName``      a class name (also ``class``, ``label``, ``label_name``); needed when there is no ClassId
``Roi.X1..Y2``     optional box (inclusive corners, GTSRB's convention), all four or none; empty = no box
``Group``          optional group id (also ``Track``): samples that must stay on one side of a split
``Split``          optional ``train`` / ``val`` / ``test`` per row; without it every row is in ``train``
``Width,Height``   optional, ignored (the image file is the truth)
=================  =====================================================================================

Class ids and names: with a ClassId column the ids are those integers, named by the ClassName column when there
is one and by the id itself otherwise (``"14"``); with only a name column the names are the ids. ``evaluate`` maps
a CSV's classes to a model's classes by id first and by name second, so a test set labelled with GTSRB ClassIds
meets a GTSRB model's classes without needing names. A ``label`` column holding only integers is read as ids.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from resnetlab.config import DataConfig
from resnetlab.data.formats._registry import register_format
from resnetlab.data.formats.common import COORDINATE_LIMIT, read_csv_rows, resolve_listed
from resnetlab.data.records import BadImage, DatasetSource, SampleTable
from resnetlab.errors import DataError

PATH_KEYS = ("path", "filename", "file", "filepath", "image", "imagepath")
ID_KEYS = ("classid", "labelid", "target")
NAME_KEYS = ("classname", "labelname", "class", "label", "name")
GROUP_KEYS = ("group", "groupid", "track")
SPLIT_KEYS = ("split", "subset")
ROI_KEYS = ("roix1", "roiy1", "roix2", "roiy2")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}


def _key(column: str) -> str:
    return re.sub(r"[^a-z0-9]", "", column.lower())


def _find(columns: dict[str, str], keys: tuple[str, ...]) -> str | None:
    return next((columns[k] for k in keys if k in columns), None)


def _is_int(text: str) -> bool:
    # At most 18 digits: an int64, and far below the length Python refuses to convert.
    return re.fullmatch(r"[+-]?[0-9]{1,18}", text.strip()) is not None


def read_csv_dataset(csv_path: Path, spec: str) -> DatasetSource:
    header, rows = read_csv_rows(csv_path)
    columns = {_key(c): c for c in header}
    path_col = _find(columns, PATH_KEYS)
    id_col = _find(columns, ID_KEYS)
    name_col = _find(columns, NAME_KEYS)
    group_col = _find(columns, GROUP_KEYS)
    split_col = _find(columns, SPLIT_KEYS)
    roi_cols = [columns.get(k) for k in ROI_KEYS]
    if path_col is None or (id_col is None and name_col is None):
        needed = [what for what, col in (("Path", path_col), ("ClassId or ClassName", id_col or name_col)) if col is None]
        raise DataError(f"{csv_path}: missing column(s) {' and '.join(needed)}; a dataset CSV needs Path and ClassId "
                        f"(or a class name column), optional Roi.X1,Roi.Y1,Roi.X2,Roi.Y2, Group, Split "
                        f"(found: {','.join(header) or 'nothing'})")
    if any(roi_cols) and not all(roi_cols):
        raise DataError(f"{csv_path}: has only some of Roi.X1,Roi.Y1,Roi.X2,Roi.Y2; give all four or none")
    if id_col is None and _key(name_col) == "label" and all(_is_int(r.get(name_col) or "") for r in rows):
        id_col, name_col = name_col, None  # a 'label' column of integers holds class ids

    base = csv_path.parent
    rejected: dict[str, list[BadImage]] = {}
    names_of: dict[int | str, str] = {}
    entries: dict[str, list[tuple[str, int | str, list[int], str | None]]] = {}
    for line_no, row in enumerate(rows, start=2):
        raw_path = (row.get(path_col) or "").strip()
        path = resolve_listed(base, raw_path) if raw_path else base / f"<empty Path on line {line_no}>"
        if path is None:
            rejected.setdefault("train", []).append(BadImage(
                str(base / f"<Path on line {line_no}>"), f"line {line_no}: Path {raw_path!r} is not a file name"))
            continue
        split = "train"
        if split_col is not None:
            split = SPLIT_NAMES.get((row.get(split_col) or "").strip().lower(), "")
            if not split:
                rejected.setdefault("train", []).append(BadImage(
                    str(path), f"line {line_no}: Split {row.get(split_col)!r} is not train, val or test"))
                continue
        bad = rejected.setdefault(split, [])
        if not raw_path:
            bad.append(BadImage(str(path), f"line {line_no}: the Path cell is empty"))
            continue
        name = (row.get(name_col) or "").strip() if name_col else ""
        if id_col is not None:
            text = (row.get(id_col) or "").strip()
            if not _is_int(text):
                bad.append(BadImage(str(path), f"line {line_no}: {id_col} {text!r} is not an integer class id"))
                continue
            class_id: int | str = int(text)
            if name:
                known = names_of.setdefault(class_id, name)
                if known != name:
                    raise DataError(f"{csv_path}, line {line_no}: class id {class_id} is named {name!r} here but "
                                    f"{known!r} earlier; one id needs one name")
        else:
            if not name:
                bad.append(BadImage(str(path), f"line {line_no}: the {name_col} cell is empty"))
                continue
            class_id = name
        box = [-1, -1, -1, -1]
        if all(roi_cols):
            cells = [(row.get(c) or "").strip() for c in roi_cols]
            if any(cells):
                if not all(_is_int(c) and abs(int(c)) < COORDINATE_LIMIT for c in cells):
                    bad.append(BadImage(str(path), f"line {line_no}: Roi values {cells} are not four pixel "
                                                   "coordinates (integers)"))
                    continue
                box = [int(c) for c in cells]
        if not path.is_file():
            bad.append(BadImage(str(path), f"listed in {csv_path.name} (line {line_no}) but the file does not exist"))
            continue
        group = (row.get(group_col) or "").strip() if group_col else None
        entries.setdefault(split, []).append((str(path), class_id, box, group if group else f"line-{line_no}"))

    if not entries.get("train"):
        raise DataError(f"{csv_path}: no usable training row (rows with Split=train, or all rows without a Split "
                        f"column){_first_reason(rejected)}")
    class_ids = sorted({e[1] for e in entries["train"]}, key=lambda c: (isinstance(c, str), c))
    index_of = {cid: i for i, cid in enumerate(class_ids)}
    tables = {}
    for split, items in entries.items():
        keep = []
        for path, class_id, box, group in items:
            if class_id not in index_of:
                rejected.setdefault(split, []).append(BadImage(path, f"class {class_id!r} has no training rows"))
            else:
                keep.append((path, index_of[class_id], box, group))
        tables[split] = SampleTable([k[0] for k in keep], np.asarray([k[1] for k in keep], dtype=np.int64),
                                    np.asarray([k[2] for k in keep], dtype=np.int64).reshape(-1, 4) if all(roi_cols) else None,
                                    np.asarray([k[3] for k in keep]) if group_col else None)
    notes = []
    if group_col:
        ungrouped = sum(1 for items in entries.values() for e in items if e[3].startswith("line-"))
        if ungrouped:
            notes.append(f"{csv_path.name}: {ungrouped} row(s) with an empty {group_col} are groups of their own")
    return DatasetSource(spec=spec, root=base, class_ids=list(class_ids),
                         class_names=[names_of.get(c, str(c)) for c in class_ids], splits=tables,
                         group_kind=_key(group_col) if group_col else None,
                         rejected={k: v for k, v in rejected.items() if v}, notes=notes)


def _first_reason(rejected: dict[str, list[BadImage]]) -> str:
    first = next((b for bad in rejected.values() for b in bad), None)
    return f"; first problem: {first.reason}" if first else ""


@register_format("csv", "a CSV listing images: Path, ClassId and/or ClassName, optional Roi.*, Group, Split")
def open_csv(argument: str, cfg: DataConfig) -> DatasetSource:
    path = Path(argument).expanduser()
    if path.is_dir():
        raise DataError(f"csv:{argument} is a folder; give the CSV file itself (or use folder:{argument})")
    return read_csv_dataset(path, f"csv:{argument}")
