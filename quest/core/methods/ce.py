"""ce: the student alone, plain cross-entropy (the baseline every table compares with)."""

from __future__ import annotations

from quest.core.distill import Distiller
from quest.core.methods import MethodContext, MethodSpec, register


def build(ctx: MethodContext) -> Distiller:
    """A cross-entropy-only distiller around the student."""
    return Distiller(ctx.student)


SPEC = register(MethodSpec("ce", build, description="cross-entropy only"))
