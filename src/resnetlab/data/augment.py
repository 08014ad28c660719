"""Augmentation presets, in two implementations of the same policy.

* ``build_file_transform`` -- torchvision ``transforms.v2`` applied image by image in DataLoader workers; used for
  large images (photos, 224 px), where decoding dominates anyway.
* :class:`BatchAugment` -- the same preset on a whole uint8 batch already in memory, with *per-sample* random
  parameters. ``transforms.v2`` draws one set of parameters per call, so on a batch every image would get the same
  crop; and per-image PIL work every epoch is what makes CPU pipelines slow for 32-64 px data (batched tensor work
  is an order of magnitude faster per image; ``docs/benchmarks.md``). airbench does the same.

Presets (the first five mirror published recipes):

==========  ==================================================================================================
none        no augmentation
cifar       4-px reflect pad, random 32 crop, horizontal flip (He et al. 2016)
signs       small rotation (10 deg), scale/shift/shear, mild perspective, colour jitter, random erasing; **no**
            horizontal flip, which turns keep-left into keep-right (GTSRB practice, Sermanet & LeCun 2011)
imagenet    RandomResizedCrop scale 0.08-1 and horizontal flip (torchvision's reference scripts), plus colour jitter
            0.2/0.2/0.2/0.05 with p=0.5
objects     RandomResizedCrop, horizontal flip, rotation 30 deg, colour jitter 0.2 each (photo fine-tuning tutorials)
signs-wild  signs photographed elsewhere (another country's signs, cameras, weather); **no** horizontal flip. Each
            operation has its own probability, and a fifth of the samples pass untouched (``clean``):
            framing (p 0.75: zoom 0.7-1.15, i.e. the sign smaller inside its surroundings or with its edges cut,
            shift 10%, rotation 8 deg, shear 4 deg, perspective 0.1; the border repeated outside the image instead
            of black), strong colour jitter (p 0.8: brightness and contrast 0.35, saturation 0.6, hue 0.1 of a
            turn), a colour cast per channel (p 0.3, gains 0.7-1.3: white can turn yellow, as the warning triangles
            of countries that paint them yellow), grayscale (p 0.1), bad weather (dark 0.3-0.7x, faded contrast
            0.35-0.7x, fog blending 15-50% towards a grey-to-white veil; p 0.15 each), Gaussian blur (p 0.2, sigma
            0.4-1.2 px at the input size), Gaussian noise (p 0.2, std 0.01-0.06), a JPEG round trip (p 0.3,
            quality 20-85), random erasing (p 0.15, occlusion)
==========  ==================================================================================================

The camera and weather operations (``tint``, ``grayscale``, ``dark``, ``fade``, ``haze``, ``blur``, ``noise``,
``jpeg``) and the ``clean`` share are :class:`AugmentPolicy` fields, off by default, so any preset may use them. In
memory they are batched like the rest (one draw per sample; the blur is a grouped convolution with one kernel per
sample); JPEG alone is a loop over the chosen samples, through torchvision's codec. The file pipeline runs them on
the uint8 tensor after ``PILToTensor`` with the same code (:class:`BatchAugment` on a batch of one), and there also
the warp when ``fill="edge"`` (v2's affine transforms fill with a constant only).

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
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from resnetlab.errors import ConfigError


@dataclass(frozen=True)
class AugmentPolicy:
    """What a preset does. Every field defaults to off, so a preset names only the operations it uses.

    The fields from ``clean`` down were added for ``signs-wild`` but are ordinary policy fields: any preset may
    use them, and both pipelines apply them (see :func:`build_file_transform` and :class:`BatchAugment`).
    """

    hflip: float = 0.0  # probability
    pad_crop: int = 0  # pixels of reflect padding for a random crop (CIFAR style)
    rrc_scale: tuple[float, float] | None = None  # RandomResizedCrop area range
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotation: float = 0.0  # degrees, uniform in [-r, r]
    scale: tuple[float, float] = (1.0, 1.0)  # zoom: < 1 shows the object smaller (loose framing), > 1 cuts its edges
    translate: float = 0.0  # fraction of the side
    shear: float = 0.0  # degrees
    perspective: float = 0.0  # corner displacement, fraction of the side
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    jitter_p: float = 1.0
    erasing: float = 0.0  # probability
    # --- off by default; signs-wild uses them -------------------------------------------------------------------
    clean: float = 0.0  # probability that a sample skips every operation below but erasing (and mirror_swap)
    geometry_p: float = 1.0  # probability that a sample is warped at all (1: every sample, as the older presets)
    fill: str = "zeros"  # outside the warped image: "zeros" (black, as torchvision) or "edge" (repeat the border)
    tint: float = 0.0  # probability of a colour cast (white balance): one gain per channel
    tint_strength: float = 0.0  # each channel's gain is uniform in [1 - s, 1 + s]
    grayscale: float = 0.0  # probability
    dark: float = 0.0  # probability of dusk / overcast light: brightness times a factor in dark_range
    dark_range: tuple[float, float] = (0.3, 0.7)
    fade: float = 0.0  # probability of low contrast (rain, glare): contrast times a factor in fade_range
    fade_range: tuple[float, float] = (0.35, 0.7)
    haze: float = 0.0  # probability of fog: blend towards a flat veil (grey to white) with a weight in haze_range
    haze_range: tuple[float, float] = (0.15, 0.5)
    blur: float = 0.0  # probability of a Gaussian blur (defocus, motion at low shutter speed)
    blur_sigma: tuple[float, float] = (0.4, 1.2)  # pixels at the input size
    noise: float = 0.0  # probability of additive Gaussian noise (sensor noise at night)
    noise_std: tuple[float, float] = (0.01, 0.06)  # on the [0, 1] scale
    jpeg: float = 0.0  # probability of a JPEG round trip (8x8 block artefacts, chroma smearing)
    jpeg_quality: tuple[int, int] = (20, 85)

    @property
    def has_geometry(self) -> bool:
        return bool(self.rrc_scale or self.rotation or self.translate or self.shear or self.perspective
                    or self.scale != (1.0, 1.0))

    @property
    def has_photometric(self) -> bool:
        """Whether any of the camera and weather operations (tint ... jpeg) is on."""
        return bool(self.tint or self.grayscale or self.dark or self.fade or self.haze or self.blur or self.noise
                    or self.jpeg)


PRESETS: dict[str, AugmentPolicy] = {
    "none": AugmentPolicy(),
    "cifar": AugmentPolicy(hflip=0.5, pad_crop=4),
    "signs": AugmentPolicy(rotation=10, scale=(0.9, 1.1), translate=0.08, shear=5, perspective=0.08,
                           brightness=0.3, contrast=0.3, saturation=0.3, erasing=0.25),
    "imagenet": AugmentPolicy(hflip=0.5, rrc_scale=(0.08, 1.0), brightness=0.2, contrast=0.2, saturation=0.2,
                              hue=0.05, jitter_p=0.5),
    "objects": AugmentPolicy(hflip=0.5, rrc_scale=(0.08, 1.0), rotation=30, brightness=0.2, contrast=0.2,
                             saturation=0.2, hue=0.2),
    # Signs photographed elsewhere than the training set: other cameras, weather, framing and paint (a country with
    # yellow warning triangles). Each operation has its own probability, and clean=0.2 passes a fifth of the samples
    # through untouched, so the model still sees the clean images it is evaluated on.
    "signs-wild": AugmentPolicy(clean=0.2, rotation=8, scale=(0.7, 1.15), translate=0.1, shear=4, perspective=0.1,
                                geometry_p=0.75, fill="edge",
                                brightness=0.35, contrast=0.35, saturation=0.6, hue=0.1, jitter_p=0.8,
                                tint=0.3, tint_strength=0.3, grayscale=0.1, dark=0.15, fade=0.15, haze=0.15,
                                blur=0.2, noise=0.2, jpeg=0.3, erasing=0.15),
}


def get_policy(preset: str, *, random_erasing: float = 0.0) -> AugmentPolicy:
    if preset not in PRESETS:
        raise ConfigError(f"unknown augment.preset '{preset}'; choose one of {', '.join(PRESETS)}")
    policy = PRESETS[preset]
    if random_erasing:
        policy = replace(policy, erasing=random_erasing)
    if policy.fill not in ("zeros", "edge"):
        raise ConfigError(f"augment preset '{preset}': fill '{policy.fill}' is not zeros or edge")
    return policy


# ---------------------------------------------------------------------------------------------------------------
# Per-image: torchvision transforms.v2
# ---------------------------------------------------------------------------------------------------------------


def build_file_transform(policy: AugmentPolicy, size: int, *, randaugment: bool = False,
                         trivialaugment: bool = False) -> v2.Compose:
    """PIL image (already ROI-cropped) -> augmented uint8 tensor [3, size, size].

    The camera and weather operations (tint ... jpeg) have no v2 form with per-sample strengths (blur sigma, noise
    level and JPEG quality drawn per image, haze towards a drawn veil), and v2's affine transforms fill with a
    constant only: these run after ``PILToTensor`` in :class:`_TensorStage`, which is :class:`BatchAugment` on a
    batch of one. So both pipelines apply them with the same code, and so does a warp with ``fill="edge"``.
    """
    sizing: list = []
    steps: list = []
    if policy.rrc_scale is not None:
        sizing.append(v2.RandomResizedCrop(size, scale=policy.rrc_scale, ratio=policy.rrc_ratio, antialias=True))
    else:
        sizing.append(v2.Resize((size, size), antialias=True))
        if policy.pad_crop:
            steps.append(v2.RandomCrop(size, padding=policy.pad_crop, padding_mode="reflect"))
    if policy.hflip:
        steps.append(v2.RandomHorizontalFlip(policy.hflip))
    if policy.fill == "zeros":
        geometry: list = []
        if policy.rotation or policy.translate or policy.shear or policy.scale != (1.0, 1.0):
            geometry.append(v2.RandomAffine(
                degrees=policy.rotation, translate=(policy.translate, policy.translate) if policy.translate else None,
                scale=policy.scale if policy.scale != (1.0, 1.0) else None, shear=policy.shear or None))
        if policy.perspective:
            geometry.append(v2.RandomPerspective(distortion_scale=2 * policy.perspective, p=0.5))
        steps += [v2.RandomApply(geometry, p=policy.geometry_p)] if geometry and policy.geometry_p < 1 else geometry
    if policy.brightness or policy.contrast or policy.saturation or policy.hue:
        jitter = v2.ColorJitter(policy.brightness, policy.contrast, policy.saturation, policy.hue)
        steps.append(v2.RandomApply([jitter], p=policy.jitter_p) if policy.jitter_p < 1 else jitter)
    tensor_steps: list = []
    stage = _TensorStage.for_policy(policy)
    if stage is not None:
        tensor_steps.append(stage)
    # RandAugment/TrivialAugment are switches of their own, outside the preset (and outside its clean share).
    after = [*autoaugment_steps(randaugment=randaugment, trivialaugment=trivialaugment), v2.PILToTensor()]
    # Random erasing is not here: it runs on the collated batch (see batch_stage), the same in both pipelines.
    if policy.clean:
        return v2.Compose([*sizing, _CleanOrAugmented(steps, after, tensor_steps, policy.clean)])
    return v2.Compose([*sizing, *steps, *after, *tensor_steps])


# The fields _TensorStage takes over from the v2 steps in the file pipeline.
_PHOTOMETRIC_FIELDS = ("tint", "tint_strength", "grayscale", "dark", "dark_range", "fade", "fade_range", "haze",
                       "haze_range", "blur", "blur_sigma", "noise", "noise_std", "jpeg", "jpeg_quality")
_WARP_FIELDS = ("rotation", "scale", "translate", "shear", "perspective", "geometry_p", "fill")


class _TensorStage:
    """The operations of a policy that the file pipeline runs on the uint8 tensor of one image (see
    :func:`build_file_transform`): :class:`BatchAugment` on a batch of one, rounded back to uint8."""

    def __init__(self, policy: AugmentPolicy):
        self.augment = BatchAugment(policy)

    @classmethod
    def for_policy(cls, policy: AugmentPolicy) -> _TensorStage | None:
        names = list(_PHOTOMETRIC_FIELDS)
        if policy.fill != "zeros":  # v2's affine fills with a constant only: warp here (RandomResizedCrop stays v2)
            names += _WARP_FIELDS
        stage = AugmentPolicy(**{name: getattr(policy, name) for name in names})
        return cls(stage) if stage.has_geometry or stage.has_photometric else None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        out = self.augment(image.unsqueeze(0).float().div_(255.0))[0]
        return out.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)


class _CleanOrAugmented:
    """One image through the preset, or, with probability ``clean``, past it untouched.

    The file pipeline splits a preset into steps on the PIL image and steps on the uint8 tensor, with RandAugment and
    ``PILToTensor`` (``middle``, always applied) between them; one draw decides for both parts, so an image is clean
    in both or in neither.
    """

    def __init__(self, pil_steps: list, middle: list, tensor_steps: list, clean: float):
        self.pil_steps, self.middle, self.tensor_steps, self.clean = pil_steps, middle, tensor_steps, clean

    def __call__(self, image):
        augment = bool(torch.rand(()) >= self.clean)
        for step in (self.pil_steps if augment else []) + self.middle + (self.tensor_steps if augment else []):
            image = step(image)
        return image


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
        self.has_geometry = p.has_geometry
        self.has_colour = bool(p.brightness or p.contrast or p.saturation or p.hue)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        p = self.policy
        original = batch
        if p.pad_crop:
            batch = _random_pad_crop(batch, p.pad_crop)
        if self.has_geometry:
            batch = self._warp(batch)
        if p.hflip:
            flip = torch.rand(batch.shape[0], device=batch.device) < p.hflip
            batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
        if self.has_colour:
            batch = self._jitter(batch)
        if p.has_photometric:
            batch = _photometric(batch, p)
        if p.clean:
            keep = torch.rand(batch.shape[0], device=batch.device) < p.clean
            batch = torch.where(keep.view(-1, 1, 1, 1), original, batch)
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
        warped = None
        if p.geometry_p < 1:  # unwarped samples get the identity (drawn only here: older presets keep their stream)
            warped = torch.rand(n, device=device) < p.geometry_p
            angle, shear, tx, ty = angle * warped, shear * warped, tx * warped, ty * warped
            sx, sy = torch.where(warped, sx, 1.0), torch.where(warped, sy, 1.0)
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
            on = 1.0 if warped is None else warped
            matrix[:, 2, 0] = uniform(-p.perspective, p.perspective) * on
            matrix[:, 2, 1] = uniform(-p.perspective, p.perspective) * on
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
        # reflection would paint mirrored copies of a sign's rim into the corners. fill="edge" repeats the border
        # pixels instead: a zoomed-out (loosely framed) sign then sits in a smeared continuation of its own
        # background, closer to the surroundings a real loose crop shows than a black frame is.
        padding = "border" if p.fill == "edge" else "zeros"
        return F.grid_sample(batch, grid.to(batch.dtype), mode="bilinear", padding_mode=padding, align_corners=True)

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


def _photometric(batch: torch.Tensor, p: AugmentPolicy) -> torch.Tensor:
    """The camera and weather operations of ``p`` on a float batch in [0, 1], each sample chosen with its own
    probability and given its own strength: tint, grayscale, dark, fade, haze, blur, noise, JPEG (the order light
    meets a camera: the scene and weather, then the lens, the sensor and last the encoder)."""
    n, device, dtype = batch.shape[0], batch.device, batch.dtype

    def chosen(probability: float) -> torch.Tensor:
        return (torch.rand(n, device=device) < probability).view(n, 1, 1, 1)

    def uniform(lo: float, hi: float, channels: int = 1) -> torch.Tensor:
        return torch.empty(n, channels, 1, 1, device=device, dtype=dtype).uniform_(lo, hi)

    if p.tint:  # white balance / paint: one gain per channel, so white can turn yellowish or bluish
        gains = uniform(1 - p.tint_strength, 1 + p.tint_strength, channels=3)
        batch = batch * torch.where(chosen(p.tint), gains, torch.ones_like(gains))
    if p.grayscale:
        batch = torch.where(chosen(p.grayscale), _grey(batch).expand_as(batch), batch)
    if p.dark:
        batch = batch * torch.where(chosen(p.dark), uniform(*p.dark_range), 1.0)
    if p.fade:
        mean = _grey(batch).mean(dim=(1, 2, 3), keepdim=True)
        batch = (batch - mean) * torch.where(chosen(p.fade), uniform(*p.fade_range), 1.0) + mean
    if p.haze:  # fog: a flat veil, grey to white, over the whole picture
        veil = uniform(0.6, 1.0)
        weight = torch.where(chosen(p.haze), uniform(*p.haze_range), 0.0)
        batch = batch * (1 - weight) + veil * weight
    batch = batch.clamp(0, 1)
    # Blur and noise cost a convolution and a normal draw per pixel: they run on the chosen samples only.
    if p.blur and len(index := _chosen_index(n, p.blur, device)):
        sigma = torch.empty(len(index), device=device).uniform_(*p.blur_sigma)
        blurred = _gaussian_blur(batch[index], sigma, radius=math.ceil(3 * p.blur_sigma[1]))
        batch = batch.index_copy(0, index, blurred)
    if p.noise and len(index := _chosen_index(n, p.noise, device)):
        std = torch.empty(len(index), 1, 1, 1, device=device, dtype=dtype).uniform_(*p.noise_std)
        part = batch[index]
        batch = batch.index_copy(0, index, (part + torch.randn_like(part) * std).clamp(0, 1))
    if p.jpeg:
        batch = _jpeg(batch, chosen(p.jpeg).view(n), torch.randint(p.jpeg_quality[0], p.jpeg_quality[1] + 1, (n,)))
    return batch


def _chosen_index(n: int, probability: float, device) -> torch.Tensor:
    return torch.nonzero(torch.rand(n, device=device) < probability).flatten()


def _gaussian_blur(batch: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with one ``sigma`` per sample (0: unchanged), as two grouped convolutions.

    One kernel per sample and channel (``groups=B*C``) blurs the whole batch in two calls, however the sigmas differ.
    """
    n, c, h, w = batch.shape
    radius = max(1, min(radius, h - 1, w - 1))  # reflect padding needs a pad smaller than the side
    offsets = torch.arange(-radius, radius + 1, device=batch.device, dtype=batch.dtype)
    # sigma 0 -> a tiny sigma, whose kernel is 1 at the centre and 0 elsewhere: the identity
    kernel = torch.exp(-offsets.view(1, -1) ** 2 / (2 * sigma.to(batch.dtype).clamp(min=1e-3).view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [B*C, k]
    flat = F.pad(batch.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, h, w)


def _jpeg(batch: torch.Tensor, chosen: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """A JPEG encode-decode round trip at ``quality[i]`` for each chosen sample (torchvision's libjpeg, on the CPU).

    This is the one per-image loop of the batch path: the codec has no batched form on the CPU. It runs only on the
    chosen samples, and a 32-px image takes tens of microseconds.
    """
    index = torch.nonzero(chosen).flatten().tolist()
    if not index:
        return batch
    batch = batch.clone()
    as_bytes = batch[index].mul(255.0).round_().clamp_(0, 255).to(device="cpu", dtype=torch.uint8)
    for row, i in enumerate(index):
        decoded = TF.jpeg(as_bytes[row], quality=int(quality[i]))
        batch[i] = decoded.to(device=batch.device, dtype=batch.dtype) / 255.0
    return batch


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
