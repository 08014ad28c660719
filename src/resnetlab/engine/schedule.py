"""Learning-rate schedules, stepped once per batch, with an optional linear warm-up in front of any of them.

Epoch-defined schedules (step, multistep) are evaluated at ``step / steps_per_epoch``, so the warm-up and a resume
line up exactly with the batches. Cosine anneals per batch to ``min_lr`` after the warm-up. One-cycle is torch's
``OneCycleLR`` (its own warm-up phase: ``warmup_epochs`` sets ``pct_start``). ReduceLROnPlateau is torch's,
stepped once per epoch on the monitored metric; a warm-up in front of it is a ``LambdaLR`` that hands over to it
when the warm-up ends.
"""

from __future__ import annotations

import bisect
import math

import torch
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR, ReduceLROnPlateau

from resnetlab.config import ScheduleConfig


class Schedule:
    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, *, epochs: int, steps_per_epoch: int,
                 base_lr: float, monitor_mode: str = "max"):
        self.cfg = cfg
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total_steps = max(1, epochs * self.steps_per_epoch)
        self.warmup_steps = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        self.plateau: ReduceLROnPlateau | None = None
        if cfg.name == "onecycle":
            pct = cfg.warmup_epochs / epochs if cfg.warmup_epochs else 0.3
            cycle_momentum = any("momentum" in g and g["momentum"] > 0 or "betas" in g for g in optimizer.param_groups)
            self.per_step = OneCycleLR(optimizer, max_lr=cfg.max_lr or base_lr, total_steps=self.total_steps,
                                       pct_start=min(max(pct, 0.01), 0.99), anneal_strategy="cos",
                                       cycle_momentum=cycle_momentum)
        else:
            self.per_step = LambdaLR(optimizer, self._factor)
            if cfg.name == "plateau":
                self.plateau = ReduceLROnPlateau(optimizer, mode=monitor_mode, factor=cfg.plateau_factor,
                                                 patience=cfg.plateau_patience, min_lr=cfg.min_lr)

    def _factor(self, step: int) -> float:
        cfg = self.cfg
        warm = 1.0
        if step < self.warmup_steps:
            warm = cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * step / self.warmup_steps
        epoch = step / self.steps_per_epoch
        if cfg.name in ("constant", "plateau"):
            main = 1.0
        elif cfg.name == "step":
            main = max(cfg.gamma ** math.floor(epoch / cfg.step_size), cfg.min_lr / self.base_lr)
        elif cfg.name == "multistep":
            main = max(cfg.gamma ** bisect.bisect_right(sorted(cfg.milestones), epoch), cfg.min_lr / self.base_lr)
        elif cfg.name == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
            floor = min(1.0, cfg.min_lr / self.base_lr)
            main = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        else:
            raise ValueError(cfg.name)
        return warm * main

    def step_batch(self) -> None:
        if self.plateau is not None and self.per_step.last_epoch >= self.warmup_steps:
            return  # after the warm-up, the plateau scheduler owns the learning rate
        if isinstance(self.per_step, OneCycleLR) and self.per_step.last_epoch + 1 > self.total_steps:
            return  # one-cycle is defined for total_steps only: hold its final rate (a time-budget or longer run)
        self.per_step.step()

    def step_epoch(self, metric: float | None) -> None:
        if self.plateau is not None and metric is not None and self.per_step.last_epoch >= self.warmup_steps:
            self.plateau.step(metric)

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        state = {"per_step": self.per_step.state_dict(), "total_steps": self.total_steps,
                 "steps_per_epoch": self.steps_per_epoch}
        if self.plateau is not None:
            state["plateau"] = self.plateau.state_dict()
        return state

    def load_state_dict(self, state: dict) -> str | None:
        """Restore the position; returns a warning when the saved schedule had another length (it is rescaled)."""
        per_step = dict(state["per_step"])
        saved_total = state.get("total_steps", self.total_steps)
        saved_per_epoch = state.get("steps_per_epoch", self.steps_per_epoch)
        warning = None
        if (saved_total, saved_per_epoch) != (self.total_steps, self.steps_per_epoch):
            warning = (f"the checkpoint's schedule was {saved_total} steps ({saved_per_epoch} per epoch); this run's "
                       f"is {self.total_steps} ({self.steps_per_epoch} per epoch): the learning rate continues from "
                       f"step {per_step.get('last_epoch')} of the new schedule")
            if isinstance(self.per_step, OneCycleLR):
                # keep this run's phase boundaries, computed for the new length
                for key in ("total_steps", "_schedule_phases"):
                    per_step.pop(key, None)
        self.per_step.load_state_dict(per_step)
        if self.plateau is not None and "plateau" in state:
            self.plateau.load_state_dict(state["plateau"])
        return warning
