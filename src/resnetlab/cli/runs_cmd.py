"""``resnetlab runs``: every run under a folder with its status and results; the library is
:mod:`resnetlab.reporting.runs_index`."""

# No `from __future__ import annotations` here: typer reads the option annotations at runtime.
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

PIPED_WIDTH = 240  # columns of the table when not printed on a terminal


def register(app: typer.Typer) -> None:
    app.command("runs")(runs)


def runs(
    root: Annotated[Path, typer.Argument(metavar="[DIR]", help="The folder holding the runs, searched recursively")] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    html_file: Annotated[Optional[Path], typer.Option("--html", metavar="FILE", help="Also write a sortable index page linking each run's report")] = None,
) -> None:
    """List the runs under DIR, newest first: recipe, model, data, epochs, training time, val/test top-1, status."""
    from resnetlab.reporting.runs_index import runs as list_runs
    from resnetlab.reporting.runs_index import write_runs_html

    summaries = list_runs(root)
    if html_file is not None:
        write_runs_html(summaries, html_file)
    if as_json:
        typer.echo(json.dumps([summary.to_dict() for summary in summaries], indent=2))
    else:
        _print_table(root, summaries)
    if html_file is not None and not as_json:
        typer.echo(str(html_file))


def _print_table(root: Path, summaries) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"runs in {root}", box=box.SIMPLE_HEAD)
    names = [_relative(s.dir, root) for s in summaries]
    for header in ("started", "run", "status", "recipe", "model", "data"):
        # Run folders and data specs fold onto more lines rather than lose their end (which tells runs apart);
        # the run's name gets the room it needs first.
        table.add_column(header, overflow="fold", no_wrap=header not in ("run", "data"),
                         min_width=min(32, max(map(len, names), default=3)) if header == "run" else None)
    for header in ("epochs", "train s", "val top-1", "test top-1"):
        table.add_column(header, justify="right", no_wrap=True)
    for s, name in zip(summaries, names):
        table.add_row(_when(s.started), name, s.status, s.recipe or "", s.model or "", _short_spec(s.data),
                      "" if s.epochs is None else f"{s.epochs}/{s.epochs_planned or '?'}",
                      _fixed(s.train_seconds, 0), _fixed(s.val_top1, 4), _fixed(s.test_top1, 4))
    console = Console()
    # Piped into a file or another program, a row stays on one line however wide (rich would assume 80 columns).
    (console if console.is_terminal else Console(width=PIPED_WIDTH)).print(table)


def _short_spec(spec) -> str:
    """``gtsrb:/data/sets/GTSRB`` -> ``gtsrb:.../GTSRB``: the kind and the folder's name fit a table (--json has all)."""
    if not spec:
        return ""
    kind, _, path = spec.partition(":")
    return f"{kind}:.../{Path(path).name}" if path.count("/") > 1 else spec


def _relative(path: Path, root: Path) -> str:
    """The run's folder below DIR (the title names DIR), which keeps the table narrow."""
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return str(path)


def _when(started) -> str:
    return started.astimezone().strftime("%Y-%m-%d %H:%M") if started else ""


def _fixed(value: Optional[float], digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"
