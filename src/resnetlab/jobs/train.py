"""The main job: train, then evaluate on the test split, then write the report, all into one run directory."""

from __future__ import annotations

import glob
import itertools
import logging
import os
import platform
import shutil
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from resnetlab._version import __version__
from resnetlab.checkpoint import load_checkpoint
from resnetlab.config import RunConfig
from resnetlab.data.build import RunData, build_run_data, eval_batches_for_table
from resnetlab.data.datasets import open_dataset
from resnetlab.data.records import DatasetSource
from resnetlab.data.splits import SplitPlan, plan_data_splits
from resnetlab.data.splits import write_split_manifest
from resnetlab.engine.budget import BudgetPlan, fit_epochs_to_budget
from resnetlab.engine.distributed import DistributedContext, init_distributed, wrap_model
from resnetlab.engine.optim import freeze_parameters
from resnetlab.engine.runtime import Runtime, resolve_runtime, seed_everything
from resnetlab.engine.trainer import Trainer
from resnetlab.errors import ConfigError
from resnetlab.evaluation.selective import operating_point_from_record
from resnetlab.jobs.evaluate import collect_logits, deployment_check, evaluate_model_on_batches
from resnetlab.jobs.finetune import (
    InitFrom,
    build_init_model,
    resolve_init_from,
    to_model_classes,
    write_finetune_comparison,
)
from resnetlab.reporting.runs_index import RUN_MARKERS, is_run_dir
from resnetlab.utils.io import read_json, write_csv_rows, write_json, write_text
from resnetlab.utils.runlog import RunLog

logger = logging.getLogger(__name__)


def default_run_dir(recipe: str) -> Path:
    return Path("runs") / f"{recipe}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


# Everything a run (and `evaluate` or `export` into it) writes at its top level: --overwrite deletes these and refuses a run
# folder that holds anything else, which is the user's own (a note, a dataset, an export) and not ours to delete.
RUN_ENTRIES = frozenset(RUN_MARKERS + ("config.yaml", "eval", "evaluations", "exports", "plots", "report.md",
                                       "report.html", "tensorboard"))


def check_run_dir(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse an output folder the run may not use, before anything is read or written."""
    if resume:
        if not (out / "checkpoints" / "last.pt").is_file():
            raise ConfigError(f"--resume '{out}': no checkpoints/last.pt there to resume from")
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"--out '{out}' is not empty; choose another folder, add --overwrite, or --resume it")
        if not is_run_dir(out):
            raise ConfigError(f"--out '{out}' is not a resnetlab run (no config.yaml with run_info.json, checkpoints/ "
                              "or train.log), so --overwrite will not delete it; choose another folder")
        foreign = sorted(entry.name for entry in out.iterdir()
                         if entry.name not in RUN_ENTRIES and not entry.name.endswith(".tmp"))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ConfigError(f"--out '{out}' is a resnetlab run but also holds what no run writes ({shown}); "
                              "--overwrite deletes only a run's own files: move those out or choose another folder")


def prepare_run_dir(out: Path, *, overwrite: bool, resume: bool) -> Path:
    """Create the folder the run writes into, once its config and data have been checked, and return it.

    That is ``out`` itself, except when ``out`` holds a run that --overwrite replaces: then the new run is written
    into a new folder beside it, which :func:`replace_run_dir` moves into place when the run has finished, so a
    run that fails or is killed leaves the earlier one as it was.
    """
    recover_interrupted_replacement(out)
    check_run_dir(out, overwrite=overwrite, resume=resume)  # again: the folder may have changed meanwhile
    if resume:
        # A run killed while writing leaves the temporary file of that write behind (the checkpoint it was
        # replacing is intact): remove such leftovers.
        for leftover in itertools.chain(out.glob(".*.tmp"), (out / "checkpoints").glob(".*.tmp"),
                                        (out / "eval").glob(".*.tmp")):
            leftover.unlink(missing_ok=True)
        return out
    if out.is_dir() and any(out.iterdir()):
        new = _free_sibling(out.resolve(), "new")
        new.mkdir()
        return new
    out.mkdir(parents=True, exist_ok=True)
    return out


def replace_run_dir(new: Path, out: Path) -> None:
    """Put the finished run ``new`` (from :func:`prepare_run_dir`) in the place of the run in ``out``."""
    target = out.resolve()
    if target.exists():
        # Two renames: a kill between them leaves both runs complete, the earlier one in .NAME.old-PID.
        old = _free_sibling(target, "old")
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old)
    else:
        os.rename(new, target)


def recover_interrupted_replacement(out: Path) -> None:
    """Clear what an --overwrite killed before it finished left beside ``out``.

    Its half-written new run (``.NAME.new-PID``) is removed. If it was killed between its two renames, ``out`` is
    missing and the earlier run waits in ``.NAME.old-PID``: that run is put back, so the folder is as it was before
    the interrupted --overwrite. Only siblings of processes that no longer run are touched.
    """
    target = out.resolve()
    for role in ("old", "new"):  # old first: while a finished run is being swapped in, both exist
        for sibling in sorted(target.parent.glob(f".{glob.escape(target.name)}.{role}-*")):
            pid = sibling.name.rsplit(f".{role}-", 1)[1].split("-")[0]
            if not pid.isdigit() or _process_alive(int(pid)) or not sibling.is_dir():
                continue
            if role == "old" and not target.exists():
                os.rename(sibling, target)
                logger.warning("put back the run in %s that an interrupted --overwrite had moved aside", target)
            else:
                shutil.rmtree(sibling, ignore_errors=True)
                logger.warning("removed %s, left by an interrupted --overwrite", sibling)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _free_sibling(folder: Path, role: str) -> Path:
    """An unused name for a hidden folder beside ``folder`` (on the same file system, so that a rename is a move)."""
    stem = f".{folder.name}.{role}-{os.getpid()}"
    return next(sibling for sibling in (folder.parent / (stem + (f"-{n}" if n else "")) for n in itertools.count())
                if not sibling.exists())


def model_kwargs_of(cfg: RunConfig) -> dict:
    kwargs = dict(cfg.model.kwargs)
    if cfg.model.drop_rate is not None:
        kwargs["drop_rate"] = cfg.model.drop_rate
    return kwargs


def build_model(cfg: RunConfig, num_classes: int, log: RunLog) -> tuple[torch.nn.Module, str]:
    """The model and where its weights came from (said in the log, run_info.json and the report)."""
    from resnetlab.errors import ResnetlabError
    from resnetlab.models import count_params, create_model

    m = cfg.model
    common = dict(zero_init_residual=m.zero_init_residual, **model_kwargs_of(cfg))
    if m.pretrained_path:
        model = create_model(m.name, num_classes, pretrained_path=m.pretrained_path, **common)
        origin = f"weights file {m.pretrained_path}"
    elif m.pretrained:
        try:
            model = create_model(m.name, num_classes, pretrained=True, **common)
            origin = "ImageNet weights (torchvision)"
        except ResnetlabError as err:
            if m.pretrained != "auto":
                raise
            log(f"warning: {err}; training from random initialisation instead (model.pretrained=auto)")
            model = create_model(m.name, num_classes, **common)
            origin = "random initialisation (ImageNet weights unavailable offline)"
    else:
        model = create_model(m.name, num_classes, **common)
        origin = "random initialisation"
    log(f"model {m.name}: {count_params(model):,} parameters, {num_classes} classes, from {origin}")
    return model, origin


def train_job(cfg: RunConfig, out: Path, *, overwrite: bool = False, resume: bool = False,
              source: DatasetSource | None = None, plan: SplitPlan | None = None, evaluate: bool = True,
              report: bool = True, on_epoch_end=None) -> Path:
    """Run the whole job; returns the run directory. Raises ResnetlabError for anything the user can fix.

    ``source``/``plan`` replace reading and splitting ``cfg.data`` (tuning passes each fold's split); ``evaluate``
    and ``report`` can be turned off for runs whose test split is not to be looked at (k-fold trials).
    ``on_epoch_end(epoch, row)`` is called after every epoch; returning False stops training (tuning's pruner).

    Everything a user's input can fail on (the output folder, the model name, the data, its images) is checked
    before the run directory is touched; with ``overwrite`` the earlier run is replaced only when the new one has
    finished.
    """
    dist = init_distributed(cfg.train.device)
    if dist.is_main:
        check_run_dir(out, overwrite=overwrite, resume=resume)
    # Only rank 0 writes; the others log nowhere.
    log = RunLog(None, quiet=cfg.logging.quiet, enabled=dist.is_main)
    started = time.time()
    run_dir = None
    try:
        # model.init_from: the checkpoint's model and preprocessing replace the config's (config.yaml says so)
        cfg, init = resolve_init_from(cfg, log)
        inputs = _open_inputs(cfg, log, dist, source=source, plan=plan, init=init)
        # Every rank must write (rank 0) or read (checkpoints on --resume) the same folder: rank 0 chooses it.
        run_dir = dist.broadcast_object(prepare_run_dir(out, overwrite=overwrite, resume=resume)
                                        if dist.is_main else None)
        if dist.is_main:
            # config.yaml first: with it and train.log the folder is recognisably a run from its first moment on
            write_text(run_dir / "config.yaml", cfg.to_yaml())
        log.attach(run_dir / "train.log")
        if run_dir != out:
            log(f"--overwrite: writing the new run in {run_dir}; it replaces the run in {out} when it has finished")
        _train(cfg, run_dir, log, dist, inputs, resume=resume, started=started, evaluate=evaluate, report=report,
               on_epoch_end=on_epoch_end)
        if dist.is_main and run_dir != out:
            log(f"replacing the earlier run in {out} with this one")
    except BaseException:
        if dist.is_main and run_dir is not None and run_dir != out:
            log.close()
            shutil.rmtree(run_dir, ignore_errors=True)  # the unfinished new run; the earlier one stays
        raise
    finally:
        log.close()
    if dist.is_main and run_dir != out:
        replace_run_dir(run_dir, out)
    return out


@dataclass
class _Inputs:
    """What a run is built from, opened and checked before its directory is created."""

    runtime: Runtime
    eval_runtime: Runtime
    data: RunData
    model: torch.nn.Module
    net: torch.nn.Module
    origin: str
    init: InitFrom | None = None  # the checkpoint a fine-tuning run starts from


def _open_inputs(cfg: RunConfig, log: RunLog, dist: DistributedContext, *, source: DatasetSource | None,
                 plan: SplitPlan | None, init: InitFrom | None = None) -> _Inputs:
    # Check what the user named before printing anything, so that a typo gets one clear line and nothing else.
    from resnetlab.models import resolve_model_name

    resolve_model_name(cfg.model.name)
    data_cfg = per_rank_config(cfg, dist.world_size)
    source = source or open_dataset(cfg.data)
    if init is not None:
        # Split in the data's own class list (as `evaluate` rebuilds the splits later), then relabel into the model's.
        source, plan = to_model_classes(source, plan or plan_data_splits(source, cfg.data), init, log)
    runtime = resolve_runtime(cfg.train, local_rank=dist.local_rank if dist.enabled else None)
    # The same seed on every rank: the in-memory batches draw their order from the global RNG, and the ranks must
    # agree on it to take disjoint shards of one permutation (as DistributedSampler does with its shared seed).
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    log(f"resnetlab {__version__}, torch {torch.__version__}: {runtime.describe()}")
    eval_runtime = runtime.for_evaluation(cfg.eval.precision)
    if eval_runtime is not runtime:
        log("validation and test in float32 (eval.precision=fp32), as predict and serve run models below 1 GMAC")
    if dist.enabled:
        log(f"distributed: {dist.world_size} processes ({torch.distributed.get_backend()}), global batch "
            f"{cfg.data.batch_size} = {dist.world_size} x {data_cfg.data.batch_size} per process"
            f"{', SyncBatchNorm' if cfg.train.sync_bn else ''}")

    data = build_run_data(data_cfg, rank=dist.rank, world_size=dist.world_size,
                          pin_memory=runtime.device.type == "cuda", log=log, source=source, plan=plan,
                          normalization=init.normalization if init is not None else None,
                          absent_classes_ok=init is not None)
    if dist.enabled and dist.is_main:
        # Rank 0 validates and tests on the whole splits, not on its shard of them.
        data.val = eval_batches_for_table(data.plan.val, data.prep, cfg.data.eval_batch_size,
                                          on_bad_image=cfg.data.on_bad_image, split="val")[0]
        data.test = eval_batches_for_table(data.plan.test, data.prep, cfg.data.eval_batch_size,
                                           on_bad_image=cfg.data.on_bad_image, split="test")[0]
    class_map = ", ".join(f"{i}={cid}" + (f" ({name})" if str(cid) != name else "")
                          for i, (cid, name) in enumerate(zip(data.source.class_ids, data.source.class_names)))
    log(f"classes ({data.source.num_classes}): {class_map}")

    if init is not None:
        model, origin = build_init_model(init, model_kwargs_of(cfg), log)
    else:
        model, origin = build_model(cfg, data.source.num_classes, log)
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.freeze != "none":  # before DistributedDataParallel records which parameters need gradients
        log(freeze_parameters(model, cfg.train.freeze).describe())
    model, net = wrap_model(model, dist, sync_bn=cfg.train.sync_bn)
    if cfg.train.compile:
        net = torch.compile(net)
        log("torch.compile: on (the first steps include compilation)")
    return _Inputs(runtime=runtime, eval_runtime=eval_runtime, data=data, model=model, net=net, origin=origin,
                   init=init)


def _train(cfg: RunConfig, out: Path, log: RunLog, dist: DistributedContext, inputs: _Inputs, *, resume: bool,
           started: float, evaluate: bool, report: bool, on_epoch_end=None) -> Path:
    runtime, eval_runtime, data, model, net, origin = (inputs.runtime, inputs.eval_runtime, inputs.data,
                                                       inputs.model, inputs.net, inputs.origin)
    if dist.is_main:
        write_split_manifest(data.plan, data.source.class_names, out / "splits.csv")
        _write_bad_images(data, out)

    def make_trainer(run_cfg: RunConfig, budget_plan: BudgetPlan | None = None) -> Trainer:
        return Trainer(run_cfg, data, model, runtime, out, log, model_kwargs=model_kwargs_of(run_cfg),
                       is_main=dist.is_main, ddp_model=net if net is not model else None, dist=dist,
                       on_epoch_end=on_epoch_end, meta_extra=inputs.init.meta_extra() if inputs.init else None,
                       budget_plan=budget_plan)

    trainer = make_trainer(cfg)
    if cfg.train.epochs_from_budget and not resume:
        # A resumed run keeps the epochs its first start chose (and re-planned): config.yaml records them.
        cfg, plan = _size_epochs_to_budget(cfg, trainer, out, log, dist)
        if trainer.tensorboard is not None:
            trainer.tensorboard.close()
        trainer = make_trainer(cfg, plan)
    if resume:
        trainer.resume_from(out / "checkpoints" / "last.pt")
    outcome = trainer.fit()
    if not trainer.has_val:
        kept = f"no validation split, kept epoch {outcome.best_epoch}"
    elif cfg.train.keep == "last":
        kept = (f"kept the last epoch ({outcome.best_epoch}, train.keep=last): "
                f"{cfg.train.monitor} {outcome.best_metric:.4f}")
    else:
        kept = f"best {cfg.train.monitor} {outcome.best_metric:.4f} at epoch {outcome.best_epoch}"
    log(f"training stopped: {outcome.stopped_because}; {kept}; {outcome.train_seconds:.1f}s of training")
    dist.barrier()
    if not dist.is_main:
        dist.close()
        return out
    if not evaluate:
        _write_run_info(out, cfg, runtime, data, model, outcome, started, outcome.best_weights, dist, origin)
        dist.close()
        return out

    # Evaluate the best checkpoint (the weights early stopping restores) on the test split.
    best_file = out / "checkpoints" / "best.pt"
    best = load_checkpoint(best_file)
    model.load_state_dict(best["model"])
    collected = collect_logits(model, eval_runtime, data.test, data.val if len(data.plan.val) else None)
    calibration = _store_calibration(cfg, best_file, collected, log)
    if calibration is not None:
        best["meta"] = {**best["meta"], "calibration": calibration}
    eval_result = evaluate_model_on_batches(
        model, eval_runtime, data.test, data.plan.test, class_names=data.source.class_names, prep=data.prep,
        out_dir=out / "eval", topk=cfg.eval.topk, gradcam=cfg.eval.gradcam, split_name="test", collected=collected,
        labels_present=inputs.init.labels_present if inputs.init else None,
        temperature=calibration["temperature"] if calibration else None,
        operating_point=operating_point_from_record(calibration), log=log)
    _write_run_info(out, cfg, runtime, data, model, outcome, started, best["meta"].get("weights", "raw"), dist, origin)
    log(f"test top-1 {eval_result.metrics['top1']:.4f}, top-5 {eval_result.metrics['top5']:.4f}, balanced accuracy "
        f"{eval_result.metrics['balanced_accuracy']:.4f} on {eval_result.metrics['num_samples']} images")
    if cfg.eval.deployment_check:
        deployment = deployment_check(out / "checkpoints" / "best.pt", best["meta"], data.test, eval_result, log=log)
        if deployment is not None:
            write_json(out / "eval" / "metrics.json", {**read_json(out / "eval" / "metrics.json"),
                                                       "deployment": deployment})
    if inputs.init is not None:
        write_finetune_comparison(inputs.init, model, eval_runtime, data.test, spec=data.source.spec,
                                  out_dir=out / "eval", batch_size=cfg.data.eval_batch_size, log=log)
    if report:
        from resnetlab.reporting.report import render_report

        md, html = render_report(out, load_image=gallery_image_loader(out))
        log(f"report: {md} and {html}")
    dist.close()
    return out


def _store_calibration(cfg: RunConfig, best_file: Path, collected, log: RunLog) -> dict | None:
    """Fit the temperature and operating point on the validation logits of the best weights and store them in
    ``best_file`` (as ``meta["calibration"]``), before anything (the deployment check's export cache) keys on the
    checkpoint's sha256. None for a run without a validation split."""
    from resnetlab.checkpoint import store_calibration
    from resnetlab.evaluation.selective import fit_calibration

    if collected.val_logits is None:
        log("calibration: no validation split, so no temperature or operating point stored (confidences stay "
            "uncalibrated, every answer accepted); fit them later with `resnetlab calibrate RUN --data SPEC`")
        return None
    record = fit_calibration(collected.val_logits, collected.val_targets, coverage=cfg.eval.coverage,
                             max_error=cfg.eval.max_error)
    store_calibration(best_file, record)
    point = record["operating_point"]
    log(f"calibration on {record['num_images']} validation images: temperature {record['temperature']:.4g} "
        f"(ECE {record['ece_before']:.4f} -> {record['ece_after']:.4f}); operating point ({point['rule']} "
        f"{point['target']:g}): threshold {point['threshold']:.4f}, coverage {point['coverage']:.2%}, error among "
        f"accepted {point['error']:.2%}")
    return record


def per_rank_config(cfg: RunConfig, world_size: int) -> RunConfig:
    """The config each process builds its data from: ``data.batch_size`` is the global batch, split over ranks.

    So a recipe's batch size and learning rate mean the same thing with 1 or N processes.
    """
    if world_size <= 1:
        return cfg
    if cfg.data.batch_size % world_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is the global batch and must divide evenly over "
                          f"{world_size} processes; choose a multiple of {world_size}")
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"batch_size": cfg.data.batch_size // world_size})})


def gallery_image_loader(run_dir: Path):
    """Open an image as the model saw it (ROI-cropped, from the run's splits.csv), for the report's galleries.

    Built from the run's files alone, so `resnetlab report RUN_DIR` re-renders the same galleries as the run did.
    """
    from resnetlab.config import load_yaml
    from resnetlab.data.preprocessing import load_image
    from resnetlab.utils.io import read_csv

    manifest = run_dir / "splits.csv"
    rois = {}
    if manifest.is_file():
        rois = {row["path"]: [int(v) for v in row["roi"].split()] for row in read_csv(manifest) if row.get("roi")}
    config = run_dir / "config.yaml"
    roi_crop = bool(load_yaml(config).get("data", {}).get("roi_crop", True)) if config.is_file() else True

    def load(path: str):
        return load_image(path, rois.get(path), roi_crop)

    return load


def _write_bad_images(data: RunData, out: Path) -> None:
    rows = [(split, b.path, b.reason) for split, bad in data.bad.items() for b in bad]
    if not rows:
        return
    write_csv_rows(out / "bad_images.csv", ["split", "path", "reason"], rows, lineterminator="\r\n")


def _size_epochs_to_budget(cfg: RunConfig, trainer: Trainer, out: Path, log: RunLog,
                           dist: DistributedContext) -> tuple[RunConfig, BudgetPlan]:
    fit = fit_epochs_to_budget(trainer, cfg.train.time_budget, cfg.train.epochs)
    if fit.epochs == cfg.train.epochs:
        verdict = (f"the train.epochs cap of {fit.epochs}, about {sum(fit.plan.epoch_seconds(fit.epochs)) / 60:.1f} of "
                   f"the {cfg.train.time_budget:g} minutes")
    else:
        verdict = f"{fit.epochs} epoch(s) fill the {cfg.train.time_budget:g}-minute budget"
    full, small = cfg.data.input_size, cfg.train.progressive.min_size
    epoch_time = f"{fit.seconds_per_epoch(full):.1f} s"
    if fit.plan.small_step_seconds is not None:
        epoch_time += f" at {full} px and {fit.seconds_per_epoch(small):.1f} s at {small} px (train.progressive)"
    log(f"train.epochs_from_budget: {fit.steps_timed} timed steps with this run's pipeline took "
        f"{fit.plan.seconds_per_step * 1000:.0f} ms each ({fit.images_per_second:.0f} images/s), so an epoch of "
        f"{trainer.steps_per_epoch} steps takes about {epoch_time}: {verdict}")
    # config.yaml says what ran: the epochs chosen, fixed, so that --resume and a rerun of it train the same schedule
    sized = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": fit.epochs,
                                                                         "epochs_from_budget": False})})
    if dist.is_main:
        write_text(out / "config.yaml", sized.to_yaml())
    return sized, fit.plan


def _write_run_info(out: Path, cfg: RunConfig, runtime, data: RunData, model, outcome, started: float,
                    best_weights: str, dist: DistributedContext, origin: str) -> None:
    from resnetlab.models import count_params

    write_json(out / "run_info.json", {
        "resnetlab_version": __version__,
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": str(runtime.device) + (f" ({torch.cuda.get_device_name(runtime.device)})" if runtime.device.type == "cuda" else ""),
        "threads": runtime.threads,
        "precision": runtime.precision,
        "eval_precision": runtime.for_evaluation(cfg.eval.precision).precision,
        "channels_last": runtime.channels_last,
        "runtime_choices": runtime.reasons,
        "world_size": dist.world_size,
        "global_batch_size": cfg.data.batch_size,
        "start_time": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "end_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "total_seconds": round(time.time() - started, 2),
        "train_seconds": round(outcome.train_seconds, 2),
        "epochs_run": outcome.epochs_run,
        "stopped_because": outcome.stopped_because,
        "best_epoch": outcome.best_epoch,
        "best_metric": outcome.best_metric,
        "best_weights": best_weights,
        "monitor": cfg.train.monitor,
        "num_params": count_params(model),
        "model_origin": origin,
        "class_ids": data.source.class_ids,
        "class_names": data.source.class_names,
        "dataset": data.source.spec,
        "dataset_fingerprint": data.source.fingerprint(),
        "split_sizes": data.plan.sizes(),
        "split_strategy": data.plan.strategy,
        "split_sources": data.plan.sources,
        "preprocessing": data.prep.to_dict(),
        "in_memory_pipeline": data.in_memory,
        "bad_images": {k: len(v) for k, v in data.bad.items()},
    })


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
