"""What every resnetlab model shares: the classifier head and the default-config record.

Every model has the timm interface (``forward_features``, ``forward_head``, ``reset_classifier``), so fine-tuning,
embeddings and Grad-CAM need no per-model code:

- ``forward_features(x)`` returns the last feature *map* (N, num_features, h, w), before pooling: Grad-CAM hooks it.
- ``forward_head(x, pre_logits=False)`` global-average-pools, applies the head dropout, then the linear layer ``fc``;
  with ``pre_logits=True`` it returns the pooled embedding (N, num_features) before dropout.
- ``forward(x) == forward_head(forward_features(x))``.
"""

from typing import Any

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per-channel mean and standard deviation of the CIFAR-10 training images (pixels in [0, 1]). The often copied
# std (0.2023, 0.1994, 0.2010) is the mean of per-image stds, not the dataset std; these are the dataset std.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def make_cfg(
    *,
    family: str,
    input_size: tuple[int, int, int],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    num_classes: int,
    interpolation: str = "bilinear",
    crop_pct: float = 1.0,
    weights: str | None = None,
) -> dict[str, Any]:
    """The preprocessing a model expects, as plain data (timm's ``default_cfg``).

    ``crop_pct`` is crop size / resize size for evaluation (224/256 = 0.875 for torchvision's V1 ImageNet weights);
    ``weights`` names the torchvision weights enum (``"ResNet50_Weights.IMAGENET1K_V2"``) that ``pretrained=True``
    downloads, or None when the model has no downloadable weights.
    """
    return {
        "family": family,
        "input_size": tuple(input_size),
        "mean": tuple(mean),
        "std": tuple(std),
        "interpolation": interpolation,
        "crop_pct": crop_pct,
        "num_classes": num_classes,
        "weights": weights,
        "first_conv": "conv1",
        "classifier": "fc",
    }


def make_classifier(num_features: int, num_classes: int) -> nn.Module:
    """The final linear layer; ``num_classes=0`` gives an identity, so the model outputs embeddings (as timm)."""
    return nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()


class ClassifierModel(nn.Module):
    """Base class: subclasses build their trunk, call :meth:`_init_head` last and define ``forward_features``.

    The head modules are named ``avgpool`` and ``fc`` as in torchvision, and dropout has no parameters, so an
    ImageNet ResNet's state dict stays key-for-key identical to torchvision's.

    Attributes: ``num_classes``, ``num_features`` (width of the pooled embedding), ``drop_rate`` (head dropout)
    and ``default_cfg`` (set by the model's builder, see :func:`make_cfg`). They are not declared as class
    annotations because TorchScript would read those as attribute types.
    """

    def _init_head(self, num_features: int, num_classes: int, drop_rate: float) -> None:
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.num_features = num_features
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = make_classifier(num_features, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        if pre_logits:
            return x
        x = self.head_drop(x)
        x = self.fc(x)
        return x

    def reset_classifier(self, num_classes: int) -> None:
        """Replace ``fc`` by a freshly initialised layer with ``num_classes`` outputs (0: no classifier)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        reference = next(self.parameters())  # keep the new layer on the model's device and dtype
        self.fc = make_classifier(self.num_features, num_classes).to(reference.device, reference.dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x
