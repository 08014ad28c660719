"""Progressive resizing: the input size each epoch trains at, and the batch scaled down to it.

The pipeline always produces batches at ``data.input_size`` (decoded, cached and augmented once at that size); an
epoch that trains smaller scales its batches down on the device with antialiased bilinear interpolation, as
``torchvision.transforms.v2.Resize`` would, so the cache, the augmentation and the validation stay as they are.
Sizes follow FFCV's ramp: ``min_size`` up to ``start``, linear to full size at ``end`` (fractions of the epochs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from resnetlab.config import ProgressiveResizeConfig


def epoch_input_size(epoch: int, epochs: int, full_size: int, cfg: ProgressiveResizeConfig) -> int:
    """The side of the training inputs in epoch ``epoch`` (1-based) of ``epochs``."""
    if cfg.min_size is None or cfg.min_size >= full_size:
        return full_size
    progress = (epoch - 1) / max(epochs, 1)  # the fraction of the epochs done when this one starts
    if progress >= cfg.end:
        return full_size
    share = min(1.0, max(0.0, (progress - cfg.start) / (cfg.end - cfg.start)))
    size = cfg.min_size + share * (full_size - cfg.min_size)
    size = int(size // cfg.multiple) * cfg.multiple
    return min(full_size, max(cfg.min_size, size))


def epoch_input_sizes(epochs: int, full_size: int, cfg: ProgressiveResizeConfig) -> list[int]:
    """The input size of every epoch of a run of ``epochs`` epochs."""
    return [epoch_input_size(e, epochs, full_size, cfg) for e in range(1, epochs + 1)]


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """``images`` (N, C, H, W) scaled to ``size`` x ``size``, in the memory format they came in."""
    if images.shape[-2:] == (size, size):
        return images
    channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    resized = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
