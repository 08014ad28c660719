"""GTSRB in the Kaggle layout: ``Train.csv`` (and optionally ``Test.csv``) beside ``Train/<ClassId>/*.png``.

Columns: ``Width,Height,Roi.X1,Roi.Y1,Roi.X2,Roi.Y2,ClassId,Path`` with paths relative to the folder, and
optionally ``Track``. Training files are named ``<ClassId>_<track>_<frame>.png``; a track is the ~30 frames of
one physical sign, so it is the group that a validation split must keep whole.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from resnetlab.config import DataConfig
from resnetlab.data.formats import register_format
from resnetlab.data.formats.common import require_dir
from resnetlab.data.gtsrb_classes import GTSRB_CLASS_NAMES
from resnetlab.data.records import DatasetSource, SampleTable
from resnetlab.errors import DataError

REQUIRED_COLUMNS = ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId", "Path")
_TRACK_IN_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)\.\w+$")


def read_gtsrb_csv(csv_path: Path, root: Path, *, delimiter: str = ",") -> tuple[SampleTable, list[int]]:
    """Read one GTSRB annotation file into a table whose labels are still raw ClassIds (mapped later)."""
    try:
        with open(csv_path, newline="") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            columns = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)}; a GTSRB CSV needs "
                                f"{','.join(REQUIRED_COLUMNS)} (found: {','.join(columns) or 'nothing'})")
            rows = list(reader)
    except UnicodeDecodeError:
        raise DataError(f"{csv_path}: not a text CSV file") from None
    if not rows:
        raise DataError(f"{csv_path}: has a header but no rows")
    paths, class_ids, rois, groups, missing_files = [], [], [], [], []
    for line_no, row in enumerate(rows, start=2):
        try:
            class_id = int(row["ClassId"])
            box = [int(row[c]) for c in REQUIRED_COLUMNS[:4]]
        except (TypeError, ValueError):
            raise DataError(f"{csv_path}, line {line_no}: ClassId and Roi.* must be integers "
                            f"(got ClassId={row.get('ClassId')!r})") from None
        path = (root / row["Path"]).resolve()
        if not path.is_file():
            missing_files.append(str(path))
        paths.append(str(path))
        class_ids.append(class_id)
        rois.append(box)
        groups.append(_track_of(row, path, class_id))
    if missing_files:
        shown = ", ".join(missing_files[:3]) + (f" and {len(missing_files) - 3} more" if len(missing_files) > 3 else "")
        raise DataError(f"{csv_path}: {len(missing_files)} listed file(s) do not exist: {shown}")
    has_groups = all(g is not None for g in groups)
    table = SampleTable(paths, np.asarray(class_ids), np.asarray(rois), np.asarray(groups) if has_groups else None)
    return table, class_ids


def _track_of(row: dict[str, str], path: Path, class_id: int) -> str | None:
    if row.get("Track") not in (None, ""):
        return f"{class_id}_{row['Track']}"
    match = _TRACK_IN_NAME.match(path.name)
    return f"{int(match.group(1))}_{int(match.group(2))}" if match else None


def gtsrb_class_name(class_id: int) -> str:
    return GTSRB_CLASS_NAMES[class_id] if 0 <= class_id < len(GTSRB_CLASS_NAMES) else f"class {class_id}"


def source_from_class_id_tables(spec: str, root: Path, tables: dict[str, SampleTable]) -> DatasetSource:
    """Relabel tables holding raw ClassIds to indices 0..k-1 over the ClassIds of the training split."""
    class_ids = sorted(set(tables["train"].labels.tolist()))
    index_of = {cid: i for i, cid in enumerate(class_ids)}
    for name, table in tables.items():
        unknown = sorted(set(table.labels.tolist()) - set(index_of))
        if unknown:
            raise DataError(f"{spec}: the {name} split has ClassId(s) {unknown} that the training split lacks")
        table.labels = np.asarray([index_of[c] for c in table.labels.tolist()], dtype=np.int64)
    return DatasetSource(spec=spec, root=root, class_ids=list(class_ids),
                         class_names=[gtsrb_class_name(c) for c in class_ids], splits=tables,
                         group_kind="track" if tables["train"].groups is not None else None)


def read_gtsrb_kaggle(root: Path, spec: str) -> DatasetSource:
    tables = {"train": read_gtsrb_csv(root / "Train.csv", root)[0]}
    if (root / "Test.csv").is_file():
        test = read_gtsrb_csv(root / "Test.csv", root)[0]
        test.groups = None  # test tracks are not used for splitting
        tables["test"] = test
    return source_from_class_id_tables(spec, root, tables)


@register_format("gtsrb", "GTSRB folder (Kaggle layout: Train.csv, Train/<id>/*.png, optional Test.csv)")
def open_gtsrb(argument: str, cfg: DataConfig) -> DatasetSource:
    root = require_dir(Path(argument).expanduser(), "GTSRB folder")
    if (root / "Train.csv").is_file():
        return read_gtsrb_kaggle(root, f"gtsrb:{argument}")
    try:  # the official layout (Final_Training/Images/000NN/GT-000NN.csv), where supported
        from resnetlab.data.formats.gtsrb_official import find_official_layout, read_gtsrb_official
    except ImportError:
        find_official_layout = None
    if find_official_layout is not None and find_official_layout(root) is not None:
        return read_gtsrb_official(root, f"gtsrb:{argument}", cfg)
    raise DataError(f"GTSRB folder '{root}' has no Train.csv (Kaggle layout) nor Final_Training/Images (official "
                    "layout); point --data gtsrb:PATH at the folder that holds them")
