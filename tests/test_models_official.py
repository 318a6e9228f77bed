"""The official QuEST repository's own 224-pixel students in the zoo: VGG9 (transfer configs
RN34_VGG9_IMG*, feature_extractors/VGG_ImageNet.py) and the depthwise-separable `MobileNet` of
MobileNetV2_ImageNet.py (RN50_MNv2), a MobileNet-V1. Parameter counts and state_dict names are
those the official definitions build (valeoai/QuEST at 02a23d2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quest.core.models import (
    FeatureTap,
    build_model,
    count_macs,
    count_parameters,
    default_feature_layer,
    model_family,
)
from quest.core.models.zoo import feature_stages


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _meta(name: str, classes: int) -> nn.Module:
    with torch.device("meta"):
        return build_model(name, classes)


def _shapes(model: nn.Module, layers: list[str], side: int = 224) -> dict[str, tuple[int, ...]]:
    """Shapes of the tapped outputs for one image (meta tensors: shapes only)."""
    with FeatureTap(model, layers) as tap:
        model.eval()
        with torch.no_grad():
            model(torch.empty(1, 3, side, side, device="meta"))
        return {n: tuple(t.shape[1:]) for n, t in tap.outputs.items()}


@pytest.mark.parametrize(
    ("name", "classes", "params"),
    [
        # what the official create_model builds: VGG_ImageNet.create_model({'num_classes': c})
        # and MobileNetV2_ImageNet.MobileNet() (always 1,000 classes there; torchvision's
        # mobilenet_v2, which the ImageNet preset used to train, has 3,504,872)
        ("vgg9", 67, 9_260_355),
        ("vgg9", 1000, 9_738_984),
        ("vgg9", 100, 9_277_284),
        ("mobilenet_v1", 1000, 4_231_976),
    ],
)
def test_parameter_counts_match_the_official_definitions(name: str, classes: int,
                                                         params: int) -> None:
    assert count_parameters(build_model(name, classes)) == params


def test_registry_entries() -> None:
    assert (model_family("vgg9"), model_family("mobilenet_v1")) == ("vgg_imagenet",
                                                                     "mobilenet_v1")
    assert default_feature_layer("vgg9") == "features.28"
    assert default_feature_layer("mobilenet_v1") == "features"
    # the meta-device count model_summary uses is the real one
    assert count_parameters(_meta("mobilenet_v1", 1000)) == 4_231_976


def test_state_dict_keys_are_the_official_ones() -> None:
    vgg = build_model("vgg9", 67).state_dict()
    convs = [k for k in vgg if k.endswith("weight") and vgg[k].dim() == 4]
    # conv layers at the official Sequential indices of cfg "vgg9" (BN at +1, ReLU at +2)
    assert convs == [f"features.{i}.weight" for i in (0, 4, 8, 11, 15, 18, 22, 25)]
    assert "features.26.running_var" in vgg and vgg["classifier.2.weight"].shape == (67, 512)
    assert sum(1 for k in vgg if k.startswith("classifier")) == 2  # only the linear layer
    mob = build_model("mobilenet_v1", 1000).state_dict()
    assert mob["features.0.0.weight"].shape == (32, 3, 3, 3)
    # a depthwise 3x3 then a pointwise 1x1 in every block after the stem
    assert mob["features.1.0.weight"].shape == (32, 1, 3, 3)
    assert mob["features.1.3.weight"].shape == (64, 32, 1, 1)
    assert mob["features.13.3.weight"].shape == (1024, 1024, 1, 1)
    assert mob["classifier.2.weight"].shape == (1000, 1024)
    assert not any(k.endswith(".bias") and "classifier" not in k and "features" in k
                   and mob[k].dim() == 1 and k.replace("bias", "running_mean") not in mob
                   for k in mob)  # convs have no bias: every features bias is a BN's


def test_vgg9_official_taps_21_and_28() -> None:
    # the transfer configs' extract_from ['21', '28']: the max-pools after blocks 4 and 5
    model = _meta("vgg9", 67)
    modules = dict(model.named_modules())
    assert isinstance(modules["features.21"], nn.MaxPool2d)
    assert isinstance(modules["features.28"], nn.MaxPool2d)
    assert isinstance(modules["features.20"], nn.ReLU) and isinstance(modules["features.27"],
                                                                      nn.ReLU)
    assert _shapes(model, ["features.21", "features.28"]) == {
        "features.21": (512, 14, 14), "features.28": (512, 7, 7)}


def test_vgg9_taps_are_post_relu_and_keep_the_graph() -> None:
    model = build_model("vgg9", 67).train()
    with FeatureTap(model, ["features.21", "features.28", "features.26"]) as tap:
        logits = model(torch.randn(2, 3, 32, 32))
        pre = tap["features.26"]  # the last BN: train-mode BN has negative values
        assert pre.min().item() < 0.0
        for name in ("features.21", "features.28"):
            assert tap[name].min().item() >= 0.0 and (tap[name] > 0).any()
        tap["features.21"].square().mean().backward()
    assert logits.shape == (2, 67)
    assert model.features[0].weight.grad is not None
    assert model.features[22].weight.grad is None  # block 5 comes after tap 21


def test_mobilenet_v1_features_tap() -> None:
    model = build_model("mobilenet_v1", 1000).train()
    with FeatureTap(model, ["features", "features.13.4"]) as tap:
        logits = model(torch.randn(2, 3, 64, 64))
        feat = tap["features"]
        assert tap["features.13.4"].min().item() < 0.0  # the BN before the last ReLU
    assert logits.shape == (2, 1000)
    assert feat.shape == (2, 1024, 2, 2) and feat.min().item() >= 0.0
    assert _shapes(_meta("mobilenet_v1", 1000), ["features"]) == {"features": (1024, 7, 7)}
    # no ReLU in place: a tap on a BN output must stay intact
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_feature_stages_resolve_with_expected_shapes() -> None:
    vgg = feature_stages("vgg9")
    assert _shapes(_meta("vgg9", 10), list(vgg)) == {
        "features.2": (64, 224, 224), "features.6": (128, 112, 112),
        "features.13": (256, 56, 56), "features.20": (512, 28, 28),
        "features.27": (512, 14, 14)}
    mob = feature_stages("mobilenet_v1")
    # mdistiller's MobileNetV1 feats: 128x56x56, 256x28x28, 512x14x14, 1024x7x7 (post-ReLU)
    assert _shapes(_meta("mobilenet_v1", 10), list(mob)) == {
        "features.0": (32, 112, 112), "features.3": (128, 56, 56),
        "features.5": (256, 28, 28), "features.11": (512, 14, 14),
        "features.13": (1024, 7, 7)}


def test_macs_at_224() -> None:
    # MobileNet-V1 at 224: the paper's 569M mult-adds
    assert 568e6 < count_macs(_meta("mobilenet_v1", 1000), (3, 224, 224)) < 570e6
    # VGG9, by hand: its eight 3x3 convs and the linear layer
    convs = [(3, 64, 224), (64, 128, 112), (128, 256, 56), (256, 256, 56), (256, 512, 28),
             (512, 512, 28), (512, 512, 14), (512, 512, 14)]
    by_hand = sum(c_in * c_out * 9 * side * side for c_in, c_out, side in convs) + 512 * 67
    assert count_macs(_meta("vgg9", 67), (3, 224, 224)) == by_hand


def test_vgg9_init_is_the_official_fan_out_init() -> None:
    model = build_model("vgg9", 67)
    conv = model.features[25]
    expected = (2.0 / (3 * 3 * 512)) ** 0.5
    assert abs(conv.weight.std().item() - expected) / expected < 0.02
    assert conv.bias.abs().sum().item() == 0.0
    fc = model.classifier[2]
    assert abs(fc.weight.std().item() - 0.01) < 0.001 and fc.bias.abs().sum().item() == 0.0
