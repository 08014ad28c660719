"""The training loop: one epoch of batches, validation, checkpoints, early stopping, time budget and exact resume.

Everything that decides the next batch is in the checkpoint (model, optimizer, schedule, grad scaler, EMA, epoch,
step, and the RNG states from which the data order and the augmentations are drawn), so a run killed at any
moment and resumed from ``last.pt`` continues as if it had never stopped.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.config import RunConfig
from resnetlab.data.augment import build_mixing
from resnetlab.data.build import RunData
from resnetlab.engine.checkpoint import build_meta, load_checkpoint, save_checkpoint
from resnetlab.engine.optim import GradientPerturbation, create_optimizer, wrap_optimizer
from resnetlab.engine.runtime import Runtime, rng_state, set_rng_state
from resnetlab.engine.schedule import Schedule
from resnetlab.utils.io import atomic_write
from resnetlab.utils.runlog import RunLog

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "grad_norm",
                  "epoch_seconds", "images_per_second", "ema_val_top1", "ema_val_loss", "best"]


@dataclass
class EpochResult:
    loss: float
    top1: float
    top5: float = float("nan")


@dataclass
class TrainOutcome:
    best_epoch: int
    best_metric: float
    epochs_run: int
    stopped_because: str
    train_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


@torch.no_grad()
def evaluate_loader(model: nn.Module, batches, runtime: Runtime, *, collect: bool = False, tta_flip: bool = False):
    """Mean loss, top-1 and top-5 over ``batches``; with ``collect``, also the logits and targets.

    ``tta_flip`` averages the softmax of each image and its mirror image (test-time augmentation) and returns the
    log of that average as the logits.
    """
    model.eval()
    total_loss, correct1, correct5, count = 0.0, 0, 0, 0
    all_logits, all_targets = [], []
    for images, targets in batches:
        images = runtime.to_input(images)
        targets = targets.to(runtime.device)
        with runtime.autocast():
            logits = model(images).float()
            if tta_flip:
                probs = (logits.softmax(dim=1) + model(images.flip(-1)).float().softmax(dim=1)) / 2
                logits = probs.clamp(min=1e-12).log()
        total_loss += F.cross_entropy(logits, targets, reduction="sum").item()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == targets).sum().item()
        correct5 += (top == targets[:, None]).any(dim=1).sum().item()
        count += targets.numel()
        if collect:
            all_logits.append(logits.cpu())
            all_targets.append(targets.cpu())
    n = max(count, 1)
    result = EpochResult(total_loss / n, correct1 / n, correct5 / n)
    if collect:
        logits = torch.cat(all_logits) if all_logits else torch.zeros(0, 0)
        targets = torch.cat(all_targets) if all_targets else torch.zeros(0, dtype=torch.long)
        return result, logits, targets
    return result


class Trainer:
    def __init__(self, cfg: RunConfig, data: RunData, model: nn.Module, runtime: Runtime, run_dir: Path,
                 log: RunLog, *, model_kwargs: dict, is_main: bool = True, ddp_model: nn.Module | None = None):
        self.cfg = cfg
        self.data = data
        self.model = model  # the bare model: what checkpoints hold
        self.net = ddp_model or model  # what the forward pass goes through (DDP wrapper in multi-process runs)
        self.runtime = runtime
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        self.log = log
        self.is_main = is_main
        self.model_kwargs = model_kwargs

        t = cfg.train
        self.base_optimizer = create_optimizer(model, cfg.optim)
        self.optimizer = wrap_optimizer(self.base_optimizer, cfg.optim)
        steps_per_epoch = min(len(data.train), t.max_steps_per_epoch or len(data.train))
        self.schedule = Schedule(self.base_optimizer, cfg.schedule, epochs=t.epochs, steps_per_epoch=steps_per_epoch,
                                 base_lr=cfg.optim.lr, monitor_mode="max" if t.monitor == "val_top1" else "min")
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
        self.ema = None
        if t.ema:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay), use_buffers=True)
        weight = None
        if cfg.loss.class_weights == "balanced":
            counts = torch.as_tensor(data.train_counts, dtype=torch.float32).clamp(min=1)
            weight = (counts.sum() / (len(counts) * counts)).to(runtime.device)
        self.class_weight = weight
        self.mixing = build_mixing(data.source.num_classes, cfg.augment.mixup_alpha, cfg.augment.cutmix_alpha)

        self.epoch = 0  # epochs completed
        self.step = 0
        self.best_metric: float | None = None
        self.best_epoch = 0
        self.bad_epochs = 0
        self.train_seconds = 0.0
        self.top_k: list[tuple[float, int]] = []
        self.writer = None
        if cfg.logging.tensorboard and is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    # -- loss ---------------------------------------------------------------------------------------------------

    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Soft targets (mixup/cutmix) and hard targets both go through F.cross_entropy, which accepts either.
        return F.cross_entropy(logits.float(), targets, weight=self.class_weight,
                               label_smoothing=self.cfg.loss.label_smoothing)

    # -- state --------------------------------------------------------------------------------------------------

    def meta(self, weights: str = "raw") -> dict:
        source = self.data.source
        plan = self.data.plan
        return build_meta(
            model_name=self.cfg.model.name, model_kwargs=self.model_kwargs, class_ids=source.class_ids,
            class_names=source.class_names, prep=self.data.prep, config=self.cfg.to_dict(),
            data={"spec": source.spec, "fingerprint": source.fingerprint(), "split_strategy": plan.strategy,
                  "split_sources": plan.sources, "split_sizes": plan.sizes(),
                  "split_fingerprints": {n: getattr(plan, n).fingerprint() for n in ("train", "val", "test")}},
            epoch=self.epoch, monitor=self.cfg.train.monitor, best_metric=self.best_metric, weights=weights)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "trainer": {"epoch": self.epoch, "step": self.step, "best_metric": self.best_metric,
                        "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                        "train_seconds": self.train_seconds, "top_k": [list(x) for x in self.top_k]},
            "rng": rng_state(),
            "meta": self.meta(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        tr = state["trainer"]
        self.epoch, self.step = tr["epoch"], tr["step"]
        self.best_metric, self.best_epoch, self.bad_epochs = tr["best_metric"], tr["best_epoch"], tr["bad_epochs"]
        self.train_seconds = tr["train_seconds"]
        self.top_k = [tuple(x) for x in tr.get("top_k", [])]
        set_rng_state(state["rng"])

    def resume_from(self, path: Path) -> None:
        state = load_checkpoint(path)
        saved_epochs = state["meta"]["config"]["train"]["epochs"]
        if saved_epochs != self.cfg.train.epochs:
            self.log(f"warning: resuming a run planned for {saved_epochs} epochs with train.epochs="
                     f"{self.cfg.train.epochs}; the schedule was built for the new length")
        self.load_state_dict(state)
        self._truncate_metrics(self.epoch)
        self.log(f"resumed from {path} after epoch {self.epoch} (step {self.step})")

    # -- the loop -----------------------------------------------------------------------------------------------

    def fit(self) -> TrainOutcome:
        t = self.cfg.train
        budget_s = t.time_budget * 60 if t.time_budget else None
        stopped = "completed all epochs"
        progress = _Progress(enabled=self.is_main and not self.cfg.logging.quiet)
        try:
            while self.epoch < t.epochs:
                if budget_s is not None and self.train_seconds >= budget_s:
                    stopped = f"time budget of {t.time_budget:g} min spent"
                    break
                epoch = self.epoch + 1
                if hasattr(self.data.train, "set_epoch"):
                    self.data.train.set_epoch(epoch)
                train_result, seconds, images, grad_norm, out_of_time = self._train_epoch(epoch, progress, budget_s)
                self.epoch = epoch
                val = evaluate_loader(self.net, self.data.val, self.runtime)
                ema_val = evaluate_loader(self.ema.module, self.data.val, self.runtime) if self.ema is not None else None
                improved, use_ema = self._track_best(val, ema_val)
                row = {
                    "epoch": epoch, "lr": self.schedule.current_lr(), "train_loss": train_result.loss,
                    "train_top1": train_result.top1, "val_loss": val.loss, "val_top1": val.top1,
                    "val_top5": val.top5, "grad_norm": grad_norm, "epoch_seconds": seconds,
                    "images_per_second": images / seconds if seconds > 0 else 0.0,
                    "ema_val_top1": ema_val.top1 if ema_val else "", "ema_val_loss": ema_val.loss if ema_val else "",
                    "best": int(improved),
                }
                self.schedule.step_epoch(self._monitored(val))
                if self.is_main:
                    self._append_metrics(row)
                    self._save(improved, use_ema)
                    self._tensorboard(row)
                    self.log(_epoch_line(row, t.epochs))
                if t.early_stopping_patience and self.bad_epochs >= t.early_stopping_patience:
                    stopped = (f"early stopping: {t.monitor} did not improve by {t.early_stopping_min_delta:g} "
                               f"for {t.early_stopping_patience} epochs")
                    break
                if out_of_time:
                    stopped = f"time budget of {t.time_budget:g} min spent"
                    break
                if not math.isfinite(train_result.loss):
                    stopped = "training loss became NaN/inf; lower optim.lr"
                    break
        finally:
            progress.close()
            if self.writer is not None:
                self.writer.close()
        return TrainOutcome(best_epoch=self.best_epoch, best_metric=self.best_metric or 0.0, epochs_run=self.epoch,
                            stopped_because=stopped, train_seconds=self.train_seconds)

    def _train_epoch(self, epoch: int, progress: _Progress, budget_s: float | None):
        self.net.train()
        runtime, t = self.runtime, self.cfg.train
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.int64)
        norm_sum, norm_count, seen = 0.0, 0, 0
        start = time.perf_counter()
        out_of_time = False
        max_steps = t.max_steps_per_epoch or len(self.data.train)
        progress.start_epoch(epoch, t.epochs, min(max_steps, len(self.data.train)))
        for batch_index, (images, targets) in enumerate(self.data.train):
            if batch_index >= max_steps:
                break
            images = runtime.to_input(images)
            targets = targets.to(runtime.device, non_blocking=True)
            hard_targets = targets
            if self.mixing is not None:
                images, targets = self.mixing(images, targets)

            def forward_backward():
                with runtime.autocast():
                    logits = self.net(images)
                loss = self.loss_fn(logits, targets)
                self.scaler.scale(loss).backward()
                return logits, loss

            self.optimizer.zero_grad(set_to_none=True)
            logits, loss = forward_backward()
            grad_norm = self._clip_and_measure()
            if isinstance(self.optimizer, GradientPerturbation):
                def closure():
                    self.optimizer.zero_grad(set_to_none=True)
                    _, second_loss = forward_backward()
                    self._clip_and_measure()
                    return second_loss

                self.optimizer.step(closure)
            else:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.schedule.step_batch()
            self.step += 1
            n = hard_targets.numel()
            seen += n
            loss_sum += loss.detach().double() * n
            correct += (logits.detach().argmax(dim=1) == hard_targets).sum()
            if grad_norm is not None:
                norm_sum += grad_norm
                norm_count += 1
            elapsed = time.perf_counter() - start
            progress.advance(loss=loss_sum.item() / seen, top1=correct.item() / seen, rate=seen / max(elapsed, 1e-9))
            if budget_s is not None and self.train_seconds + elapsed >= budget_s:
                out_of_time = True
                break
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        mean_norm = norm_sum / norm_count if norm_count else float("nan")
        return EpochResult(loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1)), seconds, seen, mean_norm, out_of_time

    def _clip_and_measure(self) -> float | None:
        t = self.cfg.train
        self.scaler.unscale_(self.base_optimizer) if self.scaler.is_enabled() else None
        if t.grad_clip_value is not None:
            torch.nn.utils.clip_grad_value_(self.model.parameters(), t.grad_clip_value)
        max_norm = t.grad_clip_norm if t.grad_clip_norm is not None else float("inf")
        # clip_grad_norm_ with an infinite bound only measures: the gradient norm is logged every epoch.
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return float(norm)

    # -- bookkeeping --------------------------------------------------------------------------------------------

    def _monitored(self, result: EpochResult) -> float:
        return result.top1 if self.cfg.train.monitor == "val_top1" else result.loss

    def _track_best(self, val: EpochResult, ema_val: EpochResult | None) -> tuple[bool, bool]:
        t = self.cfg.train
        sign = 1.0 if t.monitor == "val_top1" else -1.0
        candidate, use_ema = self._monitored(val), False
        if ema_val is not None and sign * self._monitored(ema_val) > sign * candidate:
            candidate, use_ema = self._monitored(ema_val), True
        improved = self.best_metric is None or sign * (candidate - self.best_metric) > t.early_stopping_min_delta
        if improved:
            self.best_metric, self.best_epoch, self.bad_epochs = candidate, self.epoch, 0
        else:
            self.bad_epochs += 1
        self._pending_metric = candidate
        return improved, use_ema

    def _save(self, improved: bool, use_ema: bool) -> None:
        t = self.cfg.train
        state = self.state_dict()
        save_checkpoint(self.ckpt_dir / "last.pt", state)
        if improved:
            best = {"model": (self.ema.module if use_ema else self.model).state_dict(), "meta": self.meta("ema" if use_ema else "raw")}
            save_checkpoint(self.ckpt_dir / "best.pt", best)
        if t.save_every and self.epoch % t.save_every == 0:
            save_checkpoint(self.ckpt_dir / f"epoch_{self.epoch:04d}.pt", state)
        if t.keep_top_k > 1:
            sign = 1.0 if t.monitor == "val_top1" else -1.0
            self.top_k.append((self._pending_metric, self.epoch))
            self.top_k.sort(key=lambda x: -sign * x[0])
            keep = {e for _, e in self.top_k[: t.keep_top_k]}
            if self.epoch in keep:
                save_checkpoint(self.ckpt_dir / f"top_epoch_{self.epoch:04d}.pt",
                                {"model": self.model.state_dict(), "meta": self.meta()})
            for _, e in self.top_k[t.keep_top_k:]:
                (self.ckpt_dir / f"top_epoch_{e:04d}.pt").unlink(missing_ok=True)
            self.top_k = self.top_k[: t.keep_top_k]

    def _append_metrics(self, row: dict) -> None:
        path = self.run_dir / "metrics.csv"
        rows = _read_rows(path)
        rows.append({k: _fmt(row.get(k, "")) for k in METRIC_COLUMNS})
        with atomic_write(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def _truncate_metrics(self, epochs: int) -> None:
        path = self.run_dir / "metrics.csv"
        rows = [r for r in _read_rows(path) if int(r["epoch"]) <= epochs]
        with atomic_write(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def _tensorboard(self, row: dict) -> None:
        if self.writer is None:
            return
        for key in ("lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "grad_norm", "images_per_second"):
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key.replace("_", "/", 1), value, row["epoch"])
        if row["epoch"] == 1:
            import torchvision

            images, _ = next(iter(self.data.train))
            mean = torch.as_tensor(self.data.prep.mean).view(1, 3, 1, 1)
            std = torch.as_tensor(self.data.prep.std).view(1, 3, 1, 1)
            grid = torchvision.utils.make_grid((images[:64] * std + mean).clamp(0, 1), nrow=8)
            self.writer.add_image("augmented_batch", grid, 1)
        self.writer.flush()


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _epoch_line(row: dict, epochs: int) -> str:
    ema = f" ema_val_top1 {row['ema_val_top1']:.4f}" if isinstance(row["ema_val_top1"], float) else ""
    return (f"epoch {row['epoch']}/{epochs} lr {row['lr']:.3g} train_loss {row['train_loss']:.4f} "
            f"train_top1 {row['train_top1']:.4f} val_loss {row['val_loss']:.4f} val_top1 {row['val_top1']:.4f} "
            f"val_top5 {row['val_top5']:.4f}{ema} grad_norm {row['grad_norm']:.3g} {row['epoch_seconds']:.1f}s "
            f"{row['images_per_second']:.0f} img/s{' *best*' if row['best'] else ''}")


class _Progress:
    """A rich progress bar for the batches of one epoch: loss, accuracy, images/s and time left."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.task = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), transient=True)
            self.bar.start()

    def start_epoch(self, epoch: int, epochs: int, batches: int) -> None:
        if self.bar is None:
            return
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(f"epoch {epoch}/{epochs}", total=batches, stats="")

    def advance(self, *, loss: float, top1: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, stats=f"loss {loss:.3f} top1 {top1:.3f} {rate:.0f} img/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
