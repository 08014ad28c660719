"""How an image file becomes a model input: the one definition shared by training, evaluation, prediction and export.

The :class:`Preprocessing` record is stored in every checkpoint (and in an export's ``preprocessing.json``), and
:func:`load_image` / :func:`resize_to_input` / :func:`normalize` are the only code that applies it, so that the
model that was evaluated and the one that is deployed can never disagree on crop, resize or normalization.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from resnetlab.errors import DataError, first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Decompression bombs: a small file that expands to gigapixels. Every resnetlab reader refuses an image of more
# pixels than this, checked from the header before decoding. Pillow's own Image.MAX_IMAGE_PIXELS (a process-wide
# setting of the user's) is left alone: it is higher by default, and its warning is turned into the same error.
MAX_IMAGE_PIXELS = 64_000_000


@dataclass(frozen=True)
class Preprocessing:
    input_size: int
    resize: str = "squash"  # "squash": resize to a square; "shorter_crop": shorter side to size/crop_pct, centre crop
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    roi_crop: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: str = "RGB"
    # Per-image contrast normalization of the luminance, before resizing: "none", "autocontrast" (stretch to the full
    # range) or "equalize" (histogram equalization). Dark, washed-out road signs are GTSRB's main nuisance; the
    # published GTSRB winners normalized contrast per image (Ciresan et al. 2012).
    contrast: str = "none"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, record: dict) -> Preprocessing:
        known = {k: v for k, v in record.items() if k in cls.__dataclass_fields__}
        for key in ("mean", "std"):
            if key in known:
                known[key] = tuple(float(x) for x in known[key])
        return cls(**known)


def load_image(path: str | Path, roi: np.ndarray | list[int] | None = None, roi_crop: bool = True) -> Image.Image:
    """Open any image file as 8-bit RGB, cropped to its ROI box (inclusive corners) when it has one.

    Greyscale, palette, RGBA (alpha dropped, as torchvision's ImageFolder loader does), CMYK, 16-bit and float
    images are all converted; a camera's EXIF orientation is applied, so a phone photo is seen upright. An
    unreadable file (corrupt, truncated, empty, not an image) raises a :class:`DataError` naming it.
    """
    return _open_rgb(path, roi=roi, roi_crop=roi_crop)


def check_image(path: str | Path) -> None:
    """Decode ``path`` far enough to know it is a complete image, or raise the :class:`DataError` load_image would.

    JPEGs are decoded at reduced scale (libjpeg's DCT scaling): every byte is still read, so a truncated file is
    caught, at a third of the cost of a full decode of a large photo.
    """
    _open_rgb(path, draft=True)


def _open_rgb(path: str | Path, *, roi=None, roi_crop: bool = True, draft: bool = False) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(f"{img.width}x{img.height}")
                if draft:
                    img.draft("RGB", (64, 64))
                img.load()
                # A ROI box refers to the stored pixel grid, so only images without one are turned upright.
                upright = roi is None or int(roi[0]) < 0
                image = _to_rgb(ImageOps.exif_transpose(img) if upright else img)
    except FileNotFoundError:
        raise DataError(f"image file '{path}' does not exist") from None
    except IsADirectoryError:
        raise DataError(f"'{path}' is a folder, not an image file") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise DataError(f"image '{path}' is too large (over {MAX_IMAGE_PIXELS:,} pixels)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        reason = first_line(err)
        if isinstance(err, UnidentifiedImageError):
            reason = "not an image file Pillow can read (empty, corrupt or another format)"
        raise DataError(f"cannot read image '{path}': {reason}") from None
    return crop_to_roi(image, roi) if roi_crop else image


def crop_to_roi(image: Image.Image, roi) -> Image.Image:
    """The image cropped to its ROI box (inclusive corners, clipped to the image); unchanged without a box."""
    if roi is not None and int(roi[0]) >= 0:
        x1, y1, x2, y2 = (int(v) for v in roi)
        x1, y1 = max(0, x1), max(0, y1)
        x2, y2 = min(image.width - 1, x2), min(image.height - 1, y2)
        if x2 > x1 and y2 > y1:
            image = image.crop((x1, y1, x2 + 1, y2 + 1))
    return image


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        # 16-bit, 32-bit integer and float greyscale: scale to 8 bits by the range the values are in, rather than
        # clipping at 255 (which would turn most 16-bit images white and every 0-1 float image black).
        array = np.asarray(img, dtype=np.float64)
        peak = float(np.nanmax(array)) if array.size else 0.0
        if img.mode.startswith("I;16"):
            scale = 65535.0
        elif img.mode == "F" and peak <= 1.0:
            scale = 1.0
        else:
            scale = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
        img = Image.fromarray(np.clip(np.nan_to_num(array) / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB") if img.mode != "RGB" else img.copy()


def _interpolation(name: str) -> InterpolationMode:
    return InterpolationMode(name)


CONTRAST_MODES = ("none", "autocontrast", "equalize")


def normalize_contrast(image: Image.Image, mode: str) -> Image.Image:
    """Stretch or equalize the luminance (Y of YCbCr) of an RGB image, leaving its colours (Cb, Cr) alone.

    Equalizing R, G and B separately (``ImageOps.equalize`` on the RGB image) would shift hues, and a sign's colour
    is part of what it means.
    """
    if mode == "none":
        return image
    if mode not in CONTRAST_MODES:
        raise DataError(f"unknown contrast normalization '{mode}'; choose one of {', '.join(CONTRAST_MODES)}")
    luma, blue, red = image.convert("YCbCr").split()
    luma = ImageOps.equalize(luma) if mode == "equalize" else ImageOps.autocontrast(luma, cutoff=1)
    return Image.merge("YCbCr", (luma, blue, red)).convert("RGB")


def resize_target(prep: Preprocessing) -> int:
    """The side :func:`resize_to_input` resizes to before any crop (squash: the input size; shorter_crop: the
    shorter side, ``input_size / crop_pct``)."""
    if prep.resize == "squash":
        return prep.input_size
    return int(round(prep.input_size / prep.crop_pct))


def resize_to_input(image: Image.Image, prep: Preprocessing) -> Image.Image:
    """ROI-cropped RGB image -> the model's input size, contrast normalized first when the record asks for it."""
    image = normalize_contrast(image, prep.contrast)
    size = prep.input_size
    mode = _interpolation(prep.interpolation)
    if prep.resize == "squash":
        return TF.resize(image, [size, size], interpolation=mode, antialias=True)
    image = TF.resize(image, resize_target(prep), interpolation=mode, antialias=True)
    return TF.center_crop(image, [size, size])


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 tensor [3, H, W]."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def normalize(batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float batch [B, 3, H, W] -> normalized float32."""
    if batch.dtype == torch.uint8:
        batch = batch.float().div_(255.0)
    return (batch - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def prepare_image(path: str | Path, prep: Preprocessing, roi=None) -> torch.Tensor:
    """One file -> the uint8 [3, S, S] tensor the model's evaluation sees (before normalization)."""
    return pil_to_uint8(resize_to_input(load_image(path, roi, prep.roi_crop), prep))
