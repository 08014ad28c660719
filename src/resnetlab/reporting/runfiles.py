"""Read a run directory (or a bare evaluation directory) into plain Python data for reports and comparisons.

Everything is optional except that at least one of ``metrics.csv`` (training history) or ``metrics.json`` (an
evaluation) must exist: a report leaves out the sections whose files are missing.
"""

from __future__ import annotations

import csv
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from resnetlab.errors import ResnetlabError
from resnetlab.utils.io import read_csv, read_csv_columns, read_json, to_float
from resnetlab.evaluation.gradcam import GRADCAM_FILENAME, load_gradcam_npz


@dataclass
class Confusion:
    counts: np.ndarray
    row_names: list[str]
    col_names: list[str]


@dataclass
class RunFiles:
    """The parsed files of one run or evaluation directory; ``None`` where a file is absent."""

    root: Path
    eval_dir: Path | None
    config: dict[str, Any] | None = None
    run_info: dict[str, Any] | None = None
    history: dict[str, np.ndarray] | None = None
    metrics: dict[str, Any] | None = None
    per_class: list[dict[str, Any]] | None = None
    confusion: Confusion | None = None
    predictions: list[dict[str, str]] | None = None
    most_confused: list[dict[str, Any]] | None = None
    risk_coverage: dict[str, np.ndarray] | None = None
    #: Reliability bins per variant ("uncalibrated", "temperature_scaled"), each a dict of column arrays.
    reliability: dict[str, dict[str, np.ndarray]] | None = None
    gradcam: dict[str, np.ndarray] | None = None

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def class_names(self) -> list[str] | None:
        if self.run_info and self.run_info.get("class_names"):
            return [str(name) for name in self.run_info["class_names"]]
        if self.confusion is not None:
            return self.confusion.col_names
        return None


def find_eval_dir(path: Path) -> Path | None:
    """``path`` itself if it holds ``metrics.json`` (an evaluation directory), else ``path/eval`` if that does."""
    if (path / "metrics.json").is_file():
        return path
    if (path / "eval" / "metrics.json").is_file():
        return path / "eval"
    return None


def _wrap_errors(path: Path, read):
    try:
        return read(path)
    except (OSError, ValueError, KeyError, csv.Error, yaml.YAMLError, zipfile.BadZipFile) as error:
        raise ResnetlabError(f"{path}: cannot be read ({error}); re-create it with `resnetlab evaluate` or "
                             f"`resnetlab train`, or remove it") from error


def _read_yaml(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, dict):
        raise ValueError("expected a mapping at the top level")
    return data


def _read_confusion(path: Path) -> Confusion:
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    return Confusion(
        counts=np.array([[int(cell) for cell in row[1:]] for row in body], dtype=np.int64).reshape(len(body), -1),
        row_names=[row[0] for row in body],
        col_names=header[1:],
    )


def _typed_rows(rows: list[dict[str, str]], numeric: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{key: (to_float(value) if key in numeric else value) for key, value in row.items()} for row in rows]


def _read_reliability(path: Path) -> dict[str, dict[str, np.ndarray]]:
    variants: dict[str, dict[str, list[float]]] = {}
    for row in read_csv(path):
        columns = variants.setdefault(row["variant"], {})
        for key in ("bin_lower", "bin_upper", "count", "mean_confidence", "accuracy"):
            columns.setdefault(key, []).append(to_float(row[key]))
    return {variant: {key: np.asarray(values) for key, values in columns.items()}
            for variant, columns in variants.items()}


def load_run(path: str | Path) -> RunFiles:
    """Parse the files of a run directory (``config.yaml``, ``run_info.json``, ``metrics.csv``, ``eval/``) or of
    an evaluation directory (``metrics.json`` and friends directly inside)."""
    root = Path(path)
    if not root.is_dir():
        raise ResnetlabError(f"{root}: no such run or evaluation directory")
    eval_dir = find_eval_dir(root)
    run = RunFiles(root=root, eval_dir=eval_dir)
    if (root / "config.yaml").is_file():
        run.config = _wrap_errors(root / "config.yaml", _read_yaml)
    if (root / "run_info.json").is_file():
        run.run_info = _wrap_errors(root / "run_info.json", read_json)
    if (root / "metrics.csv").is_file():
        run.history = _wrap_errors(root / "metrics.csv", read_csv_columns) or None
    if run.history is None and eval_dir is None:
        raise ResnetlabError(f"{root}: neither metrics.csv nor metrics.json (directly or in eval/) found; point at "
                             f"a directory written by `resnetlab train` or `resnetlab evaluate --out`")
    if eval_dir is None:
        return run
    run.metrics = _wrap_errors(eval_dir / "metrics.json", read_json)
    optional_readers = {
        "per_class.csv": ("per_class", lambda p: _typed_rows(
            read_csv(p), ("index", "precision", "recall", "f1", "support", "accuracy", "predicted",
                          "mean_confidence"))),
        "confusion.csv": ("confusion", _read_confusion),
        "predictions.csv": ("predictions", read_csv),
        "most_confused.csv": ("most_confused", lambda p: _typed_rows(
            read_csv(p), ("count", "fraction_of_true", "true_index", "pred_index"))),
        "risk_coverage.csv": ("risk_coverage", read_csv_columns),
        "reliability.csv": ("reliability", _read_reliability),
        GRADCAM_FILENAME: ("gradcam", load_gradcam_npz),
    }
    for filename, (attribute, reader) in optional_readers.items():
        if (eval_dir / filename).is_file():
            setattr(run, attribute, _wrap_errors(eval_dir / filename, reader))
    return run
