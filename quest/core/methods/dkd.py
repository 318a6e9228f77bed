"""dkd: decoupled knowledge distillation with mdistiller's semantics (settings: student.dkd).

KD's KL splits into a target-class part (TCKD: the binary target-vs-rest distributions) and a
non-target part (NCKD: the distribution over the other classes, the target masked out); DKD weighs
them separately: loss = ce_weight * CE + warm-up * (alpha * TCKD + beta * NCKD), both KLs at
temperature T, times T^2, summed over classes and averaged over the batch (mdistiller's
CE 1, alpha 1, beta 8, T 4).

Warm-up: mdistiller multiplies the DKD term by min(epoch / 20, 1) over a 240-epoch schedule
(epoch 1-based), i.e. a linear ramp over the first 1/12 of training. Here the ramp covers the same
share (`warmup_share`, 20/240) of whatever schedule runs and rises every step, reaching
(steps done) / (share * total steps): at the end of epoch e of a 240-epoch run that is e/20, as in
mdistiller, and a short schedule (6 epochs: the first half epoch) still warms up instead of
starting at full weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from quest.core.distill import Batch, Distiller, FrozenTeacher, StepContext
from quest.core.methods import MethodContext, MethodSpec, register
from quest.infra.config import Section
from quest.infra.errors import QuestError


class DKDSettings(Section):
    """DKD settings (student.dkd): mdistiller's CIFAR-100 defaults."""

    ce_weight: float = Field(1.0, description="weight of the cross-entropy on the labels")
    alpha: float = Field(1.0, description="weight of the target-class term (TCKD)")
    beta: float = Field(8.0, description=(
        "weight of the non-target term (NCKD); mdistiller's default 8, its per-pair configs use "
        "2 for resnet56->resnet20 and 6 for vgg13->vgg8"))
    temperature: float = Field(4.0, gt=0, description="softening temperature T of both "
                                                      "softmaxes")
    warmup_share: float = Field(20 / 240, ge=0, le=1, description=(
        "share of the schedule over which the DKD term ramps up linearly (mdistiller: 20 of "
        "240 epochs; scaled to the same share of a shorter schedule)"))


def dkd_terms(s_logits: Tensor, t_logits: Tensor, labels: Tensor, temperature: float
              ) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD), each KL(teacher || student) * T^2 summed over classes, batch mean."""
    gt = F.one_hot(labels, s_logits.shape[1]).bool()
    p_s = F.softmax(s_logits / temperature, dim=1)
    p_t = F.softmax(t_logits / temperature, dim=1)
    # the binary target-vs-rest distributions
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], dim=1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], dim=1)
    scale = temperature ** 2 / s_logits.shape[0]
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * scale
    # the distribution over the non-target classes (mdistiller subtracts 1000 from the target's
    # logit; -inf would make 0 * log 0 terms NaN in the KL)
    masked_s = s_logits / temperature - 1000.0 * gt
    masked_t = t_logits / temperature - 1000.0 * gt
    nckd = F.kl_div(F.log_softmax(masked_s, dim=1), F.softmax(masked_t, dim=1),
                    reduction="sum") * scale
    return tckd, nckd


def warmup_factor(ctx: StepContext, share: float) -> float:
    """The DKD term's weight at this step: linear in the steps done, 1 after `share` of them."""
    if share <= 0:
        return 1.0
    done = (ctx.step + 1) / max(ctx.total_steps, 1)
    return min(done / share, 1.0)


class DKD(Distiller):
    """ce_weight * CE + warm-up * (alpha * TCKD + beta * NCKD) against the teacher's logits."""

    name = "dkd"

    def __init__(self, student: nn.Module, teacher: nn.Module, settings: DKDSettings) -> None:
        super().__init__(student)
        self.teacher = FrozenTeacher(teacher)
        self.settings = settings

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Not used: DKD's warm-up needs the schedule position (`step`)."""
        raise QuestError("dkd needs the step context for its warm-up: train it through "
                         "Distiller.step(batch, ctx), as the Trainer does")

    def step(self, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        """Student logits with the weighted CE and the warmed-up DKD term."""
        s = self.settings
        t_logits = self.teacher(batch.images).clone()  # out of inference mode
        logits = self.student(batch.images)
        tckd, nckd = dkd_terms(logits, t_logits, batch.labels, s.temperature)
        w = warmup_factor(ctx, s.warmup_share)
        return logits, {"ce": s.ce_weight * F.cross_entropy(logits, batch.labels),
                        "dkd": w * (s.alpha * tckd + s.beta * nckd)}


def build(ctx: MethodContext) -> DKD:
    """DKD around the student and the frozen teacher."""
    assert ctx.teacher is not None
    return DKD(ctx.student, ctx.teacher, ctx.settings.section("dkd", DKDSettings))


SPEC = register(MethodSpec("dkd", build, needs_teacher=True, settings=("dkd",),
                           description="decoupled KD, TCKD + 8 NCKD with warm-up (mdistiller)",
                           owns={"dkd": DKDSettings}, loss_terms=("ce", "dkd")))
