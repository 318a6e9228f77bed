"""Distillation methods: each returns the student's logits and a dict of named, weighted losses."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quest.losses import QuestLoss, kd_loss
from quest.models.taps import FeatureTap


class FrozenTeacher(nn.Module):
    """A teacher that is always in eval mode and never receives gradients, whatever train() asks."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.model.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Ignore `mode`: a frozen teacher stays in eval mode (BatchNorm statistics stay fixed)."""
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        """Teacher logits, computed in inference mode (no autograd records, no version counters)."""
        with torch.inference_mode():
            return self.model(x)


class Distiller(nn.Module):
    """Base method: plain cross-entropy on the student."""

    name = "ce"

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student
        # Detached monitoring values of the last step (device tensors; read once per epoch).
        self.monitors: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        """Inference: the student's logits."""
        return self.student(x)

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Training step: the student's logits and the named loss terms to be summed."""
        logits = self.student(x)
        return logits, {"ce": F.cross_entropy(logits, y)}

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the optimizer updates (never the teacher's)."""
        return (p for p in self.parameters() if p.requires_grad)

    def export_student(self) -> nn.Module:
        """The plain student network, without any training-only heads."""
        return self.student


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


class Quest(Distiller):
    """QuEST: CE + weight * KL(p_T || p_S) over the teacher's visual-word assignments."""

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
    ) -> None:
        super().__init__(student)
        self.teacher = FrozenTeacher(teacher)
        self.criterion = QuestLoss(codebook, student_channels, temperature, init_scale, predictor)
        self.weight = weight
        # (temperature, ce_weight, kd_weight) when the Hinton term is added (quest+kd)
        self.kd_settings = kd_settings
        self._t_tap = FeatureTap(self.teacher.model, [teacher_layer])
        self._s_tap = FeatureTap(self.student, [student_layer])
        self.teacher_layer, self.student_layer = teacher_layer, student_layer

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Student logits with CE, the QuEST term and (for quest+kd) the KD term."""
        t_logits = self.teacher(x)
        t_feat = self._t_tap.outputs[self.teacher_layer]
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
        self.monitors = terms
        return logits, losses


def build_distiller(
    method: str,
    student: nn.Module,
    teacher: nn.Module | None = None,
    *,
    codebook: Tensor | None = None,
    teacher_layer: str | None = None,
    student_layer: str | None = None,
    student_channels: int | None = None,
    quest_temperature: float = 5.0,
    quest_weight: float = 1.0,
    init_scale: float = 3.0,
    quest_predictor: str = "learned_scale",
    kd_temperature: float = 4.0,
    kd_ce_weight: float = 0.1,
    kd_weight: float = 0.9,
) -> Distiller:
    """Build the distiller for one method name: ce, kd, quest or quest+kd."""
    if method == "ce":
        return Distiller(student)
    assert teacher is not None, "distillation needs a teacher"
    if method == "kd":
        return KD(student, teacher, kd_temperature, kd_ce_weight, kd_weight)
    assert codebook is not None and teacher_layer and student_layer and student_channels
    kd = (kd_temperature, kd_ce_weight, kd_weight) if method == "quest+kd" else None
    return Quest(
        student,
        teacher,
        codebook,
        teacher_layer,
        student_layer,
        student_channels,
        quest_temperature,
        quest_weight,
        init_scale,
        kd_settings=kd,
        predictor=quest_predictor,
    )
