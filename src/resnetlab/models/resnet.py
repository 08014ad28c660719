"""ImageNet-style ResNets (v1.5, as torchvision) and their small-input variants.

The ImageNet models reproduce torchvision's ``models/resnet.py`` module for module: same attribute names, same
shapes, same initialisation, so torchvision's ImageNet weights load into them and their state dicts load into
torchvision's models. They add only parameter-free modules (the head dropout), which do not appear in state dicts.

Paper: "Deep Residual Learning for Image Recognition", He et al. 2016, https://arxiv.org/abs/1512.03385
"""

from collections.abc import Sequence
from typing import Any

import torch.nn as nn
from torch import Tensor
from torchvision.models import get_weight

from resnetlab.models._base import IMAGENET_MEAN, IMAGENET_STD, ClassifierModel, make_cfg
from resnetlab.models._registry import register_model

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "conv1x1", "conv3x3"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding; no bias because a BatchNorm follows."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution; no bias because a BatchNorm follows."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34 and the CIFAR ResNets)."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        # Both self.conv1 and self.downsample downsample the input when stride != 1.
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (ResNet-50/101/152).

    The stride sits on the 3x3 convolution (conv2), not on the first 1x1 as in the paper: this "ResNet v1.5" is
    what torchvision ships and is about 0.5% more accurate on ImageNet
    (https://catalog.ngc.nvidia.com/orgs/nvidia/resources/resnet_50_v1_5_for_pytorch).
    """

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        width = planes
        # Both self.conv2 and self.downsample downsample the input when stride != 1.
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)
        return out


class ResNet(ClassifierModel):
    """ResNet with four stages of 64/128/256/512 planes.

    ``small_input=True`` replaces the 7x7 stride-2 stem and the max-pool by one 3x3 stride-1 convolution, for
    32 to 64 px inputs: the ImageNet stem would shrink a 32 px image to 8 px before the first stage and to 1 px
    at the last. This is the CIFAR variant used by SimCLR (Chen et al. 2020, appendix B.9,
    https://arxiv.org/abs/2002.05709). Every other layer keeps torchvision's names and shapes.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        small_input: bool = False,
        zero_init_residual: bool = False,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.inplanes = 64
        if small_input:
            self.conv1 = conv3x3(3, self.inplanes)
        else:
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        # Identity has no parameters, so the small variant's state dict differs from torchvision's only in conv1.
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self._init_head(512 * block.expansion, num_classes, drop_rate)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        # Zero-initialize the last BN in each residual branch,
        # so that the residual branch starts with zeros, and each residual block behaves like an identity.
        # This improves the model by 0.2~0.3% according to https://arxiv.org/abs/1706.02677
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            # Projection shortcut (option B of the paper) wherever the shape changes.
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )

        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return x


def _imagenet_cfg(weights_name: str, small_input: bool = False) -> dict[str, Any]:
    """Default config from the torchvision weights' own evaluation preset (resize, crop, mean, std)."""
    if small_input:
        # ImageNet mean/std even at 32 px: the ImageNet weights these variants can start from expect them.
        return make_cfg(
            family="resnet-small",
            input_size=(3, 32, 32),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            num_classes=1000,
            weights=weights_name,
        )
    preset = get_weight(weights_name).transforms()
    crop, resize = preset.crop_size[0], preset.resize_size[0]
    return make_cfg(
        family="resnet",
        input_size=(3, crop, crop),
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        interpolation=preset.interpolation.value,
        crop_pct=round(crop / resize, 4),
        num_classes=1000,
        weights=weights_name,
    )


# torchvision's best ImageNet weights per depth (ResNet-18/34 only have V1).
_WEIGHTS = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V2",
    "resnet101": "ResNet101_Weights.IMAGENET1K_V2",
    "resnet152": "ResNet152_Weights.IMAGENET1K_V2",
}

default_cfgs: dict[str, dict[str, Any]] = {}
for _name, _weights in _WEIGHTS.items():
    default_cfgs[_name] = _imagenet_cfg(_weights)
    default_cfgs[f"{_name}_small"] = _imagenet_cfg(_weights, small_input=True)
del _name, _weights


def _create_resnet(name: str, **kwargs: Any) -> ResNet:
    model = ResNet(**kwargs)
    model.default_cfg = dict(default_cfgs[name])
    return model


@register_model
def resnet18(**kwargs: Any) -> ResNet:
    """ResNet-18 (BasicBlock 2-2-2-2), torchvision-compatible, 224 px."""
    return _create_resnet("resnet18", block=BasicBlock, layers=(2, 2, 2, 2), **kwargs)


@register_model
def resnet34(**kwargs: Any) -> ResNet:
    """ResNet-34 (BasicBlock 3-4-6-3), torchvision-compatible, 224 px."""
    return _create_resnet("resnet34", block=BasicBlock, layers=(3, 4, 6, 3), **kwargs)


@register_model
def resnet50(**kwargs: Any) -> ResNet:
    """ResNet-50 v1.5 (Bottleneck 3-4-6-3), torchvision-compatible, 224 px."""
    return _create_resnet("resnet50", block=Bottleneck, layers=(3, 4, 6, 3), **kwargs)


@register_model
def resnet101(**kwargs: Any) -> ResNet:
    """ResNet-101 v1.5 (Bottleneck 3-4-23-3), torchvision-compatible, 224 px."""
    return _create_resnet("resnet101", block=Bottleneck, layers=(3, 4, 23, 3), **kwargs)


@register_model
def resnet152(**kwargs: Any) -> ResNet:
    """ResNet-152 v1.5 (Bottleneck 3-8-36-3), torchvision-compatible, 224 px."""
    return _create_resnet("resnet152", block=Bottleneck, layers=(3, 8, 36, 3), **kwargs)


@register_model
def resnet18_small(**kwargs: Any) -> ResNet:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 32-64 px inputs."""
    return _create_resnet("resnet18_small", block=BasicBlock, layers=(2, 2, 2, 2), small_input=True, **kwargs)


@register_model
def resnet34_small(**kwargs: Any) -> ResNet:
    """ResNet-34 with a 3x3 stride-1 stem and no max-pool, for 32-64 px inputs."""
    return _create_resnet("resnet34_small", block=BasicBlock, layers=(3, 4, 6, 3), small_input=True, **kwargs)


@register_model
def resnet50_small(**kwargs: Any) -> ResNet:
    """ResNet-50 v1.5 with a 3x3 stride-1 stem and no max-pool, for 32-64 px inputs."""
    return _create_resnet("resnet50_small", block=Bottleneck, layers=(3, 4, 6, 3), small_input=True, **kwargs)


@register_model
def resnet101_small(**kwargs: Any) -> ResNet:
    """ResNet-101 v1.5 with a 3x3 stride-1 stem and no max-pool, for 32-64 px inputs."""
    return _create_resnet("resnet101_small", block=Bottleneck, layers=(3, 4, 23, 3), small_input=True, **kwargs)


@register_model
def resnet152_small(**kwargs: Any) -> ResNet:
    """ResNet-152 v1.5 with a 3x3 stride-1 stem and no max-pool, for 32-64 px inputs."""
    return _create_resnet("resnet152_small", block=Bottleneck, layers=(3, 8, 36, 3), small_input=True, **kwargs)
