"""GTSRB's annotation files, shared by both layouts (:mod:`.gtsrb` for Kaggle's, :mod:`.gtsrb_official` for the
benchmark archives'): reading a CSV of ROI boxes and ClassIds, tracks from file names, and relabelling ClassIds."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from resnetlab.data.formats.common import COORDINATE_LIMIT, read_csv_rows, resolve_listed
from resnetlab.data.gtsrb_classes import GTSRB_CLASS_NAMES, GTSRB_MIRROR_PAIRS
from resnetlab.data.records import BadImage, DatasetSource, SampleTable
from resnetlab.errors import DataError

ROI_COLUMNS = ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2")
REQUIRED_COLUMNS = (*ROI_COLUMNS, "ClassId", "Path")
_KAGGLE_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)\.\w+$")  # <ClassId>_<track>_<frame>.png
OFFICIAL_NAME = re.compile(r"^(\d+)_(\d+)\.\w+$")  # <track>_<frame>.ppm, in the class's folder


def read_gtsrb_csv(csv_path: Path, base: Path, *, path_column: str = "Path", delimiter: str | None = None,
                   rejected: list[BadImage] | None = None) -> tuple[SampleTable, list[int]]:
    """Read one GTSRB annotation file into a table whose labels are still raw ClassIds (mapped later).

    Paths in ``path_column`` are relative to ``base``. Unusable rows go to ``rejected`` when a list is given, else
    the first one raises a :class:`DataError`. A missing column is always an error: the file cannot be read at all.
    """
    columns, rows = read_csv_rows(csv_path, delimiter=delimiter)
    required = (*ROI_COLUMNS, "ClassId", path_column)
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)}; a GTSRB CSV needs "
                        f"{','.join(required)} (found: {','.join(columns) or 'nothing'})")
    collect = rejected if rejected is not None else []
    paths, class_ids, rois, groups = [], [], [], []
    for line_no, row in enumerate(rows, start=2):
        listed = (row[path_column] or "").strip()
        path = resolve_listed(base, listed)
        if path is None:
            collect.append(BadImage(str(base / f"<{path_column} on line {line_no}>"),
                                    f"{csv_path.name} line {line_no}: {path_column} {listed!r} is not a file name"))
            continue
        try:
            class_id = int(row["ClassId"])
            box = [int(row[c]) for c in ROI_COLUMNS]
            if any(abs(value) >= COORDINATE_LIMIT for value in box):
                raise ValueError("not a pixel coordinate")
        except (TypeError, ValueError):
            collect.append(BadImage(str(path), f"{csv_path.name} line {line_no}: ClassId and Roi.* must be integers "
                                               f"(ClassId={row.get('ClassId')!r})"))
            continue
        try:
            group = _track_of(row, path, class_id)
        except ValueError:
            collect.append(BadImage(str(path), f"{csv_path.name} line {line_no}: Track must be an integer "
                                               f"(Track={row.get('Track')!r})"))
            continue
        if not 0 <= class_id < len(GTSRB_CLASS_NAMES):
            collect.append(BadImage(str(path), f"{csv_path.name} line {line_no}: ClassId {class_id} is not a GTSRB "
                                               f"class (0-{len(GTSRB_CLASS_NAMES) - 1})"))
            continue
        if not path.is_file():
            collect.append(BadImage(str(path), f"listed in {csv_path.name} (line {line_no}) but the file does not exist"))
            continue
        paths.append(str(path))
        class_ids.append(class_id)
        rois.append(box)
        groups.append(group)
    if rejected is None and collect:
        raise DataError(f"{csv_path}: {collect[0].reason}: {collect[0].path}")
    has_groups = bool(groups) and all(g is not None for g in groups)
    table = SampleTable(paths, np.asarray(class_ids, dtype=np.int64), np.asarray(rois, dtype=np.int64).reshape(-1, 4),
                        np.asarray(groups) if has_groups else None)
    return table, class_ids


def _track_of(row: dict[str, str], path: Path, class_id: int) -> str | None:
    if (row.get("Track") or "").strip():
        return f"{class_id}_{int(row['Track'])}"
    match = _KAGGLE_NAME.match(path.name)
    if match and int(match.group(1)) == class_id:
        return f"{class_id}_{int(match.group(2))}"
    match = OFFICIAL_NAME.match(path.name)
    if match and path.parent.name.isdecimal() and int(path.parent.name) == class_id:
        return f"{class_id}_{int(match.group(1))}"
    return None


def gtsrb_class_name(class_id: int) -> str:
    return GTSRB_CLASS_NAMES[class_id] if 0 <= class_id < len(GTSRB_CLASS_NAMES) else f"class {class_id}"


def source_from_class_id_tables(spec: str, root: Path, tables: dict[str, SampleTable],
                                rejected: dict[str, list[BadImage]] | None = None) -> DatasetSource:
    """Relabel tables holding raw ClassIds to indices 0..k-1 over the ClassIds of the training split.

    Samples of another split whose ClassId the training split lacks cannot be learned: they are rejected (or, when
    no ``rejected`` dict is given, raise a :class:`DataError`).
    """
    if len(tables["train"]) == 0:
        raise DataError(f"{spec}: the training split holds no usable image"
                        + (f" ({len(rejected.get('train', []))} row(s) rejected, e.g. {rejected['train'][0].reason})"
                           if rejected and rejected.get("train") else ""))
    class_ids = sorted(set(tables["train"].labels.tolist()))
    index_of = {cid: i for i, cid in enumerate(class_ids)}
    for name, table in tables.items():
        known = np.asarray([c in index_of for c in table.labels.tolist()], dtype=bool)
        if not known.all():
            unknown = sorted(set(table.labels[~known].tolist()))
            if rejected is None:
                raise DataError(f"{spec}: the {name} split has ClassId(s) {unknown} that the training split lacks")
            for i in np.flatnonzero(~known):
                rejected.setdefault(name, []).append(
                    BadImage(table.paths[i], f"ClassId {int(table.labels[i])} has no training images"))
            table = table.subset(np.flatnonzero(known))
            tables[name] = table
        table.labels = np.asarray([index_of[c] for c in table.labels.tolist()], dtype=np.int64)
    present = set(class_ids)
    return DatasetSource(spec=spec, root=root, class_ids=list(class_ids),
                         class_names=[gtsrb_class_name(c) for c in class_ids], splits=tables,
                         group_kind="track" if tables["train"].groups is not None else None,
                         rejected=dict(rejected or {}),
                         mirror_pairs=tuple((a, b) for a, b in GTSRB_MIRROR_PAIRS if a in present and b in present))
