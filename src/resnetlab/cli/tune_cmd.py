"""``resnetlab tune``: k-fold cross-validated search over a grid or with Optuna; the library is
:mod:`resnetlab.tuning`. It takes the same run options as ``train`` (the base of every trial) plus the search's."""

# No `from __future__ import annotations` here: typer reads the option annotations of `tune` at runtime, and they
# name types that are imported inside register().
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand

from resnetlab.cli.options import (
    OUTPUT,
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
    fail,
)

SEARCH, WORKERS = "Search", "Workers and storage"


def expand_grid_args(args: list) -> list:
    """Let one ``--grid`` take several items: ``--grid a=1,2 b=3,4`` -> ``--grid a=1,2 --grid b=3,4``.

    After ``--grid``, every following ``KEY=VALUES`` word up to the next option is another grid item.
    """
    expanded: list[str] = []
    greedy = expect_value = False
    for word in args:
        if expect_value:
            expanded.append(word)
            expect_value, greedy = False, True
        elif word == "--grid":
            expanded.append(word)
            expect_value = True
        elif word.startswith("--grid="):
            expanded.append(word)
            greedy = True
        elif word.startswith("-"):
            expanded.append(word)
            greedy = False
        elif greedy and "=" in word:
            expanded += ["--grid", word]
        else:
            expanded.append(word)
    return expanded


class _TuneCommand(TyperCommand):
    def parse_args(self, ctx, args):
        ctx.meta["resnetlab.tune.argv"] = list(args)
        return super().parse_args(ctx, expand_grid_args(list(args)))


def register(app: typer.Typer) -> None:
    @app.command(cls=_TuneCommand, context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
    def tune(
        ctx: typer.Context,
        overrides: OverridesArg = None,
        recipe: RecipeOption = None,
        data: DataOption = None,
        batch_size: BatchSizeOption = None,
        model: ModelOption = None,
        epochs: EpochsOption = None,
        seed: SeedOption = None,
        device: DeviceOption = None,
        quiet: QuietOption = False,
        grid: Annotated[Optional[list[str]], typer.Option("--grid", "-g", help="KEY=V1,V2 ... values to search; one --grid takes every KEY=VALUES word after it (a single value is a plain override)", rich_help_panel=SEARCH)] = None,
        search: Annotated[str, typer.Option("--search", help="grid (every combination) or optuna (TPE, with pruning)", rich_help_panel=SEARCH)] = "grid",
        space: Annotated[Optional[Path], typer.Option("--space", help="YAML search space, one dotted key per line: a list of values, or a range {low, high, log, step}", rich_help_panel=SEARCH)] = None,
        trials: Annotated[Optional[int], typer.Option("--trials", "-n", help="Optuna search: settings to finish between all workers", rich_help_panel=SEARCH)] = None,
        folds: Annotated[int, typer.Option("--folds", "-k", help="Folds of the training split (stratified; grouped where the data has groups)", rich_help_panel=SEARCH)] = 3,
        metric: Annotated[str, typer.Option("--metric", help="val_top1 (maximized) or val_loss (minimized), after each fold's last epoch", rich_help_panel=SEARCH)] = "val_top1",
        pruner: Annotated[str, typer.Option("--pruner", help="auto (median for optuna, none for a grid), median or none", rich_help_panel=SEARCH)] = "auto",
        prune_warmup: Annotated[int, typer.Option("--prune-warmup", help="Epochs of each fold before the pruner may stop a trial", rich_help_panel=SEARCH)] = 1,
        prune_startup: Annotated[int, typer.Option("--prune-startup", help="Finished trials before pruning starts", rich_help_panel=SEARCH)] = 3,
        trial_budget: Annotated[Optional[float], typer.Option("--trial-budget", help="Minutes of training per trial, split over its folds", rich_help_panel=SEARCH)] = None,
        sampler_seed: Annotated[Optional[int], typer.Option("--sampler-seed", help="Seed of the Optuna sampler (repeatable single-worker searches)", rich_help_panel=SEARCH)] = None,
        refit: Annotated[bool, typer.Option("--refit", help="Retrain the best setting on the training split and test it once", rich_help_panel=RUN)] = False,
        out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Tune folder; running the same command again resumes it", rich_help_panel=OUTPUT)] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard the tune folder and its study and start afresh", rich_help_panel=OUTPUT)] = False,
        storage: Annotated[Optional[str], typer.Option("--storage", help="Study storage: default SQLite in --out; journal (a journal file in --out, for several processes on one machine); journal:FILE; or a database URL (postgresql://..., mysql://...) for workers on several machines", rich_help_panel=WORKERS)] = None,
        study_name: Annotated[Optional[str], typer.Option("--study-name", help="Study name in the storage (default: the --out folder's name)", rich_help_panel=WORKERS)] = None,
        timeout: Annotated[Optional[float], typer.Option("--timeout", help="Minutes after which this worker starts no new trial", rich_help_panel=WORKERS)] = None,
    ) -> None:
        """Search hyperparameters with k-fold cross-validation on the training split, then optionally refit the best
        setting and test it once. Start the same command in several processes (or machines, with --storage) to share
        the work; start it again after a crash to resume."""
        from resnetlab.api.functions import tune as tune_search
        from resnetlab.api.functions import tune_command

        if out is None:
            fail("tune needs --out DIR (running the same command again with the same --out resumes the search)")
        result = tune_search(
            data, recipe=recipe, grid=list(grid or []), folds=folds, refit=refit, search=search, trials=trials,
            out=out, overrides=list(overrides or []) + list(ctx.args), progress=False if quiet else None,
            command=tune_command(ctx.meta.get("resnetlab.tune.argv")), batch_size=batch_size, model=model,
            epochs=epochs, seed=seed, device=device, metric=metric, pruner=pruner, prune_warmup=prune_warmup,
            prune_startup=prune_startup, trial_budget=trial_budget, sampler_seed=sampler_seed, storage=storage,
            study_name=study_name, timeout=timeout, overwrite=overwrite, space=space)
        outcome = result.outcome
        best = outcome.best
        if best is None:
            typer.echo(f"{out}: no setting finished", err=True)
            raise typer.Exit(1 if outcome.settled else 0)
        summary = ", ".join(f"{k}={v}" for k, v in best["params"].items())
        typer.echo(f"best (trial {best['trial']}): {summary}; mean {best['metric']} {best['mean']:.4f}")
        if outcome.refit_dir is not None:
            typer.echo(str(outcome.refit_dir))
        typer.echo(str(out))
