"""The pipeline's stages, declared once.

Each `Stage` says what runs (its function), which settings it reads (dotted params), which
upstream files and directories it reads (deps), what it writes (outs), the module whose import
closure is its code, and whether it runs once per method or per extra QuEST level. The order of
`STAGES` is the order they run in. This one table drives:

- `quest run` (quest/apps/pipeline.py): the stages in order, the Great Expectations suites
  after the stage they check;
- the Prefect flow (flows/pipeline.py): one task per stage family, made by one factory;
- the Prefect cache keys (flows/cache.py): params' values, deps' contents, code closure;
- dvc.yaml (`quest dvc-yaml` rewrites each stage's deps, params and outs from it, keeping the
  file's comments; tests/test_dvc.py fails when the committed file differs).

A stage's `key` is the method of a per-method stage, the level of a per-level one, else None;
for dvc.yaml the templates get "${item}" / "${key}" as keys, and `method_params(None)` lists
the settings of every registered method (a foreach template has one params list).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from quest.infra.config import Config, StudentConfig
from quest.infra.errors import QuestError
from quest.infra.paths import Paths

Key = str | None

# dotted params whose value names a file outside the project: Prefect hashes what they point at
LOCATION_PARAMS = ("data.location", "teacher.checkpoint")
# foreach placeholders of dvc.yaml's per-method and per-level stages
METHOD_ITEM, LEVEL_ITEM = "${item}", "${key}"


@dataclass(frozen=True)
class Stage:
    """One pipeline stage as quest run, Prefect and DVC see it."""

    name: str  # the dvc.yaml stage name
    family: str  # the Prefect task and cache-key family (validate-* share "validate")
    code: str  # module whose import closure is the stage's code
    cmd: str  # the CLI command dvc.yaml runs
    params: Callable[[Key], list[str]]
    deps: Callable[[Config | None, Paths, Key], list[Path]]
    outs: Callable[[Paths, Key], list[Path]]
    run: Callable[[Config, Paths, Key], Any]
    per: str | None = None  # "method" | "level" | None
    suite: str | None = None  # the Great Expectations suite of a validate-* stage
    needs_codebook: bool = False  # quest run skips it when no method needs a codebook

    def start(self, cfg: Config, paths: Paths, key: Key = None) -> Any:
        """Run the stage: first the checks of names that only the core knows (architectures,
        methods, layers of the built networks), then the stage's function."""
        from quest.core.checks import check_runnable

        check_runnable(cfg)
        return self.run(cfg, paths, key)


def _fields(prefix: str, cls: type, skip: tuple[str, ...] = ()) -> list[str]:
    """Dotted names of a settings model's leaves (nested sections flattened)."""
    out = []
    for name, info in cls.model_fields.items():  # type: ignore[attr-defined]
        if name in skip:
            continue
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out += _fields(f"{prefix}.{name}", kind)
        else:
            out.append(f"{prefix}.{name}")
    return out


def _train(prefix: str) -> list[str]:
    from quest.infra.config import OptimConfig

    return _fields(prefix, OptimConfig)


AUGMENT = ["data.padding", "data.padding_mode", "data.flip", "data.loader"]


def method_params(method: Key) -> list[str]:
    """The student settings a method's run reads (None: every registered method's, for the
    one params list of dvc.yaml's foreach template)."""
    from quest.core.methods import get, names, sections

    methods = names() if method in (None, METHOD_ITEM) else [method]
    specs = [get(m) for m in methods]
    out = ["student.arch"]
    if any(s.needs_codebook for s in specs):
        out.append("student.layer")
    out += _train("student.train")
    owned = sections()
    for section in dict.fromkeys(sec for s in specs for sec in s.settings):
        model = owned.get(section) or StudentConfig.model_fields[section].annotation
        out += _fields(f"student.{section}", model)
    return out + AUGMENT


def _student_deps(cfg: Config | None, paths: Paths, method: Key) -> list[Path]:
    from quest.core.methods import get, names

    specs = [get(m) for m in (names() if method in (None, METHOD_ITEM) else [method])]
    out = [paths.prepared]
    if any(s.needs_teacher for s in specs):
        out.append(paths.teacher_model.parent)
    if any(s.needs_codebook for s in specs):
        # models/levels holds every extra level's codebook (committed, so it always exists)
        out += [paths.codebook.parent, paths.root / "models" / "levels",
                _gate(paths, "codebook")]
    return out


def validation_dir(paths: Paths) -> Path:
    """reports/validation/ under the project root."""
    return paths.root / "reports" / "validation"


def report_files(paths: Paths, what: str) -> dict[str, Path]:
    """The files one suite writes: JSON report, Data Docs directory and the pass gate."""
    base = validation_dir(paths)
    return {"report": base / f"{what}.json", "docs": base / "docs" / what,
            "passed": base / f"{what}.passed"}


def _gate(paths: Paths, suite: str) -> Path:
    return report_files(paths, suite)["passed"]


def _suite_outs(suite: str) -> Callable[[Paths, Key], list[Path]]:
    def outs(paths: Paths, key: Key) -> list[Path]:
        files = report_files(paths, suite)
        return [files["report"], files["docs"], files["passed"]]

    return outs


def _level(paths: Paths, key: Key) -> Paths:
    from quest.core.levels import level_paths

    if not key:
        raise QuestError("a per-level stage needs the level's name")
    return level_paths(paths, key)


def _run(module: str, function: str) -> Callable[[Config, Paths, Key], Any]:
    """A stage's run function, imported when it runs (the CLI stays quick to start)."""
    def run(cfg: Config, paths: Paths, key: Key) -> Any:
        import importlib

        fn = getattr(importlib.import_module(module), function)
        return fn(cfg, paths, key) if key is not None else fn(cfg, paths)

    return run


def _run_level(module: str, function: str) -> Callable[[Config, Paths, Key], Any]:
    def run(cfg: Config, paths: Paths, key: Key) -> Any:
        import importlib

        from quest.core.levels import level_config

        fn = getattr(importlib.import_module(module), function)
        return fn(level_config(cfg, str(key)), _level(paths, key))

    return run


def _run_suite(suite: str) -> Callable[[Config, Paths, Key], Any]:
    def run(cfg: Config, paths: Paths, key: Key) -> Any:
        import importlib

        # by name, like the stages' modules: the table sits below what it runs
        return importlib.import_module("quest.apps.validation").run_validation(suite, cfg, paths)

    return run


def _validate(suite: str, params: list[str],
              deps: Callable[[Paths], list[Path]]) -> Stage:
    from quest.infra.config import ValidationConfig

    checks = _fields(f"validation.{suite}", ValidationConfig.model_fields[suite].annotation)
    return Stage(f"validate-{suite}", "validate", "quest.apps.validation.runner",
                 f"quest validate --what {suite}", lambda key: checks + params,
                 lambda cfg, paths, key: deps(paths), _suite_outs(suite), _run_suite(suite),
                 suite=suite, needs_codebook=suite in ("features", "codebook"))


_FEATURES_PARAMS = ["features.layer", "features.max_vectors", "features.dtype", "features.seed",
                    "features.pool"]
_LEVEL_PARAMS = ["student.quest.extra_levels." + LEVEL_ITEM, "features.max_vectors",
                 "features.dtype", "features.seed"]


def _codebook_params() -> list[str]:
    from quest.infra.config import CodebookConfig

    return _fields("codebook", CodebookConfig)


def _data_stages() -> tuple[Stage, ...]:
    """prepare, its suite and the teacher."""
    return (
        Stage("prepare", "prepare", "quest.apps.stages.prepare", "quest prepare",
              lambda key: ["data.source", "data.location", "data.image_size", "data.channels",
                           "data.on_corrupt", "data.mean", "data.std", "data.format",
                           "data.crop_scale_min", "data.eval_crop_ratio", "data.shuffle_buffer",
                           "data.subset.train_per_class", "data.subset.test_per_class",
                           "data.subset.seed", "data.validation_per_class",
                           "data.validation_seed"],
              lambda cfg, paths, key: [], lambda paths, key: [paths.prepared],
              _run("quest.apps.stages.prepare", "run_prepare")),
        _validate("data", ["data.channels", "data.image_size"], lambda p: [p.prepared]),
        Stage("teacher", "teacher", "quest.apps.stages.teacher", "quest teacher",
              lambda key: ["teacher.arch", "teacher.checkpoint", *_train("teacher.train"),
                           *AUGMENT],
              lambda cfg, paths, key: [paths.prepared, _gate(paths, "data")],
              lambda paths, key: [paths.teacher_model.parent, paths.metrics / "teacher.json"],
              _run("quest.apps.stages.teacher", "run_teacher")),
    )


def _vocabulary_stages() -> tuple[Stage, ...]:
    """Features, codebook and their suites, then the same two per extra QuEST level."""
    return (
        Stage("features", "features", "quest.apps.stages.features", "quest features",
              lambda key: _FEATURES_PARAMS,
              lambda cfg, paths, key: [paths.prepared, paths.teacher_model.parent],
              lambda paths, key: [paths.features.parent],
              _run("quest.apps.stages.features", "run_features"), needs_codebook=True),
        _validate("features", ["features.max_vectors"], lambda p: [p.prepared, p.features.parent]),
        Stage("codebook", "codebook", "quest.apps.stages.codebook", "quest codebook",
              lambda key: _codebook_params(),
              lambda cfg, paths, key: [paths.features.parent, _gate(paths, "features")],
              lambda paths, key: [paths.codebook.parent, paths.codebook_metrics,
                                  paths.codebook_plot("objective"), paths.codebook_plot("usage")],
              _run("quest.apps.stages.codebook", "run_codebook"), needs_codebook=True),
        _validate("codebook", ["codebook.seed", "codebook.max_points_per_centroid"],
                  lambda p: [p.features.parent, p.codebook.parent]),
        Stage("features-level", "features", "quest.apps.stages.features",
              f"quest features --level {LEVEL_ITEM}", lambda key: _LEVEL_PARAMS,
              lambda cfg, paths, key: [paths.prepared, paths.teacher_model.parent],
              lambda paths, key: [_level(paths, key).features.parent],
              _run_level("quest.apps.stages.features", "run_features"), per="level",
              needs_codebook=True),
        Stage("codebook-level", "codebook", "quest.apps.stages.codebook",
              f"quest codebook --level {LEVEL_ITEM}",
              lambda key: ["student.quest.extra_levels." + LEVEL_ITEM, *_codebook_params()],
              lambda cfg, paths, key: [_level(paths, key).features.parent],
              lambda paths, key: [_level(paths, key).codebook.parent],
              _run_level("quest.apps.stages.codebook", "run_codebook"), per="level",
              needs_codebook=True),
    )


def _student_stages() -> tuple[Stage, ...]:
    """The students, evaluate, the predictions suite and the report."""
    from quest.infra.config import ReportConfig

    return (
        Stage("student", "student", "quest.apps.stages.student",
              f"quest student --method {METHOD_ITEM}", method_params, _student_deps,
              lambda paths, key: [paths.student_model(str(key)), paths.student_metrics(str(key)),
                                  paths.student_curve(str(key))],
              _run("quest.apps.stages.student", "run_student"), per="method"),
        Stage("evaluate", "evaluate", "quest.apps.stages.evaluate", "quest evaluate",
              lambda key: ["student.methods"],
              lambda cfg, paths, key: [paths.prepared, paths.teacher_model.parent,
                                       paths.root / "models" / "students"],
              lambda paths, key: [paths.metrics / "evaluation.json",
                                  paths.metrics / "per_class.json"],
              _run("quest.apps.stages.evaluate", "run_evaluate")),
        _validate("predictions", ["student.methods"],
                  lambda p: [p.prepared, p.root / "models" / "students",
                             p.metrics / "evaluation.json"]),
        Stage("report", "report", "quest.apps.report", "quest report",
              # the gallery ranks positions by p_T, which uses the QuEST temperature
              lambda key: [*_fields("report", ReportConfig), "student.quest.temperature"],
              lambda cfg, paths, key: [paths.prepared, paths.teacher_model.parent,
                                       paths.codebook.parent, paths.metrics / "evaluation.json",
                                       paths.metrics / "students", paths.codebook_metrics,
                                       paths.codebook_plot("objective"),
                                       paths.codebook_plot("usage")],
              lambda paths, key: [paths.reports / "report.html", paths.reports / "report.md",
                                  paths.reports / "figures"],
              _run("quest.apps.report", "run_report")),
    )


STAGES: tuple[Stage, ...] = (*_data_stages(), *_vocabulary_stages(), *_student_stages())
BY_NAME = {s.name: s for s in STAGES}


def stage_for(family: str, key: Key) -> Stage:
    """The stage of a Prefect family and key (validate's key is the suite; features and
    codebook with a key are the per-level stages)."""
    if family == "validate":
        return BY_NAME[f"validate-{key}"]
    if family in ("features", "codebook") and key:
        return BY_NAME[f"{family}-level"]
    try:
        return BY_NAME[family]
    except KeyError:
        raise ValueError(f"unknown stage {family!r}") from None


def get_param(cfg: Config, dotted: str) -> Any:
    """The value of a dotted setting (a mapping key may follow a typed section; a method's
    section is read validated, its defaults filled in)."""
    from quest.core.methods import resolve_settings, sections

    node: Any = cfg
    parts = dotted.split(".")
    if len(parts) > 2 and parts[0] == "student" and parts[1] in sections():
        node, parts = resolve_settings(cfg.student).sections[parts[1]], parts[2:]
    for part in parts:
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node
