"""Grad-CAM (Selvaraju et al., 2017, https://arxiv.org/abs/1610.02391) through the models' uniform interface.

Every resnetlab classifier splits into ``forward_features(x) -> feature map [B, K, h, w]`` and
``forward_head(features) -> logits``. Grad-CAM needs the gradient of the target logit with respect to that
feature map, so the map is detached and made a leaf: the backward pass then runs through the head only, needs no
hooks, and leaves the model's parameter gradients untouched.

The heatmaps and the images they belong to are stored as ``eval/gradcam.npz`` (:func:`save_gradcam_npz`) so that
``resnetlab report`` can draw the overlays from the run directory alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from resnetlab.utils.io import write_npz

GRADCAM_FILENAME = "gradcam.npz"


def grad_cam(model: torch.nn.Module, images: torch.Tensor, target_indices) -> torch.Tensor:
    """Class-activation heatmaps ``[B, H, W]`` in ``[0, 1]`` for ``images [B, 3, H, W]`` (model-normalised).

    ``target_indices`` (``[B]`` ints) picks the class explained for each image, e.g. the predicted or the true
    class. The model is evaluated in eval mode (restored afterwards) and the maps are upsampled bilinearly to the
    input size. An image whose weighted activations are all negative gets an all-zero map.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    targets = torch.as_tensor(target_indices, dtype=torch.long, device=images.device).reshape(-1)
    if targets.shape[0] != images.shape[0]:
        raise ValueError(f"{targets.shape[0]} target indices for {images.shape[0]} images")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            features = model.forward_features(images)
        if features.ndim != 4:
            raise ValueError(f"forward_features must return a [B, K, h, w] map, got shape {tuple(features.shape)}")
        features = features.detach().float().requires_grad_(True)
        with torch.enable_grad():
            logits = model.forward_head(features)
            target_scores = logits.float().gather(1, targets[:, None]).sum()
            (gradients,) = torch.autograd.grad(target_scores, features)
    finally:
        model.train(was_training)
    channel_weights = gradients.mean(dim=(2, 3), keepdim=True)
    cams = F.relu((channel_weights * features.detach()).sum(dim=1, keepdim=True))
    cams = F.interpolate(cams, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cams.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return (cams / peak).clamp_(0.0, 1.0)


def denormalize_to_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo ``Normalize(mean, std)`` on ``[B, 3, H, W]`` and return ``uint8 [B, H, W, 3]`` for plotting."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device)[None, :, None, None]
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device)[None, :, None, None]
    pixels = (images.float() * std_t + mean_t).clamp(0.0, 1.0)
    return (pixels * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_gradcam_npz(
    path: str | Path,
    images: np.ndarray,
    heatmaps,
    true_names: Sequence[str],
    pred_names: Sequence[str],
    confidences: Sequence[float],
    paths: Sequence[str] | None = None,
    target_names: Sequence[str] | None = None,
) -> Path:
    """Store Grad-CAM overlays' inputs: ``images`` uint8 ``[B, H, W, 3]``, ``heatmaps`` float ``[B, H, W]`` in
    ``[0, 1]``, the true/predicted class names and confidences, and optionally the source paths and the class each
    heatmap explains (``target_names``, default the predicted class)."""
    images = np.asarray(images)
    if isinstance(heatmaps, torch.Tensor):
        heatmaps = heatmaps.detach().cpu().numpy()
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {images.shape}")
    if heatmaps.shape != images.shape[:3]:
        raise ValueError(f"heatmaps {heatmaps.shape} must match images {images.shape[:3]}")
    count = images.shape[0]
    target_names = list(pred_names) if target_names is None else list(target_names)
    for name, values in (("true_names", true_names), ("pred_names", pred_names), ("confidences", confidences),
                         ("target_names", target_names), ("paths", paths if paths is not None else images)):
        if len(values) != count:
            raise ValueError(f"{name} has {len(values)} entries for {count} images")
    return write_npz(
        Path(path),
        images=images,
        heatmaps=heatmaps,
        true_names=np.asarray([str(name) for name in true_names]),
        pred_names=np.asarray([str(name) for name in pred_names]),
        confidences=np.asarray(confidences, dtype=np.float64),
        target_names=np.asarray([str(name) for name in target_names]),
        paths=np.asarray([str(p) for p in (paths if paths is not None else [""] * count)]),
    )


def load_gradcam_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read a file written by :func:`save_gradcam_npz` (plain arrays, no pickled objects)."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
