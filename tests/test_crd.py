"""CRD (RepDistiller's semantics) against an independent float64 formulation with explicit loops:
embedding heads, memory banks, other-class negatives, the normalisation constant, the NCE loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from quest.core.distill import Batch, StepContext
from quest.core.methods import MethodContext, get, resolve_settings
from quest.core.methods.crd import (
    CRD,
    CRDSettings,
    NegativeSampler,
    contrast_scores,
    contrast_scores_naive,
    nce_loss,
)
from quest.infra.config import StudentConfig
from quest.infra.errors import QuestError

LABELS = torch.arange(30) % 3  # 30 training samples, 3 classes of 10


def _nets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
    return student, teacher


def _crd(nce_k: int = 5, labels: torch.Tensor = LABELS) -> CRD:
    student, teacher = _nets()
    settings = resolve_settings(StudentConfig.model_validate(
        {"crd": {"nce_k": nce_k, "feat_dim": 4}}))
    d = get("crd").build(MethodContext(student, teacher, settings, train_labels=labels))
    assert isinstance(d, CRD)
    return d


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def _embed(lin: nn.Linear, f: list[float]) -> list[float]:
    w, b = lin.weight.double().tolist(), lin.bias.double().tolist()
    return _unit([sum(wi * fi for wi, fi in zip(row, f, strict=True)) + bi
                  for row, bi in zip(w, b, strict=True)])


def _nce(p: list[list[float]], n_data: int) -> float:
    """RepDistiller's Eq. 18 with Pn = 1 / n_data, one score at a time."""
    m, eps = len(p[0]) - 1, 1e-7
    total = 0.0
    for row in p:
        total += math.log(row[0] / (row[0] + m / n_data + eps))
        total += sum(math.log((m / n_data) / (q + m / n_data + eps)) for q in row[1:])
    return -total / len(p)


def test_nce_loss_and_fast_scores_match_references() -> None:
    g = torch.Generator().manual_seed(1)
    p = torch.rand(4, 7, generator=g) * 1e-2
    assert float(nce_loss(p, 50)) == pytest.approx(_nce(p.double().tolist(), 50), rel=1e-5)
    anchor = nn.functional.normalize(torch.randn(5, 16, generator=g), dim=1)
    bank = nn.functional.normalize(torch.randn(200, 16, generator=g), dim=1)
    idx = torch.randint(0, 200, (5, 33), generator=g)
    fast = contrast_scores(anchor, bank, idx, 0.07)
    naive = contrast_scores_naive(anchor, bank, idx, 0.07)
    assert torch.allclose(fast, naive, rtol=1e-5)
    ref = [[math.exp(sum(a * b for a, b in zip(anchor[i].tolist(), bank[j].tolist(),
                                               strict=True)) / 0.07) for j in idx[i].tolist()]
           for i in range(5)]
    assert torch.allclose(fast.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-4)


def test_negatives_are_other_classes_without_then_with_replacement() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0, 1])
    few = NegativeSampler(LABELS, 20).draw(labels, g)  # exactly the 20 other-class samples
    for row, c in zip(few.tolist(), labels.tolist(), strict=True):
        assert sorted(row) == sorted(i for i in range(30) if LABELS[i] != c)
    many = NegativeSampler(LABELS, 50)  # more than the 20 there are: with replacement
    assert many.replaces(0)
    drawn = many.draw(labels, g)
    assert drawn.shape == (5, 50)
    assert all(LABELS[j] != c for row, c in zip(drawn.tolist(), labels.tolist(), strict=True)
               for j in row)


def test_a_step_matches_the_loop_reference_and_updates_the_banks() -> None:
    d = _crd(nce_k=5)
    student, teacher = d.student, d.teacher.model
    n, temp, k = 30, 0.07, 5
    mem_s0, mem_t0 = d.memory_s.double().tolist(), d.memory_t.double().tolist()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 12, generator=g)
    indices = torch.tensor([3, 7, 11, 29])
    y = LABELS[indices]
    idx = d.contrast_indices(indices, y, step=0)
    assert idx[:, 0].tolist() == indices.tolist()  # the positive first ("exact" mode)
    assert all(LABELS[j] != LABELS[i] for i, row in zip(indices.tolist(), idx[:, 1:].tolist(),
                                                       strict=True) for j in row)
    assert len(set(idx[0, 1:].tolist())) == k  # without replacement: 20 others >= 5

    logits, losses = d.step(Batch(x, y, indices), StepContext(0, 1, 0, 10))
    assert set(losses) == {"ce", "crd"} == set(get("crd").loss_terms)

    with torch.no_grad():
        f_s = torch.relu(student[1](x)).double().tolist()
        f_t = torch.relu(teacher[1](x)).double().tolist()
    v_s = [_embed(d.embed_s.linear, f) for f in f_s]
    v_t = [_embed(d.embed_t.linear, f) for f in f_t]
    rows = idx.tolist()

    def scores(v: list[list[float]], mem: list[list[float]]) -> list[list[float]]:
        return [[math.exp(sum(a * b for a, b in zip(v[i], mem[j], strict=True)) / temp)
                 for j in rows[i]] for i in range(len(v))]

    out_s, out_t = scores(v_s, mem_t0), scores(v_t, mem_s0)  # each anchor on the other bank
    z_s = sum(map(sum, out_s)) / (4 * (k + 1)) * n  # fixed from this first batch
    z_t = sum(map(sum, out_t)) / (4 * (k + 1)) * n
    ref = _nce([[q / z_s for q in r] for r in out_s], n) + _nce([[q / z_t for q in r]
                                                                for r in out_t], n)
    assert float(d.z_s) == pytest.approx(z_s, rel=1e-4)
    assert float(d.z_t) == pytest.approx(z_t, rel=1e-4)
    assert float(losses["crd"].detach()) == pytest.approx(0.8 * ref, rel=1e-4)
    # the banks: normalize(0.5 * row + 0.5 * embedding) at the batch's rows, the rest untouched
    for b, i in enumerate(indices.tolist()):
        want = _unit([0.5 * m + 0.5 * v for m, v in zip(mem_s0[i], v_s[b], strict=True)])
        assert d.memory_s[i].tolist() == pytest.approx(want, rel=1e-5)
        want = _unit([0.5 * m + 0.5 * v for m, v in zip(mem_t0[i], v_t[b], strict=True)])
        assert d.memory_t[i].tolist() == pytest.approx(want, rel=1e-5)
    assert d.memory_s[0].tolist() == pytest.approx(mem_s0[0])
    # gradients reach the student and both heads, never the teacher
    (losses["ce"] + losses["crd"]).backward()
    assert d.embed_s.linear.weight.grad is not None and d.embed_t.linear.weight.grad is not None
    assert student[1].weight.grad is not None and teacher[1].weight.grad is None
    # Z stays fixed; negatives depend on the global step alone (bit-identical resume)
    z = float(d.z_s)
    d.step(Batch(x, y, indices), StepContext(0, 1, 1, 10))
    assert float(d.z_s) == z
    assert torch.equal(d.contrast_indices(indices, y, 5), d.contrast_indices(indices, y, 5))
    assert not torch.equal(d.contrast_indices(indices, y, 5), d.contrast_indices(indices, y, 6))


def test_heads_train_banks_checkpoint_and_the_student_exports_alone() -> None:
    d = _crd()
    trained = {id(p) for p in d.trainable_parameters()}
    assert all(id(p) in trained for p in [*d.embed_s.parameters(), *d.embed_t.parameters()])
    # what the Trainer's checkpoint keeps: the distiller's state minus the teacher
    kept = {k for k in d.state_dict() if not k.startswith("teacher.")}
    assert {"memory_s", "memory_t", "z_s", "z_t", "embed_s.linear.weight"} <= kept
    assert d.memory_s.shape == (30, 4)
    assert not any("embed" in k for k in d.export_student().state_dict())


def test_defaults_and_one_line_errors() -> None:
    c = CRDSettings()
    assert (c.ce_weight, c.weight, c.feat_dim, c.nce_k, c.nce_t, c.nce_m) == (
        1.0, 0.8, 128, 16384, 0.07, 0.5)
    d = _crd()
    x, y = torch.randn(2, 12), torch.tensor([0, 1])
    with pytest.raises(QuestError, match="crd needs each sample's training-set index"):
        d.step(Batch(x, y, None), StepContext(0, 1, 0, 1))
    student, teacher = _nets()
    with pytest.raises(QuestError, match="crd needs the training set's labels"):
        get("crd").build(MethodContext(student, teacher, resolve_settings(StudentConfig())))
    with pytest.raises(QuestError, match="student.crd.nce_m is 2: use a value less than"):
        resolve_settings(StudentConfig.model_validate({"crd": {"nce_m": 2}}))
