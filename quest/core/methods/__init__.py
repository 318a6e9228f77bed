"""Distillation methods as plug-ins: one module per method, registered by name.

A method is a `MethodSpec`: its name, what it needs (a teacher, a codebook and feature taps), the
typed settings sections of `student:` it reads (``kd`` -> ``student.kd``: `KDConfig`), and a
builder that turns a `MethodContext` into a `Distiller` (which returns the student's logits and
a dict of named losses; extra trainable heads live inside it and are never exported). Stages,
flows, run records and cache keys learn about methods only from this registry, so a new method
is one module that calls `register` (and its test)::

    from quest.core.methods import MethodSpec, register
    register(MethodSpec("mine", build=lambda ctx: MyDistiller(ctx.student, ctx.teacher),
                        needs_teacher=True, settings=("kd",)))

The built-in methods (ce, kd, quest, quest+kd) register when this package is imported. A teacher
wrapped in `quest.core.distill.FrozenTeacher` returns inference-mode tensors: clone one before an op
that autograd saves it for (e.g. as an MSE target).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from quest.infra.errors import QuestError


@dataclass
class MethodContext:
    """What a builder gets: the networks, the student's settings and, for methods that need a
    codebook, the vocabulary and the tapped layers."""

    student: nn.Module
    teacher: nn.Module | None
    settings: Any  # quest.infra.config.StudentConfig (typed sections: settings.kd, settings.quest)
    codebook: Tensor | None = None
    teacher_layer: str | None = None
    student_layer: str | None = None
    student_channels: int | None = None
    image_shape: tuple[int, ...] | None = None  # C x H x W of the inputs (dummy forwards)
    teacher_pool: int = 1  # the pooling the codebook's vectors had (features.pool)
    # further quantized levels (quest.core.levels.LevelInputs), each with its own codebook
    extra_levels: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class MethodSpec:
    """A distillation method as the pipeline sees it."""

    name: str
    build: Callable[[MethodContext], nn.Module]
    needs_teacher: bool = False
    needs_codebook: bool = False  # also means: teacher and student feature taps
    settings: tuple[str, ...] = ()  # sections of `student:` it reads, e.g. ("quest", "kd")
    description: str = ""

    def config_sections(self) -> tuple[str, ...]:
        """Top-level config sections a run of this method depends on beside data and the
        student's recipe (run records and cache keys hash these)."""
        out: tuple[str, ...] = ()
        if self.needs_teacher or self.needs_codebook:
            out += ("teacher",)
        if self.needs_codebook:
            out += ("features", "codebook")
        return out


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method (a name registered twice is an error: unregister it first)."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise QuestError(f"method '{spec.name}' is already registered")
    if spec.needs_codebook and not spec.needs_teacher:
        spec = MethodSpec(spec.name, spec.build, True, True, spec.settings, spec.description)
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a registered method (tests and plug-in reloads)."""
    _REGISTRY.pop(name, None)


# tables and listings show the built-ins in this order, plug-ins after them as registered
_BUILTIN_ORDER = ("ce", "kd", "quest", "quest+kd", "fitnet", "at")


def names() -> tuple[str, ...]:
    """Registered method names: the built-ins first (baselines, then QuEST, then the feature
    baselines), plug-ins after them in registration order."""
    rank = {n: i for i, n in enumerate(_BUILTIN_ORDER)}
    order = list(_REGISTRY)
    return tuple(sorted(order, key=lambda n: (rank.get(n, len(rank)), order.index(n))))


def get(name: str) -> MethodSpec:
    """The method registered as `name`; an unknown name is one line with a did-you-mean."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise QuestError(f"unknown method '{name}'{hint}: choose one of "
                         f"{', '.join(names())}") from None


def needs_codebook(methods: list[str] | tuple[str, ...]) -> bool:
    """Whether any of `methods` needs the features and codebook stages."""
    return any(get(m).needs_codebook for m in methods)


# the built-in methods register themselves on import (after the registry exists)
from quest.core.methods import at, ce, fitnet, kd, quest  # noqa: E402,F401
