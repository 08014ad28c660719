"""Deterministic runs repeat exactly, and a run killed with SIGKILL mid-epoch then resumed ends where an
uninterrupted run ends (CPU, ``train.deterministic=true``, one thread)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resnetlab.checkpoint import load_checkpoint
from resnetlab.cli.main import main

TIME_COLUMNS = {"epoch_seconds", "images_per_second"}
EPOCHS = 4


def run_args(tiny_signs: Path, out: Path) -> list[str]:
    # EMA, mixup (random draws every batch), momentum, a warmed-up cosine schedule and the augmentation all carry
    # state across epochs that the checkpoint must restore.
    return ["train", "--data", f"gtsrb:{tiny_signs}", "--model", "simple_cnn", "--epochs", str(EPOCHS),
            "--batch-size", "32", "--out", str(out), "--quiet", "train.deterministic=true", "train.threads=1",
            "train.ema=true", "augment.mixup_alpha=0.4", "schedule.name=cosine", "schedule.warmup_epochs=0.5",
            "optim.lr=0.05", "eval.gradcam=false"]


@pytest.fixture(scope="module", autouse=True)
def skip_report():
    """The HTML/Markdown report (tested in test_cli_end_to_end) takes longer than these tiny trainings."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("resnetlab.reporting.report.render_report", lambda run_dir, **_: (run_dir, run_dir))
        yield


def metric_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in csv.DictReader(handle)]


def eval_metrics(run: Path) -> dict:
    return json.loads((run / "eval" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def reference_run(tiny_signs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "uninterrupted"
    assert main(run_args(tiny_signs, out)) == 0
    return out


def test_two_deterministic_runs_are_identical(reference_run, tiny_signs, tmp_path):
    again = tmp_path / "again"
    assert main(run_args(tiny_signs, again)) == 0
    assert len(metric_rows(again)) == EPOCHS
    assert metric_rows(again) == metric_rows(reference_run)
    assert eval_metrics(again) == eval_metrics(reference_run)

    # Resuming a finished run with more epochs trains on, and says that the schedule length changed.
    assert main(["train", "--resume", str(again), "--epochs", str(EPOCHS + 1), "--quiet"]) == 0
    rows = metric_rows(again)
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 2))
    assert rows[:EPOCHS] == metric_rows(reference_run)
    log = (again / "train.log").read_text()
    assert f"planned for {EPOCHS} epochs" in log and "schedule was" in log


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(reference_run, tiny_signs, tmp_path):
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "resnetlab", *run_args(tiny_signs, out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = out / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    try:
        while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert last.is_file(), process.stderr.read().decode() if process.poll() is not None else "timed out"
        # last.pt of epoch 1 is the last write of epoch 1: wait about half an epoch to land inside epoch 2
        first_epoch_seconds = float(next(iter(csv.DictReader(open(out / "metrics.csv"))))["epoch_seconds"])
        time.sleep(first_epoch_seconds / 2)
        assert process.poll() is None, "the run ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL

    interrupted_at = load_checkpoint(last)["trainer"]["epoch"]
    assert 1 <= interrupted_at < EPOCHS
    assert not (out / "eval" / "metrics.json").exists()
    leftover = out / "checkpoints" / ".last.pt.killed.tmp"  # what a kill during a checkpoint write leaves
    leftover.write_bytes(b"partial")

    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert not leftover.exists()
    assert metric_rows(out) == metric_rows(reference_run)
    assert eval_metrics(out) == eval_metrics(reference_run)
    assert f"resumed from {last} after epoch {interrupted_at}" in (out / "train.log").read_text()


def test_resume_needs_a_checkpoint(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("train:\n  epochs: 1\n")
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "no checkpoints/last.pt" in capsys.readouterr().err


def test_epochs_sized_to_a_budget_leave_the_run_as_a_fixed_epoch_run_would_be(reference_run, tiny_signs, tmp_path):
    """train.epochs_from_budget trains real steps to time them, then puts the weights and random streams back and
    starts afresh (optimizer, EMA, schedule): with a budget that holds more than the cap, the run equals the fixed
    4-epoch run exactly."""
    sized = tmp_path / "sized"
    assert main(run_args(tiny_signs, sized) + ["train.time_budget=600", "train.epochs_from_budget=true"]) == 0
    assert metric_rows(sized) == metric_rows(reference_run)
    assert eval_metrics(sized)["top1"] == eval_metrics(reference_run)["top1"]
    log = (sized / "train.log").read_text()
    assert "timed steps with this run's pipeline" in log and f"the train.epochs cap of {EPOCHS}" in log
    # config.yaml records the epochs chosen, fixed, so --resume and reruns train the same schedule
    saved = (sized / "config.yaml").read_text()
    assert f"epochs: {EPOCHS}\n" in saved and "epochs_from_budget: false" in saved


def test_a_small_budget_gets_fewer_epochs_and_a_missing_budget_is_refused(tiny_signs, tmp_path, capsys):
    short = tmp_path / "short"
    # 0.003 minutes (0.18 s) hold less than one epoch here: one epoch is chosen, and the budget stops it
    assert main(run_args(tiny_signs, short) + ["--epochs", "50", "train.time_budget=0.003",
                                               "train.epochs_from_budget=true"]) == 0
    assert len(metric_rows(short)) == 1
    assert "epochs: 1\n" in (short / "config.yaml").read_text()
    capsys.readouterr()
    assert main(run_args(tiny_signs, tmp_path / "no-budget") + ["train.epochs_from_budget=true"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs_from_budget" in err and "train.time_budget" in err
