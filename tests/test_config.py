import pytest

from resnetlab.config import RunConfig, build_config, parse_override
from resnetlab.errors import ConfigError
from resnetlab.recipes import list_recipes, load_recipe


def test_precedence_recipe_then_flags_then_overrides():
    recipe = {"recipe": "r", "optim": {"lr": 0.5}, "train": {"epochs": 7}, "data": {"batch_size": 16}}
    cfg = build_config(recipe, {"train.epochs": 3, "data.batch_size": None}, ["train.epochs=4", "optim.lr=0.01"])
    assert cfg.train.epochs == 4  # override beats flag beats recipe
    assert cfg.optim.lr == 0.01
    assert cfg.data.batch_size == 16  # a flag that was not given (None) leaves the recipe's value


def test_override_values_are_parsed_as_yaml():
    cfg = build_config({}, {}, ["data.classes=[2,3,14,17]", "train.ema=true", "model.kwargs={shortcut: B}"])
    assert cfg.data.classes == [2, 3, 14, 17]
    assert cfg.train.ema is True
    assert cfg.model.kwargs == {"shortcut": "B"}


@pytest.mark.parametrize("override, fragment", [
    ("optim.lrr=0.1", "optim.lrr"),
    ("trian.epochs=3", "trian"),
    ("optim.lr.x=1", "optim.lr.x"),
])
def test_unknown_keys_are_named(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        build_config({}, {}, [override])


def test_unknown_key_in_recipe_is_rejected():
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        build_config({"optim": {"learning_rate": 0.1}})


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="train.epochs"):
        build_config({}, {}, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="optim.name"):
        build_config({}, {}, ["optim.name=lion"])


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("optim.lr")


def test_every_shipped_recipe_validates():
    names = list_recipes()
    assert "demo" in names
    for name in names:
        cfg = build_config(load_recipe(name))
        assert isinstance(cfg, RunConfig)
        assert cfg.recipe == name


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="demo"):
        load_recipe("no-such-recipe")


def test_resolved_config_round_trips_through_yaml():
    import yaml

    cfg = build_config(load_recipe("demo"), {}, ["data.classes=[1,2]"])
    again = build_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
