"""Model zoo: every registered model runs, trains, scripts and honours the common interface; the ImageNet ResNets
are interchangeable with torchvision's; sizes match the papers; pretrained loading fails in one clear line."""

import logging
import urllib.error

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum, get_weight

from resnetlab.errors import CheckpointError, ConfigError, ResnetlabError
from resnetlab.models import (
    count_macs,
    count_params,
    create_model,
    describe_models,
    get_model_default_cfg,
    list_models,
    resolve_model_name,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

ALL_MODELS = list_models()
IMAGENET_DEPTHS = (18, 34, 50, 101, 152)
IMAGENET_MODELS = [f"resnet{depth}" for depth in IMAGENET_DEPTHS]
# Over 4 GMACs per 224 px image: a training step at the default size takes several seconds on one CPU core, so
# these train and script at 64 px; test_imagenet_forward_at_default_size keeps a 224 px forward for resnet50.
HEAVY_AT_DEFAULT_SIZE = {"resnet50", "resnet101", "resnet152"}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _test_input(name: str, batch: int = 2) -> torch.Tensor:
    channels, height, width = get_model_default_cfg(name)["input_size"]
    if name in HEAVY_AT_DEFAULT_SIZE:
        height = width = 64
    return torch.randn(batch, channels, height, width)


def _on_meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs)


def _torchvision_on_meta(depth: int) -> nn.Module:
    with torch.device("meta"):
        return getattr(torchvision.models, f"resnet{depth}")(weights=None)


# ---------------------------------------------------------------------------------------------------- registry


def test_registry_holds_every_family():
    expected = (
        IMAGENET_MODELS
        + [f"resnet{depth}_small" for depth in IMAGENET_DEPTHS]
        + [f"resnet{depth}" for depth in (20, 32, 44, 56, 110)]
        + [f"preact_resnet{depth}" for depth in (20, 32, 44, 56, 110)]
        + ["resnet44v2", "wrn16_8", "wrn28_10", "simple_cnn"]
    )
    assert ALL_MODELS == sorted(expected)


@pytest.mark.parametrize(
    "spelling, name",
    [("simple-cnn", "simple_cnn"), ("ResNet-50", "resnet50"), ("WRN-28-10", "wrn28_10"), ("RESNET44V2", "resnet44v2")],
)
def test_lookup_ignores_case_dashes_and_underscores(spelling, name):
    assert resolve_model_name(spelling) == name
    assert _on_meta(spelling, num_classes=3).default_cfg == get_model_default_cfg(name)


def test_unknown_model_names_near_matches():
    with pytest.raises(ConfigError) as excinfo:
        create_model("resnet5", num_classes=10)
    message = str(excinfo.value)
    assert "unknown model 'resnet5'" in message
    assert "did you mean: resnet50, resnet56?" in message
    assert "\n" not in message


def test_unknown_option_is_a_config_error():
    with pytest.raises(ConfigError, match="resnet50 has no option 'shortcut'"):
        create_model("resnet50", num_classes=10, shortcut="B")
    with pytest.raises(ConfigError, match="shortcut='C'"):
        create_model("resnet20", num_classes=10, shortcut="C")


# ------------------------------------------------------------------------------------- every registered model


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward(name):
    model = create_model(name, num_classes=7)
    model.train()
    logits = model(_test_input(name))
    assert logits.shape == (2, 7)
    logits.logsumexp(dim=1).sum().backward()
    unused = [key for key, param in model.named_parameters() if param.grad is None]
    assert not unused, f"parameters outside the forward pass: {unused[:3]}"
    assert all(torch.isfinite(param.grad).all() for param in model.parameters())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_common_interface(name):
    model = create_model(name, num_classes=5).eval()
    assert model.num_classes == 5
    cfg = model.default_cfg
    assert {"input_size", "mean", "std", "interpolation", "crop_pct"} <= set(cfg)
    assert cfg == get_model_default_cfg(name)
    x = _test_input(name, batch=1)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.ndim == 4, "forward_features must return a feature map for Grad-CAM"
        torch.testing.assert_close(model.forward_head(features), model(x))
        embeddings = model.forward_head(features, pre_logits=True)
        assert embeddings.shape == (1, model.num_features)

        model.reset_classifier(3)
        assert model.num_classes == 3 and model.forward_head(features).shape == (1, 3)
        model.reset_classifier(0)
        torch.testing.assert_close(model.forward_head(features), embeddings)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_torchscript(name):
    model = create_model(name, num_classes=4).eval()
    scripted = torch.jit.script(model)
    x = _test_input(name, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_imagenet_forward_at_default_size():
    model = create_model("resnet50", num_classes=5).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, *model.default_cfg["input_size"]))
    assert model.default_cfg["input_size"] == (3, 224, 224)
    assert logits.shape == (1, 5)


# ------------------------------------------------------------------------------------ torchvision compatibility


@pytest.mark.parametrize(
    "depth, spec_params",
    [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032), (101, 44_549_160), (152, 60_192_808)],
)
def test_imagenet_param_counts_equal_torchvision(depth, spec_params):
    ours = count_params(_on_meta(f"resnet{depth}", num_classes=1000))
    assert ours == count_params(_torchvision_on_meta(depth)) == spec_params
    assert ours == get_weight(get_model_default_cfg(f"resnet{depth}")["weights"]).meta["num_params"]


@pytest.mark.parametrize("depth", IMAGENET_DEPTHS)
def test_imagenet_state_dict_keys_and_shapes_equal_torchvision(depth):
    ours = {key: value.shape for key, value in _on_meta(f"resnet{depth}", num_classes=1000).state_dict().items()}
    theirs = {key: value.shape for key, value in _torchvision_on_meta(depth).state_dict().items()}
    assert ours == theirs


@pytest.mark.parametrize("depth", (18, 50))
def test_state_dicts_load_both_ways(depth):
    torchvision_model = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    ours = create_model(f"resnet{depth}", num_classes=1000).eval()
    x = torch.randn(1, 3, 64, 64)

    ours.load_state_dict(torchvision_model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours(x), torchvision_model(x))

    retrained = create_model(f"resnet{depth}", num_classes=1000).eval()
    torchvision_model.load_state_dict(retrained.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(torchvision_model(x), retrained(x))


@pytest.mark.parametrize("depth", IMAGENET_DEPTHS)
def test_macs_match_torchvision_published_ops(depth):
    name = f"resnet{depth}"
    macs = count_macs(_on_meta(name, num_classes=1000), get_model_default_cfg(name)["input_size"])
    published_gops = get_weight(get_model_default_cfg(name)["weights"]).meta["_ops"]  # rounded to 3 decimals
    assert abs(macs / 1e9 - published_gops) < 1e-3


def test_count_macs_counts_conv_and_linear():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4),
        nn.Flatten(),
        nn.Linear(128, 10),
    )
    expected = 8 * 8 * 8 * (3 * 3 * 3) + 8 * 4 * 4 * (2 * 3 * 3) + 10 * 128
    assert count_macs(model, (3, 8, 8)) == expected
    assert model.training, "count_macs must restore the training mode"


# ------------------------------------------------------------------------------------------------ architectures


@pytest.mark.parametrize(
    "name, paper_millions",
    [
        ("resnet20", 0.27),  # He et al. 2016, table 6
        ("resnet56", 0.85),
        ("resnet110", 1.7),
        ("preact_resnet110", 1.7),  # He et al. 2016 (Identity Mappings), table 3
        ("wrn16_8", 11.0),  # Zagoruyko & Komodakis 2016, table 4
        ("wrn28_10", 36.5),
    ],
)
def test_cifar_param_counts_match_papers(name, paper_millions):
    params = count_params(_on_meta(name, num_classes=10))
    assert abs(params / 1e6 - paper_millions) / paper_millions < 0.02


def test_resnet44v2_has_the_params_of_its_stated_architecture(capsys):
    # Widths 32/64/128/256 with 7/7/7/3 basic blocks: about 5.9M, not the "about 2.7M" of its write-up.
    model = _on_meta("resnet44v2", num_classes=10)
    params = count_params(model)
    with capsys.disabled():
        print(f"\nresnet44v2: {params:,} parameters at 10 classes")
    assert 5.8e6 < params < 6.0e6
    blocks = [module for module in model.modules() if type(module).__name__ == "PreActBasicBlock"]
    assert len(blocks) == 7 + 7 + 7 + 3
    assert model.head_drop.p == pytest.approx(0.1)


def test_cifar_shortcut_options():
    option_a = create_model("resnet20", num_classes=10)
    option_b = create_model("resnet20", num_classes=10, shortcut="b")
    # Option A pads with zeros (no parameters); option B adds a 1x1 conv + BN in the two down-sampling blocks.
    extra = count_params(option_b) - count_params(option_a)
    assert extra == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    x = torch.randn(2, 16, 9, 9)
    padded = option_a.layer2[0].downsample(x)
    assert padded.shape == (2, 32, 5, 5)
    torch.testing.assert_close(padded[:, :16], x[:, :, ::2, ::2])
    assert padded[:, 16:].abs().sum() == 0


def test_preact_shortcut_options():
    projection = create_model("preact_resnet20", num_classes=10)  # option B by default, as the authors' code
    zero_padding = create_model("preact_resnet20", num_classes=10, shortcut="A")
    # Option B's shortcuts are bare 1x1 convolutions (the next pre-activation normalises the sum).
    assert count_params(projection) - count_params(zero_padding) == 16 * 32 + 32 * 64
    zero_padding(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(param.grad is not None for param in zero_padding.parameters())


def test_small_variant_keeps_resolution_through_the_stem():
    model = create_model("resnet18_small", num_classes=10).eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 512, 4, 4)
    assert isinstance(model.maxpool, nn.Identity)


def test_default_configs():
    imagenet = get_model_default_cfg("resnet50")
    assert imagenet["input_size"] == (3, 224, 224)
    assert imagenet["mean"] == pytest.approx((0.485, 0.456, 0.406))
    preset = get_weight(imagenet["weights"]).transforms()
    assert imagenet["crop_pct"] == pytest.approx(preset.crop_size[0] / preset.resize_size[0], abs=1e-4)
    assert get_model_default_cfg("resnet18_small")["mean"] == imagenet["mean"]
    for name in ("resnet18_small", "resnet20", "preact_resnet20", "resnet44v2", "wrn28_10", "simple_cnn"):
        assert get_model_default_cfg(name)["input_size"] == (3, 32, 32)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet20", "preact_resnet20", "wrn16_8"])
def test_zero_init_residual_makes_blocks_identities(name):
    model = create_model(name, num_classes=10, zero_init_residual=True).eval()
    block = model.layer1[1]  # same shape in and out, so no projection on its shortcut
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    with torch.no_grad():
        out = block(x.clone())
    # Post-activation blocks end with ReLU(branch + x); pre-activation blocks return branch + x unchanged.
    expected = x if name.startswith(("preact", "wrn")) else torch.relu(x)
    torch.testing.assert_close(out, expected)
    fresh = create_model(name, num_classes=10).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh.layer1[1](x.clone()), expected)


def test_simple_cnn_has_no_residual_branch_to_zero():
    with pytest.raises(ConfigError, match="simple_cnn has no residual"):
        create_model("simple-cnn", num_classes=10, zero_init_residual=True)


def test_head_dropout_defaults_and_override():
    assert create_model("resnet18", num_classes=10).head_drop.p == 0.0
    assert create_model("resnet44v2", num_classes=10).head_drop.p == pytest.approx(0.1)
    assert create_model("simple_cnn", num_classes=10).head_drop.p == pytest.approx(0.5)
    assert create_model("resnet18", num_classes=10, drop_rate=0.4).head_drop.p == pytest.approx(0.4)
    assert create_model("resnet44v2", num_classes=10, drop_rate=0.0).head_drop.p == 0.0


def test_describe_models():
    records = describe_models()
    assert [record["name"] for record in records] == ALL_MODELS
    by_name = {record["name"]: record for record in records}
    assert by_name["resnet20"]["params"] == count_params(create_model("resnet20", num_classes=10))
    assert by_name["resnet50"]["params"] == count_params(_torchvision_on_meta(50))
    assert by_name["resnet50"]["input_size"] == [3, 224, 224]
    assert by_name["resnet50"]["pretrained"] and not by_name["resnet20"]["pretrained"]
    for record in records:
        assert {"name", "family", "params", "gmacs", "input_size", "description"} <= set(record)
        assert record["gmacs"] > 0 and record["description"]


# ----------------------------------------------------------------------------------------------- pretrained


def _assert_same_except_fc(model: nn.Module, state_dict: dict, skip: tuple[str, ...] = ()):
    for key, value in model.state_dict().items():
        if not key.startswith("fc.") and key not in skip:
            torch.testing.assert_close(value, state_dict[key], msg=key)


@pytest.fixture(scope="module")
def torchvision_resnet18_state():
    return torchvision.models.resnet18(weights=None).state_dict()


def test_pretrained_path_raw_state_dict(tmp_path, torchvision_resnet18_state):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision_resnet18_state, path)
    same_classes = create_model("resnet18", num_classes=1000, pretrained_path=str(path))
    torch.testing.assert_close(same_classes.fc.weight, torchvision_resnet18_state["fc.weight"])
    fewer_classes = create_model("resnet18", num_classes=10, pretrained_path=path)
    _assert_same_except_fc(fewer_classes, torchvision_resnet18_state)
    assert fewer_classes.fc.out_features == 10


def test_pretrained_path_training_checkpoint_with_ddp_prefix(tmp_path, torchvision_resnet18_state):
    path = tmp_path / "checkpoint.pth"
    wrapped = {f"module.{key}": value for key, value in torchvision_resnet18_state.items()}
    torch.save({"model": wrapped, "epoch": 7, "args": {"lr": 0.1}}, path)
    model = create_model("resnet18", num_classes=10, pretrained_path=path)
    _assert_same_except_fc(model, torchvision_resnet18_state)


def test_pretrained_path_small_variant_skips_imagenet_stem(tmp_path, torchvision_resnet18_state, caplog):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision_resnet18_state, path)
    with caplog.at_level(logging.WARNING, logger="resnetlab.models"):
        model = create_model("resnet18_small", num_classes=10, pretrained_path=path)
    assert "conv1.weight" in caplog.text
    _assert_same_except_fc(model, torchvision_resnet18_state, skip=("conv1.weight",))
    assert model.conv1.weight.shape == (64, 3, 3, 3)


def test_pretrained_path_for_another_architecture(tmp_path):
    path = tmp_path / "resnet20b.pth"
    torch.save(create_model("resnet20", num_classes=10, shortcut="B").state_dict(), path)
    with pytest.raises(CheckpointError) as excinfo:
        create_model("resnet20", num_classes=10, pretrained_path=path)
    assert "is for resnet20 (shortcut=B), not resnet20" in str(excinfo.value)
    with pytest.raises(CheckpointError, match="is for resnet20 .*, not resnet18"):
        create_model("resnet18", num_classes=10, pretrained_path=path)


@pytest.mark.parametrize(
    "content, message",
    [(None, "no such file"), (b"not a checkpoint", "cannot read weights file"), ({"epoch": 3}, "holds no state dict")],
)
def test_pretrained_path_bad_files(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=message) as excinfo:
        create_model("resnet18", num_classes=10, pretrained_path=path)
    assert "\n" not in str(excinfo.value)


def test_pretrained_offline_says_what_to_do(monkeypatch):
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(ResnetlabError) as excinfo:
        create_model("resnet50", num_classes=10, pretrained=True)
    message = str(excinfo.value)
    assert "ResNet50_Weights.IMAGENET1K_V2" in message and "model.pretrained_path=FILE" in message
    assert "\n" not in message


def test_pretrained_loads_torchvision_weights_and_resets_classifier(monkeypatch, torchvision_resnet18_state):
    requested = []

    def from_cache(self, *args, **kwargs):
        requested.append(str(self))
        return torchvision_resnet18_state

    monkeypatch.setattr(WeightsEnum, "get_state_dict", from_cache)
    model = create_model("resnet18", num_classes=43, pretrained=True)
    assert requested == ["ResNet18_Weights.IMAGENET1K_V1"]
    _assert_same_except_fc(model, torchvision_resnet18_state)
    assert model.fc.out_features == 43 and model.num_classes == 43


def test_pretrained_option_errors():
    with pytest.raises(ConfigError, match="no downloadable pretrained weights"):
        create_model("resnet20", num_classes=10, pretrained=True)
    with pytest.raises(ConfigError, match="not both"):
        create_model("resnet18", num_classes=10, pretrained=True, pretrained_path="weights.pth")
