"""at: attention transfer with RepDistiller's semantics (settings: student.at).

at(f) = L2-normalised, flattened channel mean of f^p (p = 2). Every intermediate stage output of
the student is paired, in order, with the teacher's (RepDistiller's feat[1:-1]); the larger map
is average-pooled to the smaller one's size; per pair the mean of (at_s - at_t)^2, summed over
pairs; loss = CE + weight * AT (weight 1000).
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from quest.core.distill import Distiller, FrozenTeacher
from quest.core.methods import MethodContext, MethodSpec, register
from quest.core.methods.fitnet import arch_of
from quest.core.models.taps import FeatureTap
from quest.core.models.zoo import feature_stages
from quest.infra.config import Section
from quest.infra.errors import QuestError


class ATSettings(Section):
    """Attention transfer settings (student.at), RepDistiller's: CE + weight * sum of pairs."""

    weight: float = Field(1000.0, description="weight of the summed attention terms")
    p: float = Field(2.0, description="power of the feature maps in the attention map")


def attention_map(f: Tensor, p: float = 2.0) -> Tensor:
    """B x (H*W): the channel mean of f^p, flattened and L2-normalised per image."""
    return F.normalize(f.pow(p).mean(1).flatten(1), dim=1)


def at_pair_loss(f_s: Tensor, f_t: Tensor, p: float = 2.0) -> Tensor:
    """Mean squared difference of the two attention maps, the larger map pooled first."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, f_t.shape[2:])
    elif t_h > s_h:
        f_t = F.adaptive_avg_pool2d(f_t, f_s.shape[2:])
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


class AttentionTransfer(Distiller):
    """CE + weight * sum over stage pairs of at_pair_loss."""

    name = "at"

    def __init__(self, student: nn.Module, teacher: nn.Module, s_layers: list[str],
                 t_layers: list[str], weight: float, p: float) -> None:
        super().__init__(student)
        self.teacher = FrozenTeacher(teacher)
        self.pairs = list(zip(s_layers, t_layers, strict=True))
        self.weight, self.p = weight, p
        self._s_tap = FeatureTap(self.student, s_layers)
        self._t_tap = FeatureTap(self.teacher.model, t_layers)

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Student logits with the CE and the weighted attention terms."""
        self.teacher(x)
        targets = {t: self._t_tap.outputs[t].clone() for _, t in self.pairs}
        logits = self.student(x)
        total = sum(at_pair_loss(self._s_tap.outputs[s], targets[t], self.p)
                    for s, t in self.pairs)
        assert isinstance(total, Tensor)
        return logits, {"ce": F.cross_entropy(logits, y), "at": self.weight * total}


def build(ctx: MethodContext) -> AttentionTransfer:
    """Pairs every intermediate stage (the stem left out) of student and teacher in order."""
    assert ctx.teacher is not None
    s_stages = list(feature_stages(arch_of(ctx.student, "student"))[1:])
    t_stages = list(feature_stages(arch_of(ctx.teacher, "teacher"))[1:])
    if len(s_stages) != len(t_stages):
        raise QuestError(f"at: the student has {len(s_stages)} stages and the teacher "
                         f"{len(t_stages)}: attention transfer pairs them one to one")
    a = ctx.settings.section("at", ATSettings)
    return AttentionTransfer(ctx.student, ctx.teacher, s_stages, t_stages, a.weight, a.p)


SPEC = register(MethodSpec("at", build, needs_teacher=True, settings=("at",),
                           description="attention transfer over every stage (RepDistiller)",
                           owns={"at": ATSettings}, loss_terms=("ce", "at")))
