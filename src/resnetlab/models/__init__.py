"""The model zoo: ImageNet ResNets (torchvision-compatible), small-input and CIFAR ResNets, pre-activation and
wide ResNets, and the simple CNN baseline, all behind one registry and one interface.

    model = create_model("resnet50", num_classes=43, pretrained_path="resnet50-11ad3fa6.pth")
    features = model.forward_features(images)  # (N, 2048, 7, 7) map, for Grad-CAM
    embeddings = model.forward_head(features, pre_logits=True)  # (N, 2048)
    logits = model.forward_head(features)  # (N, 43)
"""

# Importing the model modules registers their models.
from resnetlab.models import cifar_resnet, preact_resnet, resnet, simple_cnn, wide_resnet  # noqa: F401
from resnetlab.models._base import ClassifierModel
from resnetlab.models._complexity import count_macs, count_params, describe_models
from resnetlab.models._factory import create_model
from resnetlab.models._pretrained import guess_architecture, load_state_dict_into, load_weights_file
from resnetlab.models._registry import get_model_default_cfg, list_models, register_model, resolve_model_name

__all__ = [
    "ClassifierModel",
    "count_macs",
    "count_params",
    "create_model",
    "describe_models",
    "get_model_default_cfg",
    "guess_architecture",
    "list_models",
    "load_state_dict_into",
    "load_weights_file",
    "register_model",
    "resolve_model_name",
]
