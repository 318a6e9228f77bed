"""Model zoo (RepDistiller CIFAR nets, torchvision ImageNet nets, the official QuEST VGG9 and
MobileNet-V1) and named feature taps."""

from quest.core.models.taps import FeatureTap, list_layers, resolve_layer
from quest.core.models.zoo import (
    MODEL_NAMES,
    build_model,
    count_macs,
    count_parameters,
    default_feature_layer,
    model_family,
    model_summary,
)

__all__ = [
    "MODEL_NAMES",
    "FeatureTap",
    "build_model",
    "count_macs",
    "count_parameters",
    "default_feature_layer",
    "list_layers",
    "model_family",
    "model_summary",
    "resolve_layer",
]
