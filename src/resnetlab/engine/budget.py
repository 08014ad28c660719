"""How many epochs fit a time budget on this machine.

A time budget alone (``train.time_budget``) stops training when the minutes are spent, wherever the schedule is: a
one-cycle or cosine schedule cut off at 60% never anneals, and the run ends on its noisiest weights. With
``train.epochs_from_budget`` the schedule is sized to the budget instead: a few real steps (batches drawn and
augmented by the run's own pipeline, then the Trainer's own step) are timed before training, and the epoch count
becomes what the budget holds. The clock is this machine's, so the same command trains more epochs on a faster one.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass

import torch

from resnetlab.engine.runtime import rng_state, set_rng_state

# Steps timed (after the warm-up ones) to estimate an epoch's time. Every process of a distributed run takes the
# same number, since each step all-reduces gradients.
TIMED_STEPS = 12
WARMUP_STEPS = 3
# The budget counts training time only (validation is not in it); a few percent are kept for the noise of a
# shared machine, which the time budget then absorbs by stopping at most a little early.
BUDGET_FILL = 0.97


@dataclass
class BudgetFit:
    epochs: int
    seconds_per_step: float
    seconds_per_epoch: float
    images_per_second: float
    steps_timed: int


def time_training_steps(trainer, *, warmup_steps: int = WARMUP_STEPS, timed_steps: int = TIMED_STEPS) -> tuple[float, int]:
    """Seconds per training step of ``trainer`` on its own batches, and the steps timed.

    ``trainer`` is a throwaway: its optimizer, schedule and EMA are left as the steps made them, and the run builds a
    fresh Trainer afterwards. What the fresh one inherits is put back: the model's weights and batch-norm statistics
    and the random streams (the batches drawn consume them), so the run starts exactly as it would have without the
    measurement.
    """
    model_state = copy.deepcopy(trainer.model.state_dict())
    rng = rng_state()
    runtime = trainer.runtime
    total = min(trainer.steps_per_epoch, warmup_steps + timed_steps)
    warmup = min(warmup_steps, max(total - 1, 0))
    trainer.net.train()
    start = None
    try:
        for index, (images, targets) in enumerate(itertools.islice(trainer.data.train, total)):
            if index == warmup:
                if runtime.device.type == "cuda":
                    torch.cuda.synchronize(runtime.device)
                start = time.perf_counter()
            images = runtime.to_input(images)
            targets = targets.to(runtime.device, non_blocking=True)
            if trainer.mixing is not None:
                images, targets = trainer.mixing(images, targets)
            trainer.train_step(images, targets)
            if trainer.ema is not None:
                trainer.ema.update_parameters(trainer.model)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)
        elapsed = time.perf_counter() - start if start is not None else 0.0
    finally:
        trainer.model.load_state_dict(model_state)
        set_rng_state(rng)
    timed = total - warmup
    return elapsed / max(timed, 1), timed


def fit_epochs_to_budget(trainer, budget_minutes: float, max_epochs: int) -> BudgetFit:
    """The number of epochs (1 to ``max_epochs``) whose training fills ``budget_minutes`` on this machine.

    ``trainer`` is spent by the measurement (see :func:`time_training_steps`). In a distributed run the processes average their step times, so all of them choose the same count.
    """
    seconds_per_step, timed = time_training_steps(trainer)
    seconds_per_step = trainer.dist.all_reduce_sum([seconds_per_step])[0] / trainer.dist.world_size
    seconds_per_epoch = seconds_per_step * trainer.steps_per_epoch
    fits = math.floor(budget_minutes * 60 * BUDGET_FILL / seconds_per_epoch) if seconds_per_epoch > 0 else max_epochs
    batch = trainer.cfg.data.batch_size  # the global batch (per process x processes)
    return BudgetFit(epochs=max(1, min(max_epochs, fits)), seconds_per_step=seconds_per_step,
                     seconds_per_epoch=seconds_per_epoch,
                     images_per_second=batch / seconds_per_step if seconds_per_step > 0 else float("inf"),
                     steps_timed=timed)
