"""fitnet: FitNets hints with RepDistiller's semantics (settings: student.fitnet).

The student's stage output `hint_layer` (2: the middle stage) goes through a regressor to the
teacher's at the same index; loss = CE + weight * MSE (weight 100). The regressor is chosen from
the spatial sizes: equal sizes a 1x1 conv, a student map twice the teacher's a 3x3 stride-2
conv, a teacher map twice the student's a 4x4 stride-2 transposed conv, otherwise (student
larger) a (1 + s - t) kernel; the conv has a bias and is followed by BatchNorm and ReLU. It is
trained by the student's optimizer and never exported.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from quest.core.distill import Distiller, FrozenTeacher
from quest.core.methods import MethodContext, MethodSpec, register
from quest.core.models.taps import FeatureTap, tap_shapes
from quest.core.models.zoo import feature_stages
from quest.infra.config import Section
from quest.infra.errors import QuestError


class FitNetSettings(Section):
    """FitNets hint settings (student.fitnet), RepDistiller's: CE + weight * MSE."""

    weight: float = Field(100.0, description="weight of the hint MSE")
    hint_layer: int = Field(2, description="index into the stage outputs [stem, stage 1, stage "
                                           "2, ...]: 2 is the middle stage")


class HintRegressor(nn.Module):
    """conv (by the size rule above) -> BatchNorm -> ReLU, from student to teacher shape."""

    def __init__(self, s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> None:
        super().__init__()
        s_c, s_h, s_w = s_shape
        t_c, t_h, t_w = t_shape
        self.conv: nn.Module
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise QuestError(f"fitnet: student map {s_h}x{s_w} is smaller than the teacher's "
                             f"{t_h}x{t_w} and not half of it: choose another hint_layer")
        self.bn = nn.BatchNorm2d(t_c)

    def forward(self, x: Tensor) -> Tensor:
        """The student's hint mapped to the teacher's channels and size."""
        return F.relu(self.bn(self.conv(x)))


def arch_of(model: nn.Module, role: str) -> str:
    """The zoo name a model was built with (build_model records it)."""
    arch = getattr(model, "quest_arch", None)
    if not arch:
        raise QuestError(f"the {role} was not built by the model zoo: its stages are unknown")
    return str(arch)


class FitNet(Distiller):
    """CE + weight * MSE(regressor(student hint), teacher hint)."""

    name = "fitnet"

    def __init__(self, student: nn.Module, teacher: nn.Module, s_layer: str, t_layer: str,
                 regressor: nn.Module, weight: float) -> None:
        super().__init__(student)
        self.teacher = FrozenTeacher(teacher)
        self.regressor = regressor
        self.weight = weight
        self.s_layer, self.t_layer = s_layer, t_layer
        self._s_tap = FeatureTap(self.student, [s_layer])
        self._t_tap = FeatureTap(self.teacher.model, [t_layer])

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Student logits with the CE and the weighted hint terms."""
        self.teacher(x)
        target = self._t_tap.outputs[self.t_layer].clone()  # out of inference mode
        logits = self.student(x)
        hint = F.mse_loss(self.regressor(self._s_tap.outputs[self.s_layer]), target)
        return logits, {"ce": F.cross_entropy(logits, y), "hint": self.weight * hint}


def build(ctx: MethodContext) -> FitNet:
    """The hint pair at `student.fitnet.hint_layer` of both nets, its regressor, the loss."""
    assert ctx.teacher is not None and ctx.image_shape is not None
    f = ctx.settings.section("fitnet", FitNetSettings)
    s_stages = feature_stages(arch_of(ctx.student, "student"))
    t_stages = feature_stages(arch_of(ctx.teacher, "teacher"))
    if not 0 <= f.hint_layer < min(len(s_stages), len(t_stages)):
        raise QuestError(f"student.fitnet.hint_layer is {f.hint_layer}: use 0 to "
                         f"{min(len(s_stages), len(t_stages)) - 1}")
    s_layer, t_layer = s_stages[f.hint_layer], t_stages[f.hint_layer]
    (s_shape,) = tap_shapes(ctx.student, [s_layer], ctx.image_shape)
    (t_shape,) = tap_shapes(ctx.teacher, [t_layer], ctx.image_shape)
    return FitNet(ctx.student, ctx.teacher, s_layer, t_layer, HintRegressor(s_shape, t_shape),
                  f.weight)


SPEC = register(MethodSpec("fitnet", build, needs_teacher=True, settings=("fitnet",),
                           description="FitNets hint on the middle stage (RepDistiller)",
                           owns={"fitnet": FitNetSettings}, loss_terms=("ce", "hint")))
