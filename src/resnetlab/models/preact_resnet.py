"""Pre-activation ResNets for small images: the CIFAR depths, ResNet-44V2, and the base of the Wide ResNets.

Paper: "Identity Mappings in Deep Residual Networks", He et al. 2016, https://arxiv.org/abs/1603.05027
Each block computes BN -> ReLU -> conv -> BN -> ReLU -> conv and adds its input unchanged: no ReLU or BN sits on
the shortcut path, so the signal of any block reaches any later one directly. The net therefore ends with one
more BN -> ReLU before pooling.

Shortcuts where the shape changes: option B (default) is a 1x1 convolution with stride applied to the
*pre-activated* input, as in the authors' code (KaimingHe/resnet-1k-layers, ``resnet-pre-act.lua``, where the
first block of a stage shares its BN-ReLU with the projection); option A is the zero-padding identity of the
original CIFAR ResNets, applied to the raw input so the shortcut stays a pure identity.
"""

from collections.abc import Sequence
from typing import Any

import torch.nn as nn
from torch import Tensor

from resnetlab.models._base import CIFAR10_MEAN, CIFAR10_STD, ClassifierModel, make_cfg
from resnetlab.models._registry import register_model
from resnetlab.models.cifar_resnet import ZeroPadShortcut, check_shortcut
from resnetlab.models.resnet import conv1x1, conv3x3

__all__ = ["PreActBasicBlock", "PreActResNet"]


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3, plus the shortcut (Wide ResNets use the dropout)."""

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        shortcut_from_preact: bool = False,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        # Dropout between the two convolutions: Zagoruyko & Komodakis 2016, section 2.3.
        self.drop = nn.Dropout(drop_rate)
        self.conv2 = conv3x3(planes, planes)
        self.downsample = downsample
        self.shortcut_from_preact = shortcut_from_preact
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.bn1(x)
        out = self.relu(out)
        if self.downsample is not None:
            identity = self.downsample(out if self.shortcut_from_preact else x)

        out = self.conv1(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.drop(out)
        out = self.conv2(out)

        out += identity
        return out


class PreActResNet(ClassifierModel):
    """3x3 stem conv -> 3 or 4 stages of pre-activation blocks (stride 2 from the second) -> BN-ReLU -> pool -> fc.

    The stages are ``layer1``..``layer4`` as in the ImageNet ResNets; a 3-stage net has ``layer4 = Identity``
    (no parameters), so code that walks the stages by name works for every family.
    """

    def __init__(
        self,
        layers: Sequence[int],
        widths: Sequence[int],
        stem_width: int = 16,
        num_classes: int = 10,
        shortcut: str = "B",
        block_drop_rate: float = 0.0,
        zero_init_residual: bool = False,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths) or len(layers) not in (3, 4):
            raise ValueError(f"need 3 or 4 stages with one width each, got layers={layers}, widths={widths}")
        self.shortcut = check_shortcut(shortcut)
        self.block_drop_rate = block_drop_rate
        self.inplanes = stem_width

        self.conv1 = conv3x3(3, stem_width)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(widths[3], layers[3], stride=2) if len(layers) == 4 else nn.Identity()
        # The last blocks end in a bare addition; normalise and activate once before pooling.
        self.bn = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self._init_head(self.inplanes, num_classes, drop_rate)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        # A pre-activation branch ends in a convolution, not a BN: zeroing that convolution makes each block an
        # identity at the start, as zeroing the last BN does in post-activation ResNets (Goyal et al. 2017,
        # https://arxiv.org/abs/1706.02677). Zeroing bn2 instead would stop its gradient at ReLU(0) forever.
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, PreActBasicBlock):
                    nn.init.zeros_(m.conv2.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != planes:
            if self.shortcut == "A":
                downsample = ZeroPadShortcut(self.inplanes, planes, stride)
            else:
                # No BN after the projection: the next block's pre-activation normalises the sum.
                downsample = conv1x1(self.inplanes, planes, stride)

        layers = [
            PreActBasicBlock(
                self.inplanes,
                planes,
                stride,
                downsample,
                shortcut_from_preact=self.shortcut == "B",
                drop_rate=self.block_drop_rate,
            )
        ]
        self.inplanes = planes
        for _ in range(1, blocks):
            layers.append(PreActBasicBlock(self.inplanes, planes, drop_rate=self.block_drop_rate))
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.conv1(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.bn(x)
        x = self.relu(x)
        return x


def _small_image_cfg(family: str) -> dict[str, Any]:
    return make_cfg(family=family, input_size=(3, 32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD, num_classes=10)


default_cfgs = {f"preact_resnet{depth}": _small_image_cfg("preact-resnet") for depth in (20, 32, 44, 56, 110)}
default_cfgs["resnet44v2"] = _small_image_cfg("preact-resnet")


def _create_preact_resnet(name: str, **kwargs: Any) -> PreActResNet:
    model = PreActResNet(**kwargs)
    model.default_cfg = dict(default_cfgs[name])
    return model


def _cifar_depth(name: str, depth: int, **kwargs: Any) -> PreActResNet:
    n = (depth - 2) // 6
    return _create_preact_resnet(name, layers=(n, n, n), widths=(16, 32, 64), stem_width=16, **kwargs)


@register_model
def preact_resnet20(**kwargs: Any) -> PreActResNet:
    """Pre-activation CIFAR ResNet-20, He et al. 2016 (Identity Mappings); shortcut=B|A."""
    return _cifar_depth("preact_resnet20", 20, **kwargs)


@register_model
def preact_resnet32(**kwargs: Any) -> PreActResNet:
    """Pre-activation CIFAR ResNet-32, He et al. 2016 (Identity Mappings); shortcut=B|A."""
    return _cifar_depth("preact_resnet32", 32, **kwargs)


@register_model
def preact_resnet44(**kwargs: Any) -> PreActResNet:
    """Pre-activation CIFAR ResNet-44, He et al. 2016 (Identity Mappings); shortcut=B|A."""
    return _cifar_depth("preact_resnet44", 44, **kwargs)


@register_model
def preact_resnet56(**kwargs: Any) -> PreActResNet:
    """Pre-activation CIFAR ResNet-56, He et al. 2016 (Identity Mappings); shortcut=B|A."""
    return _cifar_depth("preact_resnet56", 56, **kwargs)


@register_model
def preact_resnet110(**kwargs: Any) -> PreActResNet:
    """Pre-activation CIFAR ResNet-110, He et al. 2016 (Identity Mappings); shortcut=B|A."""
    return _cifar_depth("preact_resnet110", 110, **kwargs)


@register_model
def resnet44v2(**kwargs: Any) -> PreActResNet:
    """4-stage pre-activation ResNet-44V2: widths 32/64/128/256, blocks 7/7/7/3, dropout 0.1 before fc.

    Its original write-up says "about 2.7M parameters"; this stated architecture with basic blocks has about
    5.9M (``resnetlab models`` prints the exact count).
    """
    model_args: dict[str, Any] = dict(layers=(7, 7, 7, 3), widths=(32, 64, 128, 256), stem_width=32, drop_rate=0.1)
    return _create_preact_resnet("resnet44v2", **dict(model_args, **kwargs))
