"""`resnetlab bench train`: both loops run on the same model and batch; the JSON holds both rates and their ratio.

Speed itself is not asserted here (that belongs in docs/benchmarks.md); these tests check what is measured.
"""

import json

import torch

from resnetlab.cli.main import main
from resnetlab.bench.train import TrainerStep, measure_conv_peak
from resnetlab.config import build_config


def test_bench_train_json(capsys):
    code = main(["bench", "train", "--model", "resnet20", "--input-size", "32", "--batch-size", "8", "--repeats",
                 "2", "--seconds", "0.05", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    ours, ref = result["resnetlab"], result["reference"]
    assert ours["images_per_second"] > 0 and ref["images_per_second"] > 0
    assert abs(result["ratio"] - ours["images_per_second"] / ref["images_per_second"]) < 0.01
    assert ref["precision"] == "fp32" and ref["channels_last"] is False
    assert len(ours["all_repeats"]) == 2 == len(ref["all_repeats"])
    assert 0 < ours["fraction_of_peak"] and 0 < ref["fraction_of_peak"]
    assert result["forward_gmacs_per_image"] > 0.03  # ResNet-20 at 32 px: about 41 MMACs


def test_trainer_step_updates_the_model():
    cfg = build_config({}, {"model.name": "simple_cnn", "data.input_size": 32, "data.batch_size": 4},
                       ["train.threads=1"])
    with TrainerStep(cfg, num_classes=5) as step:
        before = [p.detach().clone() for p in step.model.parameters()]
        step()
        changed = [not torch.equal(a, b) for a, b in zip(before, step.model.parameters())]
    assert any(changed)


def test_conv_peak_is_positive():
    assert measure_conv_peak(torch.float32, seconds=0.05) > 0
