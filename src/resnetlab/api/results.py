"""The objects the API returns: views of the files a run, an evaluation, a comparison, a tune or an export wrote.

Each reads its files when an attribute is first asked for, so a result of a finished job and one opened later from
its folder (``rl.run("runs/demo-...")``) are the same thing. Tables come as lists of dicts with numbers as numbers,
and as pandas DataFrames (``*_df``) where pandas is installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resnetlab.utils.io import read_csv, read_json

if TYPE_CHECKING:
    import pandas

    from resnetlab.api.classifier import Classifier


def typed_cell(text: str | None) -> Any:
    """A CSV cell as the value it writes: an int, a float, None for an empty cell, else the text."""
    if text is None or text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def typed_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV file with typed cells; [] when the file is absent."""
    if not path.is_file():
        return []
    return [{key: typed_cell(value) for key, value in row.items()} for row in read_csv(path)]


def data_frame(rows: list[dict[str, Any]]) -> pandas.DataFrame:
    """``rows`` as a pandas DataFrame; pandas is optional, so its absence is one line saying how to get it."""
    try:
        import pandas
    except ImportError:
        raise ImportError("this table as a DataFrame needs pandas: pip install pandas (the same rows are a list of "
                          "dicts without the _df suffix)") from None
    return pandas.DataFrame(rows)


def _top1(metrics: dict[str, Any]) -> str:
    value = metrics.get("top1")
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def _read_json_if(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


@dataclass(repr=False)
class ResultFolder:
    """A folder of results that resnetlab wrote; ``dir`` may be given as a string."""

    dir: Path

    def __post_init__(self) -> None:
        self.dir = Path(self.dir)


@dataclass(repr=False)
class Evaluation(ResultFolder):
    """An evaluation folder: ``metrics.json``, ``per_class.csv``, the report (``rl.evaluate`` returns one)."""

    @property
    def metrics(self) -> dict[str, Any]:
        """``metrics.json``: ``top1``, ``top5``, ``balanced_accuracy``, ``num_samples``, calibration, ..."""
        return _read_json_if(self.dir / "metrics.json")

    @property
    def per_class(self) -> list[dict[str, Any]]:
        """``per_class.csv``: one dict per class (precision, recall, f1, support, ...)."""
        return typed_rows(self.dir / "per_class.csv")

    @property
    def per_class_df(self) -> pandas.DataFrame:
        return data_frame(self.per_class)

    @property
    def report_path(self) -> Path:
        return self.dir / "report.html"

    def __repr__(self) -> str:
        metrics = self.metrics
        return f"Evaluation({str(self.dir)!r}, top1={_top1(metrics)}, samples={metrics.get('num_samples', '-')})"


@dataclass(repr=False)
class Run(ResultFolder):
    """A run directory, as ``rl.train`` leaves it (or ``rl.run(path)`` finds it)."""

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config the run trained with (``config.yaml``), as a dict."""
        from resnetlab.config import load_yaml

        path = self.dir / "config.yaml"
        return load_yaml(path) if path.is_file() else {}

    @property
    def metrics(self) -> dict[str, Any]:
        """The test metrics (``eval/metrics.json``): ``top1``, ``top5``, ``balanced_accuracy``, ..."""
        return _read_json_if(self.dir / "eval" / "metrics.json")

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per epoch (``metrics.csv``): epoch, train and val loss and accuracy, lr, ..."""
        return typed_rows(self.dir / "metrics.csv")

    @property
    def history_df(self) -> pandas.DataFrame:
        return data_frame(self.history)

    @property
    def per_class(self) -> list[dict[str, Any]]:
        """The test split's per-class table (``eval/per_class.csv``)."""
        return typed_rows(self.dir / "eval" / "per_class.csv")

    @property
    def per_class_df(self) -> pandas.DataFrame:
        return data_frame(self.per_class)

    @property
    def report_path(self) -> Path:
        return self.dir / "report.html"

    @property
    def checkpoint(self) -> Path:
        return self.dir / "checkpoints" / "best.pt"

    @property
    def status(self) -> str:
        """As ``rl.runs`` reports it: ``finished`` (trained, tested and reported), ``trained`` (never tested: a
        tune's fold), ``resumable`` (stopped with a ``last.pt`` to continue from, as ``rl.train(resume=dir)``
        does), ``interrupted`` (stopped before its first checkpoint) or ``damaged`` (a file cannot be read)."""
        from resnetlab.reporting.runs_index import summarize_run

        return summarize_run(self.dir).status

    def load(self, **options: Any) -> Classifier:
        """The run's best checkpoint as a :class:`~resnetlab.api.classifier.Classifier` (options: as ``rl.load``)."""
        from resnetlab.api.classifier import load

        return load(self.dir, **options)

    def __repr__(self) -> str:
        config = self.config
        model = config.get("model", {}).get("name", "?")
        data = config.get("data", {}).get("spec", "?")
        status = self.status
        tail = f"top1={_top1(self.metrics)}" if status == "finished" else f"status={status}"
        return f"Run({str(self.dir)!r}, model={model}, data={data}, {tail})"


@dataclass(repr=False)
class Comparison(ResultFolder):
    """A comparison folder (``rl.compare``): ``compare.csv``, the per-class deltas, any domain shift, the report."""

    @property
    def table(self) -> list[dict[str, Any]]:
        """``compare.csv``: one dict per metric, with a column per run and a delta column per non-baseline run."""
        return typed_rows(self.dir / "compare.csv")

    @property
    def table_df(self) -> pandas.DataFrame:
        return data_frame(self.table)

    @property
    def per_class(self) -> list[dict[str, Any]]:
        """``per_class_delta.csv``: one dict per class with each run's per-class figures and support, and the deltas of
        each non-baseline run."""
        return typed_rows(self.dir / "per_class_delta.csv")

    @property
    def per_class_df(self) -> pandas.DataFrame:
        return data_frame(self.per_class)

    @property
    def domain_shift(self) -> list[dict[str, Any]]:
        """``domain_shift.json``: one dict per (reference, shifted) pair of evaluations of one checkpoint (accuracy
        drop, calibration, coverage at the operating point, out-of-distribution AUROC); [] when none was compared."""
        return _read_json_if(self.dir / "domain_shift.json").get("domain_shift", [])

    @property
    def domain_shift_per_class(self) -> list[dict[str, Any]]:
        """``domain_shift_per_class.csv``: each class's reference and shifted accuracy and the drop, per pair."""
        return typed_rows(self.dir / "domain_shift_per_class.csv")

    @property
    def domain_shift_per_class_df(self) -> pandas.DataFrame:
        return data_frame(self.domain_shift_per_class)

    @property
    def report_path(self) -> Path:
        return self.dir / "compare.html"

    def __repr__(self) -> str:
        runs = [key for key in (self.table[0] if self.table else {}) if key != "metric" and not key.startswith("delta_")]
        return f"Comparison({str(self.dir)!r}, runs={runs})"


@dataclass(repr=False)
class TuneResult(ResultFolder):
    """A tune folder (``rl.tune``): the best setting, every trial, and the refit run if there is one."""

    #: What this call did (``tuning.TuneOutcome``: trials run, whether the search is settled), when it ran one.
    outcome: Any = field(default=None, compare=False)

    @property
    def best(self) -> dict[str, Any]:
        """``best.json``: ``params``, ``metric``, ``mean``, ``std``, ``folds``, ``config``, ``refit`` ({} if none)."""
        return _read_json_if(self.dir / "best.json")

    @property
    def trials(self) -> list[dict[str, Any]]:
        """``trials.csv``: one dict per setting with its parameters, fold scores, mean and std."""
        return typed_rows(self.dir / "trials.csv")

    @property
    def refit(self) -> Run | None:
        """The best setting retrained and tested once (``refit=True``), else None."""
        folder = self.dir / "refit"
        return Run(folder) if (folder / "config.yaml").is_file() else None

    @property
    def report_path(self) -> Path:
        return self.dir / "tune_report.html"

    def __repr__(self) -> str:
        best = self.best
        if not best:
            return f"TuneResult({str(self.dir)!r}, trials={len(self.trials)}, best=None)"
        params = ", ".join(f"{key}={value}" for key, value in best.get("params", {}).items())
        return (f"TuneResult({str(self.dir)!r}, trials={len(self.trials)}, best={{{params}}}, "
                f"mean {best.get('metric')}={best.get('mean', float('nan')):.4f})")


@dataclass(repr=False)
class Export(ResultFolder):
    """An export folder (``rl.export``): the model file and its deployment record (``preprocessing.json``)."""

    record: dict[str, Any] = field(default_factory=dict)
    #: The export's parity figures (``deployment.export.ExportResult``), when this call made it.
    result: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.record:
            from resnetlab.deployment.records import read_export_record

            self.record = read_export_record(self.dir)

    @cached_property
    def model_path(self) -> Path:
        return self.dir / self.record["artifact"]["file"]

    def load(self, **options: Any) -> Classifier:
        """The export as a :class:`~resnetlab.api.classifier.Classifier`, run by the runtime it was made for."""
        from resnetlab.api.classifier import load

        return load(self.dir, **options)

    def __repr__(self) -> str:
        artifact = self.record.get("artifact", {})
        return (f"Export({str(self.dir)!r}, format={artifact.get('format')}, "
                f"precision={artifact.get('precision', 'float32')}, classes={len(self.record['classes']['names'])})")


@dataclass(repr=False)
class Adaptation:
    """A checkpoint adapted to a new domain (``rl.adapt``): a new ``.pt`` file beside the run, and how it was made.

    It is an ordinary checkpoint: ``rl.evaluate``, ``rl.load``, ``rl.export`` and ``resnetlab serve`` take it.
    """

    checkpoint: Path
    #: ``meta["adaptation"]``: method, data, num_images, steps, lr, source_checkpoint_sha256, mean entropies, time ...
    record: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.checkpoint = Path(self.checkpoint)
        if not self.record:
            from resnetlab.checkpoint import load_checkpoint

            self.record = dict(load_checkpoint(self.checkpoint)["meta"].get("adaptation") or {})

    def load(self, **options: Any) -> Classifier:
        """The adapted model as a :class:`~resnetlab.api.classifier.Classifier` (options: as ``rl.load``)."""
        from resnetlab.api.classifier import load

        return load(self.checkpoint, **options)

    def __repr__(self) -> str:
        record = self.record
        return (f"Adaptation({str(self.checkpoint)!r}, method={record.get('method')}, data={record.get('data')}, "
                f"images={record.get('num_images')})")
