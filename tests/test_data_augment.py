"""Augmentation presets in both forms, RandAugment in memory, mirror swap, mixing, and where they are wired."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from resnetlab.config import build_config
from resnetlab.data.augment import (
    PRESETS,
    AugmentPolicy,
    BatchAugment,
    MirrorSwap,
    batch_stage,
    build_file_transform,
    build_mixing,
    build_per_image,
    get_policy,
)
from resnetlab.data.build import build_run_data
from resnetlab.errors import ConfigError


def _pattern(n: int = 16, size: int = 32) -> torch.Tensor:
    """An asymmetric picture (a bar and a corner block), identical for every sample."""
    batch = torch.full((n, 3, size, size), 0.2)
    batch[:, :, 8:24, 14:18] = 0.9
    batch[:, 0, 2:6, 2:10] = 1.0
    return batch


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_in_both_forms(preset):
    torch.manual_seed(0)
    policy = get_policy(preset)
    out = BatchAugment(policy)(_pattern())
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    image = Image.fromarray((_pattern(1)[0].permute(1, 2, 0).numpy() * 255).astype("uint8")).resize((45, 37))
    tensor = build_file_transform(policy, 32)(image)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.uint8
    if preset == "none":
        assert torch.equal(out, _pattern())


def test_batch_augment_draws_parameters_per_sample():
    torch.manual_seed(0)
    for policy in (AugmentPolicy(rotation=20), AugmentPolicy(pad_crop=4), AugmentPolicy(rrc_scale=(0.3, 1.0)),
                   AugmentPolicy(brightness=0.4), AugmentPolicy(hue=0.3)):
        out = BatchAugment(policy)(_pattern())
        distinct = {tuple(x.flatten()[::37].tolist()) for x in out}
        assert len(distinct) > 8, policy  # a v2 transform on the batch would give one result for all 16


def test_geometry_fills_outside_with_black_like_torchvision():
    torch.manual_seed(0)
    batch = torch.ones(8, 3, 32, 32)
    out = BatchAugment(AugmentPolicy(rotation=45))(batch)
    assert (out[:, :, 0, 0] < 0.5).float().mean() > 0.5  # corners rotated out of the picture are dark


def test_hue_rotation_keeps_greys_grey_and_changes_colours():
    torch.manual_seed(0)
    grey = torch.full((4, 3, 8, 8), 0.5)
    assert torch.allclose(BatchAugment(AugmentPolicy(hue=0.5))(grey), grey, atol=1e-5)
    red = torch.zeros(4, 3, 8, 8)
    red[:, 0] = 0.8
    out = BatchAugment(AugmentPolicy(hue=0.5))(red.clone())
    assert not torch.allclose(out, red, atol=0.05)


def test_flip_probability():
    torch.manual_seed(0)
    batch = _pattern(400)
    out = BatchAugment(AugmentPolicy(hflip=0.5))(batch.clone())
    flipped = (out != batch).flatten(1).any(1).float().mean().item()
    assert 0.4 < flipped < 0.6


def test_mirror_swap_flips_and_relabels_only_mirror_classes():
    torch.manual_seed(0)
    class_ids = [14, 33, 34, 38]  # 38's partner 39 is absent: it must never be flipped
    swap = MirrorSwap.for_classes(class_ids, ((33, 34), (36, 37), (38, 39)))
    assert swap.partner.tolist() == [-1, 2, 1, -1]
    labels = torch.tensor([0, 1, 2, 3] * 100)
    batch = _pattern(400)
    out, new = swap(batch.clone(), labels)
    flipped = (out != batch).flatten(1).any(1)
    assert not flipped[(labels == 0) | (labels == 3)].any()
    assert 0.35 < flipped[labels == 1].float().mean() < 0.65
    assert torch.equal(new[flipped], swap.partner[labels[flipped]])
    assert torch.equal(new[~flipped], labels[~flipped])
    assert torch.equal(out[flipped], batch[flipped].flip(-1))
    assert MirrorSwap.for_classes(["cat", "dog"], ((33, 34),)) is None


def test_per_image_randaugment_on_uint8():
    torch.manual_seed(0)
    per_image = build_per_image(randaugment=True, trivialaugment=False)
    batch = (_pattern(32) * 255).to(torch.uint8)
    out = per_image(batch)
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    assert len({tuple(x.flatten()[::29].tolist()) for x in out}) > 4  # one draw per image
    assert build_per_image(randaugment=False, trivialaugment=False) is None


def test_random_erasing_is_a_batch_stage_in_the_file_pipeline():
    policy = get_policy("signs", random_erasing=1.0)
    assert "RandomErasing" not in repr(build_file_transform(policy, 32))
    torch.manual_seed(0)
    batch = torch.full((8, 3, 32, 32), 0.5)
    out = batch_stage(policy)(batch.clone())
    assert (out != 0.5).flatten(1).any(1).all()  # every sample got a rectangle
    assert batch_stage(get_policy("cifar")) is None


def test_mixing_gives_soft_targets():
    torch.manual_seed(0)
    mixing = build_mixing(5, mixup_alpha=0.4, cutmix_alpha=1.0)
    images, targets = mixing(torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 0]))
    assert targets.shape == (6, 5) and torch.allclose(targets.sum(1), torch.ones(6))
    assert build_mixing(5, 0.0, 0.0) is None


# ---------------------------------------------------------------------------------------------------------------
# Wiring through build_run_data
# ---------------------------------------------------------------------------------------------------------------


def _gtsrb_cfg(root, *overrides):
    return build_config({}, {"data.spec": f"gtsrb:{root}"},
                        ["data.split=stratified", "data.val_fraction=0.2", "data.test_fraction=0.2", "data.batch_size=8",
                         *overrides])


@pytest.fixture()
def mirror_signs(tmp_path):
    from tests.test_gtsrb_loader import make_gtsrb

    return make_gtsrb(tmp_path, rows_per_class=10, classes=(1, 33, 34))


@pytest.mark.parametrize("in_memory", ["always", "never"])
def test_mirror_swap_is_wired_into_training_batches(mirror_signs, in_memory):
    cfg = _gtsrb_cfg(mirror_signs, "augment.preset=none", "augment.mirror_swap=true", f"data.in_memory={in_memory}",
                     "data.num_workers=0", "data.input_size=32")
    logs = []
    data = build_run_data(cfg, log=logs.append)
    assert any("mirror swap" in line for line in logs)
    assert data.train.mirror is not None and data.val.mirror is None and data.test.mirror is None
    turn_right, turn_left = data.source.class_ids.index(33), data.source.class_ids.index(34)
    torch.manual_seed(0)
    images = (_pattern(200) * 255).to(torch.uint8)
    out, labels = data.train.transform(images, torch.full((200,), turn_right))
    swapped = labels == turn_left
    assert 0.3 < swapped.float().mean() < 0.7 and set(labels.tolist()) == {turn_right, turn_left}
    # the swapped samples are the mirrored ones
    assert torch.allclose(out[swapped][0], out[~swapped][0].flip(-1), atol=1e-5)
    for batch, batch_labels in data.train:
        assert batch.shape[1:] == (3, 32, 32) and len(batch) == len(batch_labels)


def test_mirror_swap_refuses_flipping_presets_and_data_without_pairs(mirror_signs, tmp_path):
    with pytest.raises(ConfigError, match="also flips every image"):
        build_run_data(_gtsrb_cfg(mirror_signs, "augment.preset=cifar", "augment.mirror_swap=true"), log=lambda m: None)
    with pytest.raises(ConfigError, match="no pair of mirror-image classes"):
        build_run_data(_gtsrb_cfg(mirror_signs, "augment.mirror_swap=true", "data.classes=[1,33]"), log=lambda m: None)
    logs = []
    build_run_data(_gtsrb_cfg(mirror_signs, "augment.preset=cifar"), log=logs.append)
    assert any("wrong label" in line for line in logs)  # flips on signs with mirror classes: warned


def test_randaugment_in_memory_and_file_pipelines(mirror_signs):
    for in_memory in ("always", "never"):
        cfg = _gtsrb_cfg(mirror_signs, "augment.randaugment=true", "augment.trivialaugment=true",
                         f"data.in_memory={in_memory}", "data.num_workers=0")
        data = build_run_data(cfg, log=lambda m: None)
        if in_memory == "always":
            assert data.train.per_image is not None
        else:
            assert "RandAugment" in repr(data.train.loader.dataset.transform)
        images, labels = next(iter(data.train))
        assert images.dtype == torch.float32 and torch.isfinite(images).all()
