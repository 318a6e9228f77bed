"""Model registry: build by name, default feature layer, parameter and MAC counts."""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from quest.core.models.mobilenet_v1 import mobilenet_v1
from quest.core.models.mobilenetv2 import MOBILENETV2_SPECS, mobilenetv2
from quest.core.models.resnet_cifar import RESNET_CIFAR_SPECS, resnet_cifar
from quest.core.models.resnet_cifar_v2 import RESNET_V2_SPECS, resnet_v2
from quest.core.models.shufflenet import SHUFFLENET_V1_SPECS, SHUFFLENET_V2_SPECS, shufflenet
from quest.core.models.taps import dummy_forward
from quest.core.models.vgg import VGG_SPECS, vgg9, vgg_bn
from quest.core.models.wrn import WRN_SPECS, wide_resnet
from quest.infra.errors import QuestError


def _torchvision(name: str, num_classes: int) -> nn.Module:
    """Build an untrained torchvision ImageNet model with `num_classes` outputs."""
    # imported here: torchvision costs ~1.7 s at start-up, and every pipeline stage is a process
    from torchvision import models as tvm

    factory: Callable[..., nn.Module] = getattr(tvm, name)
    model = factory(weights=None, num_classes=num_classes)
    # in-place activations would rewrite the outputs of the BN layers before them, which a
    # feature tap may be holding; the results are identical either way
    for m in model.modules():
        if isinstance(m, nn.ReLU | nn.ReLU6):
            m.inplace = False
    return model


_TORCHVISION_LAYERS = {
    "resnet18": "layer4",
    "resnet34": "layer4",
    "resnet50": "layer4",
    "mobilenet_v2": "features",
}

# name -> (family, builder, default feature layer)
_REGISTRY: dict[str, tuple[str, Callable[[str, int], nn.Module], str]] = {
    # RepDistiller's blocks end in a ReLU, so a stage's output is already post-activation
    **{n: ("resnet_cifar", resnet_cifar, "layer3") for n in RESNET_CIFAR_SPECS},
    # RepDistiller's CIFAR ResNet50 (resnetv2.py): four bottleneck stages, post-ReLU outputs
    **{n: ("resnet_cifar_v2", resnet_v2, "layer4") for n in RESNET_V2_SPECS},
    # pre-activation WRN: the last stage is only activated by the final bn1 + relu
    **{n: ("wrn", wide_resnet, "relu") for n in WRN_SPECS},
    **{n: ("vgg", vgg_bn, "relu4") for n in VGG_SPECS},
    # RepDistiller's mobile_half; the official QuEST configs tap conv2 (1x1 conv-BN-ReLU, 1280
    # channels), which is post-ReLU as the ReLU sits inside it
    **{n: ("mobilenetv2", mobilenetv2, "conv2") for n in MOBILENETV2_SPECS},
    # ShuffleV1 has no head conv: its last stage (post-ReLU) is what QuEST's configs tap;
    # ShuffleV2's is the ReLU after its 1x1 head conv2 (QuEST's relu2)
    **{n: ("shufflenet", shufflenet, "layer3") for n in SHUFFLENET_V1_SPECS},
    **{n: ("shufflenet", shufflenet, "relu2") for n in SHUFFLENET_V2_SPECS},
    **{n: ("torchvision", _torchvision, layer) for n, layer in _TORCHVISION_LAYERS.items()},
    # the official QuEST's own 224-pixel students. VGG9 (transfer configs): the max-pool after
    # its fifth block, which the configs tap as '28' (post-ReLU, 512x7x7); MobileNet-V1
    # (RN50_MNv2): its features, ending in a ReLU (1024x7x7)
    "vgg9": ("vgg_imagenet", vgg9, "features.28"),
    "mobilenet_v1": ("mobilenet_v1", mobilenet_v1, "features"),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _lookup(name: str) -> tuple[str, Callable[[str, int], nn.Module], str]:
    """Return the registry entry for `name` or raise a one-line QuestError."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), MODEL_NAMES, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise QuestError(
            f"unknown architecture {name!r}{hint}: choose one of {', '.join(MODEL_NAMES)} "
            "(check the arch setting)"
        ) from None


def model_family(name: str) -> str:
    """Return the family of a zoo model: resnet_cifar, resnet_cifar_v2, wrn, vgg, mobilenetv2,
    shufflenet, torchvision, vgg_imagenet or mobilenet_v1."""
    return _lookup(name)[0]


def build_model(name: str, num_classes: int) -> nn.Module:
    """Build the zoo model `name` with freshly initialised weights and `num_classes` outputs."""
    _, builder, _ = _lookup(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise QuestError(
            f"num_classes must be a positive integer, got {num_classes!r} "
            "(check the num_classes setting)"
        )
    model = builder(name, num_classes)
    # lets error messages about layers name the architecture; not part of the state_dict
    model.quest_arch = name
    return model


# The outputs RepDistiller's CIFAR models return as features, in order, without the final pooled
# vector: [stem, stage 1, stage 2, ...]. FitNets' hint_layer indexes it, and attention transfer
# takes every entry but the stem (RepDistiller's feat[1:-1]).
_FEATURE_STAGES = {
    "resnet_cifar": ("relu", "layer1", "layer2", "layer3"),
    "resnet_cifar_v2": ("relu", "layer1", "layer2", "layer3", "layer4"),
    "wrn": ("conv1", "block1", "block2", "block3"),
    "vgg": ("relu0", "relu1", "relu2", "relu3", "relu4"),
    # RepDistiller's MobileNetV2 takes the stem and the outputs of stages 1, 2, 4 and 6 (of 0-6);
    # the stages end in a BN (linear bottleneck), so those four maps are not rectified
    "mobilenetv2": ("conv1", "blocks.1", "blocks.2", "blocks.4", "blocks.6"),
    # both ShuffleNets: the stem's ReLU, then each stage's post-ReLU output
    "shufflenet": ("relu1", "layer1", "layer2", "layer3"),
    # VGG9 as RepDistiller's VGGs: each block's last ReLU, before its max-pool
    "vgg_imagenet": ("features.2", "features.6", "features.13", "features.20", "features.27"),
    # the stem, then the four post-ReLU maps mdistiller's MobileNetV1 returns as its features
    # (blocks 3, 5, 11 and 13: 128, 256, 512 and 1024 channels)
    "mobilenet_v1": ("features.0", "features.3", "features.5", "features.11", "features.13"),
}
_TORCHVISION_STAGES = ("relu", "layer1", "layer2", "layer3", "layer4")


def feature_stages(name: str) -> tuple[str, ...]:
    """The model's stage outputs as RepDistiller's feature list orders them (stem first)."""
    family = model_family(name)
    if family in _FEATURE_STAGES:
        return _FEATURE_STAGES[family]
    if family == "torchvision" and name.startswith("resnet"):
        return _TORCHVISION_STAGES
    raise QuestError(f"{name} has no stage list for feature-based distillation (fitnet, at): "
                     "use a CIFAR model (resnet, wrn, vgg, mobilenetv2_half, shufflev1, "
                     "shufflev2), a torchvision resnet, vgg9 or mobilenet_v1")


def default_feature_layer(name: str) -> str:
    """Return the module whose output is the model's last conv stage after its activation."""
    return _lookup(name)[2]


def count_parameters(model: nn.Module) -> int:
    """Return the number of parameters (trainable or not), counting shared ones once."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Return multiply-accumulates per image of all Conv2d and Linear layers (bias excluded)."""
    total = 0

    def conv_hook(m: nn.Module, _inp: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.Conv2d)
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += out[0].numel() * k

    def linear_hook(m: nn.Module, _inp: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.Linear)
        total += out[0].numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    try:
        dummy_forward(model, input_size)
    finally:
        for h in handles:
            h.remove()
    return total


def model_summary() -> list[dict[str, object]]:
    """Return one row per zoo model: name, family, feature_layer, params_10, params_100."""
    rows: list[dict[str, object]] = []
    for name in MODEL_NAMES:
        family, builder, layer = _REGISTRY[name]
        row: dict[str, object] = {"name": name, "family": family, "feature_layer": layer}
        for classes in (10, 100):
            # meta tensors: shapes only, no memory or init cost, so listing the zoo is instant
            with torch.device("meta"):
                row[f"params_{classes}"] = count_parameters(builder(name, classes))
        rows.append(row)
    return rows
