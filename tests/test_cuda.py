"""CUDA code paths against their CPU twins. Marked `cuda`: deselected by default (pyproject's
addopts), run by scripts/gpu_check.sh with `-m cuda` on a GPU machine, where each test fails
(never skips) if no GPU is visible."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quest.core.losses import QuestLoss

pytestmark = pytest.mark.cuda


def _cuda() -> torch.device:
    assert torch.cuda.is_available(), "needs a CUDA GPU: run scripts/gpu_check.sh on a GPU machine"
    return torch.device("cuda")


@pytest.mark.parametrize("predictor", ["learned_scale", "fixed_scale_bias"])
def test_fused_quest_head_on_cuda_matches_cpu(predictor: str) -> None:
    """The GPU block size and kernels give the CPU value and gradients (float32 tolerances)."""
    dev = _cuda()
    torch.manual_seed(0)
    words = torch.randn(512, 64) * 2
    crit = QuestLoss(words, student_channels=32, temperature=5.0, init_scale=10.0,
                     predictor=predictor)
    if crit.predictor.bias is not None:
        with torch.no_grad():
            crit.predictor.bias.normal_()
    s = torch.randn(16, 32, 8, 8, requires_grad=True)
    t = torch.relu(torch.randn(16, 64, 8, 8)) * 3
    out_cpu = crit.terms(s, t)
    params = [s, *crit.parameters()]
    g_cpu = torch.autograd.grad(out_cpu["loss"], params)
    crit_gpu = QuestLoss(words, student_channels=32, temperature=5.0, init_scale=10.0,
                         predictor=predictor).to(dev)
    crit_gpu.load_state_dict(crit.state_dict())
    s_gpu = s.detach().to(dev).requires_grad_()
    out_gpu = crit_gpu.terms(s_gpu, t.to(dev))
    g_gpu = torch.autograd.grad(out_gpu["loss"], [s_gpu, *crit_gpu.parameters()])
    for key in ("loss", "word_accuracy", "mean_max_assignment", "student_mean_max"):
        assert out_gpu[key].item() == pytest.approx(out_cpu[key].item(), rel=1e-4, abs=1e-5), key
    for a, b in zip(g_gpu, g_cpu, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=1e-5)


def test_bf16_quest_step_on_cuda_keeps_the_head_in_float32() -> None:
    from quest.core.methods import build_distiller
    from quest.core.models.zoo import build_model

    dev = _cuda()
    torch.manual_seed(1)
    teacher, student = build_model("resnet20", 10).to(dev), build_model("resnet8", 10).to(dev)
    dist = build_distiller("quest", student, teacher, codebook=torch.randn(256, 64, device=dev),
                           teacher_layer="layer3", student_layer="layer3", student_channels=64,
                           quest_weight=10.0)
    x, y = torch.randn(32, 3, 32, 32, device=dev), torch.randint(0, 10, (32,), device=dev)
    _, ref = dist.forward_train(x, y)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, got = dist.forward_train(x, y)
    assert got["quest"].dtype == torch.float32 and torch.isfinite(got["quest"])
    # bf16 features move the targets slightly; the QuEST term stays close to the fp32 one
    assert got["quest"].item() == pytest.approx(ref["quest"].item(), rel=5e-2)


def test_torch_kmeans_on_cuda_matches_cpu() -> None:
    from quest.core.codebook import assign, fit_kmeans

    _cuda()
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(16, 32)).astype(np.float32) * 6
    x = (centers[rng.integers(0, 16, 8000)] + rng.normal(size=(8000, 32))).astype(np.float32)
    cpu = fit_kmeans(x, 16, iterations=10, seed=0, backend="torch", device="cpu")
    gpu = fit_kmeans(x, 16, iterations=10, seed=0, backend="torch", device="cuda")
    assert gpu.objective[-1] == pytest.approx(cpu.objective[-1], rel=1e-3)
    same = (assign(x, gpu.centroids, device="cuda") == assign(x, cpu.centroids)).mean()
    assert same > 0.999


def test_in_memory_loader_on_cuda_gives_the_cpu_batches() -> None:
    from quest.core.data.loader import InMemoryLoader

    dev = _cuda()
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (96, 3, 32, 32), dtype=np.uint8), np.arange(96) % 10
    kw = {"batch_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "train": True, "seed": 3,
          "repeat": 2}
    for (xc, yc, ic), (xg, yg, ig) in zip(InMemoryLoader(x, y, **kw),
                                          InMemoryLoader(x, y, device=dev, **kw), strict=True):
        assert torch.equal(yc, yg.cpu()) and torch.equal(ic, ig.cpu())
        assert ig.device.type == "cuda"  # the sample indices come on the training device
        torch.testing.assert_close(xc, xg.cpu(), rtol=0, atol=1e-6)


def test_compiled_channels_last_quest_steps_on_cuda_train() -> None:
    from quest.core.engine import make_optimizer
    from quest.core.methods import build_distiller
    from quest.core.models.zoo import build_model
    from quest.infra.config import OptimConfig

    dev = _cuda()
    torch.manual_seed(2)
    teacher = build_model("resnet20", 10).to(dev).to(memory_format=torch.channels_last)
    student = build_model("resnet8", 10).to(dev).to(memory_format=torch.channels_last)
    dist = build_distiller("quest", student, teacher, codebook=torch.randn(128, 64, device=dev),
                           teacher_layer="layer3", student_layer="layer3", student_channels=64)
    student.forward = torch.compile(student.forward)
    opt = make_optimizer(dist.trainable_parameters(), OptimConfig(lr=0.05, epochs=1))
    x = torch.randn(64, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,), device=dev)
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, terms = dist.forward_train(x, y)
        total = torch.stack(list(terms.values())).sum()
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        losses.append(total.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
