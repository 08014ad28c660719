"""Augmentation presets, in two implementations of the same policy.

* ``build_file_transform`` -- torchvision ``transforms.v2`` applied image by image in DataLoader workers; used for
  large images (photos, 224 px), where decoding dominates anyway.
* :class:`BatchAugment` -- the same preset on a whole uint8 batch already in memory, with *per-sample* random
  parameters. ``transforms.v2`` draws one set of parameters per call, so on a batch every image would get the same
  crop; and per-image PIL work every epoch is what makes CPU pipelines slow for 32-64 px data (batched tensor work
  is an order of magnitude faster per image; ``docs/benchmarks.md``). airbench does the same.

Presets (each mirrors a published recipe):

=========  ==================================================================================================
none       no augmentation
cifar      4-px reflect pad, random 32 crop, horizontal flip (He et al. 2016)
signs      small rotation (10 deg), scale/shift/shear, mild perspective, colour jitter, random erasing; **no**
           horizontal flip, which turns keep-left into keep-right (GTSRB practice, Sermanet & LeCun 2011)
imagenet   RandomResizedCrop scale 0.08-1 and horizontal flip (torchvision's reference scripts), plus colour jitter
           0.2/0.2/0.2/0.05 with p=0.5
objects    RandomResizedCrop, horizontal flip, rotation 30 deg, colour jitter 0.2 each (photo fine-tuning tutorials)
=========  ==================================================================================================

Shared by both pipelines, applied to collated batches: random erasing (one rectangle of uniform noise per chosen
sample) and ``augment.mirror_swap`` (:class:`MirrorSwap`: flip samples of classes that have a mirror-image partner,
GTSRB's turn left/right ahead and keep left/right, and give them the partner's label).

RandAugment and TrivialAugment (``augment.randaugment`` / ``augment.trivialaugment``) are torchvision's v2
transforms in both pipelines: per image on the PIL image in DataLoader workers, and per image on the uint8 tensors
in memory (:class:`PerImage`: one random draw per image, as torchvision intends). That Python loop is the one
per-image cost left in the in-memory path, and it takes a large share of the pipeline's margin over a small model's
training step; ``resnetlab data profile ... augment.randaugment=true`` measures it for a recipe. Differences that remain between the two pipelines: in memory, crops and
RandomResizedCrop work on the image already resized to the input size (file pipelines crop the full-resolution
file), and RandAugment runs before the preset's geometry instead of after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from resnetlab.errors import ConfigError


@dataclass(frozen=True)
class AugmentPolicy:
    hflip: float = 0.0  # probability
    pad_crop: int = 0  # pixels of reflect padding for a random crop (CIFAR style)
    rrc_scale: tuple[float, float] | None = None  # RandomResizedCrop area range
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotation: float = 0.0  # degrees, uniform in [-r, r]
    scale: tuple[float, float] = (1.0, 1.0)
    translate: float = 0.0  # fraction of the side
    shear: float = 0.0  # degrees
    perspective: float = 0.0  # corner displacement, fraction of the side
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    jitter_p: float = 1.0
    erasing: float = 0.0  # probability


PRESETS: dict[str, AugmentPolicy] = {
    "none": AugmentPolicy(),
    "cifar": AugmentPolicy(hflip=0.5, pad_crop=4),
    "signs": AugmentPolicy(rotation=10, scale=(0.9, 1.1), translate=0.08, shear=5, perspective=0.08,
                           brightness=0.3, contrast=0.3, saturation=0.3, erasing=0.25),
    "imagenet": AugmentPolicy(hflip=0.5, rrc_scale=(0.08, 1.0), brightness=0.2, contrast=0.2, saturation=0.2,
                              hue=0.05, jitter_p=0.5),
    "objects": AugmentPolicy(hflip=0.5, rrc_scale=(0.08, 1.0), rotation=30, brightness=0.2, contrast=0.2,
                             saturation=0.2, hue=0.2),
}


def get_policy(preset: str, *, random_erasing: float = 0.0) -> AugmentPolicy:
    if preset not in PRESETS:
        raise ConfigError(f"unknown augment.preset '{preset}'; choose one of {', '.join(PRESETS)}")
    policy = PRESETS[preset]
    if random_erasing:
        policy = AugmentPolicy(**{**policy.__dict__, "erasing": random_erasing})
    return policy


# ---------------------------------------------------------------------------------------------------------------
# Per-image: torchvision transforms.v2
# ---------------------------------------------------------------------------------------------------------------


def build_file_transform(policy: AugmentPolicy, size: int, *, randaugment: bool = False,
                         trivialaugment: bool = False) -> v2.Compose:
    """PIL image (already ROI-cropped) -> augmented uint8 tensor [3, size, size]."""
    steps: list = []
    if policy.rrc_scale is not None:
        steps.append(v2.RandomResizedCrop(size, scale=policy.rrc_scale, ratio=policy.rrc_ratio, antialias=True))
    else:
        steps.append(v2.Resize((size, size), antialias=True))
        if policy.pad_crop:
            steps.append(v2.RandomCrop(size, padding=policy.pad_crop, padding_mode="reflect"))
    if policy.hflip:
        steps.append(v2.RandomHorizontalFlip(policy.hflip))
    if policy.rotation or policy.translate or policy.shear or policy.scale != (1.0, 1.0):
        steps.append(v2.RandomAffine(degrees=policy.rotation, translate=(policy.translate, policy.translate) if policy.translate else None,
                                     scale=policy.scale if policy.scale != (1.0, 1.0) else None, shear=policy.shear or None))
    if policy.perspective:
        steps.append(v2.RandomPerspective(distortion_scale=2 * policy.perspective, p=0.5))
    if policy.brightness or policy.contrast or policy.saturation or policy.hue:
        jitter = v2.ColorJitter(policy.brightness, policy.contrast, policy.saturation, policy.hue)
        steps.append(v2.RandomApply([jitter], p=policy.jitter_p) if policy.jitter_p < 1 else jitter)
    steps += autoaugment_steps(randaugment=randaugment, trivialaugment=trivialaugment)
    steps.append(v2.PILToTensor())
    # Random erasing is not here: it runs on the collated batch (see batch_stage), the same in both pipelines.
    return v2.Compose(steps)


def autoaugment_steps(*, randaugment: bool, trivialaugment: bool) -> list:
    steps: list = []
    if randaugment:
        steps.append(v2.RandAugment())
    if trivialaugment:
        steps.append(v2.TrivialAugmentWide())
    return steps


class PerImage:
    """Apply a v2 transform to each uint8 image [3, H, W] of a batch with its own random draw.

    v2 transforms draw one set of parameters per call, so calling them on a whole batch would give every image the
    same operation; RandAugment's operations (posterize, equalize, solarize ...) have no batched per-sample form.
    """

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in batch])


def build_per_image(*, randaugment: bool, trivialaugment: bool) -> PerImage | None:
    steps = autoaugment_steps(randaugment=randaugment, trivialaugment=trivialaugment)
    return PerImage(v2.Compose(steps)) if steps else None


def batch_stage(policy: AugmentPolicy) -> BatchAugment | None:
    """What the file pipeline applies to collated batches: the parts of ``policy`` not done per image (erasing)."""
    return BatchAugment(AugmentPolicy(erasing=policy.erasing)) if policy.erasing else None


class MirrorSwap:
    """Flip, with probability ``p``, each sample whose class has a mirror-image partner, and relabel it as the partner.

    A horizontally flipped "turn left ahead" is a "turn right ahead" (GTSRB 33/34, 36/37, 38/39), so such flips add
    correctly labelled training images of both classes instead of teaching the model wrong ones. Works on uint8 or
    float batches [B, 3, H, W] with int64 labels [B].
    """

    def __init__(self, partner: torch.Tensor, p: float = 0.5):
        self.partner = partner.to(torch.int64)  # partner[label] = the mirror class's index, or -1
        self.p = p

    @classmethod
    def for_classes(cls, class_ids: list, pairs, p: float = 0.5) -> MirrorSwap | None:
        index_of = {str(cid): i for i, cid in enumerate(class_ids)}
        partner = torch.full((len(class_ids),), -1, dtype=torch.int64)
        for a, b in pairs:
            if str(a) in index_of and str(b) in index_of:
                partner[index_of[str(a)]] = index_of[str(b)]
                partner[index_of[str(b)]] = index_of[str(a)]
        return cls(partner, p) if (partner >= 0).any() else None

    def __call__(self, batch: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        partner = self.partner.to(labels.device)[labels]
        flip = (partner >= 0) & (torch.rand(labels.shape[0], device=labels.device) < self.p)
        if not flip.any():
            return batch, labels
        batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
        return batch, torch.where(flip, partner, labels)


# ---------------------------------------------------------------------------------------------------------------
# Per-batch: the same policies on tensors, one random draw per sample
# ---------------------------------------------------------------------------------------------------------------


class BatchAugment:
    """Augment a float batch [B, 3, S, S] in [0, 1] with independent random parameters per sample.

    Geometry is one homography per sample applied with ``grid_sample`` (rotation, scale, shift, shear, perspective
    and random-resized-crop compose into a single 3x3 matrix, so the image is resampled once).
    """

    def __init__(self, policy: AugmentPolicy):
        self.policy = policy
        p = policy
        self.has_geometry = bool(p.rrc_scale or p.rotation or p.translate or p.shear or p.perspective
                                 or p.scale != (1.0, 1.0))
        self.has_colour = bool(p.brightness or p.contrast or p.saturation or p.hue)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        p = self.policy
        if p.pad_crop:
            batch = _random_pad_crop(batch, p.pad_crop)
        if self.has_geometry:
            batch = self._warp(batch)
        if p.hflip:
            flip = torch.rand(batch.shape[0], device=batch.device) < p.hflip
            batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
        if self.has_colour:
            batch = self._jitter(batch)
        if p.erasing:
            batch = _random_erasing(batch, p.erasing)
        return batch

    def _warp(self, batch: torch.Tensor) -> torch.Tensor:
        p = self.policy
        n, device = batch.shape[0], batch.device

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return torch.empty(n, device=device).uniform_(lo, hi)

        # Build, per sample, the matrix that maps output coordinates in [-1, 1] to input coordinates.
        angle = uniform(-p.rotation, p.rotation) * math.pi / 180
        shear = uniform(-p.shear, p.shear) * math.pi / 180
        scale = uniform(*p.scale)
        sx = sy = 1 / scale
        tx, ty = uniform(-p.translate, p.translate) * 2, uniform(-p.translate, p.translate) * 2
        if p.rrc_scale is not None:
            area = uniform(*p.rrc_scale)
            log_ratio = uniform(math.log(p.rrc_ratio[0]), math.log(p.rrc_ratio[1]))
            aspect = torch.exp(log_ratio)
            sx = torch.sqrt(area * aspect).clamp(max=1.0)
            sy = torch.sqrt(area / aspect).clamp(max=1.0)
            tx = (torch.rand(n, device=device) * 2 - 1) * (1 - sx)
            ty = (torch.rand(n, device=device) * 2 - 1) * (1 - sy)
        cos, sin = torch.cos(angle), torch.sin(angle)
        matrix = torch.zeros(n, 3, 3, device=device)
        matrix[:, 0, 0] = cos * sx
        matrix[:, 0, 1] = (-sin + torch.tan(shear) * cos) * sy
        matrix[:, 1, 0] = sin * sx
        matrix[:, 1, 1] = (cos + torch.tan(shear) * sin) * sy
        matrix[:, 0, 2] = tx
        matrix[:, 1, 2] = ty
        matrix[:, 2, 2] = 1
        if p.perspective:
            matrix[:, 2, 0] = uniform(-p.perspective, p.perspective)
            matrix[:, 2, 1] = uniform(-p.perspective, p.perspective)
        size_h, size_w = batch.shape[-2:]
        if not p.perspective:  # affine: one fused call builds the sampling grid
            grid = F.affine_grid(matrix[:, :2, :].to(batch.dtype), list(batch.shape), align_corners=True)
        else:  # projective: x' = (m0 x + m1 y + m2) / (m6 x + m7 y + 1), written out (cheaper than a batched matmul)
            xs = torch.linspace(-1, 1, size_w, device=device).view(1, 1, -1)
            ys = torch.linspace(-1, 1, size_h, device=device).view(1, -1, 1)
            m = matrix.view(n, 9, 1, 1)
            denominator = (m[:, 6] * xs + m[:, 7] * ys + 1).clamp(min=1e-3)
            grid = torch.stack([(m[:, 0] * xs + m[:, 1] * ys + m[:, 2]) / denominator,
                                (m[:, 3] * xs + m[:, 4] * ys + m[:, 5]) / denominator], dim=-1).to(batch.dtype)
        # Zeros outside the image, as torchvision's RandomAffine/RandomPerspective fill (fill=0) in the file pipeline;
        # reflection would paint mirrored copies of a sign's rim into the corners.
        return F.grid_sample(batch, grid.to(batch.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)

    def _jitter(self, batch: torch.Tensor) -> torch.Tensor:
        p = self.policy
        n = batch.shape[0]
        apply = (torch.rand(n, 1, 1, 1, device=batch.device) < p.jitter_p).to(batch.dtype)

        def factor(strength: float) -> torch.Tensor:
            f = torch.empty(n, 1, 1, 1, device=batch.device).uniform_(1 - strength, 1 + strength)
            return 1 + (f - 1) * apply

        if p.brightness:
            batch = batch * factor(p.brightness)
        if p.contrast:
            mean = _grey(batch).mean(dim=(1, 2, 3), keepdim=True)
            batch = (batch - mean) * factor(p.contrast) + mean
        if p.saturation:
            grey = _grey(batch)
            batch = (batch - grey) * factor(p.saturation) + grey
        if p.hue:
            batch = _rotate_hue(batch, torch.empty(n, device=batch.device).uniform_(-p.hue, p.hue) * apply.view(-1))
        return batch.clamp_(0, 1)


def _rotate_hue(batch: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Turn the colour wheel by ``shift`` (fraction of a turn, per sample) about the grey axis of RGB space.

    A rotation about (1, 1, 1) keeps greys grey and brightness about the same, like ColorJitter's hue shift (which
    goes through HSV image by image); as one 3x3 matrix per sample it is a single batched matmul.
    """
    theta = shift.to(torch.float32) * 2 * math.pi
    cos, sin = torch.cos(theta).view(-1, 1, 1), torch.sin(theta).view(-1, 1, 1)
    axis = torch.full((3,), 1 / math.sqrt(3), device=batch.device)
    cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], device=batch.device) / math.sqrt(3)
    eye = torch.eye(3, device=batch.device)
    matrix = cos * eye + sin * cross + (1 - cos) * torch.outer(axis, axis)
    return torch.einsum("bij,bjhw->bihw", matrix.to(batch.dtype), batch)


def _grey(batch: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    return (batch * weights).sum(dim=1, keepdim=True)


def _random_pad_crop(batch: torch.Tensor, pad: int) -> torch.Tensor:
    n, _, h, w = batch.shape
    padded = F.pad(batch, (pad, pad, pad, pad), mode="reflect")
    off_y = torch.randint(0, 2 * pad + 1, (n,), device=batch.device)
    off_x = torch.randint(0, 2 * pad + 1, (n,), device=batch.device)
    rows = (off_y[:, None] + torch.arange(h, device=batch.device)[None, :])  # [B, h]
    cols = (off_x[:, None] + torch.arange(w, device=batch.device)[None, :])  # [B, w]
    index = torch.arange(n, device=batch.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]  # [B, h, w, C]
    return out.permute(0, 3, 1, 2).contiguous()


def _random_erasing(batch: torch.Tensor, probability: float, area=(0.02, 0.2), ratio=(0.3, 3.3)) -> torch.Tensor:
    """Erase one random rectangle per selected sample (Zhong et al. 2017), filled with random colour noise."""
    n, _, h, w = batch.shape
    device = batch.device
    chosen = torch.rand(n, device=device) < probability
    target = torch.empty(n, device=device).uniform_(*area) * h * w
    aspect = torch.exp(torch.empty(n, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    eh = torch.sqrt(target * aspect).clamp(1, h).floor()
    ew = torch.sqrt(target / aspect).clamp(1, w).floor()
    top = (torch.rand(n, device=device) * (h - eh + 1)).floor()
    left = (torch.rand(n, device=device) * (w - ew + 1)).floor()
    ys = torch.arange(h, device=device).view(1, h, 1)
    xs = torch.arange(w, device=device).view(1, 1, w)
    mask = ((ys >= top.view(-1, 1, 1)) & (ys < (top + eh).view(-1, 1, 1))
            & (xs >= left.view(-1, 1, 1)) & (xs < (left + ew).view(-1, 1, 1)) & chosen.view(-1, 1, 1))
    noise = torch.rand_like(batch)
    return torch.where(mask.unsqueeze(1), noise, batch)


def build_mixing(num_classes: int, mixup_alpha: float, cutmix_alpha: float):
    """Batch-level MixUp / CutMix from torchvision (soft targets), or ``None``."""
    choices = []
    if mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
