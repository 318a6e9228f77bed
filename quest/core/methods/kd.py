"""kd: Hinton knowledge distillation with RepDistiller's weighting (settings: student.kd)."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from quest.core.distill import Distiller, FrozenTeacher
from quest.core.losses import kd_loss
from quest.core.methods import MethodContext, MethodSpec, register
from quest.infra.config import Section


class KDSettings(Section):
    """Hinton KD settings (student.kd), RepDistiller's weighting; quest+kd reads them too."""

    temperature: float = Field(4.0, description="softening temperature T of both softmaxes")
    ce_weight: float = Field(0.1, description="weight of the cross-entropy on the labels")
    kd_weight: float = Field(0.9, description="weight of KL(T) * T^2 against the teacher")


class KD(Distiller):
    """Hinton KD as in RepDistiller: ce_weight * CE + kd_weight * KL(T) * T^2."""

    name = "kd"

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 4.0,
        ce_weight: float = 0.1,
        kd_weight: float = 0.9,
    ) -> None:
        super().__init__(student)
        self.teacher = FrozenTeacher(teacher)
        self.temperature, self.ce_weight, self.kd_weight = temperature, ce_weight, kd_weight

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Student logits with the weighted CE and KD terms."""
        t_logits = self.teacher(x)
        logits = self.student(x)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, y),
            "kd": self.kd_weight * kd_loss(logits, t_logits, self.temperature),
        }


def build(ctx: MethodContext) -> KD:
    """ce_weight * CE + kd_weight * KL(T) * T^2 against the teacher's logits."""
    k = ctx.settings.section("kd", KDSettings)
    assert ctx.teacher is not None
    return KD(ctx.student, ctx.teacher, k.temperature, k.ce_weight, k.kd_weight)


SPEC = register(MethodSpec("kd", build, needs_teacher=True, settings=("kd",),
                           description="Hinton KD (RepDistiller's 0.1 CE + 0.9 KD)",
                           owns={"kd": KDSettings}, loss_terms=("ce", "kd")))
