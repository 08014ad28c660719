"""Several ``resnetlab tune`` processes on one study, and a tune killed midway: real processes, real kills."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from resnetlab.cli.main import main

BASE_ARGS = ["--model", "simple_cnn", "--epochs", "2", "--batch-size", "32", "--quiet", "train.threads=1"]
START_LINE = re.compile(r"trial (\d+)(?: \(again, for trial \d+\))?: (optim\.\S+=.*)$", re.MULTILINE)


def tune_process(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "resnetlab", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def started_trials(log_text: str) -> list[tuple[int, str]]:
    """(trial number, setting) of every trial a worker started training, in order."""
    return [(int(number), setting) for number, setting in START_LINE.findall(log_text)]


def test_two_workers_share_one_study_and_run_no_trial_twice(tiny_signs, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {low: 1.0e-3, high: 0.2, log: true}\noptim.name: [sgd, adam]\n")
    out = tmp_path / "shared"
    argv = ["tune", "--data", f"gtsrb:{tiny_signs}", *BASE_ARGS, "train.max_steps_per_epoch=3", "--search", "optuna",
            "--trials", "4", "--space", str(space), "--folds", "2", "--pruner", "none", "--storage", "journal",
            "--out", str(out)]
    workers = [tune_process(argv) for _ in range(2)]
    results = [worker.communicate(timeout=600) for worker in workers]
    for worker, (_, err) in zip(workers, results):
        assert worker.returncode == 0, err

    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(study_name="shared",
                              storage=JournalStorage(JournalFileBackend(str(out / "study.journal"))))
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4
    # Anything else is a duplicate a worker claimed at the same moment and gave up without training.
    for trial in study.trials:
        if trial.state != TrialState.COMPLETE:
            assert trial.user_attrs["status"].startswith("skipped") and "fold0" not in trial.user_attrs
    started = started_trials((out / "tune.log").read_text())
    assert sorted(n for n, _ in started) == sorted(t.number for t in complete)
    assert len({setting for _, setting in started}) == 4
    assert len(list(out.glob("trials/*/fold*/run_info.json"))) == 4 * 2
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 1 + 4
    print("workers that ran trials:", sorted({t.user_attrs["worker"]["pid"] for t in complete}))


def test_a_killed_tune_resumes_and_keeps_its_finished_trials(tiny_signs, tmp_path):
    out = tmp_path / "killed"
    argv = ["tune", "--data", f"gtsrb:{tiny_signs}", *BASE_ARGS, "train.max_steps_per_epoch=6", "--grid",
            "optim.lr=0.01,0.05", "optim.name=sgd,adam", "--folds", "2", "--out", str(out)]
    process = tune_process(argv)
    log = out / "tune.log"
    deadline = time.time() + 300
    # Kill it (SIGKILL: no clean-up at all) as soon as it starts its second trial.
    while process.poll() is None and time.time() < deadline:
        if log.is_file() and any(n == 1 for n, _ in started_trials(log.read_text())):
            break
        time.sleep(0.1)
    assert process.poll() is None, "the tune finished before it could be killed"
    process.kill()
    process.wait()
    storage = f"sqlite:///{out / 'study.db'}"
    before = {t.number: t.value for t in optuna.load_study(study_name="killed", storage=storage).trials
              if t.state == TrialState.COMPLETE}
    assert before, "the first trial should have finished before the kill"
    first_run = log.read_text()
    finished_settings = {setting for n, setting in started_trials(first_run) if n in before}

    assert main(argv) == 0

    second_run = log.read_text()[len(first_run):]
    print(second_run)
    study = optuna.load_study(study_name="killed", storage=storage)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4
    assert len({(t.params["optim.lr"], t.params["optim.name"]) for t in complete}) == 4
    for number, value in before.items():  # kept, not redone
        assert study.trials[number].state == TrialState.COMPLETE and study.trials[number].value == value
    assert not finished_settings & {setting for _, setting in started_trials(second_run)}
    if 1 not in before:  # the trial that was running when killed is run again
        assert "trial 1: its worker" in second_run and "(again, for trial 1)" in second_run
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and all(",complete," in row for row in rows[1:])


@pytest.mark.slow
def test_gtsrb_dev_grid_with_refit(tmp_path):
    """The issue's example on the real development set (minutes on two CPU cores)."""
    from tests.conftest import shared_dataset

    data = shared_dataset("gtsrb-dev")
    out = tmp_path / "gtsrb-dev"
    code = main(["tune", "--data", f"gtsrb:{data}", "--epochs", "2", "--quiet", "--grid", "optim.lr=0.01,0.05",
                 "optim.name=sgd,adam", "--folds", "2", "--refit", "--out", str(out)])
    assert code == 0
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and "fold1_val_top1" in rows[0]
    assert (out / "refit" / "eval" / "metrics.json").is_file()
