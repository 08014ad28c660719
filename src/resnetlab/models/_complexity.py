"""Model size and cost: parameter counts and multiply-accumulates (MACs) of one forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from resnetlab.models import _registry


def count_params(model: nn.Module) -> int:
    """All parameters, trainable or not."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass of a single (C, H, W) image, over Conv2d and Linear layers.

    The usual convention (torchvision's "GFLOPS" column counts the same): each output element of a convolution
    costs in_channels / groups * kh * kw MACs, of a linear layer in_features MACs; BN, activations, pooling and
    additions are left out. Counted with forward hooks on an eager ``nn.Module`` in eval mode, on the model's
    device (use the meta device to count without computing anything).
    """
    macs = 0

    def conv_hook(module: nn.Conv2d, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal macs
        kernel_h, kernel_w = module.kernel_size
        macs += output.numel() * (module.in_channels // module.groups) * kernel_h * kernel_w

    def linear_hook(module: nn.Linear, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal macs
        macs += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None else torch.float32
    was_training = model.training
    # Eval mode: BatchNorm in training mode refuses a batch of one image with a 1x1 map.
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return macs


def describe_models(names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One record per model for ``resnetlab models``: size and cost at the default input and class count.

    Keys: name, family, description, params, macs, gmacs, input_size [C, H, W], num_classes (the count the
    parameters are given for: 1000 for the ImageNet families, 10 otherwise), pretrained (downloadable weights).
    Models are built on the meta device, so listing all of them takes well under a second per model.
    """
    records = []
    for name in names if names is not None else _registry.list_models():
        model_name = _registry.resolve_model_name(name)
        cfg = _registry.get_model_default_cfg(model_name)
        with torch.device("meta"):
            model = _registry.model_entrypoint(model_name)(num_classes=cfg["num_classes"])
        macs = count_macs(model, cfg["input_size"])
        records.append(
            {
                "name": model_name,
                "family": cfg["family"],
                "description": _registry.get_model_description(model_name),
                "params": count_params(model),
                "macs": macs,
                "gmacs": round(macs / 1e9, 4),
                "input_size": list(cfg["input_size"]),
                "num_classes": cfg["num_classes"],
                "pretrained": cfg["weights"] is not None,
            }
        )
    return records
