"""`resnetlab data stats | inspect | profile | formats`, and the imbalance options (weighted sampler, class weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from resnetlab.cli.main import main
from resnetlab.config import build_config
from resnetlab.data.build import build_run_data
from resnetlab.data.inspect import inspect_dataset
from resnetlab.data.stats import compute_dataset_stats

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.fixture()
def coloured(tmp_path):
    """train/: 6 red images of class r, 4 blue of class b; val/ and test/: green images of both classes."""
    for split, colours in (("train", {"r": (RED, 6), "b": (BLUE, 4)}), ("val", {"r": (GREEN, 2), "b": (GREEN, 2)}),
                           ("test", {"r": (GREEN, 2), "b": (GREEN, 2)})):
        for name, (colour, n) in colours.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (10 + i, 12), colour).save(tmp_path / split / name / f"{i}.png")
    return tmp_path


def _cfg(spec, *overrides):
    return build_config({}, {"data.spec": spec}, ["data.input_size=8", *overrides])


def test_stats_come_from_the_training_split_only(coloured):
    stats = compute_dataset_stats(_cfg(f"folder:{coloured}"), per_class=True)
    assert stats.train_images == 10 and not stats.sampled
    assert np.allclose(stats.overall.mean, (0.6, 0.0, 0.4), atol=1e-6)  # no green: val and test are left out
    assert np.allclose(stats.overall.std, (np.sqrt(0.24), 0.0, np.sqrt(0.24)), atol=1e-5)
    by_name = {c["name"]: c for c in stats.per_class}
    assert by_name["r"]["images"] == 6 and np.allclose(by_name["r"]["mean"], (1, 0, 0))
    assert np.allclose(by_name["b"]["std"], (0, 0, 0), atol=1e-5)
    # the run normalizes with exactly these numbers
    data = build_run_data(_cfg(f"folder:{coloured}"), log=lambda m: None)
    assert np.allclose(data.prep.mean, stats.overall.mean) and np.allclose(data.prep.std, stats.overall.std)


def test_stats_are_cached_by_fingerprint(coloured, monkeypatch):
    import resnetlab.data.stats as stats_module

    first = compute_dataset_stats(_cfg(f"folder:{coloured}"))

    def must_not_decode(*args, **kwargs):
        raise AssertionError("cached statistics were recomputed")

    monkeypatch.setattr(stats_module, "decode_split", must_not_decode)
    assert compute_dataset_stats(_cfg(f"folder:{coloured}")).overall == first.overall
    # a replaced file changes the fingerprint (size and time), so the cache is not used
    Image.new("RGB", (30, 30), GREEN).save(coloured / "train" / "r" / "0.png")
    with pytest.raises(AssertionError, match="recomputed"):
        compute_dataset_stats(_cfg(f"folder:{coloured}"))


def test_stats_file_backed_sample(coloured):
    stats = compute_dataset_stats(_cfg(f"folder:{coloured}", "data.input_size=80", "data.resize=shorter_crop"))
    assert np.allclose(stats.overall.mean, (0.6, 0.0, 0.4), atol=1e-3) and stats.input_size == 80


def test_stats_cli_json(coloured, capsys):
    assert main(["data", "stats", f"folder:{coloured}", "data.input_size=8", "--per-class", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["overall"]["images"] == 10 and len(record["per_class"]) == 2
    assert main(["data", "stats", f"folder:{coloured}", "data.input_size=8"]) == 0
    assert "mean (0.6000, 0.0000, 0.4000)" in capsys.readouterr().out


def test_inspect_reports_counts_sizes_imbalance_groups_and_problems(coloured, tmp_path):
    (coloured / "train" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = inspect_dataset(_cfg(f"folder:{coloured}"), out_dir=tmp_path / "inspect", samples_per_class=3)
    assert result["num_classes"] == 2 and result["images"] == 19
    by_name = {c["name"]: c for c in result["classes"]}
    assert by_name["r"]["train"] == 6 and by_name["b"]["train"] == 5 and by_name["r"]["val"] == 2
    assert result["imbalance_ratio"] == 1.2
    assert result["group_kind"] is None
    sizes = result["image_sizes"]
    assert sizes["width"]["min"] == 10 and sizes["width"]["max"] == 15 and sizes["height"]["max"] == 12
    assert sizes["formats"] == {"PNG": 18}
    assert [p["path"].endswith("broken.png") for p in result["problems"]] == [True]
    grid = Image.open(tmp_path / "inspect" / "samples_per_class.png")
    assert grid.height >= 2 * 48  # one row per class
    assert json.loads((tmp_path / "inspect" / "inspect.json").read_text())["num_classes"] == 2
    assert (tmp_path / "inspect" / "bad_images.csv").read_text().count("broken.png") == 1


def test_inspect_groups_and_rois_of_gtsrb(tmp_path, capsys):
    from tests.test_gtsrb_loader import make_gtsrb

    make_gtsrb(tmp_path / "g", rows_per_class=12, classes=(0, 14))
    split = ["data.val_fraction=0.25", "data.test_fraction=0.25"]
    assert main(["data", "inspect", f"gtsrb:{tmp_path / 'g'}", *split, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["group_kind"] == "track" and sum(result["groups"].values()) == 8
    assert result["image_sizes"]["roi_width"]["min"] == 24
    assert main(["data", "inspect", f"gtsrb:{tmp_path / 'g'}", *split, "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "imbalance ratio" in text and "groups (track)" in text and (tmp_path / "o" / "samples_per_class.png").is_file()


@pytest.mark.parametrize("in_memory", ["always", "never"])
def test_profile_times_every_stage_and_the_training_step(tmp_path, in_memory):
    from resnetlab.bench.pipeline import profile_pipeline
    from tests.test_gtsrb_loader import make_gtsrb

    make_gtsrb(tmp_path, rows_per_class=12, classes=(0, 14))
    cfg = build_config({}, {"data.spec": f"gtsrb:{tmp_path}"},
                       ["data.batch_size=8", "train.threads=1", f"data.in_memory={in_memory}", "data.num_workers=0",
                        "data.val_fraction=0.25", "data.test_fraction=0.25"])
    result = profile_pipeline(cfg, files=8, batches=2, train_steps=1)
    assert [s.name for s in result.stages] == ["read", "decode", "crop", "augment", "collate"]
    assert all(s.microseconds_per_image > 0 for s in result.stages)
    assert result.pipeline_images_per_second > 0 and result.train_images_per_second > 0
    assert result.bottleneck in ("model", "data pipeline")
    record = result.to_dict()
    assert record["ratio"] > 0 and record["conditions"]["torch_threads"] == 1
    assert (result.one_off_images_per_second is not None) == (in_memory == "always")


def test_profile_cli(tmp_path, capsys):
    from tests.test_gtsrb_loader import make_gtsrb

    make_gtsrb(tmp_path, rows_per_class=12, classes=(0, 14))
    code = main(["data", "profile", "--data", f"gtsrb:{tmp_path}", "--files", "8", "--batches", "2", "--steps", "1",
                 "data.batch_size=8", "train.threads=1", "data.val_fraction=0.25", "data.test_fraction=0.25"])
    assert code == 0
    out = capsys.readouterr().out
    assert "bottleneck" in out and "collate" in out and "conditions:" in out


def test_formats_command(capsys):
    assert main(["data", "formats"]) == 0
    out = capsys.readouterr().out
    assert "csv:PATH" in out and "cifar100:PATH" in out and "gtsrb:PATH" in out


# ---------------------------------------------------------------------------------------------------------------
# Imbalance
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def imbalanced(tmp_path):
    for name, n in (("common", 40), ("rare", 5)):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / name / f"{i}.png")
    return tmp_path


@pytest.mark.parametrize(("sampler", "in_memory"), [("weighted", "always"), ("weighted", "never"),
                                                     ("sqrt", "always"), ("sqrt", "never")])
def test_weighted_samplers_rebalance_the_batches(imbalanced, sampler, in_memory):
    cfg = _cfg(f"folder:{imbalanced}", f"data.sampler={sampler}", f"data.in_memory={in_memory}", "data.num_workers=0",
               "data.batch_size=8", "data.val_fraction=0.1", "data.test_fraction=0.1", "augment.preset=none")
    data = build_run_data(cfg, log=lambda m: None)
    common, rare = data.train_counts.tolist()
    assert common > 5 * rare
    # weighted: every class equally often; sqrt: in proportion to the square root of its count
    expected = 0.5 if sampler == "weighted" else rare ** 0.5 / (common ** 0.5 + rare ** 0.5)
    torch.manual_seed(0)
    seen = []
    for epoch in range(1, 11):
        if hasattr(data.train, "set_epoch"):  # the file pipeline draws each epoch's sample from its epoch's seed
            data.train.set_epoch(epoch)
        seen += [labels for _, labels in data.train]
    seen = torch.cat(seen)
    share_rare = (seen == 1).float().mean().item()
    assert abs(share_rare - expected) < 0.12, (share_rare, expected)  # against rare / (common + rare) without
    assert share_rare > 1.5 * rare / (common + rare)


def test_balanced_class_weights_build_from_train_counts(imbalanced):
    from resnetlab.engine.trainer import loss_class_weights

    cfg = _cfg(f"folder:{imbalanced}", "loss.class_weights=balanced", "data.val_fraction=0.1", "data.test_fraction=0.1")
    data = build_run_data(cfg, log=lambda m: None)
    weights = loss_class_weights(cfg.loss, data.train_counts)
    counts = torch.as_tensor(data.train_counts, dtype=torch.float32)
    assert torch.allclose(weights.float(), counts.sum() / (2 * counts))  # scikit-learn's n / (k * n_c)
    assert weights[1] > weights[0]
