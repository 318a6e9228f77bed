"""Optional fast paths (runtime.amp, runtime.compile) and device-aware backend choice, on CPU."""

from __future__ import annotations

import logging

import pytest
import torch

from quest.core import codebook as cb
from quest.core import fastpath
from quest.core.fastpath import amp_enabled, autocast_step, maybe_compile
from quest.core.fused_quest import fused_quest_kl
from quest.core.methods import build_distiller
from quest.core.models.zoo import build_model


def _quest_distiller(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    student, teacher = build_model("resnet8", 10), build_model("resnet8", 10)
    return build_distiller("quest", student, teacher, codebook=torch.randn(16, 64),
                           teacher_layer="layer3", student_layer="layer3", student_channels=64)


def test_amp_is_a_no_op_on_cpu(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 on the CPU: the step function is returned unchanged, with one warning."""

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return x, {}

    # an earlier test in this process may have warned already: start from a clean slate
    monkeypatch.setattr(fastpath, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="quest"):
        assert autocast_step(step, "bf16", "cpu") is step
        assert autocast_step(step, "bf16", torch.device("cpu")) is step
    warnings = [r for r in caplog.records if "only used on CUDA" in r.message]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert autocast_step(step, "fp32", "cuda") is step
    assert amp_enabled("bf16", "cuda") and not amp_enabled("fp32", "cuda")


def test_quest_head_stays_float32_under_autocast() -> None:
    """Under bf16 autocast the fused QuEST softmaxes still run in float32: same loss and grads."""
    torch.manual_seed(0)
    student = torch.nn.functional.normalize(torch.randn(300, 32), dim=1).requires_grad_()
    weight = torch.randn(16, 32, requires_grad=True)
    teacher, words = torch.randn(300, 24) * 3, torch.randn(16, 24) * 3
    ref = fused_quest_kl(student, weight, teacher, words, 5.0)[0]
    ref_grad = torch.autograd.grad(ref, (student, weight))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = fused_quest_kl(student, weight, teacher, words, 5.0)[0]
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got, (student, weight)), ref_grad, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_compiled_step_matches_eager() -> None:
    """runtime.compile: the compiled student/teacher give the eager loss and gradients.

    The test compiles with the aot_eager backend (graph capture and AOT autograd, without C++
    code generation, which takes minutes on a small CPU); `quest` itself uses inductor.
    """
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    eager = _quest_distiller().train()
    _, losses = eager.forward_train(x, y)
    ref = torch.stack(list(losses.values())).sum()
    ref.backward()
    compiled = _quest_distiller().train()
    maybe_compile(compiled.student, True, backend="aot_eager")
    maybe_compile(compiled.teacher.model, True, backend="aot_eager")
    _, losses = compiled.forward_train(x, y)
    total = torch.stack(list(losses.values())).sum()
    total.backward()
    assert torch.allclose(total, ref, rtol=1e-5, atol=1e-5)
    # every trainable parameter (student and criterion) gets a gradient in both, and the frozen
    # teacher's none: a compiled module that dropped or detached a gradient fails here
    trainable = 0
    for (name, a), b in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        assert a.requires_grad == b.requires_grad, name
        if not a.requires_grad:
            assert a.grad is None and b.grad is None, name
            continue
        assert a.grad is not None and b.grad is not None, f"no gradient for {name}"
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5), name
        trainable += 1
    assert trainable > 0
    # the state_dict keys are unchanged, so checkpoints and exported students stay loadable
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    torch._dynamo.reset()


def test_auto_backend_uses_the_gpu_when_the_device_is_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """auto on CUDA: FAISS only with its GPU build, otherwise the torch backend on the GPU."""
    monkeypatch.setattr(cb, "faiss_available", lambda: True)
    monkeypatch.setattr(cb, "faiss_has_gpu", lambda: False)
    assert cb.auto_backend("cpu") == "faiss"
    assert cb.auto_backend("cuda") == "torch"
    assert cb.auto_backend("cuda:1") == "torch"
    monkeypatch.setattr(cb, "faiss_has_gpu", lambda: True)
    assert cb.auto_backend("cuda") == "faiss"
    monkeypatch.setattr(cb, "faiss_available", lambda: False)
    assert cb.auto_backend("cpu") == "torch"
