"""`torchrun --nproc-per-node 2 -m resnetlab train` (DistributedDataParallel over gloo on CPU) matches one process
with the same global batch.

``data.batch_size`` is the global batch: each of the 2 processes trains on 16 of the 32 images of every step (the
two halves of the very batch one process would take), and DDP averages their gradients. With a model without
BatchNorm or dropout the two runs compute the same thing up to float summation order, hence the tight tolerance
(relative 1e-4 on losses). BatchNorm models differ more: each process normalizes its own 16 images unless
``train.sync_bn=true`` (CUDA only).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resnetlab.cli.main import main
from resnetlab.config import RunConfig
from resnetlab.errors import ConfigError
from resnetlab.jobs.train import per_rank_config

TOLERANCE = 1e-4


def train_args(tiny_signs: Path, out: Path) -> list[str]:
    return ["train", "--data", f"gtsrb:{tiny_signs}", "--model", "simple_cnn", "--epochs", "2", "--batch-size", "32",
            "--out", str(out), "--quiet", "train.deterministic=true", "train.threads=1", "train.precision=fp32",
            "augment.preset=none", "model.drop_rate=0", "model.kwargs={feature_drop_rate: 0}",
            "train.max_steps_per_epoch=3", "optim.lr=0.05", "eval.gradcam=false"]


def rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_two_processes_match_one_with_the_same_global_batch(tiny_signs, tmp_path, monkeypatch):
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "resnetlab", *train_args(tiny_signs, ddp)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    monkeypatch.setattr("resnetlab.reporting.report.render_report", lambda run_dir, **_: (run_dir, run_dir))
    single = tmp_path / "single"
    assert main(train_args(tiny_signs, single)) == 0

    info = json.loads((ddp / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["global_batch_size"] == 32
    log = (ddp / "train.log").read_text()
    assert "distributed: 2 processes (gloo), global batch 32 = 2 x 16 per process" in log
    assert log.count("epoch 1/2") == 1  # rank 0 alone logs
    assert (ddp / "report.md").is_file() and (ddp / "checkpoints" / "best.pt").is_file()

    ddp_rows, single_rows = rows(ddp), rows(single)
    assert len(ddp_rows) == len(single_rows) == 2
    for a, b in zip(ddp_rows, single_rows):
        for column in ("lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "grad_norm"):
            assert float(a[column]) == pytest.approx(float(b[column]), rel=TOLERANCE, abs=1e-9), column
    ddp_eval = json.loads((ddp / "eval" / "metrics.json").read_text())
    single_eval = json.loads((single / "eval" / "metrics.json").read_text())
    assert ddp_eval["num_samples"] == single_eval["num_samples"] == info["split_sizes"]["test"]  # the whole test split
    for key in ("top1", "top5", "balanced_accuracy", "nll"):
        assert ddp_eval[key] == pytest.approx(single_eval[key], rel=TOLERANCE, abs=1e-9), key


def test_global_batch_is_split_over_processes():
    cfg = RunConfig.model_validate({"data": {"batch_size": 96}})
    assert per_rank_config(cfg, 1) is cfg
    assert per_rank_config(cfg, 4).data.batch_size == 24
    assert cfg.data.batch_size == 96
    with pytest.raises(ConfigError, match="multiple of 5"):
        per_rank_config(cfg, 5)
