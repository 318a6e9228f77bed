"""DKD (mdistiller's semantics) against an independent float64 formulation with explicit loops."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from quest.core.distill import Batch, StepContext
from quest.core.methods import MethodContext, get, resolve_settings
from quest.core.methods.dkd import DKDSettings, dkd_terms, warmup_factor
from quest.infra.config import StudentConfig
from quest.infra.errors import QuestError


def _reference(s: list[list[float]], t: list[list[float]], y: list[int], temp: float
               ) -> tuple[float, float]:
    """TCKD and NCKD by the paper's definitions, one sample and one class at a time."""
    tckd = nckd = 0.0
    for s_row, t_row, label in zip(s, t, y, strict=True):
        zs = sum(math.exp(v / temp) for v in s_row)
        zt = sum(math.exp(v / temp) for v in t_row)
        ps = [math.exp(v / temp) / zs for v in s_row]
        pt = [math.exp(v / temp) / zt for v in t_row]
        bs = (ps[label], sum(p for j, p in enumerate(ps) if j != label))
        bt = (pt[label], sum(p for j, p in enumerate(pt) if j != label))
        tckd += sum(b_t * math.log(b_t / b_s) for b_t, b_s in zip(bt, bs, strict=True))
        # the distribution over the non-target classes alone
        zs_n = sum(math.exp(v / temp) for j, v in enumerate(s_row) if j != label)
        zt_n = sum(math.exp(v / temp) for j, v in enumerate(t_row) if j != label)
        for j in range(len(s_row)):
            if j == label:
                continue
            qs, qt = math.exp(s_row[j] / temp) / zs_n, math.exp(t_row[j] / temp) / zt_n
            nckd += qt * math.log(qt / qs)
    n = len(y)
    return tckd * temp ** 2 / n, nckd * temp ** 2 / n


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_dkd_terms_match_the_loop_reference(temp: float) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 10, generator=g) * 3
    t = torch.randn(6, 10, generator=g) * 3
    y = torch.randint(0, 10, (6,), generator=g)
    tckd, nckd = dkd_terms(s, t, y, temp)
    ref = _reference(s.double().tolist(), t.double().tolist(), y.tolist(), temp)
    assert float(tckd) == pytest.approx(ref[0], rel=1e-4, abs=1e-6)
    assert float(nckd) == pytest.approx(ref[1], rel=1e-4, abs=1e-6)
    assert float(nckd) > 0 and float(tckd) > 0


def test_defaults_are_mdistillers() -> None:
    d = DKDSettings()
    assert (d.ce_weight, d.alpha, d.beta, d.temperature) == (1.0, 1.0, 8.0, 4.0)
    assert d.warmup_share * 240 == pytest.approx(20)
    assert "2 for resnet56->resnet20" in (DKDSettings.model_fields["beta"].description or "")


def test_warmup_is_mdistillers_at_240_epochs_and_scaled_to_a_short_schedule() -> None:
    share = DKDSettings().warmup_share
    per_epoch = 10
    for epoch in (0, 4, 18, 19, 20, 100):  # 0-based; mdistiller's epoch is epoch + 1
        last = StepContext(epoch, 240, (epoch + 1) * per_epoch - 1, 240 * per_epoch)
        assert warmup_factor(last, share) == pytest.approx(min((epoch + 1) / 20, 1.0))
    # 6 epochs of 12 steps: the ramp spans the first half epoch (6 steps), not 20 epochs
    short = [warmup_factor(StepContext(0, 6, k, 72), share) for k in range(8)]
    assert short[0] == pytest.approx(1 / 6) and short[4] < 1.0 and short[5:] == [1.0] * 3


def test_the_step_weights_ce_and_the_warmed_up_dkd_term() -> None:
    torch.manual_seed(0)
    student, teacher = nn.Linear(12, 5), nn.Linear(12, 5)
    settings = resolve_settings(StudentConfig.model_validate({"dkd": {"beta": 2.0}}))
    d = get("dkd").build(MethodContext(student, teacher, settings))
    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    ctx = StepContext(epoch=0, epochs=10, step=2, total_steps=100)  # warm-up at 3 / 8.33
    logits, losses = d.step(Batch(x, y), ctx)
    with torch.no_grad():
        tckd, nckd = dkd_terms(student(x), teacher(x), y, 4.0)
    w = 3 / 100 / (20 / 240)
    assert set(losses) == {"ce", "dkd"} == set(get("dkd").loss_terms)
    assert float(losses["dkd"].detach()) == pytest.approx(w * float(tckd + 2.0 * nckd), rel=1e-5)
    assert float(losses["ce"].detach()) == pytest.approx(
        float(nn.functional.cross_entropy(logits.detach(), y)))
    losses["dkd"].backward()
    assert student.weight.grad is not None and teacher.weight.grad is None
    with pytest.raises(QuestError, match="dkd needs the step context"):
        d.forward_train(x, y)


@pytest.mark.parametrize(("raw", "message"), [
    ({"dkd": {"betta": 2}}, "unknown setting 'student.dkd.betta' (did you mean "
                            "'student.dkd.beta'?): remove or rename it in params.yaml"),
    ({"dkdd": {}}, "unknown setting 'student.dkdd' (did you mean 'student.dkd'?)"),
    ({"dkd": {"beta": "high"}}, "student.dkd.beta must be float, got 'high'"),
    ({"dkd": {"warmup_share": 2}}, "student.dkd.warmup_share is 2: use a value less than or "
                                   "equal to 1"),
    ({"dkd": 3}, "student.dkd must be a mapping, got 3"),
])
def test_bad_dkd_settings_are_one_line_errors(raw: dict, message: str) -> None:
    with pytest.raises(QuestError) as err:
        resolve_settings(StudentConfig.model_validate(raw))
    assert message in str(err.value) and "\n" not in str(err.value)
