"""CIFAR ResNets of He et al. 2016, section 4.2: depth 6n+2 with three stages of 16/32/64 planes.

Paper: "Deep Residual Learning for Image Recognition", https://arxiv.org/abs/1512.03385
ResNet-20/32/44/56/110 have n = 3/5/7/9/18 basic blocks per stage, a 3x3 stem, global average pooling and one
linear layer. Where a block changes the shape, the shortcut is either
- option A (the paper's CIFAR choice, the default): identity, subsampled by taking every other pixel and
  zero-padded with extra channels, so it adds no parameters; or
- option B: a 1x1 convolution with stride plus BatchNorm (a projection), as in the ImageNet ResNets.
"""

from typing import Any

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from resnetlab.errors import ConfigError
from resnetlab.models._base import CIFAR10_MEAN, CIFAR10_STD, ClassifierModel, make_cfg
from resnetlab.models._registry import register_model
from resnetlab.models.resnet import BasicBlock, conv1x1, conv3x3

__all__ = ["CifarResNet", "ZeroPadShortcut", "check_shortcut"]


def check_shortcut(shortcut: str) -> str:
    """Normalise the shortcut option to "A" or "B"; anything else is the user's error."""
    option = str(shortcut).upper()
    if option not in ("A", "B"):
        raise ConfigError(
            f"model.shortcut={shortcut!r} is not an option; "
            f"use shortcut=A (zero-padding) or shortcut=B (1x1 projection)"
        )
    return option


class ZeroPadShortcut(nn.Module):
    """Option A shortcut: subsample by ``stride`` and append zero channels up to ``out_planes``.

    As in the authors' Torch code (fb.resnet.torch, ``shortcutType == 'A'``): 1x1 average pooling with stride,
    concatenated with zeros. Taking every ``stride``-th pixel gives the same ceil(H / stride) size as the stride-2
    3x3 convolution of the residual branch.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = out_planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # F.pad pads from the last dimension backwards: (W left, W right, H top, H bottom, C front, C back).
        return F.pad(x, [0, 0, 0, 0, 0, self.extra_channels])


class CifarResNet(ClassifierModel):
    """ResNet-(6n+2) for 32 px images: 3x3 conv (16) -> 3 stages of n BasicBlocks (16, 32, 64) -> pool -> fc."""

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        shortcut: str = "A",
        zero_init_residual: bool = False,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.shortcut = check_shortcut(shortcut)
        self.inplanes = 16

        self.conv1 = conv3x3(3, self.inplanes)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, blocks_per_stage)
        self.layer2 = self._make_layer(32, blocks_per_stage, stride=2)
        self.layer3 = self._make_layer(64, blocks_per_stage, stride=2)
        self._init_head(64, num_classes, drop_rate)

        # He initialisation, as the paper (its reference [13]) and torchvision.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        # Zero-initialize the last BN in each residual branch so every block starts as an identity
        # (Goyal et al. 2017, https://arxiv.org/abs/1706.02677).
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != planes:
            if self.shortcut == "A":
                downsample = ZeroPadShortcut(self.inplanes, planes, stride)
            else:
                downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))

        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        for _ in range(1, blocks):
            layers.append(BasicBlock(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return x


def _cifar_cfg(family: str) -> dict[str, Any]:
    return make_cfg(family=family, input_size=(3, 32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD, num_classes=10)


default_cfgs = {f"resnet{depth}": _cifar_cfg("cifar-resnet") for depth in (20, 32, 44, 56, 110)}


def _create_cifar_resnet(name: str, depth: int, **kwargs: Any) -> CifarResNet:
    model = CifarResNet(depth, **kwargs)
    model.default_cfg = dict(default_cfgs[name])
    return model


@register_model
def resnet20(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-20 (3 blocks per stage), He et al. 2016; shortcut=A|B."""
    return _create_cifar_resnet("resnet20", 20, **kwargs)


@register_model
def resnet32(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-32 (5 blocks per stage), He et al. 2016; shortcut=A|B."""
    return _create_cifar_resnet("resnet32", 32, **kwargs)


@register_model
def resnet44(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-44 (7 blocks per stage), He et al. 2016; shortcut=A|B."""
    return _create_cifar_resnet("resnet44", 44, **kwargs)


@register_model
def resnet56(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-56 (9 blocks per stage), He et al. 2016; shortcut=A|B."""
    return _create_cifar_resnet("resnet56", 56, **kwargs)


@register_model
def resnet110(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-110 (18 blocks per stage), He et al. 2016; shortcut=A|B."""
    return _create_cifar_resnet("resnet110", 110, **kwargs)
