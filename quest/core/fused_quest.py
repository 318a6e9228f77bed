"""A chunked, fused QuEST head: soft assignment, cosine scores and KL without N x K temporaries.

Evaluating the loss naively touches several (positions x words) tensors many times; at K=4096 that
is memory traffic, not arithmetic. Here every block of positions goes through teacher assignment,
student scores, KL, accuracy and the gradient of the scores while the block is hot in cache, in
four block-sized buffers reused by every block. Only the inputs' gradients are kept for backward.
The value is the unfused formula's within float32 rounding (tests/test_losses.py, float64
references).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# Rows (positions) per CPU block: 2^21 scores (8 MiB) when K is large, at most 1024 rows when
# it is small; measured on 2 cores (8192 positions, fwd + bwd), 1024 rows at K = 1024 and 512 at
# K = 4096 beat 256 by 12-15 %: fewer, larger ops (each op is split over the threads, and every
# split has a fixed cost) outweigh a block that no longer fits a core's cache.
_CPU_BLOCK_SCORES = 1 << 21
_CPU_BLOCK_ROWS = (256, 1024)
_GPU_BLOCK = 8192
# teacher logits further below their row's max are raised to it (see forward)
_LOGIT_FLOOR = 80.0


def _cpu_block(k: int) -> int:
    """Rows per block on the CPU for a vocabulary of `k` words."""
    lo, hi = _CPU_BLOCK_ROWS
    return max(lo, min(hi, _CPU_BLOCK_SCORES // max(k, 1)))


def _softmax_into(x: Tensor, out: Tensor) -> Tensor:
    """Row softmax of ``x`` written into ``out`` (torch's fused kernel; no public out= form)."""
    return torch.ops.aten._softmax.out(x, 1, False, out=out)


def _fold_gradients(g: Tensor, weight: Tensor, student: Tensor, start: int,
                    grad_student: Tensor | None, grad_weight: Tensor | None,
                    grad_bias: Tensor | None) -> None:
    """Add one block's d(sum KL)/d(scores) = p_S - p_T into the input gradients."""
    if grad_student is not None:
        torch.mm(g, weight, out=grad_student[start : start + g.shape[0]])
    if grad_weight is not None:  # held transposed, [C_s, K]
        grad_weight.addmm_(student.t(), g)
    if grad_bias is not None:
        grad_bias += g.sum(dim=0)


def _block_kl(s_blk: Tensor, t_blk: Tensor, wt: Tensor, bias: Tensor | None, ct: Tensor,
              c_bias: Tensor, buffers: list[Tensor], sums: list[Tensor],
              usage: Tensor) -> tuple[Tensor, Tensor]:
    """One block of positions: add its KL, hits and max teacher / student probabilities into
    ``sums`` and its teacher word usage into ``usage``; return (p_S, p_T), held in ``buffers``."""
    b_t, b_s, b_pt, b_ps = buffers
    t_logits = torch.addmm(c_bias, t_blk, ct, out=b_t)
    if bias is None:
        scores = torch.mm(s_blk, wt, out=b_s)
    else:
        scores = torch.addmm(bias, s_blk, wt, out=b_s)
    t_lmax, t_arg = t_logits.max(dim=1, keepdim=True)
    # the teacher logits are of size T ||c||^2 (10^5 at T = 500): they are shifted by their
    # row's max first (exact for the words that carry probability), so that the KL below sums
    # small numbers; summing p_T t and lse_t apart and subtracting lost up to 7e-3 of the value
    # in float32 at T = 500 (tests/test_losses.py)
    t_logits.sub_(t_lmax)
    # exp() of a logit more than 80 below its row's max gives a denormal float or underflows,
    # and x86 CPUs take a slow microcode path for each (the teacher's softmax ran 2.5x slower on
    # near-hard targets). Raised to max - 80, such a word's probability stays below e^-80
    # (2e-35): invisible beside the row's max in float32
    t_logits.clamp_(min=-_LOGIT_FLOOR)
    p_t = _softmax_into(t_logits, b_pt)
    p_s = _softmax_into(scores, b_ps)
    # the max probability and the max logit give the log-partition back:
    # lse = logit_max - log(p_max) (the shifted teacher's max logit is 0); amax (values only)
    # runs ~4x faster than max with indices, so only the teacher's word is located
    s_lmax = scores.amax(dim=1, keepdim=True)
    t_pmax = p_t.gather(1, t_arg)
    s_pmax = p_s.amax(dim=1, keepdim=True)
    lse_t = -t_pmax.log()
    lse_s = s_lmax - s_pmax.log()
    kl_sum, hits, max_sum, s_max_sum = sums
    # the student hits when the teacher's word has the student's top score
    hits += (scores.gather(1, t_arg) >= s_lmax).sum()
    # sum over the block of p_T (t - s): one dot product, no product tensor
    cross = torch.dot(p_t.view(-1), t_logits.sub_(scores).view(-1))
    kl_sum += cross - lse_t.sum() + lse_s.sum()
    max_sum += t_pmax.sum()
    s_max_sum += s_pmax.sum()
    usage += p_t.sum(dim=0)
    return p_s, p_t


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
        # d loss / d scores = (p_S - p_T) / N is multiplied into the gradients of the student
        # vectors and of the weight block by block, while the block is hot in cache, so no
        # N x K gradient is stored; backward only scales these by the incoming gradient
        want_s, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        grad_student = torch.zeros_like(student) if want_s else None
        grad_weight = None
        grad_bias = torch.zeros_like(bias) if want_b and bias is not None else None
        # the block sums of KL, hits, max teacher and max student probability
        sums = [student.new_zeros(()) for _ in range(4)]
        usage = student.new_zeros(k)
        # -T ||f - c||^2 = 2T f.c - T ||c||^2 - T ||f||^2; the last term is the same for every
        # word of a position, and neither the softmax nor KL = sum p_T (t - s) - lse_t + lse_s
        # changes when a row's logits shift, so it is never computed
        c_bias = codebook.pow(2).sum(dim=1).mul_(-temperature)
        ct = codebook.t().mul(2.0 * temperature)
        wt = weight.t()
        # the weight gradient is accumulated transposed ([C_s, K] += s^T g): a plain-by-plain
        # product runs about 12 % faster on the CPU than g^T s into [K, C_s]
        grad_weight_t = weight.new_zeros(weight.shape[1], k) if want_w else None
        # four block-sized buffers written in place by every block: fresh multi-MiB tensors
        # per block cost the CPU page faults and zeroing (8 % of the head at K = 4096)
        buffers = [student.new_empty(min(block, n), k) for _ in range(4)]
        for start in range(0, n, block):
            stop = min(start + block, n)
            s_blk = student[start:stop]
            p_s, p_t = _block_kl(s_blk, teacher[start:stop], wt, bias, ct, c_bias,
                                 [b[: stop - start] for b in buffers], sums, usage)
            if want_s or want_w or want_b:
                _fold_gradients(p_s.sub_(p_t), weight, s_blk, start,
                                grad_student, grad_weight_t, grad_bias)
        if grad_weight_t is not None:
            grad_weight = grad_weight_t.t().contiguous()
        ctx.grads = (grad_student, grad_weight, grad_bias)
        ctx.n = n
        kl_sum, hits, max_sum, s_max_sum = sums
        ctx.mark_non_differentiable(hits, max_sum, usage, s_max_sum)
        return kl_sum / n, hits / n, max_sum / n, usage / n, s_max_sum / n

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_loss: Tensor, *_: Tensor
    ) -> tuple[Tensor | None, ...]:
        scale = grad_loss / ctx.n
        grads = [None if g is None else g * scale for g in ctx.grads]
        return grads[0], grads[1], grads[2], None, None, None, None


def fused_quest_kl(
    student: Tensor, weight: Tensor, teacher: Tensor, codebook: Tensor, temperature: float,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Return (mean KL, word accuracy, mean max teacher assignment, mean teacher word usage,
    mean max student probability); ``bias`` ([K]) is added to every position's scores."""
    block = _GPU_BLOCK if student.is_cuda else _cpu_block(weight.shape[0])
    # float32 under autocast too: softmax(-T ||f - c||^2) of logits in the hundreds needs it
    if not torch.is_grad_enabled():  # forward computes the gradients only when they are wanted
        student, weight = student.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    with torch.autocast(device_type=student.device.type, enabled=False):
        return _FusedQuestKL.apply(student.float(), weight.float(),
                                   None if bias is None else bias.float(),
                                   teacher.detach().float(), codebook.float(), temperature, block)
