"""QuEST objective against a slow loop reference, stored golden values, KL direction, gradients."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quest.core.distill import FrozenTeacher
from quest.core.losses import CosinePredictor, QuestLoss, kd_loss, quest_kl, soft_assign
from quest.core.methods import build_distiller
from quest.infra.errors import QuestError

GOLDEN = Path(__file__).parent / "golden" / "quest_loss.json"


def ref_soft_assign(f: torch.Tensor, c: torch.Tensor, t: float) -> torch.Tensor:
    """Obviously-correct reference: explicit loops over positions and words, float64."""
    b, ch, h, w = f.shape
    out = torch.zeros(b, h, w, c.shape[0], dtype=torch.float64)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                d = [sum((float(f[i, j, y, x]) - float(c[k, j])) ** 2 for j in range(ch))
                     for k in range(c.shape[0])]
                m = max(-t * v for v in d)
                e = [math.exp(-t * v - m) for v in d]
                s = sum(e)
                for k in range(c.shape[0]):
                    out[i, y, x, k] = e[k] / s
    return out


def ref_quest_loss(scores: torch.Tensor, p_t: torch.Tensor) -> tuple[float, float]:
    """Reference KL(p_T || p_S) averaged over positions, and word accuracy, with loops."""
    b, k, h, w = scores.shape
    total, hits = 0.0, 0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                s = [float(scores[i, j, y, x]) for j in range(k)]
                m = max(s)
                lse = m + math.log(sum(math.exp(v - m) for v in s))
                log_ps = [v - lse for v in s]
                pt = [float(p_t[i, y, x, j]) for j in range(k)]
                total += sum(p * (math.log(p) - lq) for p, lq in zip(pt, log_ps, strict=True)
                             if p > 0)
                hits += int(max(range(k), key=lambda j: s[j]) == max(range(k), key=lambda j: pt[j]))
    n = b * h * w
    return total / n, hits / n


def ref_cosine_scores(x: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference cosine predictor: per position, scale * cos(x, w_k)."""
    b, c, h, w = x.shape
    k = weight.shape[0]
    out = torch.zeros(b, k, h, w, dtype=torch.float64)
    for i in range(b):
        for y in range(h):
            for xx in range(w):
                v = x[i, :, y, xx].double()
                for j in range(k):
                    wr = weight[j].double()
                    out[i, j, y, xx] = scale * (v @ wr) / (v.norm() * wr.norm())
    return out


@pytest.fixture
def small() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f": torch.randn(2, 5, 3, 3, generator=g),
        "c": torch.randn(7, 5, generator=g),
        "s": torch.randn(2, 4, 3, 3, generator=g),
    }


def test_soft_assign_matches_loop_reference(small: dict[str, torch.Tensor]) -> None:
    for t in (0.1, 1.0, 5.0):
        got = soft_assign(small["f"], small["c"], t).double()
        torch.testing.assert_close(got, ref_soft_assign(small["f"], small["c"], t),
                                   atol=1e-5, rtol=1e-5)


def test_cosine_predictor_matches_reference(small: dict[str, torch.Tensor]) -> None:
    pred = CosinePredictor(4, 7, init_scale=3.0)
    assert pred.scale.item() == 3.0
    got = pred(small["s"]).double()
    ref = ref_cosine_scores(small["s"], pred.weight.detach(), 3.0)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert not any("bias" in n for n, _ in pred.named_parameters())


def test_cosine_predictor_init_std() -> None:
    torch.manual_seed(0)
    pred = CosinePredictor(256, 4096)
    assert abs(pred.weight.std().item() - math.sqrt(2 / 256)) < 0.002
    assert abs(pred.weight.mean().item()) < 0.002


def test_quest_loss_matches_loop_reference(small: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(1)
    crit = QuestLoss(small["c"], student_channels=4, temperature=5.0)
    loss, acc = crit(small["s"], small["f"])
    p_t = ref_soft_assign(small["f"], small["c"], 5.0)
    scores = ref_cosine_scores(small["s"], crit.predictor.weight.detach(), 3.0)
    ref_loss, ref_acc = ref_quest_loss(scores, p_t)
    assert abs(loss.item() - ref_loss) < 1e-5
    assert abs(acc.item() - ref_acc) < 1e-6


def test_teacher_map_larger_than_student_needs_explicit_pooling() -> None:
    # pooling the teacher only here would assign vectors the codebook was not fit on: the loss
    # refuses, and features.pool pools in the features stage and before the loss alike
    torch.manual_seed(2)
    c = torch.randn(6, 4)
    crit = QuestLoss(c, student_channels=3, temperature=1.0)
    teacher = torch.randn(2, 4, 8, 8)
    student = torch.randn(2, 3, 4, 4)
    with pytest.raises(QuestError, match="features.pool: 2"):
        crit(student, teacher)
    loss, _ = crit(student, F.avg_pool2d(teacher, 2))
    assert torch.isfinite(loss)


def test_golden_values() -> None:
    golden = json.loads(GOLDEN.read_text())
    g = torch.Generator().manual_seed(golden["seed"])
    f = torch.randn(2, 8, 4, 4, generator=g)
    c = torch.randn(16, 8, generator=g)
    s = torch.randn(2, 6, 4, 4, generator=g)
    torch.manual_seed(golden["seed"])
    crit = QuestLoss(c, student_channels=6, temperature=golden["temperature"])
    loss, acc = crit(s, f)
    p = soft_assign(f, c, golden["temperature"])
    assert loss.item() == pytest.approx(golden["loss"], rel=1e-5)
    assert acc.item() == pytest.approx(golden["word_accuracy"], abs=1e-9)
    assert p[0, 0, 0, :4].tolist() == pytest.approx(golden["p_first4"], abs=1e-6)
    kd = kd_loss(s.flatten(1)[:, :10], f.flatten(1)[:, :10], temperature=4.0)
    assert kd.item() == pytest.approx(golden["kd_T4"], abs=1e-5)


def test_kl_direction_matters() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 5, 3, 3, generator=g)
    b = torch.randn(2, 5, 3, 3, generator=g) * 3
    p_a = a.permute(0, 2, 3, 1).softmax(-1)
    p_b = b.permute(0, 2, 3, 1).softmax(-1)
    forward, _ = quest_kl(b, p_a)  # KL(p_a || p_b)
    backward, _ = quest_kl(a, p_b)  # KL(p_b || p_a)
    assert abs(forward.item() - backward.item()) > 1e-3
    expected = (p_a * (p_a.log() - p_b.log())).sum(-1).mean()
    assert forward.item() == pytest.approx(expected.item(), abs=1e-6)


def test_kl_is_zero_when_student_matches_teacher() -> None:
    scores = torch.randn(1, 4, 2, 2)
    loss, acc = quest_kl(scores, scores.permute(0, 2, 3, 1).softmax(-1))
    assert abs(loss.item()) < 1e-6 and acc.item() == 1.0


def test_gradients_reach_student_and_predictor_only() -> None:
    from quest.core.models.zoo import build_model

    torch.manual_seed(0)
    teacher = build_model("resnet8", 10)
    student = build_model("resnet8", 10)
    codebook = torch.randn(32, 64)
    d = build_distiller("quest", student, teacher, codebook=codebook, teacher_layer="layer3",
                        student_layer="layer3", student_channels=64)
    d.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    _, losses = d.forward_train(x, y)
    assert set(losses) == {"ce", "quest"}
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert d.criterion.codebook.grad is None and not d.criterion.codebook.requires_grad
    assert d.criterion.predictor.weight.grad is not None
    assert d.criterion.predictor.scale.grad is not None
    assert all(p.grad is not None for p in student.parameters())
    # the teacher stays in eval mode however the distiller is switched
    assert not d.teacher.training and not any(m.training for m in teacher.modules())
    trainable = {id(p) for p in d.trainable_parameters()}
    assert not trainable & {id(p) for p in teacher.parameters()}


def _hinton_kd_float64(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """T^2 * mean over the batch of sum_c p_t log(p_t / p_s), softmaxes at temperature T."""

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z / temperature
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    log_pt, log_ps = log_softmax(teacher), log_softmax(student)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1)
    return float(kl.mean() * temperature**2)


def test_hinton_kd_reference_by_hand() -> None:
    """The float64 reference against a value worked out by hand: two classes, T = 2, student
    logits (0, 0) so p_s = (1/2, 1/2), teacher logits (2 ln 3, 0) so p_t = (3/4, 1/4);
    KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812035..., times T^2 = 4: 0.523248143."""
    golden = 4 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert golden == pytest.approx(0.523248143, abs=1e-9)
    student, teacher = np.zeros((1, 2)), np.array([[2 * math.log(3), 0.0]])
    assert _hinton_kd_float64(student, teacher, 2.0) == pytest.approx(golden, rel=1e-12)
    # and kd_loss gives it too, in float32
    assert kd_loss(torch.tensor(student, dtype=torch.float32),
                   torch.tensor(teacher, dtype=torch.float32), 2.0).item() == pytest.approx(
        golden, rel=1e-6)


def test_quest_kd_has_three_terms_and_kd_weights() -> None:
    from quest.core.models.zoo import build_model

    torch.manual_seed(0)
    t, s = build_model("resnet8", 10), build_model("resnet8", 10)
    d = build_distiller("quest+kd", s, t, codebook=torch.randn(8, 64), teacher_layer="layer3",
                        student_layer="layer3", student_channels=64)
    _, losses = d.forward_train(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    assert set(losses) == {"ce", "kd", "quest"}
    kd = build_distiller("kd", s, t)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    logits, losses = kd.forward_train(x, y)
    with torch.no_grad():
        t_logits = t(x)
    # Hinton's term written out in float64, not through kd_loss: a lost T^2, a per-element mean
    # or a reversed KL in kd_loss changes the logged term and fails here. The float32 term is
    # 1.5e-5 off (relative) on these logits; the reversed KL would be 1.1 % off.
    expected = 0.9 * _hinton_kd_float64(logits.detach().double().numpy(),
                                        t_logits.double().numpy(), 4.0)
    assert losses["kd"].item() == pytest.approx(expected, rel=2e-4)
    assert losses["ce"].item() == pytest.approx(0.1 * F.cross_entropy(logits, y).item(), rel=1e-5)


def test_frozen_teacher_ignores_train_mode() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ft = FrozenTeacher(net)
    ft.train()
    assert not net[1].training
    before = net[1].running_mean.clone()
    ft(torch.randn(2, 3, 8, 8) + 5)
    assert torch.equal(before, net[1].running_mean)


def test_soft_assign_rejects_mismatched_codebook() -> None:
    with pytest.raises(QuestError, match="does not match"):
        soft_assign(torch.randn(1, 4, 2, 2), torch.randn(3, 5), 1.0)


def test_fused_path_matches_unfused_value_gradients_and_stats() -> None:
    from quest.core.losses import assignment_stats

    torch.manual_seed(5)
    crit = QuestLoss(torch.randn(40, 6), student_channels=5, temperature=2.0).double()
    s = torch.randn(3, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    import quest.core.fused_quest as fq

    old = fq._CPU_BLOCK_ROWS
    fq._CPU_BLOCK_ROWS = (7, 7)  # several blocks, the last one partial
    try:
        terms = crit.terms(s, t)
        fused_loss = terms["loss"]
        grads_fused = torch.autograd.grad(fused_loss, [s, crit.predictor.weight,
                                                       crit.predictor.scale])
    finally:
        fq._CPU_BLOCK_ROWS = old
    p_t = crit.targets(t)
    ref_loss, ref_acc = crit.from_targets(s, p_t)
    grads_ref = torch.autograd.grad(ref_loss, [s, crit.predictor.weight, crit.predictor.scale])
    assert fused_loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    assert terms["word_accuracy"].item() == pytest.approx(ref_acc.item())
    for a, b in zip(grads_fused, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    stats = assignment_stats(p_t)
    for key in ("mean_max_assignment", "teacher_perplexity"):
        assert terms[key].item() == pytest.approx(stats[key].item(), rel=1e-6)


def test_fused_head_is_exact_when_teacher_logits_span_far_beyond_the_floor() -> None:
    """Near-hard targets (logits hundreds apart): the words the floor raises carry < 2e-35."""
    import quest.core.fused_quest as fq

    torch.manual_seed(8)
    crit = QuestLoss(3 * torch.randn(64, 6), student_channels=5, temperature=20.0).double()
    s = torch.randn(2, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    t = 3 * torch.randn(2, 6, 4, 4, dtype=torch.float64)
    logits = -20.0 * torch.cdist(t.permute(0, 2, 3, 1).reshape(-1, 6), crit.codebook).pow(2)
    gap = logits.max(dim=1, keepdim=True).values - logits
    assert (gap > fq._LOGIT_FLOOR).float().mean() > 0.5  # most words sit below the floor
    terms = crit.terms(s, t)
    params = [s, crit.predictor.weight, crit.predictor.scale]
    grads_fused = torch.autograd.grad(terms["loss"], params)
    saved = fq._LOGIT_FLOOR
    fq._LOGIT_FLOOR = float("inf")  # the same head without the floor
    try:
        unfloored = crit.terms(s, t)
        grads_unfloored = torch.autograd.grad(unfloored["loss"], params)
    finally:
        fq._LOGIT_FLOOR = saved
    assert terms["loss"].item() == pytest.approx(unfloored["loss"].item(), rel=1e-6)
    for a, b in zip(grads_fused, grads_unfloored, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
    p_t = crit.targets(t)
    ref_loss, ref_acc = crit.from_targets(s, p_t)
    grads_ref = torch.autograd.grad(ref_loss, params)
    # float32 logits in the thousands: the float64 reference agrees to float32's precision
    assert terms["loss"].item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert terms["word_accuracy"].item() == pytest.approx(ref_acc.item())
    assert terms["mean_max_assignment"].item() == pytest.approx(
        p_t.reshape(-1, 64).max(dim=1).values.mean().item(), rel=1e-6)
    for a, b in zip(grads_fused, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_fixed_scale_bias_predictor_against_loop_reference(small: dict[str, torch.Tensor]) -> None:
    """The transfer-learning predictor: a constant scale plus a learnable per-word bias."""
    torch.manual_seed(3)
    crit = QuestLoss(small["c"], student_channels=4, temperature=5.0, init_scale=10.0,
                     predictor="fixed_scale_bias")
    pred = crit.predictor
    assert isinstance(pred.bias, torch.nn.Parameter) and not isinstance(pred.scale,
                                                                        torch.nn.Parameter)
    assert [n for n, _ in crit.named_parameters()] == ["predictor.weight", "predictor.bias"]
    with torch.no_grad():
        pred.bias.copy_(torch.linspace(-1.0, 1.0, 7))  # a non-zero bias moves the scores
    loss, acc = crit(small["s"], small["f"])
    p_t = ref_soft_assign(small["f"], small["c"], 5.0)
    scores = ref_cosine_scores(small["s"], pred.weight.detach(), 10.0)
    scores += pred.bias.detach().double().view(1, -1, 1, 1)
    ref_loss, ref_acc = ref_quest_loss(scores, p_t)
    assert abs(loss.item() - ref_loss) < 1e-5
    assert abs(acc.item() - ref_acc) < 1e-6


def test_fused_bias_gradients_and_student_max_match_unfused() -> None:
    torch.manual_seed(6)
    crit = QuestLoss(torch.randn(40, 6), student_channels=5, temperature=2.0, init_scale=10.0,
                     predictor="fixed_scale_bias").double()
    with torch.no_grad():
        crit.predictor.bias.normal_()
    s = torch.randn(3, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    import quest.core.fused_quest as fq

    old = fq._CPU_BLOCK_ROWS
    fq._CPU_BLOCK_ROWS = (7, 7)
    try:
        terms = crit.terms(s, t)
        params = [s, crit.predictor.weight, crit.predictor.bias]
        grads_fused = torch.autograd.grad(terms["loss"], params)
    finally:
        fq._CPU_BLOCK_ROWS = old
    ref_loss, _ = crit.from_targets(s, crit.targets(t))
    grads_ref = torch.autograd.grad(ref_loss, params)
    assert terms["loss"].item() == pytest.approx(ref_loss.item(), abs=1e-6)
    for a, b in zip(grads_fused, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    probs = crit.predictor(s).softmax(dim=1)
    assert terms["student_mean_max"].item() == pytest.approx(
        probs.max(dim=1).values.mean().item(), rel=1e-6)
    assert terms["predictor_scale"].item() == 10.0


def test_unknown_predictor_is_a_clear_error() -> None:
    from quest.infra.errors import QuestError

    with pytest.raises(QuestError, match="unknown QuEST predictor 'cosine'.*learned_scale"):
        QuestLoss(torch.randn(4, 3), student_channels=2, predictor="cosine")


def test_fused_head_without_grad_mode_gives_the_same_terms() -> None:
    # forward folds the gradients in when they are wanted; under no_grad it must skip that and
    # still give the same value and statistics
    torch.manual_seed(8)
    crit = QuestLoss(torch.randn(24, 6), student_channels=5, temperature=2.0)
    s, t = torch.randn(2, 5, 4, 4, requires_grad=True), torch.randn(2, 6, 4, 4)
    with_grad = crit.terms(s, t)
    with torch.no_grad():
        without = crit.terms(s, t)
    assert without["loss"].grad_fn is None and with_grad["loss"].grad_fn is not None
    for key in ("loss", "word_accuracy", "mean_max_assignment", "student_mean_max"):
        assert without[key].item() == pytest.approx(with_grad[key].item(), rel=1e-6)


def test_fused_head_value_at_temperature_500_matches_float64() -> None:
    """T = 500 (the official layer3 level): teacher logits of size T ||c||^2, here over 1e5,
    where float32's spacing is 0.01-0.03. The logged KL matches the float64 formula to 1e-6
    relative (summing p_T t and lse_t apart and subtracting, it was off by 6e-4 here), and the
    gradients, which never held the cancellation, match as before."""
    torch.manual_seed(11)
    k, c_t, c_s, n = 256, 64, 32, 4
    codebook = 3.0 * torch.randn(k, c_t).abs()  # post-ReLU words, ||c||^2 ~ 580
    crit = QuestLoss(codebook, student_channels=c_s, temperature=500.0).double()
    near = codebook[torch.randint(0, k, (n * 64,))] + 0.03 * torch.randn(n * 64, c_t)
    t = near.abs().view(n, 8, 8, c_t).permute(0, 3, 1, 2).double()
    s = torch.randn(n, c_s, 8, 8, dtype=torch.float64, requires_grad=True)
    terms = crit.terms(s, t)  # the fused head runs in float32 whatever the inputs' dtype
    p_t = crit.targets(t)
    ref_loss, ref_acc = crit.from_targets(s, p_t)  # float64 throughout
    assert 500.0 * float(codebook.pow(2).sum(dim=1).max()) > 1e5
    assert terms["loss"].item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert terms["word_accuracy"].item() == pytest.approx(ref_acc.item())
    grads = [torch.autograd.grad(v, s)[0] for v in (terms["loss"], ref_loss)]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-5)
