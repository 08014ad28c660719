"""The file-backed pipeline (images above 64 px, read and augmented in DataLoader workers) is reproducible: an
image's augmentation in an epoch depends on the seed, the epoch and the image alone, so the batches do not depend
on the number of workers, and a resumed run, whose workers start afresh, trains on what the uninterrupted run did."""

from __future__ import annotations

import csv
import itertools

import pytest
import torch

from resnetlab.cli.main import main
from resnetlab.config import build_config
from resnetlab.data.build import build_run_data

SIZE = 72  # above the 64 px in-memory limit: files through DataLoader workers


def file_batches(tiny_signs, workers: int, seed: int = 0):
    cfg = build_config({}, {"data.spec": f"gtsrb:{tiny_signs}", "data.input_size": SIZE, "data.batch_size": 16,
                            "data.num_workers": workers, "augment.preset": "objects", "train.seed": seed})
    data = build_run_data(cfg, log=lambda message: None)
    assert not data.in_memory
    return data.train


def epoch_batches(loader, epoch: int, count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    torch.manual_seed(1234)  # the batch-level steps in this process draw from the global stream, as training does
    return list(itertools.islice(loader, count))


def assert_same(a, b):
    assert len(a) == len(b)
    for (images_a, labels_a), (images_b, labels_b) in zip(a, b):
        assert torch.equal(labels_a, labels_b)
        assert torch.equal(images_a, images_b)


def test_batches_do_not_depend_on_the_workers_or_on_the_epochs_before(tiny_signs):
    in_process, two_workers, fresh = (file_batches(tiny_signs, w) for w in (0, 2, 2))
    first = epoch_batches(in_process, 1)
    assert_same(first, epoch_batches(two_workers, 1))
    second = epoch_batches(two_workers, 2)  # these workers have already augmented epoch 1
    assert_same(second, epoch_batches(in_process, 2))
    assert_same(second, epoch_batches(fresh, 2))  # as after a resume: new workers, straight to epoch 2
    # and the epochs do differ, in order and in augmentation, as does another seed
    assert not torch.equal(first[0][0], second[0][0])
    assert not torch.equal(first[0][0], epoch_batches(file_batches(tiny_signs, 0, seed=1), 1)[0][0])


def test_a_file_backed_run_resumed_with_two_workers_ends_as_the_uninterrupted_one(tiny_signs, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setattr("resnetlab.reporting.report.render_report", lambda run_dir, **_: (run_dir, run_dir))

    def args(out, epochs):
        return ["train", "--data", f"gtsrb:{tiny_signs}", "--model", "simple_cnn", "--epochs", str(epochs),
                "--batch-size", "32", "--out", str(out), "--quiet", f"data.input_size={SIZE}", "data.num_workers=2",
                "augment.preset=objects", "augment.random_erasing=0.25", "schedule.name=constant", "optim.lr=0.05",
                "train.deterministic=true", "train.threads=1", "train.ema=true", "eval.gradcam=false"]

    def rows(run):
        with open(run / "metrics.csv", newline="") as handle:
            return [{k: v for k, v in row.items() if k not in {"epoch_seconds", "images_per_second"}}
                    for row in csv.DictReader(handle)]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(args(straight, 4)) == 0
    assert main(args(resumed, 2)) == 0
    assert main(["train", "--resume", str(resumed), "--epochs", "4", "--quiet"]) == 0
    assert rows(resumed) == rows(straight)
    assert len(rows(straight)) == 4


def test_weighted_sampling_is_sharded_between_ranks(tiny_signs):
    """Under DDP each rank takes its own share of one weighted draw (before, every rank trained on the whole draw)."""
    cfg = build_config({}, {"data.spec": f"gtsrb:{tiny_signs}", "data.input_size": SIZE, "data.batch_size": 16,
                            "data.num_workers": 0, "data.sampler": "weighted"})

    def drawn(rank: int, world_size: int, epoch: int) -> list[int]:
        sampler = build_run_data(cfg, rank=rank, world_size=world_size, log=lambda message: None).train.sampler
        sampler.set_epoch(epoch)
        return [i for _, i in sampler]

    whole = drawn(0, 1, epoch=3)
    shards = [drawn(rank, 2, epoch=3) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == -(-len(whole) // 2)
    # the ranks interleave one draw, the one a single process makes (padded by its first index when odd)
    padded = whole + whole[: 2 * len(shards[0]) - len(whole)]
    assert shards[0] == padded[0::2] and shards[1] == padded[1::2]
    assert drawn(0, 2, epoch=4) != shards[0]  # and a new epoch is a new draw
