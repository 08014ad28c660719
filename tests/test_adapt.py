"""Test-time adaptation without labels (``resnetlab adapt``, ``rl.adapt``): AdaBN re-estimates the BatchNorm
statistics on a shifted domain and nothing else; TENT changes the BatchNorm affine parameters alone and makes the
predictions more confident; the new checkpoint works everywhere a checkpoint does; the input is never changed."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import resnetlab as rl
from resnetlab.checkpoint import load_checkpoint, model_from_checkpoint
from resnetlab.cli.main import main
from resnetlab.engine.adaptation import adapt_batchnorm, batchnorm_layers, mean_entropy, tent
from resnetlab.errors import ConfigError, DataError

TINY = {"batch_size": 32, "train__threads": 1, "eval__gradcam": False, "eval__deployment_check": False}
STEPS = {"train.max_steps_per_epoch": 3}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def bn_run(tiny_signs, tmp_path_factory):
    """A tiny trained resnet20 (BatchNorm everywhere) on the synthetic signs."""
    return rl.train(f"gtsrb:{tiny_signs}", epochs=1, out=tmp_path_factory.mktemp("adapt") / "run", progress=False,
                    model="resnet20", overrides=STEPS, **TINY)


@pytest.fixture(scope="module")
def shifted(tiny_signs, tmp_path_factory) -> Path:
    """The synthetic test images under a strong colour cast and darkening, as a folder without class folders (a
    flat part and one nested sub-folder): a new domain with no labels."""
    folder = tmp_path_factory.mktemp("shifted") / "night"
    sources = sorted((tiny_signs / "Test").glob("*.png"))[:48]
    for i, path in enumerate(sources):
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        pixels = pixels * np.array([0.35, 0.45, 0.9]) + np.array([0.0, 10.0, 60.0])  # dark and blue
        where = folder / ("dusk" if i % 3 == 0 else "") / f"img{i:03d}.png"
        where.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(where)
    return folder


def first_bn_input_mean(model: nn.Module, batches) -> torch.Tensor:
    """The per-channel mean of what the first BN layer receives, over all images: the statistic AdaBN must find
    (its input comes before any BN, so it does not depend on the statistics being estimated)."""
    first = batchnorm_layers(model)[0]
    sums, count = [], 0

    def hook(_module, inputs):
        x = inputs[0]
        sums.append(x.double().sum(dim=(0, 2, 3)))
        nonlocal count
        count += x.shape[0] * x.shape[2] * x.shape[3]

    handle = first.register_forward_pre_hook(hook)
    with torch.no_grad():
        model.eval()
        for images in batches:
            model(images)
    handle.remove()
    return (torch.stack(sums).sum(0) / count).float()


def domain_batches(run_dir: Path, folder: Path, batch: int = 16) -> list[torch.Tensor]:
    clf = rl.load(run_dir, backend="torch")
    images = torch.stack([clf.transform(Image.open(p).convert("RGB")) for p in sorted(folder.rglob("*.png"))])
    return list(images.split(batch))


# ---------------------------------------------------------------------------------------------------------------
# the engine functions, on tiny modules
# ---------------------------------------------------------------------------------------------------------------


def test_adapt_batchnorm_finds_the_mean_over_images_even_with_unequal_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5))
    data = torch.randn(13, 3, 8, 8) * 2 + 3
    batches = [data[:5], data[5:10], (data[10:], torch.zeros(3))]  # a smaller last batch, and a labelled pair
    seen = adapt_batchnorm(model, batches)
    assert seen == 13
    with torch.no_grad():
        expected = model[0](data).mean(dim=(0, 2, 3))
    assert torch.allclose(model[1].running_mean, expected, atol=1e-5)
    assert model[1].momentum == 0.1 and not model.training  # settings restored, left in eval mode


def test_a_prior_keeps_the_source_statistics_in_proportion_to_its_strength():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    source_mean = torch.randn(4)
    source_var = torch.rand(4) + 0.5
    model[1].running_mean.copy_(source_mean)
    model[1].running_var.copy_(source_var)
    data = torch.randn(10, 3, 8, 8) + 2
    replaced = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    replaced.load_state_dict(model.state_dict())
    adapt_batchnorm(replaced, [data[:6], data[6:]])  # AdaBN: the new statistics alone
    seen = adapt_batchnorm(model, [data[:6], data[6:]], prior_strength=30)
    assert seen == 10
    weight = 30 / (30 + 10)  # the source counts as 30 images beside the 10 new ones
    assert torch.allclose(model[1].running_mean, weight * source_mean + (1 - weight) * replaced[1].running_mean,
                          atol=1e-6)
    assert torch.allclose(model[1].running_var, weight * source_var + (1 - weight) * replaced[1].running_var,
                          atol=1e-6)
    with pytest.raises(ConfigError, match="prior strength"):
        adapt_batchnorm(model, [data], prior_strength=-1)


def test_engine_refuses_a_model_without_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ConfigError, match="no BatchNorm"):
        adapt_batchnorm(model, [torch.zeros(2, 3, 8, 8)])
    with pytest.raises(ConfigError, match="no BatchNorm"):
        tent(model, [torch.zeros(2, 3, 8, 8)], steps=1, lr=1e-3)


def test_tent_trains_only_batchnorm_affine_parameters_and_lowers_entropy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5))
    data = [torch.randn(16, 3, 8, 8) for _ in range(4)]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model[5].weight.requires_grad_(False)  # a frozen flag of the caller's is given back as it was
    result = tent(model, data, steps=40, lr=1e-2)
    assert result.steps == 40 and result.images_seen == 40 * 16
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {"1.weight", "1.bias"}
    assert np.mean(result.losses[-4:]) < np.mean(result.losses[:4])
    assert model[5].weight.requires_grad is False and model[0].weight.requires_grad is True
    with pytest.raises(ConfigError, match="--steps"):
        tent(model, data, steps=0, lr=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# the job, through the API and the CLI
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adabn(bn_run, shifted):
    before = sha256(bn_run.checkpoint)
    adapted = rl.adapt(bn_run, data=f"folder:{shifted}", batch_size=16)
    return adapted, before


def test_adabn_moves_the_statistics_to_the_new_domain_and_nothing_else(bn_run, shifted, adabn):
    adapted, _ = adabn
    assert adapted.checkpoint == bn_run.dir / "adapted" / "folder-night-adabn.pt"
    source, _ = model_from_checkpoint(load_checkpoint(bn_run.checkpoint))
    model, meta = model_from_checkpoint(load_checkpoint(adapted.checkpoint))
    target = first_bn_input_mean(source, domain_batches(bn_run.dir, shifted))
    first_source, first_adapted = batchnorm_layers(source)[0], batchnorm_layers(model)[0]
    # the exact mean over the new images (a cumulative average weighted by images), far from the source's
    assert torch.allclose(first_adapted.running_mean, target, atol=1e-4)
    assert (first_source.running_mean - target).abs().mean() > 10 * (first_adapted.running_mean - target).abs().mean()
    old, new = source.state_dict(), model.state_dict()
    stats = {name for name in new if name.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert all(torch.equal(old[name], new[name]) for name in new if name not in stats)  # conv, BN affine, fc
    assert any(not torch.equal(old[name], new[name]) for name in stats if name.endswith("running_var"))


def test_the_adapted_checkpoint_keeps_the_record_and_says_how_it_was_made(bn_run, shifted, adabn):
    adapted, before = adabn
    assert sha256(bn_run.checkpoint) == before  # the input is only read
    source = load_checkpoint(bn_run.checkpoint)["meta"]
    meta = load_checkpoint(adapted.checkpoint)["meta"]
    for key in ("model", "classes", "preprocessing", "config", "data", "format_version"):
        assert meta[key] == source[key], key
    record = meta["adaptation"]
    assert record == adapted.record
    assert record["method"] == "adabn" and record["data"] == f"folder:{shifted}" and record["num_images"] == 48
    assert record["steps"] == 0 and record["lr"] is None and record["labels_used"] is False
    assert record["source_checkpoint_sha256"] == before and record["resnetlab_version"] == rl.__version__
    assert record["time"] and record["mean_entropy_before"] > 0


def test_a_calibration_record_is_kept_and_marked_as_fitted_before_adaptation(bn_run, shifted, tmp_path):
    import shutil

    from resnetlab.checkpoint import store_calibration
    from resnetlab.evaluation.selective import fit_calibration

    checkpoint = tmp_path / "checkpoints" / "best.pt"
    checkpoint.parent.mkdir()
    shutil.copy(bn_run.checkpoint, checkpoint)
    generator = torch.Generator().manual_seed(0)
    calibration = fit_calibration(torch.randn(64, 4, generator=generator) * 3,
                                  torch.randint(0, 4, (64,), generator=generator))
    store_calibration(checkpoint, calibration)
    adapted = rl.adapt(checkpoint, data=f"folder:{shifted}", batch_size=16)
    assert adapted.checkpoint == tmp_path / "adapted" / "folder-night-adabn.pt"
    kept = load_checkpoint(adapted.checkpoint)["meta"]["calibration"]
    assert kept["temperature"] == pytest.approx(calibration["temperature"])
    assert kept["operating_point"] == load_checkpoint(checkpoint)["meta"]["calibration"]["operating_point"]
    assert kept["fitted_before_adaptation"] is True


def test_predict_and_evaluate_take_the_adapted_checkpoint(tiny_signs, shifted, adabn, tmp_path):
    adapted, _ = adabn
    image = sorted(shifted.rglob("*.png"))[0]
    prediction = adapted.load(backend="torch").predict(image, topk=2)
    assert 0 <= prediction.confidence <= 1 and len(prediction.topk) == 2
    evaluation = rl.evaluate(adapted.checkpoint, data=f"gtsrb:{tiny_signs}", out=tmp_path / "ev")
    assert evaluation.metrics["num_samples"] > 0


def test_overwrite_rule_and_the_input_is_never_the_output(bn_run, shifted, adabn, tmp_path):
    adapted, _ = adabn
    with pytest.raises(ConfigError, match="already exists.*--overwrite"):
        rl.adapt(bn_run, data=f"folder:{shifted}", batch_size=16)
    with pytest.raises(ConfigError, match="never changes its input"):
        rl.adapt(bn_run, data=f"folder:{shifted}", out=bn_run.checkpoint, overwrite=True)
    out = tmp_path / "mine.pt"
    first = rl.adapt(bn_run.checkpoint, data=f"folder:{shifted}", out=out, batch_size=16)
    again = rl.adapt(bn_run.checkpoint, data=f"folder:{shifted}", out=out, batch_size=16, overwrite=True, seed=1)
    assert first.checkpoint == again.checkpoint == out and again.record["seed"] == 1


def test_tent_changes_only_batchnorm_affine_parameters_and_makes_predictions_confident(bn_run, shifted, adabn,
                                                                                      tmp_path):
    adabn_result, _ = adabn
    adapted = rl.adapt(bn_run, data=f"folder:{shifted}", method="tent", steps=30, lr=0.01, batch_size=16,
                       out=tmp_path)
    assert adapted.checkpoint == tmp_path / "folder-night-tent.pt"
    record = adapted.record
    assert record["method"] == "tent" and record["steps"] == 30 and record["lr"] == 0.01
    assert record["mean_entropy_after"] < adabn_result.record["mean_entropy_after"]
    assert record["mean_entropy_after"] < record["mean_entropy_before"]
    old = load_checkpoint(bn_run.checkpoint)["model"]
    new = load_checkpoint(adapted.checkpoint)["model"]
    model, _ = model_from_checkpoint(load_checkpoint(adapted.checkpoint))
    affine = {f"{name}.{p}" for name, m in model.named_modules() if m in batchnorm_layers(model)
              for p in ("weight", "bias")}
    changed = {name for name in new if not torch.equal(old[name], new[name])}
    stats = {name for name in changed if name.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert changed - stats <= affine and changed & affine  # BN weights and biases, and nothing else trained
    # the saved model is consistent in eval mode: its statistics were re-estimated after TENT
    batches = domain_batches(bn_run.dir, shifted)
    assert mean_entropy(model, batches) == pytest.approx(record["mean_entropy_after"], abs=1e-3)


def test_a_labelled_spec_is_accepted_and_its_labels_ignored(bn_run, tiny_signs, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="resnetlab"):
        adapted = rl.adapt(bn_run, data=f"gtsrb:{tiny_signs}", out=tmp_path / "g.pt")
    assert "labels are ignored" in caplog.text
    assert adapted.record["num_images"] > 48 and adapted.record["data"] == f"gtsrb:{tiny_signs}"


def test_clear_errors(bn_run, shifted, tiny_signs, tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(shifted.glob("*.png"))[:5]:
        (few / path.name).write_bytes(path.read_bytes())
    with pytest.raises(DataError, match="5 readable image.*at least 16"):
        rl.adapt(bn_run, data=f"folder:{few}", out=tmp_path / "x.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no image files"):
        rl.adapt(bn_run, data=f"folder:{empty}", out=tmp_path / "x.pt")
    with pytest.raises(ConfigError, match="--steps and --lr apply to --method tent"):
        rl.adapt(bn_run, data=f"folder:{shifted}", lr=0.01, out=tmp_path / "x.pt")
    with pytest.raises(ConfigError, match="--method 'bn'"):
        rl.adapt(bn_run, data=f"folder:{shifted}", method="bn", out=tmp_path / "x.pt")
    with pytest.raises(ConfigError, match="--batch-size 40 with 48 images"):
        rl.adapt(bn_run, data=f"folder:{shifted}", batch_size=40, out=tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_unreadable_images_stop_or_are_skipped(bn_run, shifted, tmp_path):
    import shutil

    folder = tmp_path / "with-bad"
    shutil.copytree(shifted, folder)
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="1 unreadable image.*broken.png.*data.on_bad_image=skip"):
        rl.adapt(bn_run, data=f"folder:{folder}", out=tmp_path / "x.pt", batch_size=16)
    adapted = rl.adapt(bn_run, data=f"folder:{folder}", out=tmp_path / "x.pt", batch_size=16,
                       overrides={"data.on_bad_image": "skip"})
    assert adapted.record["num_images"] == 48
    with pytest.raises(ConfigError, match="adapt takes data.. settings only"):
        rl.adapt(bn_run, data=f"folder:{folder}", out=tmp_path / "y.pt", overrides=["optim.lr=0.1"])


def test_adapting_an_adapted_checkpoint_keeps_the_first_record(adabn, shifted, tmp_path):
    first, _ = adabn
    again = rl.adapt(first.checkpoint, data=f"folder:{shifted}", out=tmp_path / "twice.pt", batch_size=16)
    assert again.record["previous"] == first.record
    assert again.record["source_checkpoint_sha256"] == sha256(first.checkpoint)


def test_the_file_pipeline_path_gives_shuffled_unaugmented_batches(shifted):
    """Inputs above the in-memory size are read by DataLoader workers: every image once per pass, prepared as
    recorded (no augmentation: the same image gives the same tensor in every pass), in a new order each pass."""
    from resnetlab.config import DataConfig
    from resnetlab.data.preprocessing import Preprocessing
    from resnetlab.data.unlabelled import open_unlabelled
    from resnetlab.jobs.adapt import _passes, _readable

    prep = Preprocessing(input_size=72, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    images = open_unlabelled(DataConfig(spec=f"folder:{shifted}"))
    split = _readable(images.table, prep, on_bad_image="error", log=lambda _: None)
    assert split.images is None  # the file path
    passes = _passes(split, prep, batch_size=16, seed=0)
    first, second = (torch.cat([x for x, _ in passes]) for _ in range(2))
    assert first.shape == (48, 3, 72, 72) and second.shape == first.shape
    assert not torch.equal(first, second)  # another order
    key = lambda batch: sorted(batch.flatten(1).sum(1).tolist())  # noqa: E731
    assert key(first) == pytest.approx(key(second), abs=1e-3)  # the same images, not augmented


def test_a_model_without_batchnorm_is_a_clear_error(bn_run, shifted, tmp_path):
    """A checkpoint of simple_cnn (the registry's model without BatchNorm), made from the run's by swapping the
    model: the same record otherwise, so only the missing BN layers can be the reason."""
    from resnetlab.models import create_model
    from resnetlab.utils.io import torch_save

    state = load_checkpoint(bn_run.checkpoint)
    classes = state["meta"]["model"]["num_classes"]
    meta = {**state["meta"], "model": {"name": "simple_cnn", "num_classes": classes, "kwargs": {}}}
    checkpoint = tmp_path / "checkpoints" / "best.pt"
    torch_save({"model": create_model("simple_cnn", classes).state_dict(), "meta": meta}, checkpoint)
    with pytest.raises(ConfigError, match="simple_cnn has no BatchNorm layers"):
        rl.adapt(checkpoint, data=f"folder:{shifted}")
    assert not (tmp_path / "adapted").exists()


def test_cli_adapt(bn_run, shifted, tmp_path, capsys):
    out = tmp_path / "cli.pt"
    assert main(["adapt", str(bn_run.dir), "--data", f"folder:{shifted}", "--out", str(out), "-b", "16"]) == 0
    assert str(out) in capsys.readouterr().out and load_checkpoint(out)["meta"]["adaptation"]["method"] == "adabn"
    assert main(["adapt", str(bn_run.dir), "--data", f"folder:{shifted}", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["adapt", str(bn_run.dir), "--data", f"folder:{shifted}", "--out", str(tmp_path / "y.pt"),
                 "--lr", "0.1"]) == 2
