"""``gtsrb:PATH``: the German Traffic Sign Recognition Benchmark, in either public layout (detected automatically).

* Kaggle layout: ``Train.csv`` (and optionally ``Test.csv``) beside ``Train/<ClassId>/*.png``. Columns
  ``Width,Height,Roi.X1,Roi.Y1,Roi.X2,Roi.Y2,ClassId,Path`` with paths relative to the folder, and optionally
  ``Track``. Training files are named ``<ClassId>_<track>_<frame>.png``.
* Official layout (``Final_Training/Images/000NN/GT-000NN.csv``, ``.ppm`` files, ``;``-separated): see
  :mod:`resnetlab.data.formats.gtsrb_official`, which also downloads it (``data.download=true``).

A track is the ~30 frames of one physical sign, so it is the group that a validation split must keep whole. Class
ids are GTSRB's 0-42 and the class names are built in. Rows that cannot be used (a listed file that is missing, a
ClassId that is not a GTSRB class or not a number) are collected in ``DatasetSource.rejected``: ``open_dataset``
then stops with their list, or leaves them out and records them under ``data.on_bad_image=skip``.
"""

from __future__ import annotations

from pathlib import Path

from resnetlab.config import DataConfig
from resnetlab.data.formats._registry import register_format
from resnetlab.data.formats.common import require_dir
from resnetlab.data.formats.gtsrb_official import download_gtsrb, find_official_layout, read_gtsrb_official
from resnetlab.data.formats.gtsrb_tables import read_gtsrb_csv, source_from_class_id_tables
from resnetlab.data.records import BadImage, DatasetSource
from resnetlab.errors import DataError

def read_gtsrb_kaggle(root: Path, spec: str) -> DatasetSource:
    rejected: dict[str, list[BadImage]] = {}
    tables = {"train": read_gtsrb_csv(root / "Train.csv", root, rejected=rejected.setdefault("train", []))[0]}
    if (root / "Test.csv").is_file():
        test = read_gtsrb_csv(root / "Test.csv", root, rejected=rejected.setdefault("test", []))[0]
        test.groups = None  # test tracks are not used for splitting
        tables["test"] = test
    return source_from_class_id_tables(spec, root, tables, {k: v for k, v in rejected.items() if v})


@register_format("gtsrb", "GTSRB folder: Kaggle layout (Train.csv, Train/<id>/*.png, optional Test.csv) or the "
                          "official one (Final_Training/Images/000NN/GT-000NN.csv, Final_Test/Images)")
def open_gtsrb(argument: str, cfg: DataConfig) -> DatasetSource:
    root = Path(argument).expanduser()
    spec = f"gtsrb:{argument}"
    if cfg.download and not (root / "Train.csv").is_file() and (not root.is_dir() or find_official_layout(root) is None):
        download_gtsrb(root)
    require_dir(root, "GTSRB folder")
    if (root / "Train.csv").is_file():
        return read_gtsrb_kaggle(root, spec)
    if find_official_layout(root) is not None:
        return read_gtsrb_official(root, spec, cfg)
    raise DataError(f"GTSRB folder '{root}' has no Train.csv (Kaggle layout) nor Final_Training/Images (official "
                    "layout); point --data gtsrb:PATH at the folder that holds them, or add data.download=true")
