"""``create_model``: registry lookup, model options, and pretrained weights in one call."""

from __future__ import annotations

import os
import re
from typing import Any

from torch import nn

from resnetlab.errors import ConfigError
from resnetlab.models import _registry
from resnetlab.models._pretrained import download_torchvision_state_dict, load_state_dict_into, load_weights_file


def create_model(
    name: str,
    num_classes: int,
    *,
    drop_rate: float | None = None,
    pretrained: bool = False,
    pretrained_path: str | os.PathLike[str] | None = None,
    zero_init_residual: bool = False,
    progress: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered model ``name`` (case-insensitive, '-' = '_') with ``num_classes`` outputs.

    drop_rate: dropout before the final linear layer; None keeps the model's own default (0.1 for resnet44v2,
        0.5 for simple_cnn, 0.0 otherwise).
    pretrained: start from torchvision's ImageNet weights (ImageNet ResNets and their ``_small`` variants, whose
        differently shaped stem conv1 is skipped with a warning); the classifier is re-initialised when
        ``num_classes != 1000``. Needs internet access or the file in the torch hub cache.
    pretrained_path: start from a local weights file instead (raw state dict or a dict with 'model'/'state_dict').
    zero_init_residual: zero the last BN (last conv for pre-activation nets) of every residual branch.
    kwargs: model options, e.g. ``shortcut="B"`` for the CIFAR ResNets, ``block_drop_rate`` for pre-activation nets.
    """
    model_name = _registry.resolve_model_name(name)
    cfg = _registry.get_model_default_cfg(model_name)
    if pretrained and pretrained_path is not None:
        raise ConfigError("set either model.pretrained=true or model.pretrained_path=FILE, not both")
    if pretrained and cfg["weights"] is None:
        raise ConfigError(
            f"model {model_name} has no downloadable pretrained weights (only the ImageNet ResNets and their "
            f"_small variants do); pass model.pretrained_path=FILE for a local weights file"
        )

    model_kwargs = dict(kwargs, num_classes=num_classes)
    if drop_rate is not None:
        model_kwargs["drop_rate"] = drop_rate
    if zero_init_residual:
        model_kwargs["zero_init_residual"] = True
    try:
        model = _registry.model_entrypoint(model_name)(**model_kwargs)
    except TypeError as err:
        # A misspelt or foreign option (shortcut= for resnet50) is the user's error, not a bug.
        option = re.search(r"keyword argument '(\w+)'", str(err))
        if option is None:
            raise
        name_of_option = option.group(1)
        raise ConfigError(f"model {model_name} has no option {name_of_option!r}; remove model.{name_of_option}") from err

    # The small-input ResNets share every layer with the ImageNet ones except the stem.
    skip_mismatched = ("conv1.weight",) if cfg["family"] == "resnet-small" else ()
    if pretrained:
        state_dict = download_torchvision_state_dict(cfg["weights"], progress=progress)
        load_state_dict_into(
            model,
            state_dict,
            model_name=model_name,
            source=f"torchvision weights {cfg['weights']}",
            skip_mismatched=skip_mismatched,
        )
    elif pretrained_path is not None:
        state_dict = load_weights_file(pretrained_path)
        load_state_dict_into(
            model,
            state_dict,
            model_name=model_name,
            source=f"weights file {os.fspath(pretrained_path)}",
            skip_mismatched=skip_mismatched,
        )
    return model
