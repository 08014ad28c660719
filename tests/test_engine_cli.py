"""Training features end to end through `resnetlab train`: EMA, SAM, the gradient-norm penalty, early stopping,
the time budget, keep-top-k and every-N checkpoints, TensorBoard, and the losses' options."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from resnetlab.checkpoint import load_checkpoint
from resnetlab.cli.main import main


def base_args(tiny_signs: Path, out: Path, epochs: int) -> list[str]:
    return ["train", "--data", f"gtsrb:{tiny_signs}", "--model", "simple_cnn", "--epochs", str(epochs),
            "--batch-size", "32", "--out", str(out), "--quiet", "train.threads=1", "eval.gradcam=false"]


def rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_ema_sam_early_stopping_checkpoints_and_tensorboard(tiny_signs, tmp_path, monkeypatch):
    monkeypatch.setattr("resnetlab.reporting.report.render_report", lambda run_dir, **_: (run_dir, run_dir))
    out = tmp_path / "run"
    # min_delta 1.0 on top-1 accuracy cannot be beaten: epoch 1 sets the best, epoch 2 exhausts a patience of 1.
    code = main(base_args(tiny_signs, out, epochs=5) + [
        "train.max_steps_per_epoch=3", "train.ema=true", "optim.wrapper=sam", "optim.sam_rho=0.05",
        "train.early_stopping_patience=1", "train.early_stopping_min_delta=1.0", "train.keep_top_k=2",
        "train.save_every=1", "logging.tensorboard=true", "loss.class_weights=balanced", "loss.label_smoothing=0.1",
        "augment.mixup_alpha=0.2", "augment.cutmix_alpha=1.0", "train.grad_clip_norm=1.0", "schedule.name=step",
        "schedule.step_size=1", "schedule.gamma=0.5"])
    assert code == 0
    info = json.loads((out / "run_info.json").read_text())
    assert info["epochs_run"] == 2 and info["stopped_because"].startswith("early stopping")
    assert info["best_epoch"] == 1

    history = rows(out)
    assert [int(r["epoch"]) for r in history] == [1, 2]
    assert all(r["ema_val_top1"] != "" and r["ema_val_loss"] != "" for r in history)
    assert all(float(r["grad_norm"]) > 0 and float(r["images_per_second"]) > 0 for r in history)
    assert [int(r["best"]) for r in history] == [1, 0]
    assert float(history[1]["lr"]) == pytest.approx(float(history[0]["lr"]) / 2)

    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert best["meta"]["epoch"] == 1 and best["meta"]["weights"] == info["best_weights"]
    first = history[0]
    if info["best_weights"] == "ema":  # EMA kept only where it validated better than the raw weights
        assert float(first["ema_val_top1"]) > float(first["val_top1"])
    else:
        assert float(first["ema_val_top1"]) <= float(first["val_top1"])
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["trainer"]["epoch"] == 2 and last["ema"] is not None
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"])
    for name in ("epoch_0001.pt", "epoch_0002.pt", "top_epoch_0001.pt", "top_epoch_0002.pt"):
        assert (out / "checkpoints" / name).is_file(), name
    assert (out / "eval" / "metrics.json").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/val", "accuracy/train_top1", "accuracy/val_top1", "optim/lr", "optim/grad_norm",
            "speed/images_per_second", "accuracy/val_ema_top1"} <= scalars
    assert [e.step for e in events.Scalars("optim/lr")] == [1, 2]
    assert events.Tags()["images"] == ["augmented_batch"]


def test_gradient_norm_penalty_with_a_time_budget_evaluates_and_reports(tiny_signs, tmp_path):
    out = tmp_path / "budget"
    # a budget of 6 ms is spent by the first batch: the run stops inside epoch 1, then tests and reports
    code = main(base_args(tiny_signs, out, epochs=50) + [
        "optim.wrapper=gnp", "optim.gnp_alpha=0.8", "optim.gnp_r=0.01", "optim.name=adamw", "optim.lr=0.001",
        "schedule.name=plateau", "train.time_budget=0.0001", "train.monitor=val_loss"])
    assert code == 0
    info = json.loads((out / "run_info.json").read_text())
    assert info["epochs_run"] == 1 and "time budget" in info["stopped_because"]
    assert len(rows(out)) == 1
    assert "partial: time budget" in (out / "train.log").read_text()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["num_samples"] == info["split_sizes"]["test"]
    assert (out / "report.md").is_file() and (out / "report.html").is_file()


def test_class_weights_of_the_wrong_length_are_a_config_error(tiny_signs, tmp_path, capsys):
    code = main(base_args(tiny_signs, tmp_path / "bad", epochs=1) + ["loss.class_weights=[1, 2, 3]"])
    assert code == 2
    assert "loss.class_weights has 3 numbers but the data has 11 classes" in capsys.readouterr().err


def test_keep_last_keeps_the_final_epoch_whatever_validation_says(tiny_signs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("resnetlab.reporting.report.render_report", lambda run_dir, **_: (run_dir, run_dir))
    out = tmp_path / "last"
    code = main(base_args(tiny_signs, out, epochs=3) + ["train.max_steps_per_epoch=3", "train.ema=true",
                                                        "train.keep=last", "schedule.name=onecycle"])
    assert code == 0
    info = json.loads((out / "run_info.json").read_text())
    assert info["best_epoch"] == 3
    assert [int(r["best"]) for r in rows(out)] == [1, 1, 1]
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert best["meta"]["epoch"] == 3
    # the raw or the EMA weights of the last epoch, whichever validated better then
    kept = last["ema"] if best["meta"]["weights"] == "ema" else last["model"]
    kept = {k.removeprefix("module."): v for k, v in kept.items() if k != "n_averaged"}
    assert all(torch.equal(best["model"][k], kept[k]) for k in best["model"])
    assert "kept the last epoch (3, train.keep=last)" in (out / "train.log").read_text()

    capsys.readouterr()
    code = main(base_args(tiny_signs, tmp_path / "refused", epochs=3) + ["train.keep=last",
                                                                          "train.early_stopping_patience=2"])
    assert code == 2 and "train.keep=last" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_training_saves_the_bare_model(tiny_signs, tmp_path, monkeypatch):
    """torch.compile on CPU needs a C++ compiler and takes a minute or two to compile: marked slow."""
    monkeypatch.setattr("resnetlab.reporting.report.render_report", lambda run_dir, **_: (run_dir, run_dir))
    out = tmp_path / "compiled"
    assert main(base_args(tiny_signs, out, epochs=1) + ["train.compile=true", "train.max_steps_per_epoch=2",
                                                        "optim.wrapper=sam", "train.ema=true"]) == 0
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert not any(key.startswith("_orig_mod.") for key in state["model"])
    assert "torch.compile: on" in (out / "train.log").read_text()
