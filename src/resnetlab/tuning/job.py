"""``resnetlab tune``: k-fold cross-validated search over a grid or with Optuna, then an optional refit.

The tune folder::

    tune.json            the setup (search, space, folds, metric, base config, storage, command)
    base_config.yaml     the config every trial starts from
    study.db             the Optuna study (default storage; --storage puts it elsewhere)
    tune.log             what every worker did
    trials/<NNNN>/       one folder per setting: config.yaml, and fold<k>/ = an ordinary run folder per fold
    trials.csv           one row per setting: parameters, each fold's val accuracy and loss, mean and std
    curves.csv           every epoch of every fold of every trial
    effects.csv          the score grouped by each parameter's values
    best.json            the winning setting, its full config, and the refit's test result
    refit/               the best setting retrained as an ordinary run, with its report (--refit)
    tune_report.md/.html the report

Several workers may run the same command against one storage (the SQLite file or a journal file for processes on
one machine, PostgreSQL/MySQL for several machines); each claims trials until none are left. A worker that was
killed leaves its trial to be run again by the next worker that starts, which also keeps its finished folds.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
import torch
from optuna.trial import TrialState

from resnetlab.config import RunConfig, load_yaml
from resnetlab.errors import ConfigError, ResnetlabError, first_line
from resnetlab.tuning.folds import CrossValidation, build_cross_validation
from resnetlab.tuning.results import (
    best_row, collect_rows, parameter_effects, write_best_json, write_curves_csv, write_effects_csv,
    write_trials_csv,
)
from resnetlab.tuning.space import SearchSpace, apply_params, format_value
from resnetlab.tuning.study import (
    REFIT_ATTR, WORKER_ATTR, Heartbeat, ask, StudyView, check_setup, claim_verdict, describe_storage,
    finish_error, finish_skipped, has_work, open_study, optuna_logging, recover_dead_trials, resolve_storage,
    root_number, study_is_settled, tell, worker_record,
)
from resnetlab.tuning.trial import METRICS, PruneRule, TrialPruned, run_trial
from resnetlab.utils.io import write_json, write_text
from resnetlab.utils.runlog import RunLog


@dataclass
class TuneOptions:
    out: Path
    search: Literal["grid", "optuna"] = "grid"
    folds: int = 3
    n_trials: int | None = None  # optuna: trials to finish between all workers
    metric: Literal["val_top1", "val_loss"] = "val_top1"
    storage: str | None = None  # None: DIR/study.db
    study_name: str | None = None  # None: the tune folder's name
    pruner: Literal["auto", "median", "none"] = "auto"  # auto: median for an Optuna search, none for a grid
    prune_startup_trials: int = 3
    prune_warmup_epochs: int = 1
    trial_budget: float | None = None  # minutes per trial, split over its folds
    timeout: float | None = None  # minutes for this worker to start new trials
    refit: bool = False
    overwrite: bool = False
    sampler_seed: int | None = None
    command: str | None = None  # the command line, for the report

    def __post_init__(self) -> None:
        """Options that contradict each other fail here, when they are built (the search space is checked against
        them in :func:`tune_job`)."""
        if self.metric not in METRICS:
            raise ConfigError(f"--metric '{self.metric}': choose one of {', '.join(METRICS)}")
        if self.folds < 2:
            raise ConfigError(f"--folds {self.folds}: k-fold cross-validation needs at least 2 folds")
        if self.search == "grid":
            if self.n_trials is not None:
                raise ConfigError("--trials is for --search optuna; a grid runs every combination once")
        elif self.search == "optuna":
            if not self.n_trials or self.n_trials < 1:
                raise ConfigError("--search optuna needs --trials N (the number of settings to try)")
        else:
            raise ConfigError(f"--search '{self.search}': choose grid or optuna")
        if self.pruner not in ("auto", "median", "none"):
            raise ConfigError(f"--pruner '{self.pruner}': choose auto, median or none")
        if self.trial_budget is not None and self.trial_budget <= 0:
            raise ConfigError(f"--trial-budget {self.trial_budget}: give minutes above 0")


@dataclass
class TuneOutcome:
    out: Path
    trials_run: int
    rows: list = field(default_factory=list)
    best: dict[str, Any] | None = None
    refit_dir: Path | None = None
    settled: bool = False


def tune_job(base: RunConfig, space: SearchSpace, options: TuneOptions) -> TuneOutcome:
    """Run (or resume, or join) the search described by ``base``, ``space`` and ``options``."""
    with optuna_logging():  # Optuna's per-trial INFO lines would repeat the tune log; restored afterwards
        return _tune_job(base, space, options)


def _tune_job(base: RunConfig, space: SearchSpace, options: TuneOptions) -> TuneOutcome:
    _check_options(space, options)
    out = Path(options.out)
    if options.overwrite:
        _check_discardable(out)
    # The data is read and cut into folds before anything is discarded: bad data leaves an earlier tune as it was.
    cv = build_cross_validation(base, options.folds)
    if options.overwrite:
        _discard_previous(out, options)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out / "tune.log", quiet=base.logging.quiet)
    try:
        return _tune(base, space, options, out, log, cv)
    finally:
        log.close()


def _check_options(space: SearchSpace, options: TuneOptions) -> None:
    """What the options (checked when built) ask of the search space."""
    if not space:
        raise ConfigError("nothing to search: give --grid KEY=V1,V2 ... or --space FILE.yaml")
    if options.search == "grid" and not space.is_grid():
        ranges = [k for k, p in space.params.items() if p.kind != "categorical"]
        raise ConfigError(f"--search grid takes lists of values, but {', '.join(ranges)} is a range; "
                          "use --search optuna --trials N for ranges")


# Files only a tune writes: --overwrite discards a folder holding one of them, and nothing else.
TUNE_MARKERS = ("tune.log", "tune.json", "base_config.yaml")


def _check_discardable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not any((out / name).is_file() for name in TUNE_MARKERS):
        raise ConfigError(f"--out '{out}' is not a resnetlab tune folder (no tune.log or tune.json), so --overwrite "
                          "will not delete it; choose another folder")


def _discard_previous(out: Path, options: TuneOptions) -> None:
    _check_discardable(out)
    if options.storage not in (None, "", "sqlite", "journal"):
        storage = resolve_storage(options.storage, out)
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=options.study_name or out.resolve().name, storage=storage)
    if out.exists():
        shutil.rmtree(out)


def _pruner_name(options: TuneOptions) -> str:
    if options.pruner == "auto":
        return "median" if options.search == "optuna" else "none"
    return options.pruner


def _setup(base: RunConfig, space: SearchSpace, options: TuneOptions, cv: CrossValidation) -> dict[str, Any]:
    """What must be the same for every worker and every resumption of one study."""
    config = base.to_dict()
    config.pop("logging")  # console output does not change a result
    pruner = _pruner_name(options)
    return {
        "version": 1,
        "search": options.search,
        "space": space.to_dict(),
        "folds": options.folds,
        "metric": options.metric,
        "n_trials": options.n_trials,
        "trial_budget": options.trial_budget,
        "pruner": {"name": pruner, "startup_trials": options.prune_startup_trials,
                   "warmup_epochs": options.prune_warmup_epochs},
        "cv_fingerprint": cv.fingerprint(),
        "base_config": config,
    }


def _sampler(space: SearchSpace, options: TuneOptions):
    if options.search == "grid":
        # Every worker must use the same seed: the grid's order (for re-evaluations) is drawn from it.
        return optuna.samplers.GridSampler(space.grid_for_optuna(), seed=options.sampler_seed or 0)
    # constant_liar: a worker asking while others run treats their trials as already scored (badly), so parallel
    # workers spread out instead of proposing the same point.
    return optuna.samplers.TPESampler(seed=options.sampler_seed, constant_liar=True,
                                      n_startup_trials=min(10, max(2, options.n_trials // 3)))


def _pruner(options: TuneOptions):
    if _pruner_name(options) == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=options.prune_startup_trials, n_warmup_steps=0)


def _tune(base: RunConfig, space: SearchSpace, options: TuneOptions, out: Path, log: RunLog,
          cv: CrossValidation) -> TuneOutcome:
    worker = worker_record()
    log(f"tune worker {worker['host']}:{worker['pid']} in {out}")
    log(cv.describe())
    setup = _setup(base, space, options, cv)
    storage = resolve_storage(options.storage, out)
    study_name = options.study_name or out.resolve().name
    direction = METRICS[options.metric]
    study = open_study(storage, study_name, direction=direction, sampler=_sampler(space, options),
                       pruner=_pruner(options))
    check_setup(study, setup, relaxed=("n_trials",))
    storage_text = describe_storage(options.storage or storage)
    write_json(out / "tune.json", {**setup, "storage": storage_text, "study_name": study_name,
                                   "command": options.command})
    write_text(out / "base_config.yaml", base.to_yaml())
    grid_size = space.grid_size() if options.search == "grid" else None
    log(f"study '{study_name}' in {storage_text}: " + (
        f"grid of {grid_size} settings" if grid_size else f"{options.n_trials} Optuna trials")
        + f", {options.folds} folds each, objective {options.metric} ({direction})")

    prune = PruneRule(enabled=_pruner_name(options) != "none", warmup_epochs=options.prune_warmup_epochs)
    started = time.time()
    trials_run = 0
    while True:
        recover_dead_trials(study, log)
        if options.timeout is not None and time.time() - started > options.timeout * 60:
            log(f"--timeout of {options.timeout:g} min reached: this worker starts no more trials")
            break
        if not has_work(StudyView.of(study), grid_size=grid_size, n_trials=options.n_trials):
            break
        trial = ask(study)
        reason = claim_verdict(StudyView.of(study), trial.number, n_trials=options.n_trials)
        if reason is not None:
            finish_skipped(study, trial, reason)
            continue
        _run_one(study, trial, base, space, cv, options, out, prune, worker, log)
        trials_run += 1

    return _finish(study, base, space, cv, options, out, setup, storage_text, study_name, trials_run, log)


def _run_one(study: optuna.Study, trial: optuna.Trial, base: RunConfig, space: SearchSpace, cv: CrossValidation,
             options: TuneOptions, out: Path, prune: PruneRule, worker: dict[str, Any], log: RunLog) -> None:
    trial.set_user_attr(WORKER_ATTR, worker)
    heartbeat = Heartbeat(study, trial._trial_id)
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    trial_dir = out / "trials" / f"{root_number(frozen):04d}"
    try:
        params = space.suggest(trial)
        label = ", ".join(f"{k}={format_value(v)}" for k, v in params.items())
        retry = root_number(frozen) != trial.number
        log(f"trial {trial.number}{f' (again, for trial {root_number(frozen)})' if retry else ''}: {label}")
        cfg = apply_params(base, params, f"trial {trial.number}")
        write_text(trial_dir / "config.yaml", cfg.to_yaml())
        result = run_trial(trial, cfg, cv, trial_dir, metric=options.metric, prune=prune,
                           trial_budget_minutes=options.trial_budget, log=log)
        if not math.isfinite(result["mean"]):
            finish_error(study, trial, f"{options.metric} is not a number (training diverged)")
            log(f"trial {trial.number}: failed, {options.metric} is not a number (training diverged)")
            return
        try:
            tell(study, trial, result["mean"])
        except ValueError:  # another worker took this one for dead and failed it; its retry runs the setting
            log(f"trial {trial.number}: was failed by another worker meanwhile; its retry will count instead")
            return
        log(f"trial {trial.number}: mean {options.metric} {result['mean']:.4f} +/- {result['std']:.4f}")
    except TrialPruned as pruned:
        trial.set_user_attr("pruned_at", {"fold": pruned.fold, "epoch": pruned.epoch})
        tell(study, trial, state=TrialState.PRUNED)
        log(f"trial {trial.number}: {pruned}")
    except (ResnetlabError, torch.OutOfMemoryError) as err:
        # A setting that cannot run (too large a batch, a model that does not fit the input) fails alone.
        finish_error(study, trial, first_line(err))
        log(f"trial {trial.number}: failed: {err}")
    except BaseException as err:
        if isinstance(err, Exception):
            finish_error(study, trial, f"{type(err).__name__}: {err}")
            log(f"trial {trial.number}: failed with a bug; traceback:\n{traceback.format_exc()}")
        else:
            # Interrupted (Ctrl-C, SystemExit): fail it without a status so the next worker runs it again.
            with contextlib.suppress(Exception):
                tell(study, trial, state=TrialState.FAIL)
            log(f"trial {trial.number}: interrupted; it runs again when a worker starts")
        raise
    finally:
        heartbeat.stop()


def _finish(study: optuna.Study, base: RunConfig, space: SearchSpace, cv: CrossValidation, options: TuneOptions,
            out: Path, setup: dict[str, Any], storage_text: str, study_name: str, trials_run: int,
            log: RunLog) -> TuneOutcome:
    settled = study_is_settled(StudyView.of(study))
    rows, effects = write_results(study, base, space, options, out)
    best = best_row(rows)
    refit_dir = None
    if best is None:
        log("no setting finished" + ("" if settled else " yet (other workers are still running trials)"))
    else:
        log(f"best: trial {best.number}, mean {options.metric} {best.score:.4f}: "
            + ", ".join(f"{k}={format_value(v)}" for k, v in best.params.items()))
        if options.refit and settled:
            refit_dir = refit_best(study, base, best, cv, out, log)
            rows, effects = write_results(study, base, space, options, out)
        elif options.refit:
            log("refit left to the last worker: trials are still running or queued in other workers")
    md, _ = _render(study, out, rows, space, effects, setup, options, cv, storage_text, study_name, settled)
    log(f"results: {out / 'trials.csv'}, {out / 'best.json'}; report: {md}")
    best_record = _read_json(out / "best.json")
    return TuneOutcome(out=out, trials_run=trials_run, rows=rows, best=best_record, refit_dir=refit_dir,
                       settled=settled)


def write_results(study: optuna.Study, base: RunConfig, space: SearchSpace, options: TuneOptions, out: Path):
    """Rewrite the data files from the study; returns the rows and the parameter effects."""
    rows = collect_rows(study, space, options.folds, options.metric)
    effects = parameter_effects(rows, space, options.metric)
    write_trials_csv(rows, space, options.folds, out / "trials.csv")
    write_curves_csv(rows, out / "curves.csv")
    write_effects_csv(effects, options.metric, out / "effects.csv")
    best = best_row(rows)
    best_config = apply_params(base, best.params).to_dict() if best else None
    write_best_json(study, rows, best_config, options.metric, out / "best.json")
    return rows, effects


def _render(study, out, rows, space, effects, setup, options, cv, storage_text, study_name, settled):
    importances = None
    complete = [r for r in rows if r.state == "complete"]
    if len(space.params) > 1 and len(complete) >= 8:
        with contextlib.suppress(Exception):  # an estimate for the report only; it needs enough varied trials
            importances = optuna.importance.get_param_importances(study)
    from resnetlab.tuning.report import render_tune_report

    return render_tune_report(out, rows=rows, space=space, effects=effects,
                              setup={**setup, "command": options.command}, metric=options.metric,
                              cv_text=cv.describe(), storage_text=storage_text, study_name=study_name,
                              refit=study.user_attrs.get(REFIT_ATTR), settled=settled, importances=importances)


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------------------------------------------
# Refit
# ---------------------------------------------------------------------------------------------------------------


def refit_best(study: optuna.Study, base: RunConfig, best, cv: CrossValidation, out: Path, log: RunLog) -> Path | None:
    """Train the best setting as an ordinary run on the training split, test it once, record the result.

    The run is the one ``resnetlab train`` would make of this config: trained on the data's training split (the
    data the folds were cut from), with the data's own validation split to pick the best epoch and calibrate, and
    evaluated on the test split. A refit killed midway resumes from its last checkpoint.
    """
    from resnetlab.jobs.train import train_job
    from resnetlab.tuning.trial import can_resume

    cfg = apply_params(base, best.params, "refit")
    refit_dir = out / "refit"
    with _exclusive(out / ".refit.lock") as acquired:
        if not acquired:
            log("refit: another worker on this machine is refitting")
            return None
        metrics_file = refit_dir / "eval" / "metrics.json"
        same_config = (refit_dir / "config.yaml").is_file() and load_yaml(refit_dir / "config.yaml") == cfg.to_dict()
        if same_config and metrics_file.is_file():
            log(f"refit: already done for trial {best.number} in {refit_dir}")
        else:
            resume = can_resume(refit_dir, cfg)
            log(f"refit: trial {best.number}'s setting on the whole training split, "
                f"{'resuming' if resume else 'into'} {refit_dir}")
            train_job(cfg, refit_dir, overwrite=not resume, resume=resume, source=cv.source, plan=cv.refit_plan())
        metrics = _read_json(metrics_file) or {}
        test = {k: metrics.get(k) for k in ("top1", "top5", "balanced_accuracy", "macro_f1", "num_samples")}
        study.set_user_attr(REFIT_ATTR, {"trial": best.number, "params": best.params, "cv_mean": best.score,
                                         "host": socket.gethostname(), "dir": str(refit_dir.resolve()),
                                         "report": "refit/report.md", "test": test})
        log(f"refit: test top-1 {test['top1']:.4f} on {test['num_samples']} images; report {refit_dir / 'report.md'}")
        return refit_dir


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """An advisory lock on a file, not waited for: yields False if another process holds it."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): workers on one machine share a folder there only with care
        yield True
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_path, "a")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True
    finally:
        handle.close()  # closing the file releases the lock

