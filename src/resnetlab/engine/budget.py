"""How many epochs fit a time budget on this machine, planned before training and re-planned while it runs.

A time budget alone (``train.time_budget``) stops training when the minutes are spent, wherever the schedule is: a
one-cycle or cosine schedule cut off at 60% never anneals, and the run ends on its noisiest weights. With
``train.epochs_from_budget`` the schedule is sized to the budget instead: a few real steps (batches drawn and
augmented by the run's own pipeline, then the Trainer's own step) are timed before training, at the full input size
and, with progressive resizing, at the smallest one, and the epoch count becomes what the budget holds. The clock is
this machine's, so the same command trains more epochs on a faster one.

A dozen steps are a small sample of a shared machine's speed: the steps timed may fall in a slow or a fast moment.
So the plan is made again after each epoch of the first half of training, with the speed the epochs so far actually
ran at (:meth:`BudgetPlan.replan`); the schedule is stretched or shortened while the learning rate is still high,
never in the annealing half, where the time budget's hard stop remains the backstop.
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass, field

import torch

from resnetlab.config import ProgressiveResizeConfig
from resnetlab.engine.progressive import epoch_input_sizes, resize_batch
from resnetlab.engine.runtime import rng_state, set_rng_state

# Steps timed (after the warm-up ones) to estimate an epoch's time. Every process of a distributed run takes the
# same number, since each step all-reduces gradients.
TIMED_STEPS = 12
WARMUP_STEPS = 3
# The budget counts training time only (validation is not in it); a few percent are kept for the noise of a
# shared machine, which the time budget then absorbs by stopping at most a little early.
BUDGET_FILL = 0.97
# Re-planning moves the learning rate (the schedule is rebuilt at the step reached), so a long run is not re-planned
# for a change of a few percent of its epochs: if it ran slower, the budget's hard stop then cuts the last epoch of a
# schedule whose rate is almost zero there anyway. One epoch always counts (a 7-epoch run is 14% off by one).
REPLAN_TOLERANCE = 0.05


@dataclass
class BudgetPlan:
    """The cost model of one run's epochs and the budget they must fit.

    A step at side ``s`` costs ``seconds_per_step`` at the full input size and ``small_step_seconds`` at
    ``progressive.min_size`` (when progressive resizing is on), and in between in proportion to ``s**2`` (the
    convolutions' work), interpolated between the two measured points.
    """

    budget_seconds: float
    max_epochs: int
    steps_per_epoch: int
    full_size: int
    seconds_per_step: float
    progressive: ProgressiveResizeConfig = field(default_factory=ProgressiveResizeConfig)
    small_step_seconds: float | None = None

    def step_seconds(self, size: int) -> float:
        low = self.progressive.min_size
        if low is None or self.small_step_seconds is None or size >= self.full_size or low >= self.full_size:
            return self.seconds_per_step
        share = (size**2 - low**2) / (self.full_size**2 - low**2)
        return self.small_step_seconds + share * (self.seconds_per_step - self.small_step_seconds)

    def epoch_seconds(self, epochs: int) -> list[float]:
        """The predicted training seconds of each epoch of a run planned for ``epochs`` epochs."""
        sizes = epoch_input_sizes(epochs, self.full_size, self.progressive)
        return [self.step_seconds(size) * self.steps_per_epoch for size in sizes]

    def fit(self, *, done_epochs: int = 0, done_seconds: float = 0.0, speed: float = 1.0) -> int:
        """The most epochs (at least ``done_epochs + 1``, at most ``max_epochs``) whose training fills the budget.

        ``done_epochs`` have trained already, in ``done_seconds``; the rest are predicted by the cost model times
        ``speed`` (the ratio of measured to predicted seconds so far). Each candidate length has its own ramp of
        input sizes, so the candidates are tried whole rather than by division.
        """
        room = self.budget_seconds * BUDGET_FILL - done_seconds
        for epochs in range(self.max_epochs, done_epochs, -1):
            if self.remaining_seconds(epochs, done_epochs=done_epochs, speed=speed) <= room:
                return epochs
        return max(1, done_epochs + 1)

    def remaining_seconds(self, epochs: int, *, done_epochs: int, speed: float) -> float:
        """The predicted training seconds of the epochs after ``done_epochs`` in a run of ``epochs``, at ``speed``
        times the cost model."""
        return speed * sum(self.epoch_seconds(epochs)[done_epochs:])

    def measured_speed(self, *, planned_epochs: int, done_epochs: int, done_seconds: float) -> float | None:
        """The ratio of the seconds the first ``done_epochs`` epochs took to the seconds the cost model predicted
        for them in a run of ``planned_epochs`` (None when nothing can be compared yet)."""
        predicted = sum(self.epoch_seconds(planned_epochs)[:done_epochs])
        return done_seconds / predicted if predicted > 0 and done_seconds > 0 else None

    def replan(self, *, planned_epochs: int, done_epochs: int, done_seconds: float) -> int:
        """The epoch count after ``done_epochs`` epochs took ``done_seconds``: ``planned_epochs`` unless the speed
        measured so far says that a count at least :data:`REPLAN_TOLERANCE` away (and at least one epoch) fills the
        budget; unchanged in the second half of the schedule."""
        if done_epochs >= planned_epochs or done_epochs * 2 > planned_epochs:
            return planned_epochs
        speed = self.measured_speed(planned_epochs=planned_epochs, done_epochs=done_epochs, done_seconds=done_seconds)
        if speed is None:
            return planned_epochs
        epochs = self.fit(done_epochs=done_epochs, done_seconds=done_seconds, speed=speed)
        if abs(epochs - planned_epochs) < max(1.0, REPLAN_TOLERANCE * planned_epochs):
            return planned_epochs
        # The plan in force stands while it is predicted to fit the whole budget: the BUDGET_FILL margin is asked of
        # a new plan only, so that a run whose speed sits at the boundary between two counts does not swing between
        # them (6, then 5 again: the lost epoch is a sixth of a 5-minute run's budget left unused).
        remaining = self.remaining_seconds(planned_epochs, done_epochs=done_epochs, speed=speed)
        if epochs < planned_epochs and remaining <= self.budget_seconds - done_seconds:
            return planned_epochs
        return epochs


@dataclass
class BudgetFit:
    epochs: int
    plan: BudgetPlan  # the step times measured (at the full size and, with progressive resizing, the smallest)
    images_per_second: float  # at the full size
    steps_timed: int

    def seconds_per_epoch(self, size: int) -> float:
        return self.plan.step_seconds(size) * self.plan.steps_per_epoch


def time_training_steps(trainer, *, input_size: int | None = None, warmup_steps: int = WARMUP_STEPS,
                        timed_steps: int = TIMED_STEPS) -> tuple[float, int]:
    """Seconds per training step of ``trainer`` on its own batches (scaled to ``input_size``), and the steps timed.

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
            if input_size is not None:
                images = resize_batch(images, input_size)
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

    ``trainer`` is spent by the measurement (see :func:`time_training_steps`). In a distributed run the processes
    average their step times, so all of them choose the same count.
    """
    cfg = trainer.cfg
    full_size = cfg.data.input_size
    progressive = cfg.train.progressive
    seconds_per_step, timed = _mean_over_processes(trainer, time_training_steps(trainer))
    small_seconds = None
    if progressive.min_size is not None and progressive.min_size < full_size:
        small_seconds, _ = _mean_over_processes(trainer, time_training_steps(trainer, input_size=progressive.min_size))
    plan = BudgetPlan(budget_seconds=budget_minutes * 60, max_epochs=max_epochs,
                      steps_per_epoch=trainer.steps_per_epoch, full_size=full_size,
                      seconds_per_step=seconds_per_step, progressive=progressive, small_step_seconds=small_seconds)
    epochs = plan.fit() if seconds_per_step > 0 else max_epochs
    batch = cfg.data.batch_size  # the global batch (per process x processes)
    return BudgetFit(epochs=epochs, plan=plan,
                     images_per_second=batch / seconds_per_step if seconds_per_step > 0 else float("inf"),
                     steps_timed=timed)


def _mean_over_processes(trainer, timing: tuple[float, int]) -> tuple[float, int]:
    seconds, timed = timing
    return trainer.dist.all_reduce_sum([seconds])[0] / trainer.dist.world_size, timed
