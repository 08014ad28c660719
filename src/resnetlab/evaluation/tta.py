"""Test-time augmentation: average the softmax over several views of each image.

Views are the image itself, four corner crops of the image padded by 1/8 of its side (the multi-crop of
Krizhevsky et al. 2012 and He et al. 2016, at the model's own input size), and, where the training augmentation
flips images (never for traffic signs, where a flip turns keep-left into keep-right), the mirror of each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def tta_views(images: torch.Tensor, *, flip: bool, crops: bool) -> list[torch.Tensor]:
    views = [images]
    if crops:
        height, width = images.shape[-2:]
        pad = max(1, min(height, width) // 8)
        # replicate, not zeros: a normalized zero is a grey border the model never saw in training
        padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
        for dy, dx in ((0, 0), (0, 2 * pad), (2 * pad, 0), (2 * pad, 2 * pad)):
            views.append(padded[..., dy : dy + height, dx : dx + width])
    if flip:
        views += [view.flip(-1) for view in views]
    return views


def tta_log_probabilities(model: nn.Module, images: torch.Tensor, *, flip: bool, crops: bool) -> torch.Tensor:
    """log of the mean softmax over the views (used as the logits of the averaged prediction)."""
    views = tta_views(images, flip=flip, crops=crops)
    probs = torch.stack([model(view).float().softmax(dim=1) for view in views]).mean(dim=0)
    return probs.clamp(min=1e-12).log()
