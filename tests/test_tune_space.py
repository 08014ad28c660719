"""Tuning without training: search spaces, argument parsing, and the rules that keep workers from running a setting
twice or losing one to a crash (on real Optuna studies, in memory or in SQLite)."""

from __future__ import annotations

import subprocess

import optuna
import pytest
from optuna.trial import TrialState

from resnetlab.cli.tune_cmd import expand_grid_args
from resnetlab.config import build_config
from resnetlab.errors import ConfigError
from resnetlab.tuning.space import apply_params, build_space, load_space_file, split_grid_items
from resnetlab.tuning.study import (
    STATUS_ATTR, WORKER_ATTR, StudyView, claim_verdict, finish_error, has_work, recover_dead_trials, root_number,
    worker_record,
)


@pytest.fixture()
def base():
    return build_config({}, {}, [])


def test_grid_values_are_typed_by_the_config(base):
    space = build_space(base, ["optim.lr=1e-3,0.01", "optim.name=sgd,adam", "train.epochs=7,12",
                               "optim.betas=[0.9,0.99],[0.8,0.9]"], None)
    assert space.params["optim.lr"].choices == (0.001, 0.01)  # YAML reads 1e-3 as text; the config makes it a float
    assert space.params["train.epochs"].choices == (7, 12)
    assert space.params["optim.name"].choices == ("sgd", "adam")
    assert space.grid_size() == 16
    betas = space.params["optim.betas"]
    # Lists travel through Optuna as JSON text and come back as the config value.
    encoded = betas.encoded_choices()
    assert all(isinstance(code, str) for code in encoded)
    assert betas.decode(encoded[1]) == [0.8, 0.9]
    cfg = apply_params(base, {"optim.betas": betas.decode(encoded[1]), "optim.lr": 0.01})
    assert cfg.optim.betas == (0.8, 0.9) and cfg.optim.lr == 0.01


def test_single_valued_grid_items_are_plain_overrides():
    searched, fixed = split_grid_items(["optim.lr=0.01,0.1", "optim.momentum=0.8", "data.classes=[1,2]"])
    assert searched == ["optim.lr=0.01,0.1"]
    assert fixed == ["optim.momentum=0.8", "data.classes=[1,2]"]


@pytest.mark.parametrize("item, fragment", [
    ("optim.lrr=0.1,0.2", "optim.lrr"),
    ("optim.name=sgd,nesterov", "optim.name"),
    ("data.classes=[1,2],[3,4]", "cannot be searched"),
    ("data.spec=a,b", "cannot be searched"),
    ("optim.lr=0.1,0.1", "twice"),
    ("optim=1,2", "section"),
    ("optim.lr", "KEY=V1,V2"),
])
def test_bad_grid_items_name_the_key(base, item, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        build_space(base, [item], None)


def test_space_file_ranges_take_the_config_type(base, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("optim.lr: {low: 1.0e-4, high: 0.3, log: true}\n"
                    "train.epochs: {low: 3, high: 12}\n"
                    "optim.momentum: {low: 0.8, high: 0.98, step: 0.02}\n"
                    "optim.name: [sgd, adam]\n"
                    "data.batch_size: {choices: [32, 64]}\n")
    space = load_space_file(base, path)
    assert space.params["optim.lr"].kind == "float" and space.params["optim.lr"].log
    assert space.params["train.epochs"].kind == "int"
    assert space.params["optim.momentum"].step == pytest.approx(0.02)
    assert space.params["data.batch_size"].choices == (32, 64)
    assert not space.is_grid()
    values = space.suggest(optuna.trial.FixedTrial({"optim.lr": 0.002, "train.epochs": 5, "optim.momentum": 0.9,
                                                    "optim.name": "adam", "data.batch_size": 64}))
    assert apply_params(base, values).train.epochs == 5


@pytest.mark.parametrize("text, fragment", [
    ("optim.name: {low: 1, high: 2}", "not a number"),
    ("optim.lr: {low: 0.1, high: 0.01}", "low < high"),
    ("optim.lr: {low: 0, high: 0.1, log: true}", "above 0"),
    ("optim.lr: {low: 0.0, high: 0.1}", "optim.lr"),  # lr must be > 0: the low end is checked by the config
    ("optim.lr: {high: 0.1}", "low and high"),
    ("optim: {lr: [0.1, 0.2]}", "section"),
    ("optim.lr: 0.1", "list of values or a range"),
])
def test_bad_space_files_are_refused(base, tmp_path, text, fragment):
    path = tmp_path / "space.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=fragment):
        load_space_file(base, path)


def test_one_grid_flag_takes_every_item_after_it():
    argv = ["--data", "x", "optim.momentum=0.8", "--grid", "optim.lr=0.1,0.01", "data.batch_size=16,32",
            "--folds", "2", "train.epochs=3"]
    assert expand_grid_args(argv) == ["--data", "x", "optim.momentum=0.8", "--grid", "optim.lr=0.1,0.01",
                                      "--grid", "data.batch_size=16,32", "--folds", "2", "train.epochs=3"]
    assert expand_grid_args(["--grid=a=1,2", "b=3,4"]) == ["--grid=a=1,2", "--grid", "b=3,4"]


# ---------------------------------------------------------------------------------------------------------------
# Claiming and recovery
# ---------------------------------------------------------------------------------------------------------------


def _grid_study(points: int) -> optuna.Study:
    sampler = optuna.samplers.GridSampler({"x": list(range(points))}, seed=0)
    return optuna.create_study(sampler=sampler, direction="maximize")


def test_a_grid_point_already_taken_is_skipped_not_run_twice():
    study = _grid_study(2)
    first, second = study.ask(), study.ask()
    first.suggest_categorical("x", [0, 1])
    second.suggest_categorical("x", [0, 1])
    view = StudyView.of(study)
    assert claim_verdict(view, first.number, n_trials=None) is None
    assert claim_verdict(view, second.number, n_trials=None) is None
    assert not has_work(view, grid_size=2, n_trials=None)
    # A worker that asks anyway (it looked just before the others claimed the last point) gets a grid point that is
    # already running: it must not train it.
    extra = study.ask()
    verdict = claim_verdict(StudyView.of(study), extra.number, n_trials=None)
    assert verdict is not None and verdict.startswith("skipped")


def test_an_optuna_search_stops_at_n_trials_between_workers():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trials = [study.ask() for _ in range(3)]
    view = StudyView.of(study)
    assert [claim_verdict(view, t.number, n_trials=2) is None for t in trials] == [True, True, False]
    assert not has_work(view, grid_size=None, n_trials=2)
    finish_error(study, trials[0], "a setting that cannot run")
    # An error is a result: the slot stays taken and the search does not grow past n_trials.
    assert not has_work(StudyView.of(study), grid_size=None, n_trials=2)


def test_a_dead_workers_trial_is_failed_and_queued_again_once(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    done = study.ask()
    done.suggest_float("lr", 0.001, 0.1, log=True)
    study.tell(done, 0.5)
    orphan = study.ask()
    lr = orphan.suggest_float("lr", 0.001, 0.1, log=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan.set_user_attr(WORKER_ATTR, {**worker_record(), "pid": dead.pid, "start": None})
    alive = study.ask()
    alive.suggest_float("lr", 0.001, 0.1, log=True)
    alive.set_user_attr(WORKER_ATTR, worker_record())  # this process: alive

    assert recover_dead_trials(study, log=lambda m: None) == [orphan.number]
    recover_dead_trials(study, log=lambda m: None)  # a second worker starting later queues no second copy
    trials = StudyView.of(study).trials
    states = {t.number: t.state for t in trials}
    assert states[done.number] == TrialState.COMPLETE
    assert states[orphan.number] == TrialState.FAIL and STATUS_ATTR not in trials[orphan.number].user_attrs
    assert states[alive.number] == TrialState.RUNNING
    copies = [t for t in trials if t.state == TrialState.WAITING]
    assert len(copies) == 1 and copies[0].params["lr"] == pytest.approx(lr)
    assert root_number(copies[0]) == orphan.number
    # The copy is what the next ask hands out, and it may run: it holds the dead trial's slot.
    retry = study.ask()
    assert retry.number == copies[0].number
    assert claim_verdict(StudyView.of(study), retry.number, n_trials=3) is None
