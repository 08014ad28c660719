"""Every shipped recipe runs for a few steps on tiny data, so that none of them rots.

Recipes name real datasets (GTSRB, CIFAR, photo folders); here each runs on the small synthetic set with its own
model, optimizer, schedule, loss and augmentation, and 224-px recipes run at 64 px to stay fast.
"""

import json

import pytest
import yaml

from resnetlab.cli.main import main
from resnetlab.config import build_config
from resnetlab.recipes import list_recipes, load_recipe

REQUIRED = {"demo", "gtsrb-fast", "gtsrb-best", "gtsrb-robust", "cifar10-resnet20", "gtsrb-resnet50-finetune",
            "custom-resnet50-kfold", "cifar100-resnet44v2", "road-signs-4class", "imagenet-resnet50"}


def test_the_shipped_recipes_are_listed(capsys):
    assert REQUIRED <= set(list_recipes())
    assert main(["recipes", "--json"]) == 0
    listed = {row["name"] for row in json.loads(capsys.readouterr().out)}
    assert REQUIRED <= listed


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_recipe_runs_a_few_steps(name, tiny_signs, tmp_path):
    cfg = build_config(load_recipe(name))
    extra = ["data.input_size=64", "data.batch_size=8", "data.eval_batch_size=32"] if cfg.data.input_size > 64 else []
    out = tmp_path / name
    code = main(["train", "--recipe", name, "--data", f"gtsrb:{tiny_signs}", "--epochs", "2", "--out", str(out),
                 "--quiet", "train.max_steps_per_epoch=2", "train.threads=1", "eval.gradcam=false", *extra])
    assert code == 0
    saved = build_config(yaml.safe_load((out / "config.yaml").read_text()))
    assert saved.recipe == name
    assert saved.model.name == cfg.model.name and saved.optim.name == cfg.optim.name
    assert saved.schedule.name == cfg.schedule.name and saved.augment.preset == cfg.augment.preset
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["num_classes"] == (len(cfg.data.classes) if cfg.data.classes else 11)
    assert (out / "report.html").is_file()
    if cfg.train.keep == "last":  # the report says which epoch and which weights were kept, and why
        assert "was kept (`train.keep=last`" in (out / "report.md").read_text()
