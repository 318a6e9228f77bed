"""FitNets and attention transfer (RepDistiller's semantics) against independent formulations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from quest.apps.cli import main
from quest.core.methods import MethodContext, get
from quest.core.methods.at import at_pair_loss, attention_map
from quest.core.methods.fitnet import HintRegressor
from quest.core.models.zoo import build_model, feature_stages


def _np_attention(f: np.ndarray, p: float) -> np.ndarray:
    """Per image: channel mean of f^p, flattened, divided by its L2 norm (loops, float64)."""
    out = []
    for img in f.astype(np.float64):
        a = (img ** p).mean(axis=0).reshape(-1)
        out.append(a / max(np.sqrt((a ** 2).sum()), 1e-12))
    return np.stack(out)


def _np_pool2(f: np.ndarray) -> np.ndarray:
    b, c, h, w = f.shape
    return f.reshape(b, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


def test_attention_map_and_pair_loss_match_a_loop_formulation() -> None:
    rng = np.random.default_rng(0)
    f_s = rng.normal(size=(3, 4, 8, 8)).astype(np.float32)
    f_t = rng.normal(size=(3, 6, 4, 4)).astype(np.float32)
    got_map = attention_map(torch.from_numpy(f_s)).numpy()
    np.testing.assert_allclose(got_map, _np_attention(f_s, 2.0), rtol=1e-5, atol=1e-7)
    # the larger (student) map is pooled to the teacher's 4x4, then mean squared difference
    ref = ((_np_attention(_np_pool2(f_s), 2.0) - _np_attention(f_t, 2.0)) ** 2).mean()
    got = at_pair_loss(torch.from_numpy(f_s), torch.from_numpy(f_t)).item()
    assert got == pytest.approx(ref, rel=1e-5)
    # and symmetric in which side is larger
    got_t = at_pair_loss(torch.from_numpy(f_t), torch.from_numpy(f_s)).item()
    assert got_t == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize(("s_hw", "t_hw", "kind", "kernel"), [
    (8, 8, nn.Conv2d, (1, 1)),            # equal sizes: 1x1
    (16, 8, nn.Conv2d, (3, 3)),           # student twice the teacher: 3x3 stride 2
    (8, 16, nn.ConvTranspose2d, (4, 4)),  # teacher twice the student: 4x4 transposed
    (10, 8, nn.Conv2d, (3, 3)),           # student larger otherwise: (1 + s - t)
])
def test_hint_regressor_follows_the_size_rule(s_hw: int, t_hw: int, kind: type,
                                              kernel: tuple[int, int]) -> None:
    reg = HintRegressor((16, s_hw, s_hw), (32, t_hw, t_hw))
    assert type(reg.conv) is kind and tuple(reg.conv.kernel_size) == kernel
    assert reg.conv.bias is not None and isinstance(reg.bn, nn.BatchNorm2d)
    out = reg(torch.randn(2, 16, s_hw, s_hw))
    assert out.shape == (2, 32, t_hw, t_hw) and out.min() >= 0  # BatchNorm then ReLU


def _ctx(student: str, teacher: str) -> MethodContext:
    from quest.core.methods import resolve_settings
    from quest.infra.config import StudentConfig

    torch.manual_seed(0)
    return MethodContext(build_model(student, 10), build_model(teacher, 10),
                         resolve_settings(StudentConfig()),
                         image_shape=(3, 32, 32))


def test_fitnet_hint_is_the_middle_stage_and_the_loss_is_ce_plus_100_mse() -> None:
    ctx = _ctx("resnet20", "resnet56")
    d = get("fitnet").build(ctx)
    assert (d.s_layer, d.t_layer) == ("layer2", "layer2") and d.weight == 100.0
    params = {id(p) for p in d.trainable_parameters()}
    assert all(id(p) in params for p in d.regressor.parameters())  # trained with the student
    assert not any(id(p) in params for p in d.teacher.parameters())
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    _, terms = d.forward_train(x, y)
    # independent: the same forward passes by hand
    with torch.no_grad():
        feats: dict[str, torch.Tensor] = {}
        hooks = [m.register_forward_hook(lambda _m, _i, o, k=k: feats.__setitem__(k, o))
                 for k, m in (("s", d.student.layer2), ("t", d.teacher.model.layer2))]
        d.teacher.model(x)
        d.student(x)
        for h in hooks:
            h.remove()
    assert terms["hint"].item() == pytest.approx(
        100.0 * ((d.regressor(feats["s"]) - feats["t"]) ** 2).mean().item(), rel=1e-4)
    # vgg: the hint is relu2; wrn: block2 (RepDistiller's feat[2])
    assert get("fitnet").build(_ctx("vgg8", "vgg13")).s_layer == "relu2"
    assert get("fitnet").build(_ctx("wrn_16_2", "wrn_40_2")).t_layer == "block2"


def test_at_pairs_every_intermediate_stage_and_weights_1000() -> None:
    d = get("at").build(_ctx("resnet20", "resnet56"))
    assert d.pairs == [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")]
    assert get("at").build(_ctx("vgg8", "vgg13")).pairs[-1] == ("relu4", "relu4")
    assert feature_stages("wrn_40_2")[1:] == ("block1", "block2", "block3")
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    _, terms = d.forward_train(x, y)
    assert set(terms) == {"ce", "at"} and d.weight == 1000.0 and terms["at"].item() > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fitnet", "at"])
def test_feature_methods_run_through_quest_student(method: str, smoke_root: Path) -> None:
    base = ["--root", str(smoke_root), "--preset", "smoke", "--set", "student.train.epochs=1"]
    assert main(["teacher", *base]) == 0
    assert main(["student", "--method", method, *base]) == 0
    metrics = json.loads((smoke_root / "metrics" / "students" / f"{method}.json").read_text())
    term = {"fitnet": "hint", "at": "at"}[method]
    assert np.isfinite(metrics["history"][0][term]) and metrics["history"][0][term] > 0
    saved = torch.load(smoke_root / "models" / "students" / f"{method}.pt", weights_only=True)
    assert not any("regressor" in k for k in saved["model"])  # the student alone is exported
