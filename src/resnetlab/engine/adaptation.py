"""Test-time adaptation without labels: the BatchNorm layers of a trained model fitted to a new domain's images.

Two methods, both touching nothing but the BatchNorm layers:

- **AdaBN** (Li et al. 2016, "Revisiting Batch Normalization For Practical Domain Adaptation"): the running mean and
  variance of every BN layer are re-estimated on the new images, everything else is kept. A covariate shift
  (lighting, colour cast, another camera) mostly moves the activations' statistics; replacing the source statistics
  with the target's undoes much of it, without a gradient. With a prior (Schneider et al., NeurIPS 2020, "Improving
  robustness against common corruptions by covariate shift adaptation"), the source statistics count as
  ``prior_strength`` images beside the new ones: the new statistics are a weighted mean of both, which keeps a few
  new images, or new images that hold only some of the classes in other proportions (label shift, which AdaBN
  cannot tell from a domain shift), from replacing what the source statistics knew.
- **TENT** (Wang et al., ICLR 2021, "Tent: Fully Test-Time Adaptation by Entropy Minimization"): the BN affine
  parameters (weight, bias) are trained to minimise the entropy of the model's own softmax predictions on the new
  images, with BN normalizing by the statistics of each batch. Running statistics are then re-estimated with
  :func:`adapt_batchnorm` (the affine parameters of a layer change the inputs of the layers after it), so that the
  adapted model works in eval mode like any other.

Pure torch: ``batches`` is any re-iterable of image tensors ``[B, C, H, W]`` (normalized as the model expects), or of
``(images, labels)`` pairs whose labels are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from resnetlab.errors import ConfigError

Batches = Iterable[Any]


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer of ``model`` (1d/2d/3d, SyncBatchNorm), in module order."""
    return [module for module in model.modules() if isinstance(module, _BatchNorm)]


def _require_batchnorm(model: nn.Module) -> list[_BatchNorm]:
    layers = [m for m in batchnorm_layers(model) if m.track_running_stats]
    if not layers:
        raise ConfigError(f"model {type(model).__name__} has no BatchNorm layers with running statistics, so there is "
                          "nothing to adapt (AdaBN and TENT change BatchNorm layers only); use a model with "
                          "BatchNorm, such as the resnet family (`resnetlab models`)")
    return layers


def _images(item: Any) -> torch.Tensor:
    """A batch as given: a tensor, or the images of an ``(images, labels)`` pair."""
    images = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(images, torch.Tensor) or images.ndim < 2:
        raise TypeError(f"a batch must be an image tensor [B, C, H, W] or an (images, labels) pair, got "
                        f"{type(images).__name__}")
    return images


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _batchnorm_only_training(model: nn.Module) -> None:
    """Eval mode for everything (dropout off, stochastic depth off), train mode for the BN layers alone: they then
    normalize by the statistics of the batch and update their running statistics."""
    model.eval()
    for layer in batchnorm_layers(model):
        layer.train()


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, batches: Batches, prior_strength: float = 0.0) -> int:
    """AdaBN: replace the running statistics of every BN layer by those of the images in ``batches``.

    The statistics are reset, then every batch is forwarded once with the BN layers in train mode (the rest of the
    model in eval mode) and no gradient. Each batch's mean and variance enter a cumulative average weighted by its
    number of images, which is ``momentum=None`` (torch's cumulative average, as ``torch.optim.swa_utils.update_bn``
    uses) with a last, smaller batch counted for what it holds rather than as a full batch. The model's momentum
    settings are restored and it is left in eval mode.

    Args:
        model: A model with BatchNorm layers, on the device the batches should run on.
        batches: Image batches (or ``(images, labels)`` pairs), normalized as the model expects.
        prior_strength: How many images the model's current statistics count as (Schneider et al. 2020): each
            layer ends with ``(prior_strength * source + n * new) / (prior_strength + n)`` for its mean and
            variance, ``n`` the number of new images. 0 (AdaBN) replaces them.

    Returns:
        The number of images the statistics were estimated on.

    Raises:
        ConfigError: The model has no BatchNorm layer with running statistics.
    """
    if not (prior_strength >= 0 and math.isfinite(prior_strength)):
        raise ConfigError(f"the prior strength must be a number of images >= 0, got {prior_strength}")
    layers = _require_batchnorm(model)
    device = _device_of(model)
    momenta = [layer.momentum for layer in layers]
    source = [(layer.running_mean.clone(), layer.running_var.clone()) for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
    _batchnorm_only_training(model)
    seen = 0
    try:
        for item in batches:
            images = _images(item).to(device, non_blocking=True)
            count = len(images)
            if count == 0:
                continue
            # running <- running + (batch - running) * count / (seen + count): the mean over images so far
            for layer in layers:
                layer.momentum = count / (seen + count)
            model(images)
            seen += count
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.eval()
    if seen == 0:
        raise ConfigError("no images to estimate BatchNorm statistics on: the batches were empty")
    if prior_strength > 0:
        weight = prior_strength / (prior_strength + seen)
        for layer, (mean, var) in zip(layers, source):
            layer.running_mean.lerp_(mean, weight)
            layer.running_var.lerp_(var, weight)
    return seen


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy (nats) of ``softmax(logits)`` per row, computed from log-probabilities for stability."""
    log_probabilities = logits.float().log_softmax(dim=1)
    return -(log_probabilities.exp() * log_probabilities).sum(dim=1)


@torch.no_grad()
def mean_entropy(model: nn.Module, batches: Batches) -> float:
    """The mean prediction entropy of ``model`` in eval mode over the images of ``batches`` (lower: more confident)."""
    device = _device_of(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for item in batches:
            images = _images(item).to(device, non_blocking=True)
            total += float(softmax_entropy(model(images)).sum())
            count += len(images)
    finally:
        model.train(was_training)
    return total / count if count else math.nan


@dataclass
class TentResult:
    """What :func:`tent` did: the optimizer steps taken and the mean entropy of each step's batch (the loss)."""

    steps: int
    images_seen: int
    losses: list[float] = field(default_factory=list)


def tent(model: nn.Module, batches: Batches, steps: int, lr: float, *, optimizer: str = "adam",
         progress: Callable[[int, float], None] | None = None) -> TentResult:
    """TENT: minimise the mean entropy of the model's predictions by training the BN affine parameters alone.

    Every other parameter is frozen; BN layers normalize by the statistics of each batch (train mode, the rest of
    the model in eval mode, so dropout stays off). One optimizer step per batch; ``batches`` is iterated again until
    ``steps`` steps are taken (shuffle it for the batches to differ between passes). Batches of fewer than two images
    are skipped: a single image's batch statistics normalize it to its own mean.

    The running statistics the BN layers accumulate meanwhile mix the parameters of every step; call
    :func:`adapt_batchnorm` afterwards to estimate them for the final parameters (the job does). The model's
    ``requires_grad`` flags are restored and it is left in eval mode.

    Args:
        model: A model with affine BatchNorm layers.
        batches: Image batches (or ``(images, labels)`` pairs), re-iterable.
        steps: Optimizer steps (at least 1).
        lr: Learning rate. TENT used Adam at 1e-3 for CIFAR-10-C (batch 128) and SGD with momentum 0.9 at 2.5e-4
            for ImageNet-C (batch 64).
        optimizer: ``adam`` or ``sgd`` (momentum 0.9), as in the paper.
        progress: Called with ``(step, loss)`` after each step.

    Returns:
        A :class:`TentResult`.

    Raises:
        ConfigError: No affine BatchNorm layer, ``steps`` < 1, ``lr`` not positive, an unknown optimizer, or no batch
            of two images or more.
    """
    layers = [layer for layer in _require_batchnorm(model) if layer.affine]
    if not layers:
        raise ConfigError(f"model {type(model).__name__} has BatchNorm layers without affine parameters "
                          "(affine=False), which TENT trains; use --method adabn")
    if steps < 1:
        raise ConfigError(f"--steps {steps}: TENT needs at least one step")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"--lr {lr}: give a positive learning rate, e.g. 0.001")
    parameters = [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(parameters, lr=lr, betas=(0.9, 0.999))
    elif optimizer == "sgd":
        opt = torch.optim.SGD(parameters, lr=lr, momentum=0.9)
    else:
        raise ConfigError(f"optimizer '{optimizer}': choose adam or sgd")

    device = _device_of(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    trained = {id(p) for p in parameters}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    _batchnorm_only_training(model)
    result = TentResult(steps=0, images_seen=0)
    try:
        while result.steps < steps:
            stepped = yielded = False
            for item in batches:
                yielded = True
                images = _images(item).to(device, non_blocking=True)
                if len(images) < 2:
                    continue
                loss = softmax_entropy(model(images)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                stepped = True
                result.steps += 1
                result.images_seen += len(images)
                result.losses.append(float(loss.detach()))
                if progress is not None:
                    progress(result.steps, result.losses[-1])
                if result.steps >= steps:
                    break
            if not yielded and result.steps:
                raise TypeError(f"the batches ran out after {result.steps} of {steps} steps: pass a re-iterable "
                                "(a list, a DataLoader), not a generator, for TENT to go over the images again")
            if not stepped:
                raise ConfigError("TENT needs batches of at least two images; give more images or a larger batch")
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        opt.zero_grad(set_to_none=True)
        model.eval()
    return result
