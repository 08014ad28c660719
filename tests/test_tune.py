"""``resnetlab tune`` end to end on the tiny synthetic set: a 2x2 grid with 2 folds and a refit, leak checks on the
folds, resuming a finished study, and an Optuna search with pruning."""

from __future__ import annotations

import csv
import itertools
import json

import numpy as np
import optuna
import pytest
import torch

from resnetlab.cli.main import main

# Small and fast: 2 epochs of at most 3 batches per fold, one thread (the machine is shared).
BASE_ARGS = ["--model", "simple_cnn", "--epochs", "2", "--batch-size", "32", "--quiet", "train.threads=1",
             "train.max_steps_per_epoch=3"]
GRID = {"optim.lr": ["0.01", "0.05"], "optim.name": ["sgd", "adam"]}


def grid_argv(tiny_signs, out, *extra):
    grid = [f"{key}={','.join(values)}" for key, values in GRID.items()]
    return ["tune", "--data", f"gtsrb:{tiny_signs}", *BASE_ARGS, "--grid", *grid, "--folds", "2", "--out", str(out),
            *extra]


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def grid_tune(tiny_signs, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "grid"
    assert main(grid_argv(tiny_signs, out, "--refit")) == 0
    return out


def test_trials_csv_has_every_setting_with_per_fold_scores(grid_tune):
    rows = read_csv(grid_tune / "trials.csv")
    assert len(rows) == 4 and all(r["state"] == "complete" for r in rows)
    settings = {(float(r["optim.lr"]), r["optim.name"]) for r in rows}
    assert settings == {(float(lr), name) for lr, name in itertools.product(*GRID.values())}
    for row in rows:
        for metric in ("val_top1", "val_loss"):
            folds = [float(row[f"fold{k}_{metric}"]) for k in range(2)]
            assert float(row[f"mean_{metric}"]) == pytest.approx(np.mean(folds), rel=1e-4)
            assert float(row[f"std_{metric}"]) == pytest.approx(np.std(folds), rel=1e-3, abs=1e-6)
        assert [int(row[f"fold{k}_epochs"]) for k in range(2)] == [2, 2]
    # Ranked best first; best.json is the first row.
    means = [float(r["mean_val_top1"]) for r in rows]
    assert means == sorted(means, reverse=True) and [int(r["rank"]) for r in rows] == [1, 2, 3, 4]
    best = json.loads((grid_tune / "best.json").read_text())
    assert best["trial"] == int(rows[0]["trial"]) and best["mean"] == pytest.approx(means[0], rel=1e-4)
    assert best["config"]["optim"]["name"] == rows[0]["optim.name"]


def test_fold_curves_are_kept_as_data(grid_tune):
    curves = read_csv(grid_tune / "curves.csv")
    trials = {r["trial"] for r in read_csv(grid_tune / "trials.csv")}
    for trial in trials:
        for fold in ("0", "1"):
            epochs = [int(r["epoch"]) for r in curves if r["trial"] == trial and r["fold"] == fold]
            assert epochs == [1, 2]
    # and each fold is an ordinary run folder with its own metrics.csv
    folder = read_csv(grid_tune / "trials.csv")[0]["folder"]
    assert len(read_csv(grid_tune / folder / "fold1" / "metrics.csv")) == 2


def _fold_manifest(run_dir):
    rows = read_csv(run_dir / "splits.csv")
    return {split: [r for r in rows if r["split"] == split] for split in ("train", "val", "test")}


def test_folds_keep_tracks_whole_and_never_touch_the_test_split(grid_tune, tiny_signs):
    folder = grid_tune / read_csv(grid_tune / "trials.csv")[0]["folder"]
    folds = [_fold_manifest(folder / f"fold{k}") for k in range(2)]
    test_paths = {row["Path"] for row in read_csv(tiny_signs / "Test.csv")}
    for fold in folds:
        train_groups = {r["group"] for r in fold["train"]}
        val_groups = {r["group"] for r in fold["val"]}
        assert val_groups and not train_groups & val_groups
        assert not fold["test"]
        assert not any(r["path"].endswith(tuple(test_paths)) for r in fold["train"] + fold["val"])
    # The two validation parts partition the cross-validated table.
    val0, val1 = ({r["path"] for r in fold["val"]} for fold in folds)
    assert not val0 & val1
    assert val0 | val1 == {r["path"] for r in folds[0]["train"]} | val0


def test_normalization_comes_from_each_folds_training_part(grid_tune, tiny_signs):
    from resnetlab.config import build_config
    from resnetlab.data.build import base_preprocessing
    from resnetlab.data.pipeline import channel_stats, decode_split
    from resnetlab.tuning.folds import build_cross_validation

    cfg = build_config({}, {"data.spec": f"gtsrb:{tiny_signs}"}, [])
    cv = build_cross_validation(cfg, 2)
    folder = grid_tune / read_csv(grid_tune / "trials.csv")[0]["folder"]
    means = []
    for k in range(2):
        meta = torch.load(folder / f"fold{k}" / "checkpoints" / "last.pt", weights_only=True)["meta"]
        expected, _ = channel_stats(decode_split(cv.fold_plan(k).train, base_preprocessing(cfg)).images)
        assert meta["preprocessing"]["mean"] == pytest.approx(list(expected), abs=1e-5)
        means.append(meta["preprocessing"]["mean"])
    assert means[0] != means[1]


def test_refit_is_an_ordinary_run_of_the_best_setting(grid_tune):
    best = json.loads((grid_tune / "best.json").read_text())
    refit = grid_tune / "refit"
    for name in ("report.md", "eval/metrics.json", "checkpoints/best.pt", "config.yaml"):
        assert (refit / name).is_file(), name
    info = json.loads((refit / "run_info.json").read_text())
    assert info["split_sizes"]["test"] > 0
    config = optuna_free_yaml(refit / "config.yaml")
    assert config["optim"]["name"] == best["params"]["optim.name"]
    assert config["optim"]["lr"] == pytest.approx(best["params"]["optim.lr"])
    metrics = json.loads((refit / "eval" / "metrics.json").read_text())
    assert best["refit"]["test"]["top1"] == pytest.approx(metrics["top1"])
    report = (grid_tune / "tune_report.md").read_text()
    for section in ("## Ranked settings", "## Effect of each parameter", "## Fold curves of the best setting",
                    "## Refit on the training split and test"):
        assert section in report
    assert "plots/best_fold_curves.png" in report and (grid_tune / "plots" / "best_fold_curves.png").is_file()
    assert (grid_tune / "tune_report.html").is_file()


def optuna_free_yaml(path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_running_the_same_command_again_trains_nothing(grid_tune, tiny_signs):
    curves = (grid_tune / "curves.csv").read_text()
    fold_metrics = sorted(grid_tune.glob("trials/*/fold*/metrics.csv"))
    stamps = [p.stat().st_mtime_ns for p in fold_metrics]
    refit_stamp = (grid_tune / "refit" / "eval" / "metrics.json").stat().st_mtime_ns
    assert main(grid_argv(tiny_signs, grid_tune, "--refit")) == 0
    assert (grid_tune / "curves.csv").read_text() == curves
    assert [p.stat().st_mtime_ns for p in fold_metrics] == stamps
    assert (grid_tune / "refit" / "eval" / "metrics.json").stat().st_mtime_ns == refit_stamp
    study = optuna.load_study(study_name=grid_tune.name, storage=f"sqlite:///{grid_tune / 'study.db'}")
    assert len(study.trials) == 4


def test_another_setup_in_the_same_folder_is_refused(grid_tune, tiny_signs, capsys):
    argv = grid_argv(tiny_signs, grid_tune)
    argv[argv.index("--epochs") + 1] = "3"
    assert main(argv) == 2
    assert "train.epochs" in capsys.readouterr().err


def test_grid_with_a_range_is_refused(tiny_signs, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {low: 0.001, high: 0.1, log: true}\n")
    code = main(["tune", "--data", f"gtsrb:{tiny_signs}", "--space", str(space), "--out", str(tmp_path / "t")])
    assert code == 2
    assert "--search optuna" in capsys.readouterr().err


def test_optuna_search_reports_every_epoch_of_every_fold(tiny_signs, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {low: 1.0e-4, high: 0.3, log: true}\noptim.name: [sgd, adam]\n")
    out = tmp_path / "optuna"
    argv = ["tune", "--data", f"gtsrb:{tiny_signs}", *BASE_ARGS, "--search", "optuna", "--trials", "4", "--space",
            str(space), "--folds", "2", "--prune-startup", "1", "--sampler-seed", "3", "--out", str(out)]
    assert main(argv) == 0
    study = optuna.load_study(study_name="optuna", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 4
    assert {t.state for t in study.trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    for trial in study.trials:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            # fold k, epoch e is step k * 10000 + e: the pruner compares like with like
            assert sorted(trial.intermediate_values) == [1, 2, 10_001, 10_002]
    rows = read_csv(out / "trials.csv")
    assert len(rows) == 4
    assert all(1e-4 <= float(r["optim.lr"]) <= 0.3 for r in rows)


def test_a_pruned_fold_stops_after_the_epoch_the_pruner_rejects(tiny_signs, tmp_path):
    """The pruning path itself, with a pruner that always says stop once the warm-up is over."""
    from resnetlab.config import build_config
    from resnetlab.tuning.folds import build_cross_validation
    from resnetlab.tuning.trial import PruneRule, TrialPruned, run_trial

    cfg = build_config({}, {"data.spec": f"gtsrb:{tiny_signs}", "model.name": "simple_cnn", "train.epochs": 4},
                       ["train.threads=1", "train.max_steps_per_epoch=2", "logging.quiet=true"])
    cv = build_cross_validation(cfg, 2)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    trial = study.ask()
    with pytest.raises(TrialPruned) as caught:
        run_trial(trial, cfg, cv, tmp_path / "trial", metric="val_top1", prune=PruneRule(True, warmup_epochs=2),
                  trial_budget_minutes=None, log=lambda m: None)
    assert (caught.value.fold, caught.value.epoch) == (0, 3)
    assert len(read_csv(tmp_path / "trial" / "fold0" / "metrics.csv")) == 3
    info = json.loads((tmp_path / "trial" / "fold0" / "run_info.json").read_text())
    assert "stopped by the caller" in info["stopped_because"]
    assert not (tmp_path / "trial" / "fold1").exists()


@pytest.mark.parametrize("n_folds", [2, 4])
def test_folds_keep_groups_whole_and_every_class_in_every_training_part(tiny_signs, n_folds):
    from resnetlab.config import build_config
    from resnetlab.tuning.folds import build_cross_validation

    cfg = build_config({}, {"data.spec": f"gtsrb:{tiny_signs}"}, [])
    cv = build_cross_validation(cfg, n_folds)
    table = cv.table
    classes = set(table.labels.tolist())
    validated = []
    for k in range(n_folds):
        plan = cv.fold_plan(k)
        assert not set(plan.train.groups) & set(plan.val.groups)
        assert set(plan.train.labels.tolist()) == classes
        assert len(plan.test) == 0
        validated += plan.val.paths
    # Each image is validated at most once; the ones never validated are exactly the classes too rare to split.
    assert len(validated) == len(set(validated))
    never = set(table.paths) - set(validated)
    rare = {i for i, name in enumerate(cv.source.class_names) if name in cv.always_train}
    assert never == {p for p, label in zip(table.paths, table.labels.tolist()) if label in rare}
    for label in rare:
        assert len(set(table.groups[table.labels == label])) < n_folds


def test_a_trial_budget_is_shared_by_the_folds():
    from resnetlab.config import build_config
    from resnetlab.tuning.folds import fold_config

    cfg = build_config({}, {}, [])
    assert fold_config(cfg, n_folds=3, trial_budget_minutes=6).train.time_budget == pytest.approx(2)
    own = build_config({}, {}, ["train.time_budget=1"])
    assert fold_config(own, n_folds=3, trial_budget_minutes=6).train.time_budget == pytest.approx(1)
    assert fold_config(cfg, n_folds=3, trial_budget_minutes=None).logging.quiet


def test_a_trial_cut_off_mid_fold_resumes_that_fold_from_its_checkpoint(tiny_signs, tmp_path):
    from resnetlab.config import build_config
    from resnetlab.tuning.folds import build_cross_validation
    from resnetlab.tuning.trial import PruneRule, run_trial

    cfg = build_config({}, {"data.spec": f"gtsrb:{tiny_signs}", "model.name": "simple_cnn", "train.epochs": 3},
                       ["train.threads=1", "train.max_steps_per_epoch=2", "logging.quiet=true"])
    cv = build_cross_validation(cfg, 2)
    study = optuna.create_study(direction="maximize")

    class WorkerDied(Exception):
        pass

    first = study.ask()
    report = first.report

    def die_after_epoch_2(value, step):
        report(value, step)
        if step == 2:
            raise WorkerDied

    first.report = die_after_epoch_2
    with pytest.raises(WorkerDied):
        run_trial(first, cfg, cv, tmp_path / "trial", metric="val_top1", prune=PruneRule(False, 1),
                  trial_budget_minutes=None, log=lambda m: None)
    fold0 = tmp_path / "trial" / "fold0"
    assert [int(r["epoch"]) for r in read_csv(fold0 / "metrics.csv")] == [1, 2]

    again = study.ask()
    result = run_trial(again, cfg, cv, tmp_path / "trial", metric="val_top1", prune=PruneRule(False, 1),
                       trial_budget_minutes=None, log=lambda m: None)
    assert [int(r["epoch"]) for r in read_csv(fold0 / "metrics.csv")] == [1, 2, 3]
    assert "resumed from" in (fold0 / "train.log").read_text()
    assert len(result["folds"]) == 2
    # The retry reports the whole curve, the epochs before the cut included, so the pruner sees a full trial.
    reported = study.trials[again.number].intermediate_values
    assert sorted(reported) == [1, 2, 3, 10_001, 10_002, 10_003]
