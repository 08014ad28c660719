"""The signs-wild preset and the policy fields it added (tint, grayscale, weather, blur, noise, JPEG, framing, clean),
in both pipelines: batched on tensors in memory and per image on files."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from PIL import Image

from resnetlab.data.augment import PRESETS, AugmentPolicy, BatchAugment, build_file_transform, get_policy

WILD = "signs-wild"


def _left_heavy(n: int = 32, size: int = 32) -> torch.Tensor:
    """A dark picture with a bright, coloured bar in its left third: a flip would move the bar to the right."""
    batch = torch.full((n, 3, size, size), 0.1)
    batch[:, 0, 6:26, 4:11] = 0.95
    batch[:, 1, 6:26, 4:11] = 0.8
    batch[:, 2, 6:26, 4:11] = 0.3
    return batch


def _texture(n: int = 16, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Fine random texture: all its energy is at high spatial frequencies."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=generator)


def _high_frequency(batch: torch.Tensor) -> torch.Tensor:
    """Per sample: mean squared difference of neighbouring pixels (what blur and JPEG take away)."""
    dx = (batch[..., :, 1:] - batch[..., :, :-1]).pow(2).mean(dim=(1, 2, 3))
    dy = (batch[..., 1:, :] - batch[..., :-1, :]).pow(2).mean(dim=(1, 2, 3))
    return dx + dy


def _pil(batch_image: torch.Tensor, size=(45, 37)) -> Image.Image:
    array = (batch_image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array).resize(size)


def test_the_preset_is_registered_without_flips_and_with_every_operation():
    policy = get_policy(WILD)
    assert PRESETS[WILD] is policy
    assert policy.hflip == 0
    for name in ("tint", "grayscale", "dark", "fade", "haze", "blur", "noise", "jpeg", "clean", "erasing"):
        assert 0 < getattr(policy, name) < 1, name  # each operation is applied with a probability
    assert policy.hue > 0 and policy.saturation > 0 and policy.perspective > 0
    assert policy.scale == (0.7, 1.15) and policy.translate > 0  # loose and tight framing
    assert policy.jitter_p < 1 and policy.geometry_p < 1


def test_new_fields_default_to_off():
    policy = AugmentPolicy()
    assert not policy.has_photometric and not policy.has_geometry
    assert policy.clean == 0 and policy.geometry_p == 1 and policy.fill == "zeros"
    for name in PRESETS:
        if name != WILD:
            assert not PRESETS[name].has_photometric and PRESETS[name].clean == 0, name


def test_batch_path_changes_images_and_keeps_shape_dtype_and_range():
    torch.manual_seed(0)
    batch = _left_heavy(64)
    out = BatchAugment(get_policy(WILD))(batch.clone())
    assert out.shape == batch.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    changed = (out - batch).abs().flatten(1).amax(dim=1) > 1e-6
    assert 0.5 < changed.float().mean() < 1  # most samples change; the clean share (0.2) does not
    distinct = {tuple(x.flatten()[::53].tolist()) for x in out[changed]}
    assert len(distinct) == int(changed.sum())  # per-sample parameters, not one draw for the batch


def test_batch_path_is_deterministic_under_a_seed():
    policy = get_policy(WILD)
    batch = _left_heavy(32)
    torch.manual_seed(7)
    first = BatchAugment(policy)(batch.clone())
    torch.manual_seed(7)
    second = BatchAugment(policy)(batch.clone())
    torch.manual_seed(8)
    other = BatchAugment(policy)(batch.clone())
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_input_batch_is_not_modified():
    batch = _left_heavy(16)
    before = batch.clone()
    torch.manual_seed(0)
    BatchAugment(get_policy(WILD))(batch)
    assert torch.equal(batch, before)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_never_flips(seed):
    # Erasing drops a rectangle of noise anywhere, which can outweigh the bar; everything else must keep it left.
    policy = replace(get_policy(WILD), erasing=0.0)
    torch.manual_seed(seed)
    out = BatchAugment(policy)(_left_heavy(128))
    brightness = out.mean(dim=(1, 2))  # [B, W] column profile
    left, right = brightness[:, :16].mean(dim=1), brightness[:, 16:].mean(dim=1)
    assert (left > right).all()
    image = _pil(_left_heavy(1)[0])
    transform = build_file_transform(policy, 32)
    for i in range(40):
        torch.manual_seed(seed * 100 + i)
        tensor = transform(image).float()
        columns = tensor.mean(dim=(0, 1))
        assert columns[:16].mean() > columns[16:].mean()


def test_grayscale_gives_equal_channels():
    out = BatchAugment(AugmentPolicy(grayscale=1.0))(_texture())
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    image = build_file_transform(AugmentPolicy(grayscale=1.0), 32)(_pil(_texture(1)[0]))
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_jpeg_lowers_high_frequency_energy():
    batch = _texture()
    out = BatchAugment(AugmentPolicy(jpeg=1.0, jpeg_quality=(10, 30)))(batch)
    assert (_high_frequency(out) < 0.7 * _high_frequency(batch)).all()
    # JPEG's 8x8 grid: differences across block borders exceed those inside blocks.
    smooth = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(4, 3, 32, 32).contiguous()
    blocky = BatchAugment(AugmentPolicy(jpeg=1.0, jpeg_quality=(5, 5)))(smooth)
    steps = (blocky[..., 1:] - blocky[..., :-1]).abs().mean(dim=(0, 1, 2))
    assert steps[7::8].mean() > steps[[i for i in range(31) if i % 8 != 7]].mean()


def test_blur_lowers_high_frequency_energy_with_a_sigma_per_sample():
    batch = _texture()
    torch.manual_seed(0)
    out = BatchAugment(AugmentPolicy(blur=1.0, blur_sigma=(0.5, 2.0)))(batch)
    energy = _high_frequency(out)
    assert (energy < 0.6 * _high_frequency(batch)).all()
    assert energy.max() > 2 * energy.min()  # different sigmas, not one for the batch
    flat = torch.full((2, 3, 32, 32), 0.4)
    assert torch.allclose(BatchAugment(AugmentPolicy(blur=1.0))(flat), flat, atol=1e-6)  # mean kept, no dark rim


def test_noise_adds_zero_mean_noise_of_the_drawn_strength():
    batch = torch.full((16, 3, 32, 32), 0.5)
    torch.manual_seed(0)
    out = BatchAugment(AugmentPolicy(noise=1.0, noise_std=(0.02, 0.05)))(batch)
    std = (out - batch).flatten(1).std(dim=1)
    assert ((std > 0.015) & (std < 0.06)).all()
    assert (out - batch).mean().abs() < 0.005


def test_bad_weather_darkens_fades_and_fogs():
    batch = _texture()
    torch.manual_seed(0)
    dark = BatchAugment(AugmentPolicy(dark=1.0))(batch)
    assert (dark.mean(dim=(1, 2, 3)) < 0.75 * batch.mean(dim=(1, 2, 3))).all()
    faded = BatchAugment(AugmentPolicy(fade=1.0))(batch)
    assert (faded.std(dim=(1, 2, 3)) < 0.75 * batch.std(dim=(1, 2, 3))).all()
    night = torch.full((16, 3, 32, 32), 0.1)
    fog = BatchAugment(AugmentPolicy(haze=1.0))(night)
    assert (fog.mean(dim=(1, 2, 3)) > 0.15).all()  # pulled towards a grey-to-white veil
    assert torch.allclose(fog[:, 0], fog[:, 2])  # the veil has no colour


def test_tint_gives_white_a_colour_cast():
    white = torch.full((32, 3, 8, 8), 0.8)
    torch.manual_seed(0)
    out = BatchAugment(AugmentPolicy(tint=1.0, tint_strength=0.3))(white)
    spread = out.amax(dim=1) - out.amin(dim=1)
    assert (spread.flatten(1).mean(dim=1) > 0.01).all()
    yellowish = (out[:, 2] < out[:, 0] - 0.05) & (out[:, 2] < out[:, 1] - 0.05)
    assert yellowish.flatten(1).all(dim=1).any()  # blue lowered against red and green: white towards yellow


def test_hue_and_saturation_change_colour():
    red = torch.zeros(32, 3, 8, 8)
    red[:, 0] = 0.9
    torch.manual_seed(0)
    out = BatchAugment(AugmentPolicy(hue=0.1, saturation=0.6))(red)
    assert (out[:, 1].flatten(1).mean(dim=1) > 0.02).any()  # red turned towards orange for some samples


def test_framing_zooms_out_with_edge_fill_and_in_with_cut_edges():
    ones = torch.ones(4, 3, 32, 32)
    loose = BatchAugment(AugmentPolicy(scale=(0.7, 0.7), fill="edge"))(ones)
    assert torch.allclose(loose, ones)  # the border repeated, not a black frame
    black = BatchAugment(AugmentPolicy(scale=(0.7, 0.7)))(ones)
    assert black[:, :, 0, 0].max() < 0.1
    ring = torch.zeros(4, 3, 32, 32)
    ring[:, :, :2, :] = ring[:, :, -2:, :] = ring[:, :, :, :2] = ring[:, :, :, -2:] = 1.0
    tight = BatchAugment(AugmentPolicy(scale=(1.15, 1.15)))(ring)
    assert tight[:, :, 0, 16].max() < 0.5  # the rim is cut off


def test_geometry_probability_zero_and_clean_one_leave_images_alone():
    batch = _texture()
    still = BatchAugment(AugmentPolicy(rotation=30, scale=(0.7, 1.15), perspective=0.1, geometry_p=0.0))(batch)
    assert torch.allclose(still, batch, atol=1e-5)
    clean = BatchAugment(replace(get_policy(WILD), clean=1.0, erasing=0.0))(batch)
    assert torch.equal(clean, batch)


def test_file_path_keeps_shape_dtype_and_is_deterministic():
    image = _pil(_left_heavy(1)[0], size=(61, 53))
    transform = build_file_transform(get_policy(WILD), 32)
    outputs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outputs.append(transform(image))
    assert outputs[0].shape == (3, 32, 32) and outputs[0].dtype == torch.uint8
    assert torch.equal(outputs[0], outputs[1])
    plain = build_file_transform(get_policy("none"), 32)(image)
    variants = []
    for seed in range(20):
        torch.manual_seed(seed)
        variants.append(transform(image))
    assert sum(not torch.equal(v, plain) for v in variants) >= 10
    assert sum(torch.equal(v, plain) for v in variants) >= 1  # the clean share passes untouched


def test_file_path_applies_jpeg_and_blur():
    image = _pil(_texture(1)[0], size=(32, 32))
    base = build_file_transform(get_policy("none"), 32)(image).float().unsqueeze(0) / 255
    for policy in (AugmentPolicy(jpeg=1.0, jpeg_quality=(10, 10)), AugmentPolicy(blur=1.0)):
        out = build_file_transform(policy, 32)(image).float().unsqueeze(0) / 255
        assert _high_frequency(out) < 0.7 * _high_frequency(base), policy


def test_unknown_fill_is_a_config_error(monkeypatch):
    from resnetlab.errors import ConfigError

    monkeypatch.setitem(PRESETS, "odd", AugmentPolicy(fill="mirror"))
    with pytest.raises(ConfigError, match="fill 'mirror'"):
        get_policy("odd")


@pytest.mark.parametrize("in_memory", ["always", "never"])
def test_one_epoch_trains_with_the_preset_in_both_pipelines(in_memory, tiny_signs, tmp_path):
    from resnetlab.cli.main import main

    out = tmp_path / in_memory
    code = main(["train", "--data", f"gtsrb:{tiny_signs}", "--epochs", "1", "--out", str(out), "--quiet",
                 "augment.preset=signs-wild", f"data.in_memory={in_memory}", "data.num_workers=0",
                 "data.batch_size=16", "train.max_steps_per_epoch=3", "train.threads=1", "eval.gradcam=false"])
    assert code == 0
    assert "signs-wild" in (out / "config.yaml").read_text()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["num_classes"] == 11
