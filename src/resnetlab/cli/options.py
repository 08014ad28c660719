"""What the command modules share: the run options of ``train`` and ``tune``, help texts, ``fail`` and the config
the data tools read. Every command module imports this; none imports another command module or :mod:`.main`."""

# No `from __future__ import annotations`: typer reads these Annotated aliases at runtime.
from typing import Annotated, Optional

import typer

RUN, DATA, MODEL, TRAINING, OUTPUT = "Run", "Data", "Model", "Training", "Output"


def fail(message: str, code: int = 2) -> None:
    """Stop a command with one line on stderr and exit code 2 (bad usage or input)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# The options that describe a run, shared by `train` and `tune` (where they are the base of every trial).
OverridesArg = Annotated[Optional[list[str]], typer.Argument(metavar="[KEY=VALUE]...", help="Config overrides with dotted keys, e.g. optim.lr=0.01 data.classes=[2,3,14,17]", show_default=False)]
RecipeOption = Annotated[Optional[str], typer.Option("--recipe", "-r", help="Shipped recipe name or a YAML file (default: demo)", rich_help_panel=RUN)]
DataOption = Annotated[Optional[str], typer.Option("--data", "-d", help="Dataset: synthetic-signs, gtsrb:PATH, folder:PATH", rich_help_panel=DATA)]
BatchSizeOption = Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Training batch size", rich_help_panel=DATA)]
ModelOption = Annotated[Optional[str], typer.Option("--model", "-m", help="Model name (see `resnetlab models`)", rich_help_panel=MODEL)]
EpochsOption = Annotated[Optional[int], typer.Option("--epochs", "-e", help="Number of epochs", rich_help_panel=TRAINING)]
SeedOption = Annotated[Optional[int], typer.Option("--seed", help="Random seed", rich_help_panel=TRAINING)]
DeviceOption = Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda", rich_help_panel=TRAINING)]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or log on the console", rich_help_panel=OUTPUT)]


PRECISION_HELP = ("auto (the default: float32 ONNX Runtime for small models, equal to evaluation to 1e-4; a bf16 "
                  "AOTInductor package for models of 1 GMAC or more per image on CPUs with bf16 instructions, "
                  "where it is the faster path), float32, or bf16 (confidences differ from float32 by "
                  "up to a few hundredths)")
BACKEND_HELP = ("auto (ONNX Runtime in float32, an AOTInductor package in bf16; a checkpoint is exported once into "
                "the cache), torch, onnxruntime, torchscript or aoti")


# How `predict` and `serve` compute confidences and withhold answers (deployment.predictor.AnswerOptions).
ANSWERS = "Calibration and unknown answers"
RawOption = Annotated[bool, typer.Option("--raw", help="Uncalibrated confidences: no temperature, and no operating point unless --threshold", rich_help_panel=ANSWERS)]
CoverageOption = Annotated[Optional[float], typer.Option("--coverage", help="Operating point keeping this fraction of in-domain validation images (e.g. 0.95); the rest answer 'unknown'", rich_help_panel=ANSWERS)]
MaxErrorOption = Annotated[Optional[float], typer.Option("--max-error", help="Operating point with at most this error among accepted validation images (e.g. 0.01)", rich_help_panel=ANSWERS)]
ThresholdOption = Annotated[Optional[float], typer.Option("--threshold", help="Answer 'unknown' below this confidence (0-1)", rich_help_panel=ANSWERS)]
AcceptAllOption = Annotated[bool, typer.Option("--accept-all", help="Never answer 'unknown' (default: the operating point stored with the calibration)", rich_help_panel=ANSWERS)]


def answer_options(raw: bool, coverage, max_error, threshold, accept_all: bool):
    """The flags above as the library's AnswerOptions; a bad combination is one line and exit code 2."""
    from resnetlab.deployment.predictor import AnswerOptions
    from resnetlab.errors import ConfigError

    try:
        return AnswerOptions(raw=raw, coverage=coverage, max_error=max_error, threshold=threshold,
                             accept_all=accept_all)
    except ConfigError as err:
        fail(str(err))


def data_tool_config(spec: str | None, recipe: str | None, overrides: list[str] | None):
    """The run config these tools look at the data through: a recipe (default: none, i.e. the config defaults),
    then --data, then KEY=VALUE overrides, exactly as `resnetlab train` resolves them."""
    from resnetlab.config import build_config
    from resnetlab.recipes import load_recipe

    base = load_recipe(recipe) if recipe else {}
    return build_config(base, {"data.spec": spec}, list(overrides or []))
