"""Checks of a config that need the core: architecture and method names from their registries,
the methods' settings sections against their models, and layer names against built networks.
They run when a stage starts (and when `quest run`,
a study or a flow starts), not while the config loads, so that loading settings stays cheap and
the settings layer never imports the networks."""

from __future__ import annotations

from quest.infra.config import Config
from quest.infra.errors import QuestError


def _layer(arch: str, layer: str, key: str) -> None:
    from quest.core.models.taps import resolve_layer
    from quest.core.models.zoo import build_model

    try:
        resolve_layer(build_model(arch, 10), layer)
    except QuestError as exc:
        raise QuestError(f"{key}: {exc}") from None


def check_runnable(cfg: Config) -> None:
    """Raise a one-line QuestError when `cfg` names an unknown architecture, method or layer, or
    a method section holds an unknown key or a bad value."""
    from quest.core import methods
    from quest.core.models.zoo import MODEL_NAMES

    for key, arch in (("teacher.arch", cfg.teacher.arch), ("student.arch", cfg.student.arch)):
        if arch not in MODEL_NAMES:
            raise QuestError(f"{key} is '{arch}': choose one of {', '.join(MODEL_NAMES)}")
    for m in cfg.student.methods:
        methods.get(m)
    methods.resolve_settings(cfg.student)  # each method's section against its own model
    if cfg.features.layer is not None:
        _layer(cfg.teacher.arch, cfg.features.layer, "features.layer")
    if cfg.student.layer is not None:
        _layer(cfg.student.arch, cfg.student.layer, "student.layer")
    for name, lv in cfg.student.quest.extra_levels.items():
        key = f"student.quest.extra_levels.{name}"
        _layer(cfg.teacher.arch, lv.teacher_layer, f"{key}.teacher_layer")
        _layer(cfg.student.arch, lv.student_layer, f"{key}.student_layer")
