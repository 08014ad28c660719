"""The training loop: one epoch of batches, validation, checkpoints, early stopping, time budget and exact resume.

Everything that decides the next batch is in ``last.pt`` (model, optimizer, schedule, grad scaler, EMA, epoch, step,
and the RNG states from which the data order and the augmentations are drawn), written at the end of every epoch;
so a run killed at any moment and resumed from ``last.pt`` replays the interrupted epoch exactly and continues as
if it had never stopped. Checkpoints are written atomically (temporary file, then rename), ``best.pt`` before
``last.pt``, so that no kill can leave a ``last.pt`` that refers to a best checkpoint not yet on disk.

The trainer trains; around it, :mod:`.evaluation_loop` validates, :mod:`.checkpoint_saver` decides which checkpoints
are kept and :mod:`.run_logging` writes metrics.csv, TensorBoard and the progress bar.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel

from resnetlab.checkpoint import build_meta, load_checkpoint
from resnetlab.config import LossConfig, RunConfig
from resnetlab.data.augment import build_mixing
from resnetlab.data.build import RunData
from resnetlab.engine.budget import BudgetPlan
from resnetlab.engine.checkpoint_saver import CheckpointSaver
from resnetlab.engine.distributed import DistributedContext
from resnetlab.engine.evaluation_loop import EpochResult, evaluate_loader
from resnetlab.engine.optim import (
    GradientPerturbation,
    create_optimizer,
    freeze_parameters,
    frozen_norm_layers,
    frozen_norm_statistics,
    wrap_optimizer,
)
from resnetlab.engine.progressive import epoch_input_size, resize_batch
from resnetlab.engine.run_logging import PROGRESS_EVERY, MetricsFile, Progress, TensorBoardSink, epoch_line
from resnetlab.engine.runtime import Runtime, rng_state, set_rng_state
from resnetlab.engine.schedule import Schedule
from resnetlab.errors import ConfigError
from resnetlab.utils.io import write_text
from resnetlab.utils.runlog import RunLog

@dataclass
class TrainOutcome:
    best_epoch: int
    best_metric: float
    epochs_run: int
    stopped_because: str
    train_seconds: float
    best_weights: str = "raw"  # which weights best.pt (and the model after fit) hold: "raw" or "ema"
    history: list[dict[str, Any]] = field(default_factory=list)


def loss_class_weights(cfg: LossConfig, train_counts: np.ndarray) -> torch.Tensor | None:
    """Per-class cross-entropy weights: none, 'balanced' (scikit-learn's n / (k * n_c)) or the user's list."""
    if cfg.class_weights == "none":
        return None
    num_classes = len(train_counts)
    if cfg.class_weights == "balanced":
        from sklearn.utils.class_weight import compute_class_weight

        # Over the classes that have training images: a model fine-tuned on some of its classes (model.init_from)
        # has classes without any; they get weight 0 (no target is ever theirs).
        counts = np.asarray(train_counts, dtype=np.int64)
        present = np.flatnonzero(counts > 0)
        labels = np.repeat(present, counts[present])
        weights = np.zeros(num_classes)
        weights[present] = compute_class_weight("balanced", classes=present, y=labels)
        return torch.as_tensor(weights, dtype=torch.float32)
    if len(cfg.class_weights) != num_classes:
        raise ConfigError(f"loss.class_weights has {len(cfg.class_weights)} numbers but the data has {num_classes} "
                          "classes; give one weight per class (in the class order train.log lists) or 'balanced'")
    if any(w < 0 for w in cfg.class_weights) or not any(w > 0 for w in cfg.class_weights):
        raise ConfigError("loss.class_weights must be non-negative with at least one positive weight")
    return torch.as_tensor(cfg.class_weights, dtype=torch.float32)


def create_ema(model: nn.Module, decay: float, warmup: bool) -> AveragedModel:
    """An exponential moving average of the weights and buffers (torch's ``AveragedModel``).

    With ``warmup`` the decay after ``n`` updates is ``min(decay, (1 + n) / (10 + n))`` (timm's ModelEma warm-up),
    so that the average is not dominated by the random initial weights in short runs.
    """

    @torch.no_grad()
    def ema_update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = int(num_averaged)
        step_decay = min(decay, (1 + n) / (10 + n)) if warmup else decay
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1 - step_decay)
        else:  # integer buffers (BatchNorm's num_batches_tracked) follow the model
            for avg, cur in zip(averaged, current):
                avg.copy_(cur)

    return AveragedModel(model, multi_avg_fn=ema_update, use_buffers=True)


class Trainer:
    def __init__(self, cfg: RunConfig, data: RunData, model: nn.Module, runtime: Runtime, run_dir: Path,
                 log: RunLog, *, model_kwargs: dict, is_main: bool = True, ddp_model: nn.Module | None = None,
                 dist: DistributedContext | None = None,
                 on_epoch_end: Callable[[int, dict[str, Any]], bool | None] | None = None,
                 meta_extra: dict[str, Any] | None = None, budget_plan: BudgetPlan | None = None):
        self.cfg = cfg
        self.data = data
        self.model = model  # the bare model: what checkpoints hold and validation runs
        # what training batches go through (the DDP wrapper and/or torch.compile of the model)
        self.net = ddp_model if ddp_model is not None else model
        self.runtime = runtime
        self.eval_runtime = runtime.for_evaluation(cfg.eval.precision)
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        self.log = log
        self.dist = dist or DistributedContext()
        self.is_main = is_main and self.dist.is_main
        self.model_kwargs = model_kwargs
        # Called with (epoch, metrics row) after each epoch is saved; returning False stops training there (the
        # tuner reports to its pruner this way). In a distributed run every rank calls it and must agree.
        self.on_epoch_end = on_epoch_end
        # Added to every checkpoint's meta (a dict merged into the entry of that name): a fine-tuned run records
        # the checkpoint it started from, and its data's fingerprints in the data's own class list.
        self.meta_extra = meta_extra or {}
        # train.epochs_from_budget: the cost model the epochs were sized with, to size them again as the run's real
        # speed shows (engine.budget); None trains train.epochs as given.
        self.budget_plan = budget_plan

        t = cfg.train
        # Without a validation split (data.val_fraction=0: a refit on all training data) every epoch counts as the
        # best, so the last weights are kept; nothing can be monitored.
        self.has_val = len(data.val) > 0
        if not self.has_val and (t.early_stopping_patience or cfg.schedule.name == "plateau"):
            raise ConfigError("early stopping and the plateau schedule monitor the validation split, but "
                              "data.val_fraction=0 leaves none; give a validation fraction or drop them")
        # train.freeze: the train job has frozen the model already, before DistributedDataParallel saw its
        # parameters; freezing again changes nothing and makes every Trainer honour the setting.
        freeze_parameters(model, t.freeze)
        self.frozen_norms = frozen_norm_layers(model)
        self.base_optimizer = create_optimizer(model, cfg.optim)
        self.optimizer = wrap_optimizer(self.base_optimizer, cfg.optim)
        self.perturbation = self.optimizer if isinstance(self.optimizer, GradientPerturbation) else None
        self.steps_per_epoch = min(len(data.train), t.max_steps_per_epoch or len(data.train))
        self.schedule = self._build_schedule(t.epochs)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
        self.ema = create_ema(model, t.ema_decay, t.ema_warmup) if t.ema else None
        weight = loss_class_weights(cfg.loss, data.train_counts)
        self.class_weight = weight.to(runtime.device) if weight is not None else None
        self.mixing = build_mixing(data.source.num_classes, cfg.augment.mixup_alpha, cfg.augment.cutmix_alpha)

        self.epoch = 0  # epochs completed
        self.step = 0
        self.best_metric: float | None = None
        self.best_epoch = 0
        self.best_weights = "raw"
        self.bad_epochs = 0
        self.train_seconds = 0.0
        self.saver = CheckpointSaver(self.ckpt_dir, keep_top_k=t.keep_top_k, save_every=t.save_every,
                                     mode=self._mode())
        self._epoch_metric: float | None = None
        self.metrics_file = MetricsFile(run_dir / "metrics.csv")
        self.tensorboard = (TensorBoardSink(run_dir / "tensorboard", data.prep.mean, data.prep.std)
                            if cfg.logging.tensorboard and self.is_main else None)

    # -- loss ---------------------------------------------------------------------------------------------------

    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Soft targets (mixup/cutmix) and hard targets both go through F.cross_entropy, which accepts either,
        # with class weights and label smoothing alike.
        return F.cross_entropy(logits.float(), targets, weight=self.class_weight,
                               label_smoothing=self.cfg.loss.label_smoothing)

    # -- state --------------------------------------------------------------------------------------------------

    def meta(self, weights: str = "raw") -> dict:
        source = self.data.source
        plan = self.data.plan
        meta = build_meta(
            model_name=self.cfg.model.name, model_kwargs=self.model_kwargs, class_ids=source.class_ids,
            class_names=source.class_names, prep=self.data.prep, config=self.cfg.to_dict(),
            data={"spec": source.spec, "fingerprint": source.fingerprint(), "split_strategy": plan.strategy,
                  "split_sources": plan.sources, "split_sizes": plan.sizes(),
                  "split_fingerprints": {n: getattr(plan, n).fingerprint() for n in ("train", "val", "test")}},
            epoch=self.epoch, monitor=self.cfg.train.monitor, best_metric=self.best_metric, weights=weights)
        for key, value in self.meta_extra.items():
            meta[key] = {**meta[key], **value} if isinstance(meta.get(key), dict) and isinstance(value, dict) else value
        return meta

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "trainer": {"epoch": self.epoch, "step": self.step, "best_metric": self.best_metric,
                        "best_epoch": self.best_epoch, "best_weights": self.best_weights,
                        "bad_epochs": self.bad_epochs, "train_seconds": self.train_seconds,
                        "top_k": [list(x) for x in self.saver.top_k]},
            "rng": rng_state(),
            "meta": self.meta(),
        }

    def load_state_dict(self, state: dict) -> list[str]:
        """Restore everything from a ``last.pt`` dict; returns warnings (a schedule of another length)."""
        warnings = []
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        schedule_warning = self.schedule.load_state_dict(state["schedule"])
        if schedule_warning:
            warnings.append(schedule_warning)
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            else:
                warnings.append("the checkpoint has no EMA weights (train.ema was off); the EMA starts now")
        tr = state["trainer"]
        self.epoch, self.step = tr["epoch"], tr["step"]
        self.best_metric, self.best_epoch, self.bad_epochs = tr["best_metric"], tr["best_epoch"], tr["bad_epochs"]
        self.best_weights = tr.get("best_weights", "raw")
        self.train_seconds = tr["train_seconds"]
        self.saver.top_k = [(float(m), int(e)) for m, e in tr.get("top_k", [])]
        set_rng_state(state["rng"])
        return warnings

    def resume_from(self, path: Path) -> None:
        # Rank 0 reads the file and sends it to the others: the run directory need not be shared between nodes.
        state = load_checkpoint(path) if self.dist.is_main else None
        state = self.dist.broadcast_object(state)
        saved_epochs = state["meta"]["config"]["train"]["epochs"]
        if saved_epochs != self.cfg.train.epochs:
            self.log(f"warning: resuming a run planned for {saved_epochs} epochs with train.epochs="
                     f"{self.cfg.train.epochs}")
        for warning in self.load_state_dict(state):
            self.log(f"warning: {warning}")
        started_from, now = state["meta"].get("init_from"), self.meta_extra.get("init_from")
        if started_from and now and started_from.get("sha256") != now.get("sha256"):
            self.log(f"warning: this run was fine-tuned from {started_from.get('checkpoint')} (sha256 "
                     f"{str(started_from.get('sha256'))[:12]}...), but model.init_from now reads a different file "
                     f"(sha256 {str(now.get('sha256'))[:12]}...); the weights resume from last.pt, and its checkpoints "
                     "will record the file read now")
        if self.is_main:
            self.metrics_file.truncate(self.epoch)
        self.log(f"resumed from {path} after epoch {self.epoch} (step {self.step}, "
                 f"{self.train_seconds:.1f}s of training so far)")

    # -- the loop -----------------------------------------------------------------------------------------------

    def fit(self) -> TrainOutcome:
        t = self.cfg.train
        budget_s = t.time_budget * 60 if t.time_budget else None
        stopped = "completed all epochs"
        progress = Progress(enabled=self.is_main and not self.cfg.logging.quiet)
        history = []
        try:
            while self.epoch < self.cfg.train.epochs:
                # any(): the ranks' clocks differ slightly, and all of them must stop before the same epoch
                if budget_s is not None and self.dist.any(self.train_seconds >= budget_s):
                    stopped = f"time budget of {t.time_budget:g} min spent"
                    break
                epoch = self.epoch + 1
                if hasattr(self.data.train, "set_epoch"):
                    self.data.train.set_epoch(epoch)
                input_size = epoch_input_size(epoch, self.cfg.train.epochs, self.cfg.data.input_size, t.progressive)
                train_result, seconds, images, grad_norm, lr, out_of_time = self._train_epoch(
                    epoch, progress, budget_s, input_size)
                self.epoch = epoch
                val, ema_val = self._validate()
                improved, use_ema = self._track_best(val, ema_val)
                full_size = input_size >= self.cfg.data.input_size
                if not full_size:
                    # validation is at the full size, which a model trained smaller meets only later: early stopping
                    # and the plateau schedule count their epochs from the first trained at full size
                    # (train.progressive)
                    self.bad_epochs = 0
                row = {
                    "epoch": epoch, "lr": lr, "train_loss": train_result.loss,
                    "train_top1": train_result.top1, "train_top5": train_result.top5,
                    "val_loss": val.loss if val else "",
                    "val_top1": val.top1 if val else "", "val_top5": val.top5 if val else "",
                    "grad_norm": grad_norm, "epoch_seconds": seconds,
                    "images_per_second": images / seconds if seconds > 0 else 0.0,
                    "ema_val_top1": ema_val.top1 if ema_val else "", "ema_val_loss": ema_val.loss if ema_val else "",
                    "best": int(improved), "train_input_size": input_size,
                }
                history.append(row)
                self.schedule.step_epoch(self._monitored(val) if val and full_size else None)
                if self.budget_plan is not None and not out_of_time:
                    self._replan()  # before the checkpoint, which records the schedule and the epochs
                if self.is_main:
                    self.metrics_file.append(row)
                    self._save(improved, use_ema)
                    if self.tensorboard is not None:
                        self.tensorboard.write(row)
                    self.log(epoch_line(row, self.cfg.train.epochs, out_of_time))
                if self.on_epoch_end is not None and self.on_epoch_end(epoch, row) is False:
                    stopped = f"stopped by the caller after epoch {epoch}"
                    break
                if t.early_stopping_patience and self.bad_epochs >= t.early_stopping_patience:
                    stopped = (f"early stopping: {t.monitor} did not improve by more than "
                               f"{t.early_stopping_min_delta:g} for {t.early_stopping_patience} epochs")
                    break
                if out_of_time:
                    stopped = f"time budget of {t.time_budget:g} min spent (during epoch {epoch})"
                    break
                if not math.isfinite(train_result.loss):
                    stopped = "training loss became NaN/inf; lower optim.lr"
                    break
        finally:
            progress.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
        self._restore_best()
        return TrainOutcome(best_epoch=self.best_epoch, best_metric=self.best_metric or 0.0, epochs_run=self.epoch,
                            stopped_because=stopped, train_seconds=self.train_seconds,
                            best_weights=self.best_weights, history=history)

    def _train_epoch(self, epoch: int, progress: Progress, budget_s: float | None, input_size: int):
        self.net.train()
        for layer in self.frozen_norms:  # train.freeze=backbone: normalize with the trained statistics
            layer.eval()
        device = self.runtime.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        correct5 = torch.zeros((), dtype=torch.int64, device=device)
        norm_sum = torch.zeros((), dtype=torch.float64, device=device)
        norm_count = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        lr = self.schedule.current_lr()
        start = time.perf_counter()
        out_of_time = False
        progress.start_epoch(epoch, self.cfg.train.epochs, self.steps_per_epoch)
        # islice: never draw (and augment, consuming random numbers) a batch that will not be trained on
        for batch_index, (images, targets) in enumerate(itertools.islice(self.data.train, self.steps_per_epoch)):
            images = resize_batch(self.runtime.to_input(images), input_size)
            hard_targets = targets.to(device, non_blocking=True)
            targets = hard_targets
            if self.mixing is not None:
                images, targets = self.mixing(images, hard_targets)
            if self.tensorboard is not None:
                self.tensorboard.capture_preview(images)
            lr = self.schedule.current_lr()
            logits, loss, grad_norm = self.train_step(images, targets)
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.schedule.step_batch()
            self.step += 1
            n = hard_targets.numel()
            seen += n
            loss_sum += loss.detach().double() * n
            top = logits.detach().topk(min(5, logits.shape[1]), dim=1).indices
            correct += (top[:, 0] == hard_targets).sum()
            correct5 += (top == hard_targets[:, None]).any(dim=1).sum()
            finite = torch.isfinite(grad_norm)
            norm_sum += torch.where(finite, grad_norm.double(), 0.0)
            norm_count += finite.long()
            elapsed = time.perf_counter() - start
            if (batch_index + 1) % PROGRESS_EVERY == 0 or batch_index + 1 == self.steps_per_epoch:
                progress.advance(batch_index + 1, loss=loss_sum.item() / seen, top1=correct.item() / seen,
                                 rate=seen / max(elapsed, 1e-9))
            if budget_s is not None:
                # every rank must stop after the same batch, or DistributedDataParallel would wait forever
                out_of_time = self.dist.any(self.train_seconds + elapsed >= budget_s)
                if out_of_time:
                    break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        loss_total, correct_total, correct5_total, seen_total = self.dist.all_reduce_sum(
            [loss_sum.item(), float(correct.item()), float(correct5.item()), float(seen)])
        count = int(norm_count.item())
        mean_norm = norm_sum.item() / count if count else float("nan")
        result = EpochResult(loss_total / max(seen_total, 1), correct_total / max(seen_total, 1),
                             correct5_total / max(seen_total, 1))
        return result, seconds, int(seen_total), mean_norm, lr, out_of_time

    def train_step(self, images: torch.Tensor, targets: torch.Tensor):
        """One optimizer step (two forward/backward passes with SAM or the gradient-norm penalty)."""

        def forward_backward():
            with self.runtime.autocast():
                logits = self.net(images)
            loss = self.loss_fn(logits, targets)
            self.scaler.scale(loss).backward()
            return logits, loss

        self.base_optimizer.zero_grad(set_to_none=True)
        logits, loss = forward_backward()
        if self.perturbation is not None:
            grad_scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
            self.perturbation.perturb(grad_scale)
            self.base_optimizer.zero_grad(set_to_none=True)
            with frozen_norm_statistics(self.model):
                forward_backward()
            self.perturbation.restore(grad_scale)
        self.scaler.unscale_(self.base_optimizer)
        grad_norm = self._clip_gradients()
        self.scaler.step(self.base_optimizer)
        self.scaler.update()
        return logits, loss, grad_norm

    def _clip_gradients(self) -> torch.Tensor:
        """The norm of the gradient the optimizer is about to use (logged), then clipping by value and/or norm."""
        t = self.cfg.train
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.runtime.device)
        norm = torch.nn.utils.get_total_norm(grads)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if t.grad_clip_value is not None:
            torch.nn.utils.clip_grad_value_(params, t.grad_clip_value)
        if t.grad_clip_norm is not None:
            if t.grad_clip_value is None:
                torch.nn.utils.clip_grads_with_norm_(params, t.grad_clip_norm, norm)
            else:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip_norm)
        return norm.detach()

    def _validate(self) -> tuple[EpochResult, EpochResult | None]:
        """Rank 0 validates the bare model (and the EMA) on the whole validation split; every rank gets the result."""
        results = None
        if not self.has_val:
            return None, None
        if self.dist.is_main:
            val = evaluate_loader(self.model, self.data.val, self.eval_runtime)
            ema_val = evaluate_loader(self.ema.module, self.data.val, self.eval_runtime) if self.ema is not None else None
            results = (val, ema_val)
        return self.dist.broadcast_object(results)

    # -- schedule and budget ---------------------------------------------------------------------------------------

    def _build_schedule(self, epochs: int) -> Schedule:
        return Schedule(self.base_optimizer, self.cfg.schedule, epochs=epochs, steps_per_epoch=self.steps_per_epoch,
                        base_lr=self.cfg.optim.lr, monitor_mode=self._mode())

    def _replan(self) -> None:
        """Size the epochs again to the budget with the speed the epochs so far ran at (see engine.budget).

        The schedule is rebuilt for the new length at the step reached, so the learning rate continues from where
        the new schedule is now; the optimizer's current rate and momentum are kept until the next step sets them.
        config.yaml and the checkpoints record the new count, so that --resume trains the schedule that ran.
        """
        planned = self.cfg.train.epochs
        # every process decides on the mean of their clocks, so all of them choose the same count
        seconds = self.dist.all_reduce_sum([self.train_seconds])[0] / self.dist.world_size
        epochs = self.budget_plan.replan(planned_epochs=planned, done_epochs=self.epoch, done_seconds=seconds)
        if epochs == planned:
            return
        current = [{k: g[k] for k in ("lr", "momentum", "betas") if k in g} for g in self.base_optimizer.param_groups]
        position = self.schedule.state_dict()
        self.cfg = self.cfg.model_copy(update={"train": self.cfg.train.model_copy(update={"epochs": epochs})})
        self.schedule = self._build_schedule(epochs)
        self.schedule.load_state_dict(position)
        for group, values in zip(self.base_optimizer.param_groups, current):
            group.update(values)
        speed = self.budget_plan.measured_speed(planned_epochs=planned, done_epochs=self.epoch, done_seconds=seconds)
        self.log(f"train.epochs_from_budget: {self.epoch} epoch(s) took {seconds:.1f}s of training, {speed:.2f}x the "
                 f"timed steps' estimate; {epochs} epochs (not {planned}) fill the {self.cfg.train.time_budget:g}-"
                 "minute budget")
        if self.is_main:
            write_text(self.run_dir / "config.yaml", self.cfg.to_yaml())

    # -- bookkeeping --------------------------------------------------------------------------------------------

    def _mode(self) -> str:
        return "max" if self.cfg.train.monitor == "val_top1" else "min"

    def _monitored(self, result: EpochResult) -> float:
        return result.top1 if self.cfg.train.monitor == "val_top1" else result.loss

    def _better(self, a: float, b: float, margin: float = 0.0) -> bool:
        return (a - b > margin) if self._mode() == "max" else (b - a > margin)

    def _track_best(self, val: EpochResult | None, ema_val: EpochResult | None) -> tuple[bool, bool]:
        t = self.cfg.train
        if val is None:  # no validation split: the latest epoch is the one kept
            self.best_epoch, self.bad_epochs, self.best_weights, self._epoch_metric = self.epoch, 0, "raw", None
            return True, False
        candidate, use_ema = self._monitored(val), False
        if ema_val is not None and t.ema_keep_best and self._better(self._monitored(ema_val), candidate):
            candidate, use_ema = self._monitored(ema_val), True
        # keep=last: every epoch replaces the kept one (raw or EMA weights, whichever validates better now)
        improved = (t.keep == "last" or self.best_metric is None
                    or self._better(candidate, self.best_metric, t.early_stopping_min_delta))
        if improved:
            self.best_metric, self.best_epoch, self.bad_epochs = candidate, self.epoch, 0
            self.best_weights = "ema" if use_ema else "raw"
        else:
            self.bad_epochs += 1
        self._epoch_metric = candidate
        return improved, use_ema

    def _save(self, improved: bool, use_ema: bool) -> None:
        chosen, kind = (self.ema.module, "ema") if use_ema else (self.model, "raw")
        self.saver.save(self.epoch, improved=improved, metric=self._epoch_metric,
                        weights=lambda: {"model": chosen.state_dict(), "meta": self.meta(kind)}, state=self.state_dict)

    def _restore_best(self) -> None:
        """Load the best checkpoint's weights into the model (what early stopping promises)."""
        best = self.ckpt_dir / "best.pt"
        if self.dist.is_main and best.is_file():
            state = load_checkpoint(best)
            self.model.load_state_dict(state["model"])
            self.best_weights = state["meta"].get("weights", "raw")
