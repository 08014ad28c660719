"""Fine-tuning a trained model to a new domain: `resnetlab train --init-from RUN --data NEW [--freeze ...]`.

One tiny ResNet-20 is trained on the synthetic signs; the "new domain" is a CSV of darkened copies of a few of its
classes' images. The fine-tuned model must keep the original's class list, head and preprocessing; freezing must
leave exactly the frozen tensors bit-identical; eval/finetune.json and the report compare before and after.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageEnhance

from resnetlab.checkpoint import load_checkpoint
from resnetlab.cli.main import main
from resnetlab.deployment.records import file_sha256

FAST = ["--quiet", "train.threads=1", "train.max_steps_per_epoch=2", "eval.gradcam=false",
        "eval.deployment_check=false", "data.eval_batch_size=64"]
NEW_CLASSES = {1: "Speed limit (30km/h)", 14: "Stop", 38: "Keep right"}  # ClassIds of the synthetic signs
PER_CLASS = 10


@pytest.fixture(scope="module")
def original(tiny_signs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("original") / "run"
    code = main(["train", "--data", f"gtsrb:{tiny_signs}", "--model", "resnet20", "--epochs", "1", "--batch-size",
                 "32", "--out", str(out), "data.input_size=32", *FAST])
    assert code == 0
    return out


def write_new_domain(tiny_signs: Path, folder: Path, *, by: str = "id", extra: dict[int, str] | None = None) -> Path:
    """A CSV of darkened, low-contrast copies of PER_CLASS training images of each NEW_CLASSES class (``by``: label
    the rows by ClassId or by ClassName); ``extra`` adds rows of classes the model does not have."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(tiny_signs / "Train.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    lines = []
    for class_id, name in {**NEW_CLASSES, **(extra or {})}.items():
        source_id = class_id if class_id in NEW_CLASSES else 1
        chosen = [r for r in rows if int(r["ClassId"]) == source_id][:PER_CLASS]
        for i, row in enumerate(chosen):
            image = Image.open(tiny_signs / row["Path"]).convert("RGB")
            image = ImageEnhance.Contrast(ImageEnhance.Brightness(image).enhance(0.45)).enhance(0.6)
            path = folder / f"{class_id}_{i}.png"
            image.save(path)
            lines.append({"Path": path.name, "ClassId": class_id, "ClassName": name})
    manifest = folder / "labels.csv"
    columns = ["Path", "ClassId"] if by == "id" else ["Path", "ClassName"]
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(lines)
    return manifest


@pytest.fixture(scope="module")
def new_domain(tiny_signs, tmp_path_factory) -> Path:
    return write_new_domain(tiny_signs, tmp_path_factory.mktemp("new-domain"))


def finetune(original: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--recipe", "finetune-new-domain", "--init-from", str(original), "--data", f"csv:{data}",
                 "--epochs", "2", "--out", str(out), "data.batch_size=8", *FAST, *extra])


@pytest.fixture(scope="module")
def bn_run(original, new_domain, tmp_path_factory) -> Path:
    """The recipe's default: BatchNorm and head train. data.input_size=48 asks for another input size, which the
    checkpoint's preprocessing overrules."""
    out = tmp_path_factory.mktemp("finetuned") / "run"
    assert finetune(original, new_domain, out, "data.input_size=48", "data.contrast=equalize") == 0
    return out


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "best.pt")["model"]


def is_bn_affine(name: str, state: dict) -> bool:
    stem = name.rsplit(".", 1)[0]
    return name.endswith((".weight", ".bias")) and f"{stem}.running_mean" in state


def test_the_finetuned_model_keeps_the_original_classes_head_and_preprocessing(original, bn_run):
    before = load_checkpoint(original / "checkpoints" / "best.pt")["meta"]
    after = load_checkpoint(bn_run / "checkpoints" / "best.pt")["meta"]
    # A drop-in replacement: all 11 classes in the original order, the head unchanged in size.
    assert after["classes"] == before["classes"] and len(after["classes"]["ids"]) == 11
    assert after["model"]["num_classes"] == 11 and after["model"]["name"] == "resnet20"
    assert weights(bn_run)["fc.weight"].shape == weights(original)["fc.weight"].shape
    # The checkpoint's preprocessing, mean and std included, although the config asked for 48 px and equalize.
    assert after["preprocessing"] == before["preprocessing"]
    saved = yaml.safe_load((bn_run / "config.yaml").read_text())
    assert saved["data"]["input_size"] == 32 and saved["data"]["contrast"] == "none"
    log = (bn_run / "train.log").read_text()
    assert "keeps the checkpoint's preprocessing" in log and "data.input_size=48" in log
    assert after["init_from"] == {"checkpoint": str((original / "checkpoints" / "best.pt").resolve()),
                                  "sha256": file_sha256(original / "checkpoints" / "best.pt")}
    # The data's classes, mapped by ClassId onto the model's indices: only those three appear in the splits.
    ids = before["classes"]["ids"]
    with open(bn_run / "splits.csv", newline="") as handle:
        labels = {int(row["label"]) for row in csv.DictReader(handle)}
    assert labels == {ids.index(class_id) for class_id in NEW_CLASSES}
    # The test evaluation covers the classes the data holds, in the model's class list.
    metrics = json.loads((bn_run / "eval" / "metrics.json").read_text())
    assert metrics["num_model_classes"] == 11 and metrics["num_classes"] == 3


def test_all_but_bn_and_head_trains_only_batchnorm_and_the_classifier(original, bn_run):
    start, end = weights(original), weights(bn_run)
    changed = {name for name in start if not torch.equal(start[name], end[name])}
    trainable = {name for name in start if is_bn_affine(name, start) or name.startswith("fc.")}
    # Every trained tensor is a BatchNorm affine one, the head or a BatchNorm running statistic (which adapts).
    assert changed - trainable == {name for name in changed if name.endswith(("running_mean", "running_var",
                                                                              "num_batches_tracked"))}
    assert {"fc.weight", "fc.bias"} <= changed
    assert any(is_bn_affine(name, start) for name in changed)
    convs = [name for name in start if name.endswith("weight") and start[name].dim() == 4]
    assert convs and all(torch.equal(start[name], end[name]) for name in convs)
    log = (bn_run / "train.log").read_text()
    assert "train.freeze=all_but_bn_and_head:" in log and "parameters train" in log


def test_freeze_backbone_changes_only_the_classifier(original, new_domain, tmp_path):
    out = tmp_path / "probe"
    assert finetune(original, new_domain, out, "--freeze", "backbone") == 0
    start, end = weights(original), weights(out)
    changed = {name for name in start if not torch.equal(start[name], end[name])}
    # Conv and BatchNorm weights, and the BatchNorm running statistics (eval mode), are bit-identical.
    assert changed == {"fc.weight", "fc.bias"}
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["freeze"] == "backbone"


def test_finetune_json_and_the_report_compare_before_and_after(original, bn_run):
    record = json.loads((bn_run / "eval" / "finetune.json").read_text())
    assert record["init_from"]["sha256"] == file_sha256(original / "checkpoints" / "best.pt")
    new, old = record["new_domain"], record["original"]
    for entry in (new["before"], new["after"], old["before"], old["after"]):
        assert set(entry) == {"top1", "balanced_accuracy", "ece", "num_images"}
    # After = the run's own test evaluation; before = the original checkpoint on those same images.
    metrics = json.loads((bn_run / "eval" / "metrics.json").read_text())
    assert new["after"]["top1"] == pytest.approx(metrics["top1"])
    assert new["after"]["num_images"] == new["before"]["num_images"] == metrics["num_samples"]
    # The original model on the original test split (the synthetic signs' Test.csv) is the original run's test.
    original_metrics = json.loads((original / "eval" / "metrics.json").read_text())
    assert old["before"]["top1"] == pytest.approx(original_metrics["top1"])
    assert old["before"]["num_images"] == original_metrics["num_samples"] == 88
    report = (bn_run / "report.md").read_text()
    assert "## Fine-tuning" in report and "Original dataset" in report and "New domain" in report


def test_classes_map_by_name_too(original, tiny_signs, tmp_path):
    data = write_new_domain(tiny_signs, tmp_path / "named", by="name")
    out = tmp_path / "run"
    assert finetune(original, data, out, "--freeze", "backbone", "--original-data", "none") == 0
    meta = load_checkpoint(out / "checkpoints" / "best.pt")["meta"]
    assert len(meta["classes"]["ids"]) == 11
    record = json.loads((out / "eval" / "finetune.json").read_text())
    assert record["original"] is None and "none" in record["original_skipped"]


def test_a_class_the_model_does_not_know_is_one_clear_line(original, tiny_signs, tmp_path, capsys):
    data = write_new_domain(tiny_signs, tmp_path / "unknown", extra={99: "Moose crossing"})
    assert finetune(original, data, tmp_path / "run") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class 99 is not a class of the model" in err[0] and "'Stop'" not in err[0]
    assert "1 (Speed limit (30km/h))" in err[0]
    assert not (tmp_path / "run").exists()


def test_another_model_name_is_an_error(original, new_domain, tmp_path, capsys):
    assert finetune(original, new_domain, tmp_path / "run", "--model", "simple_cnn") == 2
    err = capsys.readouterr().err
    assert "model.name=simple_cnn" in err and "resnet20" in err


def test_the_recipe_without_init_from_says_to_pass_it(new_domain, tmp_path, capsys):
    code = main(["train", "--recipe", "finetune-new-domain", "--data", f"csv:{new_domain}", "--out",
                 str(tmp_path / "run"), *FAST])
    assert code == 2
    assert "--init-from" in capsys.readouterr().err


def test_the_finetuned_run_rebuilds_its_own_validation_split(bn_run):
    """The checkpoints record the data's fingerprints in its own class list, so `evaluate --split val` rebuilds
    the very images validation used (and maps their classes onto the model's) without a warning."""
    import resnetlab as rl

    evaluation = rl.evaluate(bn_run, split="val", out=bn_run.parent / "val-eval")
    with open(bn_run / "splits.csv", newline="") as handle:
        val_rows = [row for row in csv.DictReader(handle) if row["split"] == "val"]
    with open(bn_run / "metrics.csv", newline="") as handle:
        last_epoch = list(csv.DictReader(handle))[-1]
    assert evaluation.metrics["num_samples"] == len(val_rows)
    assert evaluation.metrics["top1"] == pytest.approx(float(last_epoch["val_top1"]))


def test_freezing_sets_requires_grad_and_the_optimizer_leaves_frozen_parameters_out():
    from resnetlab.config import OptimConfig
    from resnetlab.engine.optim import create_optimizer, freeze_parameters, frozen_norm_layers
    from resnetlab.models import create_model

    model = create_model("resnet20", 5)
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    summary = freeze_parameters(model, "backbone")
    assert summary.trainable == model.fc.weight.numel() + model.fc.bias.numel()
    assert frozen_norm_layers(model) == batch_norms
    optimizer = create_optimizer(model, OptimConfig())
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(model.fc.weight),
                                                                                    id(model.fc.bias)}
    summary = freeze_parameters(model, "all_but_bn_and_head")
    assert summary.trainable == summary.total - sum(m.weight.numel() for m in model.modules()
                                                    if isinstance(m, torch.nn.Conv2d))
    assert frozen_norm_layers(model) == []  # their scales train, so they stay in training mode
    # A model without BatchNorm trains its classifier only.
    cnn = create_model("simple_cnn", 5)
    assert freeze_parameters(cnn, "all_but_bn_and_head").trainable == cnn.fc.weight.numel() + cnn.fc.bias.numel()


def test_balanced_class_weights_leave_out_classes_without_images():
    import numpy as np

    from resnetlab.config import LossConfig
    from resnetlab.engine.trainer import loss_class_weights

    weights = loss_class_weights(LossConfig(class_weights="balanced"), np.array([6, 0, 2, 0]))
    assert weights.tolist() == pytest.approx([8 / (2 * 6), 0.0, 8 / (2 * 2), 0.0])


def test_the_cli_and_the_api_take_the_finetuning_options_alike(tmp_path, monkeypatch):
    import resnetlab as rl

    seen = []
    monkeypatch.setattr("resnetlab.jobs.train.train_job", lambda cfg, out, **_: seen.append(cfg.to_dict()) or out)
    assert main(["train", "--recipe", "finetune-new-domain", "--init-from", str(tmp_path / "run"), "--freeze",
                 "backbone", "--original-data", "none", "--quiet", "--out", str(tmp_path / "a")]) == 0
    rl.train(recipe="finetune-new-domain", init_from=tmp_path / "run", freeze="backbone", original_data="none",
             progress=False, out=tmp_path / "b")
    assert seen[0] == seen[1]
    assert seen[0]["model"]["init_from"] == str(tmp_path / "run") and seen[0]["train"]["freeze"] == "backbone"
    assert seen[0]["eval"]["original_data"] == "none"


def test_forgetting_is_measured_on_the_test_split_the_original_run_held_out(tiny_signs, new_domain, tmp_path):
    """An original dataset without a test split of its own (a CSV of every image): the original run held out its
    test images; the fine-tuning run rebuilds that very split from the checkpoint's split settings."""
    listing = tmp_path / "all.csv"
    with open(tiny_signs / "Train.csv", newline="") as handle, open(listing, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["Path", "ClassId"])
        writer.writerows([tiny_signs / row["Path"], row["ClassId"]] for row in csv.DictReader(handle))
    original = tmp_path / "original"
    assert main(["train", "--data", f"csv:{listing}", "--model", "resnet20", "--epochs", "1", "--batch-size", "32",
                 "--out", str(original), "data.input_size=32", *FAST]) == 0
    out = tmp_path / "run"
    assert finetune(original, new_domain, out, "--freeze", "backbone") == 0
    record = json.loads((out / "eval" / "finetune.json").read_text())["original"]
    held_out = json.loads((original / "eval" / "metrics.json").read_text())
    assert record["data"] == f"csv:{listing}" and record["split"] == "the test split the original run held out"
    assert record["before"]["num_images"] == held_out["num_samples"] < 264
    assert record["before"]["top1"] == pytest.approx(held_out["top1"])
    # Once the original dataset is gone, the run says so and goes on; a dataset the user names must be readable.
    listing.unlink()
    assert finetune(original, new_domain, tmp_path / "again", "--freeze", "backbone") == 0
    record = json.loads((tmp_path / "again" / "eval" / "finetune.json").read_text())
    assert record["original"] is None and "cannot be read here" in record["original_skipped"]
    assert "Not evaluated on the original dataset" in (tmp_path / "again" / "report.md").read_text()
    assert finetune(original, new_domain, tmp_path / "named", "--original-data", f"csv:{listing}") == 2
    assert not (tmp_path / "named").exists()
