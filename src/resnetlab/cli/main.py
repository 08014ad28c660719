"""The ``resnetlab`` command: a thin Typer layer that maps arguments onto the typed config and calls the library.

Exit codes: 0 on success, 1 when some inputs of a batch job failed (``predict``), 2 on bad usage or bad input, with
one line on stderr naming the file, field or value at fault.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from resnetlab.cli import bench_cmd, data_cmd, deploy_cmd, runs_cmd, tune_cmd
from resnetlab.cli.logging_setup import console_logging
from resnetlab.cli.options import (
    BACKEND_HELP,
    AcceptAllOption,
    CoverageOption,
    MaxErrorOption,
    RawOption,
    ThresholdOption,
    DATA,
    MODEL,
    OUTPUT,
    PRECISION_HELP,
    RUN,
    BatchSizeOption,
    DataOption,
    DeviceOption,
    EpochsOption,
    ModelOption,
    OverridesArg,
    QuietOption,
    RecipeOption,
    SeedOption,
    answer_options,
    fail,
)
from resnetlab.errors import ResnetlabError

try:  # typer >= 0.20 carries its own copy of click, whose exceptions are not click's
    from typer._click import exceptions as _typer_click
except ImportError:  # older typer uses click itself
    _typer_click = click.exceptions

_EXITS = (click.exceptions.Exit, typer.Exit)
_ABORTS = (click.exceptions.Abort, typer.Abort)
_USAGE_ERRORS = (click.ClickException, _typer_click.ClickException)

app = typer.Typer(
    name="resnetlab",
    help="From labelled images to a trained, tuned, honestly evaluated and deployable ResNet classifier.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context) -> None:
    """With no command, `resnetlab` runs `resnetlab train` (the offline demo)."""
    ctx.call_on_close(console_logging())  # the library logs; the command shows its records on stderr
    if ctx.invoked_subcommand is None:
        ctx.invoke(train, ctx)


# ---------------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------------


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def train(
    ctx: typer.Context,
    overrides: OverridesArg = None,
    recipe: RecipeOption = None,
    data: DataOption = None,
    batch_size: BatchSizeOption = None,
    model: ModelOption = None,
    epochs: EpochsOption = None,
    seed: SeedOption = None,
    device: DeviceOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (default runs/<recipe>-<time>)", rich_help_panel=OUTPUT)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out", rich_help_panel=OUTPUT)] = False,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this directory from its last checkpoint", rich_help_panel=RUN)] = None,
    quiet: QuietOption = False,
) -> None:
    """Train a model, evaluate it on the test split and write the report (defaults: the offline demo)."""
    from resnetlab.api.functions import environment_rank_is_main
    from resnetlab.api.functions import train as train_run

    run = train_run(data, recipe=recipe, out=out, overwrite=overwrite, resume=resume,
                    overrides=list(overrides or []) + list(ctx.args), progress=False if quiet else None,
                    batch_size=batch_size, model=model, epochs=epochs, seed=seed, device=device)
    if environment_rank_is_main():  # under torchrun, only rank 0 answers
        typer.echo(str(run.dir))


# ---------------------------------------------------------------------------------------------------------------
# evaluate / predict / report
# ---------------------------------------------------------------------------------------------------------------


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint (.pt) or a run directory")],
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="Dataset spec (default: the one the model was trained on)", rich_help_panel=DATA)] = None,
    split: Annotated[str, typer.Option("--split", help="test, val (the run's own held-out split) or all", rich_help_panel=DATA)] = "test",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder, new or empty (default: <run>/evaluations/<data>-<split>-<time>)", rich_help_panel=OUTPUT)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write over the files of a non-empty --out (such as a run's own eval/)", rich_help_panel=OUTPUT)] = False,
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation: average with the mirror image where the augmentation preset flips", rich_help_panel=MODEL)] = False,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", rich_help_panel=DATA)] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda", rich_help_panel=MODEL)] = "auto",
    overrides: Annotated[Optional[list[str]], typer.Argument(metavar="[data.KEY=VALUE]...", help="Settings for reading the data, e.g. data.on_bad_image=skip data.classes=[2,3] (the preprocessing is the checkpoint's)", show_default=False)] = None,
    export_dir: Annotated[Optional[Path], typer.Option("--export", help="Evaluate this export of the checkpoint (int8, bf16, ...) through the runtime that serves it", rich_help_panel=MODEL)] = None,
) -> None:
    """Evaluate a checkpoint, or one of its exports: metrics.json, per-class, confusion, predictions, calibration,
    and a report."""
    from resnetlab.api.functions import evaluate as evaluate_model

    evaluation = evaluate_model(checkpoint, data, split=split, out=out, overwrite=overwrite, tta=tta,
                                overrides=list(overrides or []), batch_size=batch_size, device=device,
                                export_dir=export_dir)
    metrics = evaluation.metrics
    typer.echo(f"top1 {metrics['top1']:.4f}  top5 {metrics['top5']:.4f}  balanced_accuracy "
               f"{metrics['balanced_accuracy']:.4f}  samples {metrics['num_samples']}  -> {evaluation.dir}")


@app.command()
def predict(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT|EXPORT_DIR", help="A checkpoint (.pt), a run directory or an export folder")],
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns")],
    topk: Annotated[int, typer.Option("--topk", "-k", help="Classes to show per image")] = 5,
    output_format: Annotated[str, typer.Option("--format", "-f", help="table, csv or json")] = "table",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images decoded and predicted together")] = 64,
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation as `evaluate --tta`: 5 crops, and mirror images where the training augmentation flips")] = False,
    backend: Annotated[str, typer.Option("--backend", help=BACKEND_HELP)] = "auto",
    precision: Annotated[str, typer.Option("--precision", help=PRECISION_HELP)] = "auto",
    raw: RawOption = False,
    coverage: CoverageOption = None,
    max_error: MaxErrorOption = None,
    threshold: ThresholdOption = None,
    accept_all: AcceptAllOption = False,
) -> None:
    """Predict the classes of images, with calibrated confidences; an answer below the operating point is shown as
    unknown, with its best guess. Exit code 1 if any file could not be read (an unknown answer is not an error)."""
    from resnetlab.cli.inputs import expand_inputs
    from resnetlab.api.classifier import load
    from resnetlab.deployment.predictor import BACKEND_CHOICES
    from resnetlab.cli.render import print_predictions

    if output_format not in ("table", "csv", "json"):
        fail(f"--format '{output_format}': choose table, csv or json")
    if topk < 1:
        fail("--topk must be at least 1")
    if batch_size < 1:
        fail("--batch-size must be at least 1")
    if backend not in BACKEND_CHOICES:
        fail(f"--backend '{backend}': choose {', '.join(BACKEND_CHOICES)}")
    answers = answer_options(raw, coverage, max_error, threshold, accept_all)
    paths = expand_inputs(inputs)
    if not paths:
        fail(f"no image files found in {' '.join(inputs)}")
    # rl.load's classifier, whose predictor also goes on past unreadable files (the API's predict stops on them)
    predictor = load(checkpoint, backend=backend, precision=precision, raw=answers.raw, coverage=answers.coverage,
                     max_error=answers.max_error, threshold=answers.threshold,
                     accept_all=answers.accept_all).predictor
    results = predictor.predict_paths(paths, topk=topk, batch_size=batch_size, tta=tta)
    print_predictions(results, output_format, answers=predictor.describe_answers())
    failed = [r for r in results if r.error]
    for r in failed:
        typer.echo(f"error: {r.error}", err=True)
    if failed:
        raise typer.Exit(1)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory (or an evaluation folder)")]) -> None:
    """Re-render report.md, report.html and the plots from a run's data files alone."""
    from resnetlab.reporting.report import render_report

    from resnetlab.jobs.train import gallery_image_loader

    if not run_dir.is_dir():
        fail(f"'{run_dir}' is not a folder; pass a run directory")
    md, html = render_report(run_dir, load_image=gallery_image_loader(run_dir))
    typer.echo(f"{md}\n{html}")


@app.command()
def compare(
    dirs: Annotated[list[Path], typer.Argument(help="Run directories or evaluation folders; the first is the baseline")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: compare-<time>)")] = None,
) -> None:
    """Side-by-side metrics with per-class deltas and overlaid training curves (recipes, domains, time budgets)."""
    from resnetlab.api.functions import compare as compare_runs

    typer.echo(str(compare_runs(list(dirs), out).dir / "compare.md"))


# ---------------------------------------------------------------------------------------------------------------
# registries
# ---------------------------------------------------------------------------------------------------------------


@app.command()
def models(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False) -> None:
    """List the registered models: parameters, GMACs and default input size."""
    from resnetlab.cli.render import print_table
    from resnetlab.models import describe_models

    rows = describe_models()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    print_table("models", ["name", "family", "params", "GMACs", "input"],
                [[r["name"], r["family"], f"{r['params']:,}", f"{r['gmacs']:.3f}", "x".join(map(str, r["input_size"]))]
                 for r in rows])


@app.command()
def recipes(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False) -> None:
    """List the shipped recipes."""
    from resnetlab.cli.render import print_table
    from resnetlab.recipes import describe_recipes

    rows = describe_recipes()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    print_table("recipes", ["name", "data", "model", "epochs", "description"],
                [[r["name"], r["data"], r["model"], r["epochs"], r["description"]] for r in rows])


# ---------------------------------------------------------------------------------------------------------------
# sub-command groups that live in their own modules
# ---------------------------------------------------------------------------------------------------------------

for _module in (data_cmd, tune_cmd, deploy_cmd, bench_cmd, runs_cmd):
    _module.register(app)


# ---------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    try:
        # Without standalone mode click returns the code of a typer.Exit instead of exiting.
        code = app(args=argv, standalone_mode=False)
    except ResnetlabError as err:
        typer.echo(f"error: {err}", err=True)
        return 2
    except _EXITS as exit_:
        return exit_.exit_code
    except _ABORTS:
        typer.echo("aborted", err=True)
        return 130
    except _USAGE_ERRORS as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # a bare group (`resnetlab data`) printed its help
            return 0
        # One line, like every other input error (click would add a usage block).
        typer.echo(f"error: {err.format_message()} (see `resnetlab {' '.join(argv or sys.argv[1:2])} --help`)", err=True)
        return 2
    except KeyboardInterrupt:
        typer.echo("interrupted; continue a training run with `resnetlab train --resume RUN_DIR`, a tune by running "
                   "the same command again", err=True)
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
