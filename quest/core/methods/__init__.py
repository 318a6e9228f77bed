"""Distillation methods as plug-ins: one module per method, registered by name.

A method is a `MethodSpec`: its name, what it needs (a teacher, a codebook and feature taps), the
settings sections of `student:` it reads (``kd`` -> ``student.kd``), the sections it owns (each a
pydantic model of `quest.infra.config.Section`, with its defaults and help text), the names of the
loss terms and diagnostics its step returns, and a builder that turns a `MethodContext` into a
`Distiller` (which returns the student's logits and a dict of named losses; extra trainable heads
live inside it and are never exported). Stages, flows, run records, cache keys, dvc.yaml's params,
`quest config`, study tables and MLflow learn about methods only from this registry, so a new
method is one module that calls `register` (and its test)::

    from quest.core.methods import MethodSpec, register
    from quest.infra.config import Section

    class MineSettings(Section):
        weight: float = 1.0

    register(MethodSpec("mine", build=lambda ctx: MyDistiller(ctx.student, ctx.teacher,
                        ctx.settings.section("mine", MineSettings).weight),
                        needs_teacher=True, settings=("mine",), owns={"mine": MineSettings},
                        loss_terms=("ce", "mine")))

The built-in methods (ce, kd, quest, quest+kd, fitnet, at, dkd, crd) register when this package
is imported, in that order (tables and listings keep it); then every installed package's entry
point in the group ``quest.methods`` is loaded (an outside plug-in: its module registers itself,
or the entry point names a `MethodSpec`). A teacher wrapped in `quest.core.distill.FrozenTeacher`
returns inference-mode tensors: clone one before an op that autograd saves it for (e.g. as an
MSE target).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import ValidationError
from torch import Tensor, nn

from quest.core.distill import Distiller
from quest.infra.config import Config, QuestConfig, Section, StudentConfig, one_line_error
from quest.infra.errors import QuestError

ENTRY_POINT_GROUP = "quest.methods"

S = TypeVar("S", bound=Section)


@dataclass(frozen=True)
class MethodSettings:
    """The student's settings as a method's builder sees them: the recipe (`student`) and every
    registered method's section validated into its model (`sections`, defaults filled in)."""

    student: StudentConfig
    sections: Mapping[str, Section] = field(default_factory=dict)

    @property
    def quest(self) -> QuestConfig:
        """student.quest (the QuEST loss and its levels; the pipeline's stages read it too)."""
        return self.student.quest

    def section(self, name: str, model: type[S]) -> S:
        """The validated ``student.<name>`` section, typed as its model."""
        value = self.sections.get(name)
        if value is None:
            value = model()
        if not isinstance(value, model):
            raise QuestError(f"student.{name} holds {type(value).__name__} settings, not "
                             f"{model.__name__}: two methods define the section differently")
        return value


@dataclass
class MethodContext:
    """What a builder gets: the networks, the student's settings and, for methods that need
    them, the codebook and tapped layers (QuEST) or the training set's size and labels and the
    penultimate feature sizes (CRD's memory banks and embedding heads)."""

    student: nn.Module
    teacher: nn.Module | None
    settings: MethodSettings
    codebook: Tensor | None = None
    teacher_layer: str | None = None
    student_layer: str | None = None
    student_channels: int | None = None
    image_shape: tuple[int, ...] | None = None  # C x H x W of the inputs (dummy forwards)
    teacher_pool: int = 1  # the pooling the codebook's vectors had (features.pool)
    # further quantized levels (quest.core.levels.LevelInputs), each with its own codebook
    extra_levels: list[Any] = field(default_factory=list)
    # the training split: its labels in index order (Batch.indices point into it); None where
    # the stage does not know them
    train_labels: Tensor | None = None
    num_classes: int | None = None


@dataclass(frozen=True)
class MethodSpec:
    """A distillation method as the pipeline sees it."""

    name: str
    build: Callable[[MethodContext], nn.Module]
    needs_teacher: bool = False
    needs_codebook: bool = False  # also means: teacher and student feature taps
    settings: tuple[str, ...] = ()  # sections of `student:` it reads, e.g. ("quest", "kd")
    description: str = ""
    # sections of `student:` it defines: name -> settings model (params.yaml `student.<name>:`)
    owns: Mapping[str, type[Section]] = field(default_factory=dict, hash=False, compare=False)
    loss_terms: tuple[str, ...] = ("ce",)  # the named losses its step returns
    monitors: tuple[str, ...] = ()  # the diagnostics it logs beside them (Distiller.monitors)

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
    """Add a method (a name registered twice is an error: unregister it first; a section it owns
    must not be owned differently by another method or be a field of StudentConfig)."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise QuestError(f"method '{spec.name}' is already registered")
    if spec.needs_codebook and not spec.needs_teacher:
        spec = MethodSpec(spec.name, spec.build, True, True, spec.settings, spec.description,
                          spec.owns, spec.loss_terms, spec.monitors)
    owned = sections()
    for name, model in spec.owns.items():
        if name in StudentConfig.model_fields:
            raise QuestError(f"method '{spec.name}': student.{name} is a field of the student's "
                             "settings: name its section otherwise")
        if owned.get(name, model) is not model:
            raise QuestError(f"method '{spec.name}': student.{name} is already defined by "
                             "another method: reuse its model or rename the section")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a registered method (tests and plug-in reloads)."""
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """Registered method names in registration order: the built-ins first (baselines, QuEST,
    the feature baselines, then DKD and CRD), plug-ins after them."""
    return tuple(_REGISTRY)


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


def sections() -> dict[str, type[Section]]:
    """Every method-owned section of `student:`, name -> settings model, in registry order."""
    out: dict[str, type[Section]] = {}
    for spec in _REGISTRY.values():
        out.update(spec.owns)
    return out


def logged_keys() -> tuple[str, ...]:
    """Every loss term and diagnostic a registered method logs per epoch, in registry order."""
    keys = [k for spec in _REGISTRY.values() for k in (*spec.loss_terms, *spec.monitors)]
    return tuple(dict.fromkeys(keys))


def resolve_settings(student: StudentConfig) -> MethodSettings:
    """Validate the method sections of `student` (kept there as raw mappings) into their models:
    an unknown section or a bad value is one line naming the key and the fix; a section not
    given is its model's defaults."""
    known = sections()
    extra = dict(student.model_extra or {})
    for name in extra:
        if name not in known:
            close = difflib.get_close_matches(name, [*known, *StudentConfig.model_fields], n=1)
            hint = f" (did you mean 'student.{close[0]}'?)" if close else ""
            raise QuestError(f"unknown setting 'student.{name}'{hint}: remove or rename it in "
                             "params.yaml (method sections: "
                             f"{', '.join(known) or 'none registered'})")
    out: dict[str, Section] = {}
    for name, model in known.items():
        raw = extra.get(name, {})
        if not isinstance(raw, dict):
            raise QuestError(f"student.{name} must be a mapping, got {raw!r}: fix it in "
                             "params.yaml")
        try:
            out[name] = model.model_validate(raw)
        except ValidationError as exc:
            raise one_line_error(exc, model, f"student.{name}") from None
    return MethodSettings(student, out)


def settings_dict(student: StudentConfig) -> dict[str, Any]:
    """student's settings as a plain dict with every method section validated and its defaults
    filled in (what `quest config` prints, records hash and MLflow logs)."""
    resolved = resolve_settings(student)
    d = student.model_dump()
    for name, value in resolved.sections.items():
        d[name] = value.model_dump()
    return d


def config_dict(cfg: Config) -> dict[str, Any]:
    """`cfg.to_dict()` with the student's method sections validated and filled in."""
    return {**cfg.to_dict(), "student": settings_dict(cfg.student)}


def load_plugins() -> list[str]:
    """Load every installed entry point of the group ``quest.methods``: the module it names
    registers its methods on import (an entry point that names a MethodSpec is registered).
    Returns the entry points' names; a plug-in that fails to load is one line naming it."""
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # any import error of an outside package
            raise QuestError(f"method plug-in '{ep.name}' ({ep.value}) failed to load: "
                             f"{type(exc).__name__}: {exc}: fix or uninstall it") from None
        if isinstance(obj, MethodSpec) and _REGISTRY.get(obj.name) is not obj:
            register(obj)
        loaded.append(ep.name)
    return loaded


# the built-in methods register themselves on import (after the registry exists), in the order
# tables list them; outside plug-ins come after them
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
    """Build the distiller of a registered method from loose settings (scripts and tests; the
    student stage passes its typed StudentConfig to the method's builder instead)."""
    spec = get(method)
    if spec.needs_teacher:
        assert teacher is not None, f"method {method} needs a teacher"
    settings = resolve_settings(StudentConfig.model_validate({
        "kd": {"temperature": kd_temperature, "ce_weight": kd_ce_weight, "kd_weight": kd_weight},
        "quest": QuestConfig(temperature=quest_temperature, weight=quest_weight,
                             init_scale=init_scale, predictor=quest_predictor)}))
    out = spec.build(MethodContext(student, teacher, settings, codebook, teacher_layer,
                                   student_layer, student_channels))
    assert isinstance(out, Distiller)
    return out


from quest.core.methods import ce, kd, quest, fitnet, at, dkd, crd  # noqa: E402,F401,I001

load_plugins()
