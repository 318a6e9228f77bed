"""Tests for the model zoo, feature taps and the shared pretrained teacher."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from quest.core.models import (
    MODEL_NAMES,
    FeatureTap,
    build_model,
    count_macs,
    count_parameters,
    default_feature_layer,
    list_layers,
    model_family,
    model_summary,
    resolve_layer,
)
from quest.infra.errors import QuestError

CIFAR_NAMES = [n for n in MODEL_NAMES if model_family(n) != "torchvision"]
TORCHVISION_NAMES = [n for n in MODEL_NAMES if model_family(n) == "torchvision"]


@pytest.fixture(scope="module")
def shared_dir() -> Path:
    """Return the shared data folder (../shared from the repo root, or $QUEST_SHARED_DIR)."""
    env = os.environ.get("QUEST_SHARED_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Make random inputs and initialisations reproducible."""
    torch.manual_seed(0)


def test_zoo_lists_the_required_models() -> None:
    expected = {
        "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
        "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
        "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "resnet50_cifar", "mobilenetv2_half",
        "shufflev1", "shufflev2",
        "resnet18", "resnet34", "resnet50", "mobilenet_v2", "vgg9", "mobilenet_v1",
    }  # fmt: skip
    assert set(MODEL_NAMES) == expected
    assert len(MODEL_NAMES) == len(expected)


@pytest.mark.parametrize(
    ("name", "classes", "params"),
    [
        # RepDistiller's published counts
        ("resnet50_cifar", 100, 23_705_252),
        ("resnet50_cifar", 10, 23_520_842),
        ("vgg16", 100, 14_774_436),
        ("vgg16", 10, 14_728_266),
        ("vgg19", 100, 20_086_692),
        ("vgg19", 10, 20_040_522),
        ("resnet20", 100, 278_324),
        ("resnet56", 100, 861_620),
        ("resnet8x4", 100, 1_233_540),
        ("resnet32x4", 100, 7_433_860),
        ("wrn_16_2", 100, 703_284),
        ("wrn_40_2", 100, 2_255_156),
        ("resnet56", 10, 855_770),
    ],
)
def test_parameter_counts_match_repdistiller(name: str, classes: int, params: int) -> None:
    assert count_parameters(build_model(name, classes)) == params


@pytest.mark.slow
def test_model_summary_agrees_with_built_models() -> None:
    rows = {r["name"]: r for r in model_summary()}
    assert tuple(rows) == MODEL_NAMES
    assert rows["resnet56"]["params_10"] == 855_770
    assert rows["wrn_40_2"]["params_100"] == 2_255_156
    assert rows["vgg8"]["family"] == "vgg"
    assert rows["resnet20"]["feature_layer"] == "layer3"
    # the meta-device shortcut must count exactly what a real build counts
    assert rows["mobilenet_v2"]["params_100"] == count_parameters(build_model("mobilenet_v2", 100))
    assert rows["vgg13"]["params_10"] == count_parameters(build_model("vgg13", 10))


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_cifar_models_forward_to_logits(name: str) -> None:
    model = build_model(name, 7)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_torchvision_models_forward_to_logits(name: str) -> None:
    model = build_model(name, 13)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 13)
    # in-place activations are switched off so taps on BN outputs stay intact
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_resnet_state_dict_uses_repdistiller_key_names() -> None:
    keys = set(build_model("resnet20", 100).state_dict())
    for key in [
        "conv1.weight",
        "bn1.running_mean",
        "bn1.num_batches_tracked",
        "layer1.0.conv1.weight",
        "layer1.2.bn2.running_var",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.running_mean",
        "layer3.0.downsample.0.weight",
        "fc.weight",
        "fc.bias",
    ]:
        assert key in keys
    # no shortcut where shapes match: RepDistiller has none in layer1 of the thin resnets
    assert "layer1.0.downsample.0.weight" not in keys
    # ...but resnet8x4 widens 32 -> 64 in layer1 and so has one there
    assert "layer1.0.downsample.0.weight" in build_model("resnet8x4", 100).state_dict()


def test_wrn_and_vgg_state_dict_key_names() -> None:
    wrn = set(build_model("wrn_16_2", 100).state_dict())
    assert {
        "conv1.weight",
        "block1.layer.0.bn1.weight",
        "block1.layer.0.conv1.weight",
        "block1.layer.0.convShortcut.weight",
        "block2.layer.1.conv2.weight",
        "bn1.running_mean",
        "fc.weight",
    } <= wrn
    assert "block2.layer.1.convShortcut.weight" not in wrn
    vgg = set(build_model("vgg8", 100).state_dict())
    assert {"block0.0.weight", "block0.0.bias", "block0.1.running_var", "classifier.weight"} <= vgg
    # the tap-only ReLU modules must add nothing to the state_dict
    assert not any(k.startswith("relu") for k in vgg)
    vgg13 = set(build_model("vgg13", 100).state_dict())
    assert "block4.3.weight" in vgg13 and "block4.4.running_mean" in vgg13


@pytest.mark.parametrize(
    ("name", "channels"),
    [("resnet20", 64), ("resnet56", 64), ("wrn_16_2", 128), ("resnet8x4", 256)],
)
def test_default_feature_layer_is_post_relu_8x8(name: str, channels: int) -> None:
    model = build_model(name, 100).train()
    layer = default_feature_layer(name)
    # the pre-activation counterpart, to show the post-ReLU check below is not vacuous
    pre = "bn1" if name.startswith("wrn") else "layer3.0.bn2"
    # train mode: BN normalises over the batch, so any pre-ReLU map here has negative values
    with torch.no_grad(), FeatureTap(model, [layer, pre]) as tap:
        logits = model(torch.randn(2, 3, 32, 32))
        feat = tap.outputs[layer]
        assert tap[pre].min().item() < 0.0
    assert logits.shape == (2, 100)
    assert feat.shape == (2, channels, 8, 8)
    assert feat.min().item() >= 0.0
    assert (feat == 0).any() and (feat > 0).any()


def test_tapped_features_keep_the_autograd_graph() -> None:
    # a student's tapped features feed the QuEST predictor, so gradients must flow through them
    model = build_model("resnet8", 10).train()
    with FeatureTap(model, "layer3") as tap:
        model(torch.randn(2, 3, 32, 32))
        feat = tap["layer3"]
    assert feat.requires_grad
    feat.square().mean().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert model.fc.weight.grad is None  # the loss never touched the classifier


def test_default_feature_layers_of_other_families() -> None:
    assert default_feature_layer("resnet32x4") == "layer3"
    assert default_feature_layer("resnet18") == "layer4"
    assert default_feature_layer("resnet50") == "layer4"
    assert default_feature_layer("mobilenet_v2") == "features"
    vgg = build_model("vgg8", 10)
    with torch.no_grad(), FeatureTap(vgg, default_feature_layer("vgg8")) as tap:
        vgg(torch.randn(2, 3, 32, 32))
        assert tap["relu4"].shape == (2, 512, 4, 4)
        assert tap["relu4"].min().item() >= 0.0
    r18 = build_model("resnet18", 10)
    with torch.no_grad(), FeatureTap(r18, "layer4") as tap:
        r18(torch.randn(2, 3, 64, 64))
        assert tap["layer4"].shape == (2, 512, 2, 2)
        assert tap["layer4"].min().item() >= 0.0


@pytest.mark.slow
def test_every_default_feature_layer_resolves() -> None:
    for name in MODEL_NAMES:
        model = _meta_model(name, 10)
        assert isinstance(resolve_layer(model, default_feature_layer(name)), nn.Module)


def test_tap_several_layers_and_remove() -> None:
    model = build_model("resnet20", 10).eval()
    tap = FeatureTap(model, ["layer1", "layer2", "layer3", "layer1"])
    assert tap.layers == ("layer1", "layer2", "layer3")
    with torch.no_grad():
        model(torch.randn(3, 3, 32, 32))
    shapes = {k: tuple(v.shape) for k, v in tap.outputs.items()}
    assert shapes == {"layer1": (3, 16, 32, 32), "layer2": (3, 32, 16, 16), "layer3": (3, 64, 8, 8)}
    tap.remove()
    tap.remove()  # idempotent
    assert tap.outputs == {}
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert tap.outputs == {}
    assert all(not m._forward_hooks for m in model.modules())


def test_tap_matches_manual_forward() -> None:
    model = build_model("resnet8", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), FeatureTap(model, "layer3") as tap:
        logits = model(x)
        feat = tap["layer3"]
    pooled = feat.mean(dim=(2, 3))
    torch.testing.assert_close(model.fc(pooled), logits)


def test_tap_errors() -> None:
    model = build_model("resnet20", 10)
    with pytest.raises(
        QuestError, match=r"unknown layer 'layer5'.*'layer3'.*quest models --layers"
    ):
        FeatureTap(model, ["layer3", "layer5"])
    # a failed tap registers nothing
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(QuestError, match=r"--layers resnet20"):
        resolve_layer(model, "layer3.9")
    with pytest.raises(QuestError, match="unknown layer ''"):
        resolve_layer(model, "")
    with pytest.raises(QuestError, match="at least one layer"):
        FeatureTap(model, [])
    with FeatureTap(model, "layer3") as tap:
        with pytest.raises(QuestError, match="no output yet"):
            tap["layer3"]
        with pytest.raises(QuestError, match="not tapped"):
            tap["layer2"]


def test_tap_detects_in_place_modification() -> None:
    # torchvision's BasicBlock does `out += identity` on bn2's output after the hook ran
    model = build_model("resnet18", 10).eval()
    x = torch.randn(1, 3, 64, 64)
    with FeatureTap(model, "layer4.1.bn2") as tap:
        model(x)
        with pytest.raises(QuestError, match="modified in place.*clone=True"):
            _ = tap.outputs
    with FeatureTap(model, "layer4.1.bn2", clone=True) as tap:
        model(x)
        bn2 = tap["layer4.1.bn2"]
    assert bn2.min().item() < 0.0  # a genuine BN output, not the post-add ReLU


def test_list_layers_shapes_in_execution_order() -> None:
    layers = list_layers(build_model("resnet20", 10))
    names = [n for n, _, _ in layers]
    info = {n: (t, s) for n, t, s in layers}
    assert names[:3] == ["conv1", "bn1", "relu"]
    assert names[-2:] == ["avgpool", "fc"]
    assert info["layer3"] == ("Sequential", (64, 8, 8))
    assert info["layer2.0.downsample.0"] == ("Conv2d", (32, 16, 16))
    assert info["layer1.0"] == ("BasicBlock", (16, 32, 32))
    assert info["fc"] == ("Linear", (10,))
    # containers come before their children
    assert names.index("layer2") < names.index("layer2.0") < names.index("layer2.0.conv1")
    assert len(names) == len(set(names))
    wrn = {n: s for n, _, s in list_layers(build_model("wrn_16_2", 10))}
    assert wrn["relu"] == (128, 8, 8)
    mbv2 = {n: s for n, _, s in list_layers(_meta_model("mobilenet_v2", 10), (3, 64, 64))}
    assert mbv2["features"] == (1280, 2, 2)


def test_list_layers_restores_training_mode() -> None:
    model = build_model("resnet8", 10).train()
    list_layers(model)
    assert model.training
    model.eval()
    count_macs(model, (3, 32, 32))
    assert not model.training


def _meta_model(name: str, classes: int) -> nn.Module:
    """Build a model on the meta device: shapes only, so big nets cost nothing to probe."""
    with torch.device("meta"):
        return build_model(name, classes)


def test_count_macs() -> None:
    # resnet20 at 32x32, by hand: stem 0.44M + 18 3x3 convs + two 1x1 shortcuts + fc(64x100)
    # = 40,818,944 (the literature's "resnet20: 41M MACs")
    assert count_macs(build_model("resnet20", 100), (3, 32, 32)) == 40_818_944
    assert count_macs(_meta_model("resnet20", 100), (3, 32, 32)) == 40_818_944
    macs56 = count_macs(_meta_model("resnet56", 100), (3, 32, 32))
    assert 125_000_000 < macs56 < 126_500_000  # literature: ~125M
    # resnet32x4: the CRD/RepDistiller tables give ~1.08 GMACs
    assert 1.07e9 < count_macs(_meta_model("resnet32x4", 100), (3, 32, 32)) < 1.09e9
    # torchvision mobilenet_v2 at 224x224: the well-known ~300M MACs
    assert 295e6 < count_macs(_meta_model("mobilenet_v2", 1000), (3, 224, 224)) < 305e6


def test_unknown_architecture_and_bad_classes() -> None:
    with pytest.raises(
        QuestError, match=r"unknown architecture 'resnet21'.*resnet20.*arch setting"
    ):
        build_model("resnet21", 10)
    with pytest.raises(QuestError, match="choose one of resnet8, "):
        default_feature_layer("nope")
    with pytest.raises(QuestError, match="num_classes"):
        build_model("resnet20", 0)


def test_shared_checkpoint_loads_strict(shared_dir: Path) -> None:
    path = shared_dir / "models" / "resnet56-cifar10-jpeg.pth"
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    assert ckpt["arch"] == "resnet56"
    model = build_model("resnet56", 10)
    result = model.load_state_dict(ckpt["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), FeatureTap(model, default_feature_layer("resnet56")) as tap:
        logits = model(x)
        feat = tap["layer3"]
    assert logits.shape == (4, 10)
    assert torch.isfinite(logits).all()
    assert feat.shape == (4, 64, 8, 8) and feat.min().item() >= 0.0
    # trained BN statistics, not the fresh-init ones
    assert not torch.allclose(model.bn1.running_var, torch.ones_like(model.bn1.running_var))


def test_resnet50_cifar_has_repdistillers_key_names_and_stages() -> None:
    model = build_model("resnet50_cifar", 100)
    keys = set(model.state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv3.weight", "layer1.0.bn3.bias",
            "layer1.0.shortcut.0.weight", "layer4.2.bn3.running_var", "linear.weight"} <= keys
    assert "layer1.1.shortcut.0.weight" not in keys and not any("relu" in k for k in keys)
    out = {}
    hooks = [getattr(model, n).register_forward_hook(lambda _m, _i, o, n=n: out.__setitem__(n, o))
             for n in ("relu", "layer1", "layer2", "layer3", "layer4")]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert [tuple(out[n].shape[1:]) for n in ("relu", "layer1", "layer2", "layer3", "layer4")] == [
        (64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)]
