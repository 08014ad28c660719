"""Runs as a collection: every run directory under a folder, summarized from its files, and a sortable index page.

A run is recognised by the files only resnetlab writes (its ``config.yaml`` beside ``run_info.json``,
``checkpoints/``, ``train.log``, ``metrics.csv`` or ``splits.csv``), wherever it lies below the root: plain runs,
a tune's fold trainings and its ``refit/``. Hidden folders are skipped: ``--overwrite`` writes the new run in
``.NAME.new-PID`` and parks the old one in ``.NAME.old-PID`` for a moment, and neither is a run of its own.

Nothing here trains or loads a model: the summary is read from small text files, so listing hundreds of runs
takes well under a second, and one damaged run is shown as ``damaged`` instead of breaking the listing.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from resnetlab.config import load_yaml
from resnetlab.errors import ConfigError, ResnetlabError, first_line
from resnetlab.utils.io import atomic_write_text, read_csv, read_json

logger = logging.getLogger(__name__)

#: Files that only a resnetlab run writes beside its config.yaml (the same list ``jobs.train`` uses to decide
#: what ``--overwrite`` may replace): a config.yaml alone may belong to anything.
RUN_MARKERS = ("run_info.json", "checkpoints", "train.log", "metrics.csv", "splits.csv")
#: The statuses, in the order a reader meets them in a run's life.
STATUSES = ("interrupted", "resumable", "trained", "finished", "damaged")
_LOG_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"  # the stamp utils.runlog puts before every train.log line


@dataclass(frozen=True)
class RunSummary:
    """One run directory as :func:`runs` reads it.

    ``status`` is ``finished`` (evaluated on its test split and reported), ``trained`` (training ended but it was
    never evaluated: a tune's fold trainings), ``resumable`` (stopped with ``checkpoints/last.pt``: continue it with
    ``resnetlab train --resume DIR``), ``interrupted`` (stopped before its first checkpoint) or ``damaged`` (a file
    it needs cannot be read; ``problem`` says which). Numbers a run has not produced yet are ``None``.
    """

    dir: Path
    status: str
    recipe: str | None = None
    model: str | None = None
    data: str | None = None
    epochs: int | None = None  # epochs trained so far
    epochs_planned: int | None = None  # train.epochs of its config
    train_seconds: float | None = None
    val_top1: float | None = None  # on the validation split, at the epoch the run kept
    test_top1: float | None = None
    started: datetime | None = None
    problem: str | None = None

    @property
    def report_path(self) -> Path | None:
        """The run's ``report.html``, if it has one."""
        path = self.dir / "report.html"
        return path if path.is_file() else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (paths and times as strings)."""
        record = asdict(self)
        record["dir"] = str(self.dir)
        record["started"] = self.started.isoformat(timespec="seconds") if self.started else None
        record["report"] = str(self.report_path) if self.report_path else None
        return record

    def __repr__(self) -> str:
        parts = [f"{self.dir}", self.status]
        if self.recipe or self.model:
            parts.append(f"{self.recipe or '?'}: {self.model or '?'} on {self.data or '?'}")
        if self.epochs is not None:
            parts.append(f"{self.epochs}/{self.epochs_planned or '?'} epochs")
        if self.train_seconds is not None:
            parts.append(f"{self.train_seconds:.0f}s")
        if self.val_top1 is not None:
            parts.append(f"val top-1 {self.val_top1:.4f}")
        if self.test_top1 is not None:
            parts.append(f"test top-1 {self.test_top1:.4f}")
        if self.problem:
            parts.append(self.problem)
        return f"RunSummary({', '.join(parts)})"


def is_run_dir(folder: Path) -> bool:
    """Whether ``folder`` holds a resnetlab run (its config.yaml and at least one other file every run writes)."""
    return (folder / "config.yaml").is_file() and any((folder / name).exists() for name in RUN_MARKERS)


def find_run_dirs(root: str | Path) -> list[Path]:
    """Every run directory at or below ``root``, hidden folders skipped, without descending into a run.

    Example:
        >>> find_run_dirs("runs")  # doctest: +SKIP
        [PosixPath('runs/demo-20261202-101500'), PosixPath('runs/photos-tune/refit')]
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"'{root}' is not a folder; pass the folder that holds your runs (default: runs)")
    found = []
    for folder, subfolders, _files in os.walk(root, onerror=lambda err: logger.warning("runs: skipping %s", err)):
        path = Path(folder)
        if is_run_dir(path):
            found.append(path)
            subfolders[:] = []  # a run's eval/, plots/ and evaluations/ hold no runs
            continue
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
    return found


def runs(root: str | Path = "runs") -> list[RunSummary]:
    """Summaries of every run directory under ``root``, newest first.

    A run whose files cannot be read is listed with status ``damaged`` (and a warning logged), so one half-written
    run never hides the others.

    Args:
        root: The folder to search, recursively (a tune's fold trainings and refit count as runs too).

    Returns:
        One :class:`RunSummary` per run, sorted by start time, newest first.

    Raises:
        ConfigError: ``root`` is not a folder.

    Example:
        >>> import resnetlab as rl
        >>> for run in rl.runs("runs"):  # doctest: +SKIP
        ...     print(run.dir, run.status, run.test_top1)
        runs/demo-20261202-101500 finished 0.992
    """
    summaries = [summarize_run(path) for path in find_run_dirs(root)]
    oldest = datetime.min.replace(tzinfo=timezone.utc)
    return sorted(summaries, key=lambda s: (s.started or oldest, str(s.dir)), reverse=True)


def summarize_run(run_dir: str | Path) -> RunSummary:
    """One run's :class:`RunSummary`, read from its files; ``damaged`` (never an exception) if they cannot be read.

    Example:
        >>> summarize_run("runs/demo-20261202-101500").status  # doctest: +SKIP
        'finished'
    """
    run_dir = Path(run_dir)
    try:
        return _summarize(run_dir)
    except (ResnetlabError, OSError, ValueError, KeyError, TypeError, AttributeError, csv.Error) as err:
        problem = first_line(err)
        logger.warning("runs: %s is damaged: %s", run_dir, problem)
        return RunSummary(dir=run_dir, status="damaged", started=_file_time(run_dir / "config.yaml"), problem=problem)


def _summarize(run_dir: Path) -> RunSummary:
    config = load_yaml(run_dir / "config.yaml")
    data, model, train = (_section(config, name) for name in ("data", "model", "train"))
    info = _read_mapping(run_dir / "run_info.json")
    metrics = _read_mapping(run_dir / "eval" / "metrics.json")
    history = read_csv(run_dir / "metrics.csv") if (run_dir / "metrics.csv").is_file() else []

    evaluated = metrics is not None and ((run_dir / "report.html").is_file() or (run_dir / "report.md").is_file())
    if evaluated:
        status = "finished"
    elif info is not None:
        status = "trained"
    elif (run_dir / "checkpoints" / "last.pt").is_file():
        status = "resumable"
    else:
        status = "interrupted"

    epochs = info.get("epochs_run") if info else None
    if epochs is None and history:
        epochs = max(int(float(row["epoch"])) for row in history if row.get("epoch"))
    seconds = info.get("train_seconds") if info else None
    if seconds is None and history:
        seconds = sum(_number(row.get("epoch_seconds")) or 0.0 for row in history)
    return RunSummary(
        dir=run_dir, status=status, recipe=_text(config.get("recipe")), model=_text(model.get("name")),
        data=_text((info or {}).get("dataset") or data.get("spec")), epochs=epochs,
        epochs_planned=_whole(train.get("epochs")), train_seconds=_number(seconds),
        val_top1=_kept_val_top1(history, (info or {}).get("best_epoch")),
        test_top1=_number(metrics.get("top1")) if metrics else None,
        started=_started(run_dir, info))


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    section = config.get(name) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"config.yaml: '{name}' is not a section")
    return section


def _read_mapping(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path.name} is not valid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path.name} does not hold a JSON object")
    return record


def _kept_val_top1(history: list[dict[str, str]], best_epoch: Any) -> float | None:
    """The validation top-1 of the epoch the run kept, or the best so far while it has kept none."""
    values = {row.get("epoch"): _number(row.get("val_top1")) for row in history}
    if best_epoch is not None and values.get(str(best_epoch)) is not None:
        return values[str(best_epoch)]
    finite = [value for value in values.values() if value is not None]
    return max(finite) if finite else None


def _started(run_dir: Path, info: dict[str, Any] | None) -> datetime | None:
    """When the run started: run_info.json once it has finished, else the stamp of train.log's first line (local
    time), else when config.yaml (the first file a run writes) was last written."""
    if info and info.get("start_time"):
        started = datetime.fromisoformat(str(info["start_time"]))
        return started if started.tzinfo else started.astimezone()
    log = run_dir / "train.log"
    if log.is_file():
        with open(log, encoding="utf-8", errors="replace") as handle:
            first = handle.readline()
        try:
            return datetime.strptime(first[:19], _LOG_TIME_FORMAT).astimezone()
        except ValueError:
            pass
    return _file_time(run_dir / "config.yaml")


def _file_time(path: Path) -> datetime | None:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    except OSError:
        return None


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _whole(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None else None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


# ---------------------------------------------------------------------------------------------------------------
# The index page
# ---------------------------------------------------------------------------------------------------------------

_COLUMNS = (  # (header, field, kind): kind says how the page sorts the column
    ("started", "started", "text"), ("run", "dir", "text"), ("status", "status", "text"),
    ("recipe", "recipe", "text"), ("model", "model", "text"), ("data", "data", "text"),
    ("epochs", "epochs", "number"), ("train s", "train_seconds", "number"), ("val top-1", "val_top1", "number"),
    ("test top-1", "test_top1", "number"),
)

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;font-size:14px}
th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left;white-space:nowrap}
th{cursor:pointer;user-select:none;background:#f4f4f4}
th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}
td.number{text-align:right;font-variant-numeric:tabular-nums}
tr.damaged td{color:#a00}
"""

# Sorts by the cell's data-value (numbers as numbers, empty cells last), toggling the order on each click.
_SCRIPT = """
document.querySelectorAll("th").forEach(function (th, index) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0];
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    table.querySelectorAll("th").forEach(function (other) { other.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var numeric = th.dataset.kind === "number";
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[index].dataset.value, y = b.cells[index].dataset.value;
      if (x === "" || y === "") { return (x === "") - (y === ""); }
      var order = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
      return ascending ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""


def write_runs_html(summaries: list[RunSummary], out_file: str | Path) -> Path:
    """Write a self-contained, sortable index page of ``summaries`` (click a header to sort by it) to ``out_file``.

    Each run links to its ``report.html`` by a path relative to the page, so the page keeps working when the
    folder is copied or served as a whole. Written atomically.

    Args:
        summaries: What :func:`runs` returned.
        out_file: The page to write, e.g. ``runs/index.html``.

    Returns:
        ``out_file`` as a path.

    Example:
        >>> write_runs_html(runs("runs"), "runs/index.html")  # doctest: +SKIP
        PosixPath('runs/index.html')
    """
    out_file = Path(out_file)
    page_dir = out_file.parent.resolve()
    header = "".join(f'<th data-kind="{kind}">{html.escape(title)}</th>' for title, _, kind in _COLUMNS)
    rows = []
    for summary in summaries:
        cells = []
        for _, name, kind in _COLUMNS:
            value = getattr(summary, name)
            cells.append(_cell(summary, name, kind, value, page_dir))
        title = f' title="{html.escape(summary.problem)}"' if summary.problem else ""
        rows.append(f'<tr class="{html.escape(summary.status)}"{title}>{"".join(cells)}</tr>')
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>resnetlab runs</title><style>{_STYLE}</style></head><body>\n"
        f"<h1>resnetlab runs</h1><p>{len(summaries)} run(s); click a column header to sort.</p>\n"
        f"<table id=\"runs\"><thead><tr>{header}</tr></thead><tbody>\n" + "\n".join(rows) +
        f"\n</tbody></table>\n<script>{_SCRIPT}</script>\n</body></html>\n")
    return atomic_write_text(out_file, page)


def _cell(summary: RunSummary, name: str, kind: str, value: Any, page_dir: Path) -> str:
    if value is None:
        return f'<td class="{kind}" data-value=""></td>'
    if name == "started":
        sort_key = shown = value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    elif name == "dir":
        sort_key = shown = str(value)
    elif isinstance(value, float):
        sort_key, shown = repr(value), (f"{value:.0f}" if name == "train_seconds" else f"{value:.4f}")
    else:
        sort_key = shown = str(value)
    content = html.escape(shown)
    if name == "dir" and summary.report_path is not None:
        link = quote(Path(os.path.relpath(summary.report_path.resolve(), page_dir)).as_posix())
        content = f'<a href="{html.escape(link)}">{content}</a>'
    return f'<td class="{kind}" data-value="{html.escape(sort_key)}">{content}</td>'
