"""Wide ResNets for CIFAR: WRN-d-k = pre-activation ResNet with (d-4)/6 blocks per stage and k times the widths.

Paper: "Wide Residual Networks", Zagoruyko & Komodakis 2016, https://arxiv.org/abs/1605.07146
Stages of 16k/32k/64k planes after a 16-plane 3x3 stem; the first block of every stage (including the first,
which widens 16 -> 16k) has a 1x1 projection shortcut. ``block_drop_rate`` is the dropout between the two
convolutions of a block; the paper's best CIFAR results use 0.3 (default here 0.0, the paper's plain WRN).
"""

from __future__ import annotations

from typing import Any

from resnetlab.models._base import CIFAR10_MEAN, CIFAR10_STD, make_cfg
from resnetlab.models._registry import register_model
from resnetlab.models.preact_resnet import PreActResNet

__all__: list[str] = []

default_cfgs = {
    name: make_cfg(family="wide-resnet", input_size=(3, 32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD, num_classes=10)
    for name in ("wrn16_8", "wrn28_10")
}


def _create_wide_resnet(name: str, depth: int, widen_factor: int, **kwargs: Any) -> PreActResNet:
    if (depth - 4) % 6 != 0:
        raise ValueError(f"Wide ResNet depth must be 6n+4, got {depth}")
    n = (depth - 4) // 6
    widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    # The projection shortcut is part of the architecture (the paper's code has no zero-padding variant).
    model = PreActResNet(layers=(n, n, n), widths=widths, stem_width=16, shortcut="B", **kwargs)
    model.default_cfg = dict(default_cfgs[name])
    return model


@register_model
def wrn16_8(**kwargs: Any) -> PreActResNet:
    """Wide ResNet WRN-16-8 (2 blocks per stage, widths 128/256/512), Zagoruyko & Komodakis 2016."""
    return _create_wide_resnet("wrn16_8", 16, 8, **kwargs)


@register_model
def wrn28_10(**kwargs: Any) -> PreActResNet:
    """Wide ResNet WRN-28-10 (4 blocks per stage, widths 160/320/640), Zagoruyko & Komodakis 2016."""
    return _create_wide_resnet("wrn28_10", 28, 10, **kwargs)
