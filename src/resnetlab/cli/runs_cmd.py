"""``resnetlab runs``: every run under a folder with its status and results; the library is
:mod:`resnetlab.reporting.runs_index`."""

# No `from __future__ import annotations` here: typer reads the option annotations at runtime.
import json
from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("runs")(runs)


def runs(
    root: Annotated[Path, typer.Argument(metavar="[DIR]", help="The folder holding the runs, searched recursively")] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    html_file: Annotated[Optional[Path], typer.Option("--html", metavar="FILE", help="Also write a sortable index page linking each run's report")] = None,
) -> None:
    """List the runs under DIR, newest first: recipe, model, data, epochs, training time, val/test top-1, status."""
    from resnetlab.cli.render import print_table
    from resnetlab.reporting.runs_index import runs as list_runs
    from resnetlab.reporting.runs_index import write_runs_html

    summaries = list_runs(root)
    if html_file is not None:
        write_runs_html(summaries, html_file)
    if as_json:
        typer.echo(json.dumps([summary.to_dict() for summary in summaries], indent=2))
    else:
        print_table(f"runs in {root}", ["started", "run", "status", "recipe", "model", "data", "epochs", "train s",
                                        "val top-1", "test top-1"],
                    [[_when(s.started), s.dir, s.status, s.recipe or "", s.model or "", s.data or "",
                      "" if s.epochs is None else f"{s.epochs}/{s.epochs_planned or '?'}",
                      _fixed(s.train_seconds, 0), _fixed(s.val_top1, 4), _fixed(s.test_top1, 4)] for s in summaries])
    if html_file is not None and not as_json:
        typer.echo(str(html_file))


def _when(started) -> str:
    return started.astimezone().strftime("%Y-%m-%d %H:%M") if started else ""


def _fixed(value: Optional[float], digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"
