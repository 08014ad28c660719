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
    TRAINING,
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

CALIBRATION = "Calibration"  # help panel of evaluate's and calibrate's temperature and operating-point options

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
    init_from: Annotated[Optional[str], typer.Option("--init-from", metavar="RUN_OR_CHECKPOINT", help="Fine-tune this trained model: its weights, classes, preprocessing and architecture (model.init_from)", rich_help_panel=MODEL)] = None,
    freeze: Annotated[Optional[str], typer.Option("--freeze", metavar="MODE", help="none, backbone (train the classifier only) or all_but_bn_and_head (BatchNorm and classifier) (train.freeze)", rich_help_panel=TRAINING)] = None,
    original_data: Annotated[Optional[str], typer.Option("--original-data", metavar="SPEC", help="With --init-from: the dataset whose test split measures what fine-tuning forgot (default: the original model's, if readable; none: skip) (eval.original_data)", rich_help_panel=DATA)] = None,
) -> None:
    """Train a model, evaluate it on the test split and write the report (defaults: the offline demo). With
    --init-from, fine-tune a trained model on new data and report before and after."""
    from resnetlab.api.functions import environment_rank_is_main
    from resnetlab.api.functions import train as train_run

    run = train_run(data, recipe=recipe, out=out, overwrite=overwrite, resume=resume,
                    overrides=list(overrides or []) + list(ctx.args), progress=False if quiet else None,
                    batch_size=batch_size, model=model, epochs=epochs, seed=seed, device=device,
                    init_from=init_from, freeze=freeze, original_data=original_data)
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
    raw: Annotated[bool, typer.Option("--raw", help="Uncalibrated confidences: no stored temperature, every answer accepted", rich_help_panel=CALIBRATION)] = False,
    coverage: Annotated[Optional[float], typer.Option("--coverage", help="Operating point keeping this fraction of validation images (from the stored validation curve)", rich_help_panel=CALIBRATION)] = None,
    max_error: Annotated[Optional[float], typer.Option("--max-error", help="Operating point with at most this error among accepted validation images", rich_help_panel=CALIBRATION)] = None,
) -> None:
    """Evaluate a checkpoint, or one of its exports: metrics.json, per-class, confusion, predictions, calibration,
    and a report. The stored temperature and operating point apply unless --raw."""
    from resnetlab.api.functions import evaluate as evaluate_model

    evaluation = evaluate_model(checkpoint, data, split=split, out=out, overwrite=overwrite, tta=tta, raw=raw,
                                coverage=coverage, max_error=max_error, overrides=list(overrides or []),
                                batch_size=batch_size, device=device, export_dir=export_dir)
    metrics = evaluation.metrics
    accepted = ""
    if metrics.get("accepted_fraction") is not None and metrics["accepted_fraction"] < 1:
        error = metrics.get("error_among_accepted")
        accepted = (f"  accepted {metrics['accepted_fraction']:.4f} (error among them "
                    f"{'n/a' if error is None else f'{error:.4f}'})")
    typer.echo(f"top1 {metrics['top1']:.4f}  top5 {metrics['top5']:.4f}  balanced_accuracy "
               f"{metrics['balanced_accuracy']:.4f}{accepted}  samples {metrics['num_samples']}  -> {evaluation.dir}")


@app.command()
def calibrate(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT_OR_RUN", help="A checkpoint (.pt) or a run directory")],
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="A labelled dataset whose classes are among the model's (default: the one it was trained on)", rich_help_panel=DATA)] = None,
    split: Annotated[str, typer.Option("--split", help="val (the run's own held-out split, rebuilt), test or all", rich_help_panel=DATA)] = "val",
    coverage: Annotated[Optional[float], typer.Option("--coverage", help="Operating point keeping this fraction of the images", rich_help_panel=CALIBRATION)] = None,
    max_error: Annotated[Optional[float], typer.Option("--max-error", help="Operating point with at most this error among the accepted images", rich_help_panel=CALIBRATION)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", rich_help_panel=DATA)] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda", rich_help_panel=MODEL)] = "auto",
    overrides: Annotated[Optional[list[str]], typer.Argument(metavar="[data.KEY=VALUE]...", help="Settings for reading the data, e.g. data.on_bad_image=skip", show_default=False)] = None,
) -> None:
    """Fit the temperature and operating point again on a labelled split and store them in the checkpoint
    (checkpoints from before calibration was stored, after adapt or fine-tuning, or for another rule)."""
    from resnetlab.api.functions import calibrate as calibrate_model

    record = calibrate_model(checkpoint, data, split=split, coverage=coverage, max_error=max_error,
                             overrides=list(overrides or []), batch_size=batch_size, device=device)
    point = record["operating_point"]
    typer.echo(f"temperature {record['temperature']:.4f}  ECE {record['ece_before']:.4f} -> {record['ece_after']:.4f}  "
               f"threshold {point['threshold']:.4f} ({point['rule']} {point['target']:g}: coverage "
               f"{point['coverage']:.4f}, error {point['error']:.4f})  on {record['num_images']} images "
               f"({record['fitted_on']})")


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
    reference: Annotated[Optional[str], typer.Option(
        "--reference", metavar="NAME",
        help="In-domain evaluation (label or folder) that other evaluations of its checkpoint are shifted domains "
             "of (default: the first)")] = None,
) -> None:
    """Side-by-side metrics with per-class deltas and overlaid training curves (recipes, domains, time budgets)."""
    from resnetlab.api.functions import compare as compare_runs

    typer.echo(str(compare_runs(list(dirs), out, reference=reference).dir / "compare.md"))


# ---------------------------------------------------------------------------------------------------------------
# adapt
# ---------------------------------------------------------------------------------------------------------------


@app.command()
def adapt(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT|RUN_DIR", help="A checkpoint (.pt) or a run directory; it is only read")],
    data: Annotated[str, typer.Option("--data", "-d", help="The new domain's images: folder:PATH (any folder of images, no class folders needed) or any dataset spec, whose labels are ignored", rich_help_panel=DATA)],
    method: Annotated[str, typer.Option("--method", help="adabn: re-estimate the BatchNorm statistics; tent: first train the BatchNorm weights and biases to minimise the prediction entropy, then re-estimate", rich_help_panel=MODEL)] = "adabn",
    steps: Annotated[Optional[int], typer.Option("--steps", help="TENT optimizer steps (default: one pass over the images)", rich_help_panel=MODEL)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="TENT learning rate (Adam; default 0.001)", rich_help_panel=MODEL)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Images per batch (default: the run's training batch size, at most half the images)", rich_help_panel=DATA)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the order of the images", rich_help_panel=MODEL)] = 0,
    prior: Annotated[float, typer.Option("--prior", help="How many images the model's own BatchNorm statistics count as beside the new ones (0: replaced; a few hundred keep a small or class-skewed set from overriding them)", rich_help_panel=MODEL)] = 0.0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda", rich_help_panel=MODEL)] = "auto",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The new checkpoint: a .pt file or a folder (default: <run>/adapted/<data>-<method>.pt)", rich_help_panel=OUTPUT)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file", rich_help_panel=OUTPUT)] = False,
    overrides: Annotated[Optional[list[str]], typer.Argument(metavar="[data.KEY=VALUE]...", help="Settings for reading the data, e.g. data.on_bad_image=skip (the preprocessing is the checkpoint's)", show_default=False)] = None,
) -> None:
    """Adapt a model to a new domain without labels (AdaBN, or TENT): a new checkpoint whose BatchNorm layers fit the
    new images, for evaluate, predict, export and serve."""
    from resnetlab.api.functions import adapt as adapt_model

    adapted = adapt_model(checkpoint, data, out=out, method=method, steps=steps, lr=lr, batch_size=batch_size,
                          seed=seed, device=device, overwrite=overwrite, prior_strength=prior,
                          overrides=list(overrides or []))
    record = adapted.record
    typer.echo(f"{record['method']} on {record['num_images']} images  mean entropy {record['mean_entropy_before']:.4f}"
               f" -> {record['mean_entropy_after']:.4f}  -> {adapted.checkpoint}")


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
