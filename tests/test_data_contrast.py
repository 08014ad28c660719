"""Per-image contrast normalization (``data.contrast``): what it does to pixels, and that every path applies it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from resnetlab.config import build_config
from resnetlab.data.build import base_preprocessing, build_run_data
from resnetlab.data.pipeline import geometry_key
from resnetlab.data.preprocessing import Preprocessing, normalize_contrast, prepare_image
from resnetlab.errors import ConfigError, DataError


def _dark_sign(size: int = 40) -> Image.Image:
    """A dim, low-contrast red disc with a grey centre on a dark grey background, like a GTSRB sign at dusk."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    pixels = np.full((size, size, 3), 30, dtype=np.uint8)
    pixels[r < size * 0.4] = (70, 25, 25)
    pixels[r < size * 0.25] = (55, 55, 55)
    return Image.fromarray(pixels)


def _luma(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("YCbCr"), dtype=np.int16)[..., 0]


@pytest.mark.parametrize("mode", ["autocontrast", "equalize"])
def test_contrast_stretches_the_luminance_and_keeps_greys_grey(mode):
    image = _dark_sign()
    out = normalize_contrast(image, mode)
    assert out.mode == "RGB" and out.size == image.size
    before, after = _luma(image), _luma(out)
    assert after.max() - after.min() > 2 * (before.max() - before.min())
    assert after.max() >= 250
    pixels = np.asarray(out, dtype=np.int16)
    centre = pixels[20, 20]
    assert np.ptp(centre) <= 3, centre  # the grey centre is still grey: only Y was changed, not Cb/Cr
    rim = pixels[20, 5]
    assert rim[0] > rim[1] + 20 and rim[0] > rim[2] + 20, rim  # and the red ring is still red
    assert normalize_contrast(image, "none") is image


def test_unknown_contrast_mode_is_a_clear_error():
    with pytest.raises(DataError, match="unknown contrast normalization 'clahe'"):
        normalize_contrast(_dark_sign(), "clahe")
    with pytest.raises(ConfigError, match="data.contrast"):
        build_config({}, {}, ["data.contrast=clahe"])


def test_contrast_is_part_of_the_record_and_of_the_cache_key(tmp_path):
    cfg = build_config({}, {}, ["data.contrast=equalize"])
    prep = base_preprocessing(cfg)
    assert prep.contrast == "equalize"
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    # a record written before the field existed reads as no contrast step
    old = {k: v for k, v in prep.to_dict().items() if k != "contrast"}
    assert Preprocessing.from_dict(old).contrast == "none"
    assert geometry_key(prep) != geometry_key(Preprocessing.from_dict(old))
    path = tmp_path / "sign.png"
    _dark_sign(48).save(path)
    plain = prepare_image(path, Preprocessing(input_size=32))
    stretched = prepare_image(path, prep)
    assert stretched.shape == plain.shape == (3, 32, 32)
    assert stretched.float().std() > 1.5 * plain.float().std()


def _prepared(table, prep) -> torch.Tensor:
    """What evaluation makes of every image of ``table``, scaled to [0, 1]."""
    rois = [None] * len(table) if table.rois is None else table.rois
    return torch.stack([prepare_image(path, prep, roi) for path, roi in zip(table.paths, rois)]).float() / 255


@pytest.mark.parametrize("in_memory", ["always", "never"])
def test_both_training_pipelines_see_contrast_normalized_images(tmp_path, in_memory):
    from tests.test_gtsrb_loader import make_gtsrb

    root = make_gtsrb(tmp_path, rows_per_class=6, classes=(1, 2))
    for path in (root / "Train").rglob("*.png"):  # dim signs of the same sizes instead of flat colours
        size = Image.open(path).size
        _dark_sign(64).resize(size).save(path)
    cfg = build_config({}, {"data.spec": f"gtsrb:{root}"},
                       ["data.split=stratified", "data.val_fraction=0.25", "data.test_fraction=0.25",
                        "data.batch_size=64", "data.normalize=none", "augment.preset=none", "data.contrast=equalize",
                        f"data.in_memory={in_memory}", "data.num_workers=0"])
    data = build_run_data(cfg, log=lambda m: None)
    assert data.prep.contrast == "equalize"
    expected = _prepared(data.plan.test, data.prep)
    images, _ = next(iter(data.test))
    assert torch.allclose(images, expected, atol=1e-6)
    train_images, _ = next(iter(data.train))
    expected = _prepared(data.plan.train, data.prep)
    # without augmentation the training batch holds exactly these images, in shuffled order
    assert torch.allclose(train_images.sum(dim=(1, 2, 3)).sort().values, expected.sum(dim=(1, 2, 3)).sort().values,
                          rtol=1e-5)
    assert train_images.amax(dim=(1, 2, 3)).min() > 0.95  # equalized: every image reaches full brightness
