"""`resnetlab train --model NAME` works for every registered model on the synthetic set (at 32 px, a few steps).

One model per family runs in the default suite; the whole registry runs with `pytest -m slow`.
"""

import json

import pytest

from resnetlab.cli.main import main
from resnetlab.models import list_models

ONE_PER_FAMILY = ["resnet18", "resnet18_small", "resnet20", "preact_resnet20", "resnet44v2", "wrn16_8", "simple_cnn"]


def _train(name, tiny_signs, out):
    code = main(["train", "--data", f"gtsrb:{tiny_signs}", "--model", name, "--epochs", "1", "--batch-size", "8",
                 "--out", str(out), "--quiet", "train.max_steps_per_epoch=2", "train.threads=1",
                 "eval.gradcam=false"])
    assert code == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["num_classes"] == 11
    assert 0.0 <= metrics["top1"] <= 1.0


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_train_each_family(name, tiny_signs, tmp_path):
    _train(name, tiny_signs, tmp_path / name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in list_models() if n not in ONE_PER_FAMILY])
def test_train_every_registered_model(name, tiny_signs, tmp_path):
    _train(name, tiny_signs, tmp_path / name)
