"""The three-convolution baseline that students start from, with the common model interface.

conv3x3(32) -> ReLU -> max-pool -> dropout, the same with 64 and 128 filters, then flatten -> dense(128) -> ReLU ->
dropout(0.5) -> linear. Convolutions are 'same'-padded (the Keras ``padding="same"`` habit), so a 32 px image
gives a 128 x 4 x 4 map; the dropout after each pooling is 0.25, the usual value in those notebooks.
"""

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from resnetlab.errors import ConfigError
from resnetlab.models._base import CIFAR10_MEAN, CIFAR10_STD, ClassifierModel, make_cfg
from resnetlab.models._registry import register_model

__all__ = ["SimpleCNN"]


class SimpleCNN(ClassifierModel):
    """Three conv blocks and a two-layer classifier; ``num_features`` is the 128-unit dense layer."""

    def __init__(
        self,
        num_classes: int = 10,
        drop_rate: float = 0.5,
        feature_drop_rate: float = 0.25,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if zero_init_residual:
            raise ConfigError("model simple_cnn has no residual branches; remove model.zero_init_residual")
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3, padding=1)
        self.pool1 = nn.MaxPool2d(2)
        self.drop1 = nn.Dropout(feature_drop_rate)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.pool2 = nn.MaxPool2d(2)
        self.drop2 = nn.Dropout(feature_drop_rate)
        self.conv3 = nn.Conv2d(64, 128, kernel_size=3, padding=1)
        self.pool3 = nn.MaxPool2d(2)
        self.drop3 = nn.Dropout(feature_drop_rate)
        self.relu = nn.ReLU(inplace=True)

        self._init_head(128, num_classes, drop_rate)
        # The baseline flattens its 4x4 map into the dense layer. Adaptive pooling to 4x4 is the identity at the
        # 32 px default and lets the same weights run on other input sizes.
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.dense = nn.Linear(128 * 4 * 4, 128)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.relu(x)
        x = self.pool1(x)
        x = self.drop1(x)

        x = self.conv2(x)
        x = self.relu(x)
        x = self.pool2(x)
        x = self.drop2(x)

        x = self.conv3(x)
        x = self.relu(x)
        x = self.pool3(x)
        x = self.drop3(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.dense(x)
        x = self.relu(x)
        if pre_logits:
            return x
        x = self.head_drop(x)
        x = self.fc(x)
        return x


default_cfgs = {
    "simple_cnn": make_cfg(
        family="simple-cnn", input_size=(3, 32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD, num_classes=10
    )
}


@register_model
def simple_cnn(**kwargs: Any) -> SimpleCNN:
    """Baseline CNN: 3 conv blocks (32/64/128, max-pool + dropout 0.25 each), dense 128, dropout 0.5."""
    model = SimpleCNN(**kwargs)
    model.default_cfg = dict(default_cfgs["simple_cnn"])
    return model
