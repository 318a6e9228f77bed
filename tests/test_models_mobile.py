"""Tests for RepDistiller's CIFAR MobileNetV2 (mobile_half) and ShuffleNet V1/V2 in the zoo."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quest.core.methods import MethodContext, get, resolve_settings
from quest.core.models import (
    MODEL_NAMES,
    FeatureTap,
    build_model,
    count_parameters,
    default_feature_layer,
    model_family,
    model_summary,
)
from quest.core.models.shufflenet import ChannelShuffle
from quest.core.models.zoo import feature_stages
from quest.infra.config import StudentConfig
from quest.infra.errors import QuestError

NEW = ("mobilenetv2_half", "shufflev1", "shufflev2")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _meta_model(name: str, classes: int) -> nn.Module:
    with torch.device("meta"):
        return build_model(name, classes)


def test_registered_with_family_default_layer_and_stages() -> None:
    assert set(NEW) <= set(MODEL_NAMES)
    assert [model_family(n) for n in NEW] == ["mobilenetv2", "shufflenet", "shufflenet"]
    # the maps the official QuEST configs tap: extract_from conv2 (RN50_MNv2, VGG13_MNv2),
    # layer3 (RN32x4_SNv1, WRN40w2_SNv1), relu2 (RN32x4_SNv2)
    assert [default_feature_layer(n) for n in NEW] == ["conv2", "layer3", "relu2"]
    assert feature_stages("mobilenetv2_half") == (
        "conv1", "blocks.1", "blocks.2", "blocks.4", "blocks.6")
    assert feature_stages("shufflev1") == feature_stages("shufflev2") == (
        "relu1", "layer1", "layer2", "layer3")


@pytest.mark.parametrize(
    ("name", "classes", "params"),
    [
        # what RepDistiller's own definitions build
        ("mobilenetv2_half", 100, 812_836),
        ("mobilenetv2_half", 10, 697_546),
        ("shufflev1", 100, 949_258),
        ("shufflev1", 10, 862_768),
        ("shufflev2", 100, 1_355_528),
        ("shufflev2", 10, 1_263_278),
    ],
)
def test_parameter_counts_match_repdistiller(name: str, classes: int, params: int) -> None:
    assert count_parameters(_meta_model(name, classes)) == params


@pytest.mark.slow
def test_model_summary_rows() -> None:
    rows = {r["name"]: r for r in model_summary()}
    assert rows["mobilenetv2_half"]["params_100"] == 812_836
    assert rows["shufflev1"]["params_10"] == 862_768
    assert rows["shufflev2"]["feature_layer"] == "relu2"
    assert rows["shufflev2"]["params_100"] == count_parameters(build_model("shufflev2", 100))


def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{k}" for k in
            ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def _expected_mobilenet_keys() -> set[str]:
    """Keys of RepDistiller's MobileNetV2: conv1 / conv2 are Sequential(conv, bn, relu); each
    InvertedResidual's `conv` is (conv, bn, relu, dw conv, bn, relu, conv, bn)."""
    keys = ["conv1.0.weight", *_bn("conv1.1"), "conv2.0.weight", *_bn("conv2.1"),
            "classifier.0.weight", "classifier.0.bias"]
    for stage, blocks in enumerate((1, 2, 3, 4, 3, 3, 1)):
        for b in range(blocks):
            p = f"blocks.{stage}.{b}.conv"
            for conv, bn in ((0, 1), (3, 4), (6, 7)):
                keys += [f"{p}.{conv}.weight", *_bn(f"{p}.{bn}")]
    return set(keys)


def _expected_shufflenet_keys(v2: bool) -> set[str]:
    """Keys of RepDistiller's ShuffleNets: stem conv1/bn1, layerN.i units with convK/bnK (v1:
    K = 1-3; v2: a down block with K = 1-5, then basic blocks with K = 1-3), linear; v2 adds the
    head conv2/bn2."""
    keys = ["conv1.weight", *_bn("bn1"), "linear.weight", "linear.bias"]
    counts = (4, 8, 4) if not v2 else (1 + 3, 1 + 7, 1 + 3)
    for layer, n in enumerate(counts, start=1):
        for i in range(n):
            depth = 5 if v2 and i == 0 else 3
            for k in range(1, depth + 1):
                keys += [f"layer{layer}.{i}.conv{k}.weight", *_bn(f"layer{layer}.{i}.bn{k}")]
    if v2:
        keys += ["conv2.weight", *_bn("bn2")]
    return set(keys)


@pytest.mark.parametrize(
    ("name", "expected", "total"),
    [
        ("mobilenetv2_half", _expected_mobilenet_keys(), 320),
        ("shufflev1", _expected_shufflenet_keys(v2=False), 296),
        ("shufflev2", _expected_shufflenet_keys(v2=True), 338),
    ],
)
def test_state_dict_keys_are_repdistillers(name: str, expected: set[str], total: int) -> None:
    sd = _meta_model(name, 100).state_dict()
    assert len(expected) == total
    assert set(sd) == expected
    # the tap-only modules (ReLUs, preact, pools, shuffles) add nothing
    assert not any(w in k for k in sd for w in ("relu", "preact", "avgpool", "shuffle", "split"))


def test_state_dict_shapes_of_some_repdistiller_tensors() -> None:
    mb = _meta_model("mobilenetv2_half", 100).state_dict()
    assert mb["conv1.0.weight"].shape == (16, 3, 3, 3)
    assert mb["blocks.0.0.conv.0.weight"].shape == (16, 16, 1, 1)  # t=1 still expands
    assert mb["blocks.1.0.conv.3.weight"].shape == (48, 1, 3, 3)  # depthwise, 8 * 6 channels
    assert mb["blocks.6.0.conv.6.weight"].shape == (160, 480, 1, 1)
    assert mb["conv2.0.weight"].shape == (1280, 160, 1, 1)
    assert mb["classifier.0.weight"].shape == (100, 1280)
    v1 = _meta_model("shufflev1", 100).state_dict()
    assert v1["layer1.0.conv1.weight"].shape == (54, 24, 1, 1)  # ungrouped after the stem
    assert v1["layer1.0.conv3.weight"].shape == (216, 18, 1, 1)  # 240 - 24, groups of 3
    assert v1["layer2.0.conv1.weight"].shape == (60, 80, 1, 1)
    assert v1["layer3.3.bn3.running_mean"].shape == (960,)
    assert v1["linear.weight"].shape == (100, 960)
    v2 = _meta_model("shufflev2", 100).state_dict()
    assert v2["layer1.0.conv1.weight"].shape == (24, 1, 3, 3)
    assert v2["layer1.0.conv5.weight"].shape == (58, 58, 1, 1)
    assert v2["layer2.7.conv2.weight"].shape == (116, 1, 3, 3)
    assert v2["conv2.weight"].shape == (1024, 464, 1, 1)
    assert v2["linear.weight"].shape == (100, 1024)


def test_a_saved_state_dict_loads_strictly() -> None:
    for name in NEW:
        src, dst = build_model(name, 100), build_model(name, 100)
        result = dst.load_state_dict(src.state_dict(), strict=True)
        assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("classes", [10, 100])
def test_forward_gives_logits(name: str, classes: int) -> None:
    model = build_model(name, classes).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, classes) and torch.isfinite(out).all()
    assert not any(getattr(m, "inplace", False) for m in model.modules())


_SHAPES = {
    "mobilenetv2_half": {"conv1": (16, 16, 16), "blocks.1": (12, 16, 16),
                         "blocks.2": (16, 8, 8), "blocks.4": (48, 4, 4),
                         "blocks.6": (160, 2, 2), "conv2": (1280, 2, 2)},
    "shufflev1": {"relu1": (24, 32, 32), "layer1": (240, 16, 16), "layer2": (480, 8, 8),
                  "layer3": (960, 4, 4)},
    "shufflev2": {"relu1": (24, 32, 32), "layer1": (116, 16, 16), "layer2": (232, 8, 8),
                  "layer3": (464, 4, 4), "relu2": (1024, 4, 4)},
}


@pytest.mark.parametrize("name", NEW)
def test_stages_and_default_layer_tap_with_expected_shapes(name: str) -> None:
    model = build_model(name, 100).train()
    layers = [*feature_stages(name), default_feature_layer(name)]
    with torch.no_grad(), FeatureTap(model, layers) as tap:
        model(torch.randn(2, 3, 32, 32))
        shapes = {k: tuple(v.shape[1:]) for k, v in tap.outputs.items()}
        default = tap[default_feature_layer(name)]
    assert shapes == _SHAPES[name]
    assert default.min().item() >= 0.0 and (default > 0).any()


def test_mobilenet_default_map_is_the_head_after_its_relu() -> None:
    model = build_model("mobilenetv2_half", 100).train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), FeatureTap(model, ["conv2", "conv2.1", "blocks.6"]) as tap:
        logits = model(x)
        head, pre, last = tap["conv2"], tap["conv2.1"], tap["blocks.6"]
    assert pre.min().item() < 0.0  # the BN output survives: the ReLU is not in place
    torch.testing.assert_close(head, pre.clamp(min=0))
    assert last.min().item() < 0.0  # a linear bottleneck: the stage outputs are not rectified
    # the logits are the classifier of the 2x2-average-pooled head
    torch.testing.assert_close(model.classifier(head.mean(dim=(2, 3))), logits)


@pytest.mark.parametrize("name", ["shufflev1", "shufflev2"])
def test_shufflenet_preactivation_taps(name: str) -> None:
    model = build_model(name, 100).train()
    pre = ["layer1.3.preact", "layer2.7.preact", "layer3.3.preact"]
    with torch.no_grad(), FeatureTap(model, [*pre, "layer1", "layer2", "layer3",
                                             default_feature_layer(name)]) as tap:
        logits = model(torch.randn(2, 3, 32, 32))
        out = tap.outputs
    for p, layer in zip(pre, ("layer1", "layer2", "layer3"), strict=True):
        assert out[p].min().item() < 0.0 and out[layer].min().item() >= 0.0
        post = out[p].clamp(min=0)
        if name == "shufflev2":  # RepDistiller's v2 preact is taken before the channel shuffle
            post = ChannelShuffle(2)(post)
        torch.testing.assert_close(out[layer], post)
    head = out[default_feature_layer(name)]
    torch.testing.assert_close(model.linear(head.mean(dim=(2, 3))), logits)


def test_init_follows_repdistiller() -> None:
    mb = build_model("mobilenetv2_half", 100)
    # RepDistiller's MobileNetV2 init: BN 1 / 0, linear N(0, 0.01) with a zero bias
    assert torch.equal(mb.conv2[1].weight, torch.ones(1280))
    assert torch.equal(mb.classifier[0].bias, torch.zeros(100))
    assert mb.classifier[0].weight.std().item() == pytest.approx(0.01, rel=0.05)
    # conv: N(0, sqrt(2 / (k * k * out_channels)))
    assert mb.conv2[0].weight.std().item() == pytest.approx((2 / 1280) ** 0.5, rel=0.05)
    # the ShuffleNets keep PyTorch's defaults (a uniform, non-zero linear bias)
    assert build_model("shufflev1", 100).linear.bias.abs().sum() > 0


def _ctx(student: str, teacher: str) -> MethodContext:
    torch.manual_seed(0)
    return MethodContext(build_model(student, 10), build_model(teacher, 10),
                         resolve_settings(StudentConfig()),
                         image_shape=(3, 32, 32))


@pytest.mark.parametrize(
    ("name", "hint"), [("mobilenetv2_half", "blocks.2"), ("shufflev1", "layer2"),
                       ("shufflev2", "layer2")])
def test_fitnet_with_a_resnet56_teacher(name: str, hint: str) -> None:
    d = get("fitnet").build(_ctx(name, "resnet56"))
    assert (d.s_layer, d.t_layer) == (hint, "layer2")
    # student 8x8 against the teacher's 16x16: the transposed-conv regressor
    assert isinstance(d.regressor.conv, nn.ConvTranspose2d)
    _, terms = d.forward_train(torch.randn(4, 3, 32, 32), torch.arange(4))
    assert torch.isfinite(terms["hint"]) and terms["hint"].item() > 0


@pytest.mark.parametrize("name", ["shufflev1", "shufflev2"])
def test_at_with_a_resnet56_teacher(name: str) -> None:
    d = get("at").build(_ctx(name, "resnet56"))
    assert d.pairs == [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")]
    _, terms = d.forward_train(torch.randn(4, 3, 32, 32), torch.arange(4))
    assert torch.isfinite(terms["at"]) and terms["at"].item() > 0


def test_at_with_mobilenet_needs_a_four_stage_teacher() -> None:
    # mobile_half has four intermediate stages and resnet56 three: at pairs them one to one
    with pytest.raises(QuestError, match="4 stages and the teacher 3"):
        get("at").build(_ctx("mobilenetv2_half", "resnet56"))
    # vgg (like RepDistiller's vgg13 / resnet50 teachers of this student) has four
    d = get("at").build(_ctx("mobilenetv2_half", "vgg8"))
    assert d.pairs == [("blocks.1", "relu1"), ("blocks.2", "relu2"), ("blocks.4", "relu3"),
                       ("blocks.6", "relu4")]
    _, terms = d.forward_train(torch.randn(4, 3, 32, 32), torch.arange(4))
    assert torch.isfinite(terms["at"]) and terms["at"].item() > 0
