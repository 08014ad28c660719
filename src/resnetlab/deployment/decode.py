"""Uploaded bytes -> an RGB image for the model, with the pixel count checked before anything is decoded.

An ordinary image (under :data:`LARGE_IMAGE_PIXELS`) is decoded by :func:`resnetlab.data.preprocessing.load_image`,
the loader evaluation and ``predict`` use, so the service computes exactly what ``predict`` computes for the same
bytes. A larger one goes through the same steps (decode, EXIF orientation, 8-bit RGB) without the loader's copies of
the full-size pixels, so a 36-megapixel PNG holds one 108 MB buffer while it is resized instead of three or four. A
large JPEG is decoded at reduced scale by libjpeg's DCT scaling (:meth:`PIL.Image.Image.draft`: 1/2, 1/4 or 1/8),
which never builds the full-size pixels, keeping each side at least :data:`DRAFT_MARGIN` times the size the
preprocessing resizes to; the antialiased resize that follows averages over the same area, and the model inputs stay
within a few levels of 255 of a full decode (``tests/test_service_security.py`` bounds it). Other formats have no
reduced decode, and are decoded in full: box-reducing them afterwards (:meth:`PIL.Image.Image.reduce`) would save
the resize's time but none of the decode's memory, and changed a 32 px model's inputs by up to 23 levels.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from resnetlab.data.preprocessing import MAX_IMAGE_PIXELS, Preprocessing, _to_rgb, load_image, resize_target
from resnetlab.deployment.service_settings import DEFAULT_MAX_IMAGE_PIXELS
from resnetlab.errors import DataError

# Images with fewer pixels are decoded by the evaluation's own loader, copies and all: exact, and cheap at this size
# (4 MP is 12 MB of RGB). Larger ones are decoded without the copies, and JPEGs at reduced scale.
LARGE_IMAGE_PIXELS = 4_000_000
# How many times the preprocessing's resize target a reduced JPEG decode keeps on each side.
DRAFT_MARGIN = 2
SUPPORTED_FORMATS = "PNG, JPEG, BMP, GIF, TIFF, WebP, PPM"


class UploadRejected(Exception):
    """A request the service answers with a 4xx (or 503/504): ``status``, the one-line ``detail``, and the
    ``reason`` it is counted under in ``/metrics``."""

    def __init__(self, status: int, detail: str, reason: str = "bad_request", headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.reason, self.headers = status, detail, reason, headers


@dataclass
class DecodedImage:
    image: Image.Image  # RGB, upright; full size, or (a large JPEG) no less than DRAFT_MARGIN x the resize target
    width: int  # the upright size the file describes, whatever was decoded
    height: int
    large: bool  # LARGE_IMAGE_PIXELS or more: worth returning memory to the operating system afterwards


class _NamedBytes(io.BytesIO):
    """Upload bytes that print as their file name, so the shared loader's error messages name the upload."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self._display_name = name

    def __str__(self) -> str:
        return self._display_name


def decode_upload(data: bytes, name: str, prep: Preprocessing, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> DecodedImage:
    """Upload bytes -> :class:`DecodedImage`; :class:`UploadRejected` (413 over ``max_pixels``, 415 not an image,
    400 empty or damaged) otherwise, always before more than the header has been decoded when it is too large."""
    if not data:
        raise UploadRejected(400, f"'{name}' is empty", "bad_image")
    try:
        # Image.open reads only the header: the size is known before a single pixel is decoded.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
            if width * height > MAX_IMAGE_PIXELS:  # the limit of every resnetlab reader, whatever max_pixels says
                raise Image.DecompressionBombError(f"{width}x{height}")
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise UploadRejected(413, f"'{name}' would decode to more than {MAX_IMAGE_PIXELS:,} pixels; "
                                  "refusing a possible decompression bomb", "too_many_pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise UploadRejected(415, f"'{name}' is not an image Pillow can read ({SUPPORTED_FORMATS})",
                             "bad_image") from None
    if width * height > max_pixels:
        raise UploadRejected(413, f"'{name}' is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels), over "
                                  f"the limit of {max_pixels / 1e6:.1f} megapixels (resnetlab serve "
                                  "--max-image-pixels)", "too_many_pixels")
    if width * height < LARGE_IMAGE_PIXELS:
        try:
            image = load_image(_NamedBytes(data, name), None, roi_crop=False)
        except DataError as err:
            raise UploadRejected(400, str(err), "bad_image") from None
        return DecodedImage(image, image.width, image.height, large=False)
    image, turned = _decode_large(data, name, DRAFT_MARGIN * resize_target(prep))
    return DecodedImage(image, *((height, width) if turned else (width, height)), large=True)


def _decode_large(data: bytes, name: str, keep: int) -> tuple[Image.Image, bool]:
    """What :func:`~resnetlab.data.preprocessing.load_image` does (decode, EXIF orientation, 8-bit RGB) with one
    full-size buffer, a JPEG at the smallest DCT scale that keeps both sides at least ``keep`` pixels; and whether
    the orientation swapped width and height."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # No `with`: closing an image frees its pixels, and these are returned. The bytes are in memory anyway.
            image = Image.open(io.BytesIO(data))
            if image.format in ("JPEG", "MPO"):  # MPO: a camera JPEG with extra frames
                image.draft("RGB", (keep, keep))
            image.load()
            stored_size = image.size
            ImageOps.exif_transpose(image, in_place=True)
            turned = image.size != stored_size
            if image.mode != "RGB":
                image = _to_rgb(image)  # the loader's conversion; the stored pixels go with the old object
            return image, turned
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):  # the header check passed: not expected
        raise UploadRejected(413, f"'{name}' is too large to decode", "too_many_pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UploadRejected(400, f"cannot read image '{name}': {reason}", "bad_image") from None
