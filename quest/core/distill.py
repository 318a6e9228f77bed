"""The distiller contract: a method returns the student's logits and a dict of named, weighted
losses; the teacher stays frozen. The methods themselves live in quest.core.methods (one
module each)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Batch:
    """One training batch: images, labels and each sample's index into the training set (the
    position in the prepared/streamed training split; None where a loader cannot say)."""

    images: Tensor
    labels: Tensor
    indices: Tensor | None = None

    @classmethod
    def of(cls, item: Batch | Sequence[Tensor]) -> Batch:
        """The Batch of what a loader yields: a Batch, (images, labels, indices) as the
        training loaders of quest.core.data do, or a plain (images, labels) pair."""
        if isinstance(item, Batch):
            return item
        if len(item) == 3:
            return cls(item[0], item[1], item[2])
        images, labels = item
        return cls(images, labels)


@dataclass(frozen=True)
class StepContext:
    """Where a training step stands in its schedule: the 0-based epoch of `epochs`, and the
    0-based global step (epoch x steps per epoch + batch) of `total_steps` (epochs x steps per
    epoch). A resumed run sees the same contexts as an uninterrupted one."""

    epoch: int
    epochs: int
    step: int
    total_steps: int

    @property
    def progress(self) -> float:
        """Fraction of the schedule done before this step, in [0, 1)."""
        return self.step / max(self.total_steps, 1)


# one training step of a distiller, (batch, context) -> (logits, named losses): the Trainer calls
# it; callers may wrap `Distiller.step` (bf16 autocast, DistributedDataParallel)
StepFn = Callable[[Batch, StepContext], tuple[Tensor, dict[str, Tensor]]]


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

    def step(self, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        """Training step with the whole batch and the schedule position. The default calls
        `forward_train(images, labels)`; methods that need sample indices (a memory bank) or the
        epoch (a warm-up) override this instead."""
        return self.forward_train(batch.images, batch.labels)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the optimizer updates (never the teacher's)."""
        return (p for p in self.parameters() if p.requires_grad)

    def export_student(self) -> nn.Module:
        """The plain student network, without any training-only heads."""
        return self.student
