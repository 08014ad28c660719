"""Progressive resizing (train.progressive) and the time budget's plan: sizes per epoch, the cost model, and the
re-planning of the epochs after the first ones show the machine's real speed."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from resnetlab.checkpoint import load_checkpoint
from resnetlab.cli.main import main
from resnetlab.config import ProgressiveResizeConfig, build_config
from resnetlab.engine.budget import BUDGET_FILL, BudgetPlan
from resnetlab.engine.progressive import epoch_input_size, epoch_input_sizes, resize_batch
from resnetlab.engine.schedule import Schedule
from resnetlab.errors import ConfigError


def test_sizes_ramp_from_the_smallest_to_the_input_size_in_multiples():
    ramp = ProgressiveResizeConfig(min_size=16, start=0.2, end=0.6, multiple=4)
    sizes = epoch_input_sizes(10, 32, ramp)
    assert sizes[:2] == [16, 16]  # the first 20% of the epochs at min_size
    assert sizes[6:] == [32] * 4  # from 60% on at the full size
    assert sizes == sorted(sizes) and all(s % 4 == 0 for s in sizes)
    assert 16 < sizes[4] < 32  # in between, growing
    assert epoch_input_sizes(5, 32, ProgressiveResizeConfig()) == [32] * 5  # off by default
    # a one-epoch run trains at min_size only if it is before `end`: epoch 1 starts at progress 0
    assert epoch_input_size(1, 1, 32, ProgressiveResizeConfig(min_size=24)) == 24


def test_progressive_settings_are_checked():
    with pytest.raises(ConfigError, match="train.progressive.end"):
        ProgressiveResizeConfig(min_size=24, start=0.6, end=0.5)
    with pytest.raises(ConfigError, match="data.input_size=32"):
        build_config(overrides=["train.progressive.min_size=40", "data.input_size=32"])


def test_a_resized_batch_keeps_its_memory_format():
    images = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    small = resize_batch(images, 24)
    assert small.shape == (4, 3, 24, 24) and small.is_contiguous(memory_format=torch.channels_last)
    assert resize_batch(images, 32) is images
    plain = resize_batch(torch.randn(2, 3, 32, 32), 16)
    assert plain.is_contiguous()
    # antialiased downscaling of a constant image is the same constant
    assert torch.allclose(resize_batch(torch.full((1, 3, 32, 32), 0.7), 20), torch.tensor(0.7))


def plan(**kwargs) -> BudgetPlan:
    base = dict(budget_seconds=100.0, max_epochs=60, steps_per_epoch=10, full_size=32, seconds_per_step=0.1)
    return BudgetPlan(**{**base, **kwargs})


def test_the_plan_fills_the_budget_and_cheaper_small_epochs_buy_more_of_them():
    fixed = plan()
    # 1 s per epoch, 97 s of the 100: 97 epochs would fit, the cap is 60; with a cap of 500, 97
    assert fixed.fit() == 60
    assert plan(max_epochs=500).fit() == int(100 * BUDGET_FILL)
    ramp = ProgressiveResizeConfig(min_size=16, end=0.5)
    progressive = plan(max_epochs=500, progressive=ramp, small_step_seconds=0.025)
    epochs = progressive.fit()
    assert epochs > 97
    assert sum(progressive.epoch_seconds(epochs)) <= 100 * BUDGET_FILL < sum(progressive.epoch_seconds(epochs + 1))
    # the cost of a middle size lies between the two measured ones, by area
    assert progressive.step_seconds(16) == 0.025 and progressive.step_seconds(32) == 0.1
    assert 0.025 < progressive.step_seconds(24) < (0.025 + 0.1) / 2


def test_replanning_follows_the_speed_the_epochs_ran_at_in_the_first_half_only():
    budgeted = plan(max_epochs=500)  # 97 epochs planned at 1 s each
    # the first 10 epochs took 20 s, twice the estimate: 77 s are left for epochs of 2 s
    assert budgeted.replan(planned_epochs=97, done_epochs=10, done_seconds=20.0) == 10 + int(77 / 2)
    # they ran twice as fast: more epochs, up to the cap
    assert budgeted.replan(planned_epochs=97, done_epochs=10, done_seconds=5.0) == 10 + int(92 / 0.5)
    assert plan(max_epochs=120).replan(planned_epochs=97, done_epochs=10, done_seconds=5.0) == 120
    # in the annealing half the plan stays, whatever the speed
    assert budgeted.replan(planned_epochs=97, done_epochs=60, done_seconds=120.0) == 97
    # a few percent slower than estimated: 95 epochs would fit, too close to 97 to move the learning rate for
    assert budgeted.replan(planned_epochs=97, done_epochs=10, done_seconds=10.2) == 97
    # but one epoch of a short run is a change worth making
    short = plan(budget_seconds=8.0)  # 7 epochs of 1 s planned
    assert short.fit() == 7 and short.replan(planned_epochs=7, done_epochs=1, done_seconds=1.2) == 6


def test_a_plan_in_force_is_kept_while_it_fits_the_whole_budget():
    six = plan(seconds_per_step=1.5)  # epochs of 15 s: 6 fill 97 of the 100 s
    assert six.fit() == 6
    # 2 epochs in 32.4 s: the 4 left are predicted at 64.8 s, over a new plan's 97% margin (64.6 s) but inside the
    # budget (67.6 s left): the 6 epochs stand, where a plan made afresh at that speed would choose 5
    assert six.fit(done_epochs=2, done_seconds=32.4, speed=32.4 / 30) == 5
    assert six.replan(planned_epochs=6, done_epochs=2, done_seconds=32.4) == 6
    # 2 epochs in 34 s: 68 s predicted for the 66 s left, over the budget itself: 5 epochs
    assert six.replan(planned_epochs=6, done_epochs=2, done_seconds=34.0) == 5


@pytest.fixture(autouse=True)
def skip_report(monkeypatch):
    """The HTML/Markdown report (tested in test_cli_end_to_end) takes longer than these tiny trainings."""
    monkeypatch.setattr("resnetlab.reporting.report.render_report", lambda run_dir, **_: (run_dir, run_dir))


def metric_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def run_args(tiny_signs: Path, out: Path) -> list[str]:
    return ["train", "--data", f"gtsrb:{tiny_signs}", "--model", "simple_cnn", "--batch-size", "32", "--out",
            str(out), "--quiet", "train.threads=1", "schedule.name=onecycle", "optim.lr=0.05", "eval.gradcam=false",
            "eval.deployment_check=false"]


def test_a_progressive_run_trains_small_first_and_evaluates_at_the_input_size(tiny_signs, tmp_path):
    out = tmp_path / "progressive"
    assert main(run_args(tiny_signs, out) + ["--epochs", "4", "data.input_size=32", "train.progressive.min_size=16",
                                             "train.progressive.end=0.5", "train.progressive.multiple=8"]) == 0
    assert [int(row["train_input_size"]) for row in metric_rows(out)] == [16, 24, 32, 32]
    predictions = (out / "eval" / "predictions.csv").read_text()
    assert predictions.count("\n") > 1  # the test split was evaluated at 32 px, the size the model keeps


def budgeted_run(tiny_signs: Path, out: Path, monkeypatch, *, timed_epoch_seconds: float, epochs: int,
                 minutes: float) -> str:
    """A run with its epochs sized to ``minutes``, whose timed steps said an epoch takes ``timed_epoch_seconds``
    (whatever the epochs then really take); its train.log."""

    def timing(trainer, *, input_size=None, **_):
        return timed_epoch_seconds / trainer.steps_per_epoch, 12

    monkeypatch.setattr("resnetlab.engine.budget.time_training_steps", timing)
    assert main(run_args(tiny_signs, out) + ["--epochs", str(epochs), f"train.time_budget={minutes}",
                                             "train.epochs_from_budget=true"]) == 0
    return (out / "train.log").read_text()


def test_a_run_timed_in_a_slow_moment_is_replanned_to_more_epochs(tiny_signs, tmp_path, monkeypatch):
    """The timed steps said 2.5 s per epoch, so a 6-second budget planned 2 epochs; the first epoch took far less
    (these epochs take well under a second here), so the run is re-planned to the cap of 6, and config.yaml and
    last.pt record the schedule that ran."""
    out = tmp_path / "replanned"
    log = budgeted_run(tiny_signs, out, monkeypatch, timed_epoch_seconds=2.5, epochs=6, minutes=0.1)
    assert "2 epoch(s) fill the 0.1-minute budget" in log and "6 epochs (not 2)" in log
    assert len(metric_rows(out)) == 6
    assert "epochs: 6\n" in (out / "config.yaml").read_text()
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["meta"]["config"]["train"]["epochs"] == 6
    assert last["schedule"]["total_steps"] == 6 * last["schedule"]["steps_per_epoch"]
    # the one-cycle schedule of the new length ran to its end: the last rate is far below the peak
    lrs = [float(row["lr"]) for row in metric_rows(out)]
    assert lrs[-1] < max(lrs) / 10


def test_a_run_timed_in_a_fast_moment_is_replanned_to_fewer_epochs(tiny_signs, tmp_path, monkeypatch):
    """The timed steps said 1 ms per epoch: all 40 epochs of the cap seemed to fit 3 seconds. The first epoch showed
    the real speed, and the run was cut to what the rest of the budget holds."""
    out = tmp_path / "shortened"
    log = budgeted_run(tiny_signs, out, monkeypatch, timed_epoch_seconds=0.001, epochs=40, minutes=0.05)
    assert "the train.epochs cap of 40" in log and "(not 40)" in log
    epochs = int(next(line for line in (out / "config.yaml").read_text().splitlines()
                      if line.strip().startswith("epochs:")).split(":")[1])
    assert epochs < 40 and len(metric_rows(out)) <= epochs


def test_early_stopping_counts_its_patience_from_the_first_full_size_epoch(tiny_signs, tmp_path):
    """Validation is at the full size, which the small epochs' model has not met yet: those epochs are no reason to
    stop. A min_delta no epoch can reach would stop a run after its second epoch; here all four train at 16 px and
    the run completes; another stops after its first full-size epoch, which does not improve."""
    out = tmp_path / "patient"
    stop = ["train.early_stopping_patience=1", "train.early_stopping_min_delta=0.5", "data.input_size=32",
            "train.progressive.min_size=16", "train.progressive.multiple=16"]
    assert main(run_args(tiny_signs, out) + ["--epochs", "4", *stop, "train.progressive.start=0.9",
                                             "train.progressive.end=0.95"]) == 0
    assert [int(row["train_input_size"]) for row in metric_rows(out)] == [16] * 4
    full = tmp_path / "full-size"
    assert main(run_args(tiny_signs, full) + ["--epochs", "6", *stop, "train.progressive.start=0.2",
                                              "train.progressive.end=0.25"]) == 0
    # epochs 1-2 at 16 px, then full size from epoch 3, which misses the impossible delta: patience spent
    assert [int(row["train_input_size"]) for row in metric_rows(full)] == [16, 16, 32]


def test_the_plateau_schedule_sees_only_full_size_epochs(tiny_signs, tmp_path, monkeypatch):
    """The small epochs' validation (at a size the model has not trained at) would look like a plateau or a fall and
    halve the learning rate before the model reached full size."""
    seen = []
    step_epoch = Schedule.step_epoch
    monkeypatch.setattr(Schedule, "step_epoch", lambda self, metric: (seen.append(metric), step_epoch(self, metric)))
    out = tmp_path / "plateau"
    assert main(run_args(tiny_signs, out) + ["--epochs", "4", "schedule.name=plateau", "schedule.plateau_patience=0",
                                             "data.input_size=32", "train.progressive.min_size=16",
                                             "train.progressive.multiple=16", "train.progressive.start=0.5",
                                             "train.progressive.end=0.55"]) == 0
    sizes = [int(row["train_input_size"]) for row in metric_rows(out)]
    assert 16 in sizes and 32 in sizes
    assert [metric is None for metric in seen] == [size < 32 for size in sizes]
