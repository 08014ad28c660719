"""``resnetlab data ...``: dataset tools."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(help="Dataset tools: generate the synthetic set.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (GTSRB Kaggle layout)")],
    per_class: Annotated[int, typer.Option("--per-class", help="Training images per class")] = 300,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    workers: Annotated[int, typer.Option("--workers", help="Processes to draw with")] = 1,
) -> None:
    """Generate the synthetic traffic-sign set (deterministic for a seed)."""
    from resnetlab.cli.main import fail
    from resnetlab.data.synthetic import generate_synthetic_signs

    if per_class < 1:
        fail("--per-class must be at least 1")
    path = generate_synthetic_signs(out, per_class=per_class, seed=seed, workers=workers)
    typer.echo(str(path))


