"""The main job through the CLI: train a tiny run, evaluate its checkpoint, predict an image; bad input exits 2."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from resnetlab.cli.main import main

RUN_FILES = ["config.yaml", "train.log", "metrics.csv", "checkpoints/best.pt", "checkpoints/last.pt",
             "eval/metrics.json", "eval/per_class.csv", "eval/confusion.csv", "eval/predictions.csv", "report.md",
             "report.html", "plots/training_curves.png", "plots/confusion_matrix.png", "splits.csv", "run_info.json"]


@pytest.fixture(scope="module")
def tiny_run(tiny_signs, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    code = main(["train", "--data", f"gtsrb:{tiny_signs}", "--epochs", "2", "--batch-size", "32", "--out", str(out),
                 "--quiet", "train.threads=1", "schedule.name=cosine", "optim.lr=0.05"])
    assert code == 0
    return out


def test_run_directory_contract(tiny_run):
    for name in RUN_FILES:
        assert (tiny_run / name).is_file(), name
    with open(tiny_run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for column in ("lr", "train_loss", "train_top1", "train_top5", "val_loss", "val_top1", "val_top5", "epoch_seconds",
                   "images_per_second"):
        assert all(r[column] != "" for r in rows), column
    assert all(float(r["train_top5"]) >= float(r["train_top1"]) for r in rows)
    assert float(rows[1]["lr"]) < float(rows[0]["lr"])  # cosine decays
    metrics = json.loads((tiny_run / "eval" / "metrics.json").read_text())
    for key in ("top1", "top5", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["top5"] >= metrics["top1"]
    assert metrics["num_classes"] == 11
    info = json.loads((tiny_run / "run_info.json").read_text())
    assert metrics["num_samples"] == info["split_sizes"]["test"]
    with open(tiny_run / "eval" / "predictions.csv") as handle:
        header = next(csv.reader(handle))
    assert header[:4] == ["path", "true", "pred", "confidence"]
    with open(tiny_run / "splits.csv") as handle:
        manifest = list(csv.DictReader(handle))
    assert {r["split"] for r in manifest} == {"train", "val", "test"}
    assert all(len(r["roi"].split()) == 4 for r in manifest)  # what `report` needs to crop galleries as trained


def test_checkpoint_loads_with_weights_only_and_rebuilds_the_model(tiny_run):
    from resnetlab.checkpoint import model_from_checkpoint

    state = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    meta = state["meta"]
    assert meta["model"]["name"] == "resnet20"
    assert meta["classes"]["ids"] == [1, 2, 3, 4, 5, 12, 13, 14, 17, 18, 38]
    assert meta["preprocessing"]["input_size"] == 32 and len(meta["preprocessing"]["mean"]) == 3
    assert meta["data"]["split_strategy"] == "grouped by track"
    json.dumps(meta)  # a plain JSON-able record
    model, _ = model_from_checkpoint(state)
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 11)
    last = torch.load(tiny_run / "checkpoints" / "last.pt", weights_only=True)
    assert {"optimizer", "schedule", "rng", "trainer"} <= set(last)


def test_evaluate_val_rebuilds_the_held_out_split(tiny_run, tiny_signs, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["evaluate", str(tiny_run / "checkpoints" / "best.pt"), "--data", f"gtsrb:{tiny_signs}",
                 "--split", "val", "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    info = json.loads((tiny_run / "run_info.json").read_text())
    assert metrics["num_samples"] == info["split_sizes"]["val"]
    # the validation accuracy of the best epoch, recomputed from the checkpoint alone
    with open(tiny_run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    best_val = max(float(r["val_top1"]) for r in rows)
    assert metrics["top1"] == pytest.approx(best_val, abs=1e-6)
    assert "top1" in capsys.readouterr().out


def test_predict_one_image_as_json(tiny_run, tiny_signs, capsys):
    image = next((tiny_signs / "Test").glob("*.png"))
    code = main(["predict", str(tiny_run / "checkpoints" / "best.pt"), str(image), "--format", "json", "--topk", "3"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result[0]["path"] == str(image)
    top = result[0]["top"]
    assert len(top) == 3
    confidences = [t["confidence"] for t in top]
    assert confidences == sorted(confidences, reverse=True) and 0 < sum(confidences) <= 1.0 + 1e-6


def test_predict_reports_unreadable_files_and_goes_on(tiny_run, tiny_signs, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    good = next((tiny_signs / "Test").glob("*.png"))
    code = main(["predict", str(tiny_run / "checkpoints" / "best.pt"), str(good), str(broken), "--format", "csv"])
    captured = capsys.readouterr()
    assert code == 1
    assert str(good) in captured.out
    assert "broken.png" in captured.err


def test_report_rerenders_from_files(tiny_run, capsys):
    (tiny_run / "report.md").unlink()
    assert main(["report", str(tiny_run)]) == 0
    assert (tiny_run / "report.md").is_file()


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--data", "gtsrb:/no/such/folder", "--epochs", "1"], "/no/such/folder"),
    (["train", "optim.lrr=0.1"], "optim.lrr"),
    (["train", "--model", "resnet5"], "resnet5"),
    (["train", "--recipe", "nope"], "nope"),
    (["train", "--data", "imagenet21k:/x"], "imagenet21k"),
    (["evaluate", "/no/such/checkpoint.pt", "--data", "synthetic-signs"], "/no/such/checkpoint.pt"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, fragment, tmp_path, capsys):
    code = main(argv + (["--out", str(tmp_path / "run")] if argv[0] == "train" else []))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert fragment in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_non_empty_out_is_refused_without_overwrite(tiny_run, capsys):
    assert main(["train", "--out", str(tiny_run), "--epochs", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_checkpoint_of_another_kind_is_refused(tmp_path, capsys):
    fake = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, fake)
    assert main(["predict", str(fake), str(fake)]) == 2
    assert "not a resnetlab checkpoint" in capsys.readouterr().err


def test_module_entry_point_and_help():
    result = subprocess.run([sys.executable, "-m", "resnetlab", "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for group in ("Data", "Model", "Training", "Output"):
        assert group in result.stdout


def test_compare_a_run_with_its_evaluation_on_a_class_subset(tiny_run, tiny_signs, tmp_path, capsys):
    """A second test set holding only some classes, then `compare`: per-class deltas for the classes both have."""
    import csv as csv_module

    rows = []
    with open(tiny_signs / "Test.csv", newline="") as handle:
        for row in csv_module.DictReader(handle):
            if row["ClassId"] in ("14", "17"):
                rows.append({"Path": str(tiny_signs / row["Path"]), "ClassId": row["ClassId"]})
    subset = tmp_path / "stop_and_no_entry.csv"
    with open(subset, "w", newline="") as handle:
        writer = csv_module.DictWriter(handle, fieldnames=["Path", "ClassId"])
        writer.writeheader()
        writer.writerows(rows)
    shifted = tmp_path / "shifted"
    assert main(["evaluate", str(tiny_run / "checkpoints" / "best.pt"), "--data", f"csv:{subset}", "--out",
                 str(shifted)]) == 0
    metrics = json.loads((shifted / "metrics.json").read_text())
    assert metrics["num_samples"] == len(rows)
    assert main(["compare", str(tiny_run), str(shifted), "--out", str(tmp_path / "cmp")]) == 0
    with open(tmp_path / "cmp" / "per_class_delta.csv", newline="") as handle:
        deltas = list(csv_module.DictReader(handle))
    assert {"Stop", "No entry"} <= {row[next(iter(row))] for row in deltas}
    assert (tmp_path / "cmp" / "compare.html").is_file()


def test_evaluate_takes_data_overrides_but_not_the_models_preprocessing(tiny_run, tiny_signs, tmp_path, capsys):
    checkpoint = str(tiny_run / "checkpoints" / "best.pt")
    out = tmp_path / "subset"
    # the test split of the synthetic signs, only two of its classes (GTSRB ClassIds 14 and 17)
    assert main(["evaluate", checkpoint, "--data", f"gtsrb:{tiny_signs}", "--out", str(out),
                 "data.classes=[14,17]"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    with open(tiny_signs / "Test.csv", newline="") as handle:
        expected = sum(row["ClassId"] in ("14", "17") for row in csv.DictReader(handle))
    assert metrics["num_samples"] == expected and metrics["num_classes"] == 2
    capsys.readouterr()
    for override, fragment in [("data.input_size=64", "model's preprocessing"), ("optim.lr=0.1", "data.* settings"),
                               ("data.no_such_key=1", "no_such_key"), ("data.on_bad_image=maybe", "on_bad_image")]:
        assert main(["evaluate", checkpoint, "--out", str(tmp_path / "refused"), override]) == 2, override
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "refused").exists()
