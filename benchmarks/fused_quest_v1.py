"""The QuEST head as it was before 2026-12-02, kept for benchmarks/head_speed.py only (a chunked,
fused head: soft assignment, cosine scores and KL without N x K temporaries).

Evaluating the loss naively touches several (positions x words) tensors many times; at K=4096 that
is memory traffic, not arithmetic. Here every block of positions goes through teacher assignment,
student scores, KL, accuracy and the gradient of the scores while the block is hot in cache. Only
the gradient of the scores is kept for backward. The value is exactly the unfused formula's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# Rows (positions) per block: 256 x 4096 floats = 4 MiB, about a core's share of a CPU cache.
_CPU_BLOCK = 256
_GPU_BLOCK = 8192


class _FusedQuestKL(torch.autograd.Function):
    """KL(p_T || softmax(x W^T)) averaged over rows; p_T = softmax(-T ||f - c||^2)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student: Tensor,  # [N, C_s] L2-normalised student vectors (requires grad)
        weight: Tensor,  # [K, C_s] scale * normalised predictor rows (requires grad)
        bias: Tensor | None,  # [K] per-word score offset (fixed-scale predictor) or None
        teacher: Tensor,  # [N, C_t] teacher vectors (no grad)
        codebook: Tensor,  # [K, C_t]
        temperature: float,
        block: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        n, k = student.shape[0], weight.shape[0]
        grad_scores = torch.empty(n, k, dtype=student.dtype, device=student.device)
        kl_sum = student.new_zeros(())
        hits = student.new_zeros(())
        max_sum = student.new_zeros(())
        s_max_sum = student.new_zeros(())
        usage = student.new_zeros(k)
        c_sq = codebook.pow(2).sum(dim=1)
        wt = weight.t()
        ct = codebook.t()
        for start in range(0, n, block):
            f = teacher[start : start + block]
            f_sq = f.pow(2).sum(dim=1, keepdim=True)
            t_logits = torch.addmm((f_sq + c_sq).mul_(-temperature), f, ct,
                                   beta=1.0, alpha=2.0 * temperature)
            scores = student[start : start + block] @ wt
            if bias is not None:
                scores += bias
            # one max (with its index) and one exp pass per side; the max entry of each
            # softmax is exp(0) / sum, so the mean max assignment comes for free
            t_max, t_arg = t_logits.max(dim=1, keepdim=True)
            s_max, s_arg = scores.max(dim=1, keepdim=True)
            p_t = (t_logits - t_max).exp_()
            t_sum = p_t.sum(dim=1, keepdim=True)
            p_t.div_(t_sum)
            p_s = (scores - s_max).exp_()
            s_sum = p_s.sum(dim=1, keepdim=True)
            p_s.div_(s_sum)
            lse_t = t_max + t_sum.log()
            lse_s = s_max + s_sum.log()
            # KL = sum_k p_T (t_k - s_k) - lse_t + lse_s, as sum_k p_T = 1
            cross = (p_t * (t_logits - scores)).sum()
            kl_sum += cross - lse_t.sum() + lse_s.sum()
            hits += (s_arg == t_arg).sum()
            max_sum += t_sum.reciprocal().sum()
            s_max_sum += s_sum.reciprocal().sum()
            usage += p_t.sum(dim=0)
            grad_scores[start : start + block] = p_s.sub_(p_t)
        ctx.save_for_backward(student, weight, grad_scores)
        ctx.n = n
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(hits, max_sum, usage, s_max_sum)
        return kl_sum / n, hits / n, max_sum / n, usage / n, s_max_sum / n

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_loss: Tensor, *_: Tensor
    ) -> tuple[Tensor | None, ...]:
        student, weight, grad_scores = ctx.saved_tensors
        g = grad_scores * (grad_loss / ctx.n)
        grad_student = g @ weight if ctx.needs_input_grad[0] else None
        grad_weight = g.t() @ student if ctx.needs_input_grad[1] else None
        grad_bias = g.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_student, grad_weight, grad_bias, None, None, None, None


def fused_quest_kl(
    student: Tensor, weight: Tensor, teacher: Tensor, codebook: Tensor, temperature: float,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Return (mean KL, word accuracy, mean max teacher assignment, mean teacher word usage,
    mean max student probability); ``bias`` ([K]) is added to every position's scores."""
    block = _GPU_BLOCK if student.is_cuda else _CPU_BLOCK
    # float32 under autocast too: softmax(-T ||f - c||^2) of logits in the hundreds needs it
    with torch.autocast(device_type=student.device.type, enabled=False):
        return _FusedQuestKL.apply(student.float(), weight.float(),
                                   None if bias is None else bias.float(),
                                   teacher.detach().float(), codebook.float(), temperature, block)
