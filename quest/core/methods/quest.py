"""quest and quest+kd: the student predicts the teacher's visual words (settings: student.quest;
quest+kd adds the Hinton term with student.kd)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from quest.core.distill import Distiller, FrozenTeacher
from quest.core.levels import LevelInputs
from quest.core.losses import QuestLoss, kd_loss, pool_teacher_map
from quest.core.methods import MethodContext, MethodSpec, register
from quest.core.methods.kd import KDSettings
from quest.core.models.taps import FeatureTap


class Quest(Distiller):
    """QuEST: CE + weight * KL(p_T || p_S) over the teacher's visual-word assignments, plus one
    such term (quest_<name>) per extra quantized level, each with its own codebook."""

    name = "quest"

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        codebook: Tensor,
        teacher_layer: str,
        student_layer: str,
        student_channels: int,
        temperature: float = 5.0,
        weight: float = 1.0,
        init_scale: float = 3.0,
        kd_settings: tuple[float, float, float] | None = None,
        predictor: str = "learned_scale",
        teacher_pool: int = 1,
        extra_levels: list[LevelInputs] | None = None,
    ) -> None:
        super().__init__(student)
        self.teacher = FrozenTeacher(teacher)
        self.criterion = QuestLoss(codebook, student_channels, temperature, init_scale, predictor)
        self.weight = weight
        # (temperature, ce_weight, kd_weight) when the Hinton term is added (quest+kd)
        self.kd_settings = kd_settings
        self.teacher_layer, self.student_layer = teacher_layer, student_layer
        self.teacher_pool = int(teacher_pool)
        levels = list(extra_levels or [])
        # one criterion (codebook + predictor) per extra level, trained with the student
        self.level_criteria = nn.ModuleList(
            QuestLoss(lv.codebook, lv.student_channels, lv.level.temperature,
                      lv.level.init_scale, lv.level.predictor) for lv in levels)
        self.levels = [(lv.level.name, lv.teacher_layer, lv.student_layer, lv.teacher_pool,
                        lv.level.weight) for lv in levels]
        self._t_tap = FeatureTap(self.teacher.model,
                                 [teacher_layer, *(lv.teacher_layer for lv in levels)])
        self._s_tap = FeatureTap(self.student,
                                 [student_layer, *(lv.student_layer for lv in levels)])

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Student logits with CE, the QuEST term and (for quest+kd) the KD term."""
        t_logits = self.teacher(x)
        # pooled as the features stage pooled the vectors the codebook was fit on
        t_feat = pool_teacher_map(self._t_tap.outputs[self.teacher_layer], self.teacher_pool)
        logits = self.student(x)
        s_feat = self._s_tap.outputs[self.student_layer]
        terms = self.criterion.terms(s_feat, t_feat)
        ce = F.cross_entropy(logits, y)
        losses: dict[str, Tensor]
        if self.kd_settings is None:
            losses = {"ce": ce}
        else:
            temp, ce_w, kd_w = self.kd_settings
            losses = {"ce": ce_w * ce, "kd": kd_w * kd_loss(logits, t_logits, temp)}
        losses["quest"] = self.weight * terms.pop("loss")
        monitors = terms
        for (name, t_layer, s_layer, pool, weight), crit in zip(
                self.levels, self.level_criteria, strict=True):
            t_map = pool_teacher_map(self._t_tap.outputs[t_layer], pool)
            level_terms = crit.terms(self._s_tap.outputs[s_layer], t_map)
            losses[f"quest_{name}"] = weight * level_terms.pop("loss")
            monitors.update({f"{k}_{name}": v for k, v in level_terms.items()})
        self.monitors = monitors
        return logits, losses


def _build(ctx: MethodContext, with_kd: bool) -> Quest:
    q = ctx.settings.quest
    assert ctx.teacher is not None and ctx.codebook is not None
    assert ctx.teacher_layer and ctx.student_layer and ctx.student_channels
    kd = ctx.settings.section("kd", KDSettings)
    return Quest(ctx.student, ctx.teacher, ctx.codebook, ctx.teacher_layer, ctx.student_layer,
                 ctx.student_channels, q.temperature, q.weight, q.init_scale,
                 kd_settings=(kd.temperature, kd.ce_weight, kd.kd_weight) if with_kd else None,
                 predictor=q.predictor, teacher_pool=ctx.teacher_pool,
                 extra_levels=ctx.extra_levels)


def build(ctx: MethodContext) -> Quest:
    """CE + weight * KL(p_T || p_S) over the teacher's soft visual-word assignments."""
    return _build(ctx, with_kd=False)


def build_with_kd(ctx: MethodContext) -> Quest:
    """The QuEST term beside Hinton KD (not in the official code; a study knob)."""
    return _build(ctx, with_kd=True)


# the per-epoch diagnostics of every level (extra levels log them suffixed _<level>)
MONITORS = ("word_accuracy", "mean_max_assignment", "student_mean_max", "predictor_scale",
            "teacher_perplexity")

SPEC = register(MethodSpec("quest", build, needs_teacher=True, needs_codebook=True,
                           settings=("quest",), description="QuEST visual words + CE",
                           loss_terms=("ce", "quest"), monitors=MONITORS))
SPEC_KD = register(MethodSpec("quest+kd", build_with_kd, needs_teacher=True,
                              needs_codebook=True, settings=("quest", "kd"),
                              description="QuEST visual words + Hinton KD",
                              loss_terms=("ce", "kd", "quest"), monitors=MONITORS))
