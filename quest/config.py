"""Typed configuration: params.yaml sections as dataclasses, presets, overrides and validation."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from quest.errors import QuestError

SCHEDULES = ("step", "cosine", "onecycle")
PADDING_MODES = ("constant", "reflect")


@dataclass
class SubsetConfig:
    """A seeded, class-balanced slice of the data (for smoke runs and CPU-sized jobs)."""

    train_per_class: int | None = None
    test_per_class: int | None = None
    seed: int = 0


@dataclass
class DataConfig:
    """Where the data comes from and how it is turned into the prepared format."""

    source: str = "image_folder"
    location: str | None = "../shared/data/cifar10-jpeg.tar.gz"
    image_size: int | None = None
    channels: int = 3
    on_corrupt: str = "skip"
    download: bool = False
    mean: list[float] | None = None
    std: list[float] | None = None
    padding: int = 4
    # how the crop's border is filled: constant (zeros, RepDistiller) or reflect (official QuEST)
    padding_mode: str = "constant"
    flip: bool = True
    loader: str = "memory"
    subset: SubsetConfig = field(default_factory=SubsetConfig)


@dataclass
class OptimConfig:
    """SGD recipe shared by teacher and student training."""

    epochs: int = 240
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "step"
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1
    warmup_fraction: float = 0.15
    seed: int = 0
    # passes over the training set per epoch, each a fresh shuffle (the official few-images
    # sampler: a small subset repeated so that an epoch keeps the full set's step count)
    repeat: int = 1


@dataclass
class TeacherConfig:
    """Teacher: an architecture, and either a checkpoint to import or a recipe to train it."""

    arch: str = "resnet56"
    checkpoint: str | None = None
    train: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class FeaturesConfig:
    """Which teacher layer to quantize and how many of its spatial vectors to keep."""

    layer: str | None = None
    max_vectors: int | None = None
    dtype: str = "float32"
    batch_size: int = 256
    seed: int = 0
    # teacher-side average pooling (kernel = stride = pool) before k-means and in training alike:
    # the official "downscale" of the cross-architecture pairs is 2
    pool: int = 1


@dataclass
class CodebookConfig:
    """k-means over the teacher's spatial vectors."""

    k: int = 4096
    iterations: int = 20
    seed: int = 0
    backend: str = "auto"
    max_points_per_centroid: int = 256


@dataclass
class QuestLevelConfig:
    """One more quantized level (the official transfer setting quantizes layer3 and layer4):
    its own teacher and student layers and codebook; unset values are the first level's."""

    teacher_layer: str = ""
    student_layer: str = ""
    k: int | None = None  # None: codebook.k
    temperature: float | None = None  # None: student.quest.temperature, and so on
    weight: float | None = None
    init_scale: float | None = None
    predictor: str | None = None
    pool: int | None = None  # None: 1 (features.pool is the first level's)


@dataclass
class QuestConfig:
    """QuEST loss settings (DESIGN.md defaults). The first quantized level is features.layer
    against student.layer with codebook.k words; `extra_levels` names further ones."""

    temperature: float = 5.0
    weight: float = 1.0
    init_scale: float = 3.0
    predictor: str = "learned_scale"
    extra_levels: dict[str, QuestLevelConfig] = field(default_factory=dict)


@dataclass
class KDConfig:
    """Hinton KD settings, RepDistiller's weighting."""

    temperature: float = 4.0
    ce_weight: float = 0.1
    kd_weight: float = 0.9


@dataclass
class FitNetConfig:
    """FitNets hint settings, RepDistiller's: CE + weight * MSE(regressor(s_hint), t_hint)."""

    weight: float = 100.0
    hint_layer: int = 2  # index into the stage outputs [stem, stage 1, stage 2, ...]


@dataclass
class ATConfig:
    """Attention transfer settings, RepDistiller's: CE + weight * sum over stage pairs."""

    weight: float = 1000.0
    p: float = 2.0


@dataclass
class StudentConfig:
    """Student architecture, the methods to train, and the training recipe."""

    arch: str = "resnet20"
    layer: str | None = None
    methods: list[str] = field(default_factory=lambda: ["ce", "kd", "quest"])
    train: OptimConfig = field(default_factory=OptimConfig)
    quest: QuestConfig = field(default_factory=QuestConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    fitnet: FitNetConfig = field(default_factory=FitNetConfig)
    at: ATConfig = field(default_factory=ATConfig)


@dataclass
class RuntimeConfig:
    """Where and how computation runs."""

    device: str = "auto"
    threads: int | None = None
    channels_last: bool = True
    progress: str = "auto"
    amp: str = "fp32"
    compile: bool = False


@dataclass
class PromotionConfig:
    """Gates for moving the registry's champion alias to a new student."""

    min_top1: float = 0.0
    model_name: str = "quest-student"


@dataclass
class ReportConfig:
    """What `quest report` shows: the visual-word gallery's size and sample."""

    gallery_words: int = 8
    gallery_patches: int = 16
    gallery_images: int = 500
    patch_scale: float = 3.0
    seed: int = 0


@dataclass
class DataChecksConfig:
    """Thresholds of the prepared-data suite (run after prepare, before the teacher)."""

    min_class_share: float = 0.5
    max_duplicate_share: float = 0.01
    pixel_mean_min: float = 20.0
    pixel_mean_max: float = 235.0
    pixel_std_min: float = 10.0


@dataclass
class FeatureChecksConfig:
    """Thresholds of the teacher-feature suite (run after features, before the codebook)."""

    norm_min: float = 0.01
    norm_max: float = 1000.0


@dataclass
class CodebookChecksConfig:
    """Thresholds of the codebook suite (run after codebook, before the students)."""

    max_dead_share: float = 0.05
    min_perplexity_share: float = 0.1


@dataclass
class PredictionChecksConfig:
    """Thresholds of the students' test-set predictions suite (run after evaluate)."""

    sum_tolerance: float = 0.001
    min_top1_over_chance: float = 1.0


@dataclass
class ValidationConfig:
    """Great Expectations suites that gate the pipeline between stages."""

    data: DataChecksConfig = field(default_factory=DataChecksConfig)
    features: FeatureChecksConfig = field(default_factory=FeatureChecksConfig)
    codebook: CodebookChecksConfig = field(default_factory=CodebookChecksConfig)
    predictions: PredictionChecksConfig = field(default_factory=PredictionChecksConfig)


@dataclass
class Config:
    """The whole pipeline configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of all settings."""
        return dataclasses.asdict(self)


# Environment variables that point the pipeline at an offline mirror without editing params.yaml.
ENV_OVERRIDES = {
    "QUEST_DATA_LOCATION": "data.location",
    "QUEST_TEACHER_CHECKPOINT": "teacher.checkpoint",
    "QUEST_DEVICE": "runtime.device",
}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except QuestError:
                continue
        raise QuestError(f"{key} must be {_type_name(tp)}, got {value!r}: fix it in params.yaml")
    if origin is dict:
        if not isinstance(value, dict):
            raise QuestError(f"{key} must be a mapping, got {value!r}: fix it in params.yaml")
        _, inner = typing.get_args(tp)
        return {str(k): _coerce(v, inner, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise QuestError(f"{key} must be a list, got {value!r}: fix it in params.yaml")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise QuestError(f"{key} must be {_type_name(tp)}, got {value!r}: fix it in params.yaml")
    return float(value) if tp is float else value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise QuestError(f"{prefix or 'params'} must be a mapping, got {raw!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise QuestError(f"unknown setting '{full}'{hint}: remove or rename it in params.yaml")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `over` into a copy of `base` (mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `tree[a][b][c] = value` for the dotted key "a.b.c", creating sections on the way."""
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise QuestError(f"cannot set '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.sub=value`` (value read as YAML) into a dotted key and a value."""
    if "=" not in text:
        raise QuestError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def _read_mapping(p: Path, what: str, holds: str) -> dict[str, Any]:
    """Parse the YAML file `p` (a `what` holding `holds`, for messages) into a dict; an empty
    file gives an empty dict."""
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise QuestError(f"{what} {p} is not valid YAML{where}: fix its syntax") from None
    if not isinstance(raw, dict):
        raise QuestError(f"{what} {p} must hold a mapping of {holds}")
    return raw


def read_params(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a params YAML file into a dict (empty file -> empty dict)."""
    p = Path(path)
    if not p.is_file():
        raise QuestError(f"params file {p} does not exist: pass --params PATH or create it")
    return _read_mapping(p, "params file", "sections")


# Beside the params file: more named presets, each *.yaml there a mapping of name -> overrides
# shaped like the params file's `presets:` entries (presets/official.yaml: the official configs).
PRESETS_DIR = "presets"


def read_preset_files(directory: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The presets of every ``*.yaml`` file in `directory`, name -> overrides (files in name
    order; no directory: none). A name defined in two files is an error."""
    folder = Path(directory)
    found: dict[str, dict[str, Any]] = {}
    origin: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.yaml")):
        for name, over in _read_mapping(path, "presets file", "presets").items():
            if name in origin:
                raise QuestError(f"preset '{name}' is defined in both {origin[name]} and {path}: "
                                 "rename one of them")
            if not isinstance(over, dict):
                raise QuestError(f"preset '{name}' in {path} must be a mapping of settings")
            found[str(name)], origin[str(name)] = over, path
    return found


def resolve_raw(
    raw: dict[str, Any],
    preset: str | None = None,
    overrides: list[str] | None = None,
    preset_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Apply a named preset, then environment overrides, then ``key=value`` overrides.

    The preset is looked up in `raw`'s ``presets:`` first, then in the ``*.yaml`` files of
    `preset_dir` (see `read_preset_files`; None: params presets only)."""
    raw = copy.deepcopy(raw)
    presets = raw.pop("presets", {}) or {}
    if preset:
        if preset not in presets:
            files = read_preset_files(preset_dir) if preset_dir is not None else {}
            if preset not in files:
                choices = ", ".join(sorted(map(str, {*presets, *files}))) or "none defined"
                where = "params.yaml presets:" + (
                    f" or {Path(preset_dir) / '*.yaml'}" if preset_dir is not None else "")
                raise QuestError(f"unknown preset '{preset}': choose one of {choices} ({where})")
            presets = files
        raw = deep_merge(raw, presets[preset])
    for env, dotted in ENV_OVERRIDES.items():
        if os.environ.get(env):
            set_dotted(raw, dotted, os.environ[env])
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    return raw


def build_config(raw: dict[str, Any]) -> Config:
    """Turn a resolved settings dict into a validated Config."""
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def load_config(
    path: str | os.PathLike[str] = "params.yaml",
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Load params.yaml, apply a preset (from its ``presets:``, else from the presets/*.yaml
    files beside it) and overrides, and validate everything."""
    return build_config(resolve_raw(read_params(path), preset, overrides,
                                    preset_dir=Path(path).parent / PRESETS_DIR))


def _choice(value: Any, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise QuestError(f"{key} is '{value}': choose one of {', '.join(choices)}")


def _positive(value: float | None, key: str) -> None:
    if value is not None and value <= 0:
        raise QuestError(f"{key} must be positive, got {value}")


def _validate_levels(cfg: Config) -> None:
    """Each extra QuEST level: a file-name-safe name, both layers present, sane values."""
    import re

    from quest.losses import PREDICTORS
    from quest.models.taps import resolve_layer
    from quest.models.zoo import build_model

    for name, lv in cfg.student.quest.extra_levels.items():
        key = f"student.quest.extra_levels.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise QuestError(f"{key}: a level name may hold letters, digits, _ and - only "
                             "(it names the level's files)")
        for side, arch, layer in (("teacher_layer", cfg.teacher.arch, lv.teacher_layer),
                                  ("student_layer", cfg.student.arch, lv.student_layer)):
            if not layer:
                raise QuestError(f"{key}.{side} is missing: name the layer to quantize "
                                 f"(`quest models --layers {arch}` lists them)")
            try:
                resolve_layer(build_model(arch, 10), layer)
            except QuestError as exc:
                raise QuestError(f"{key}.{side}: {exc}") from None
        if lv.predictor is not None:
            _choice(lv.predictor, PREDICTORS, f"{key}.predictor")
        for field_name in ("k", "temperature", "init_scale", "pool"):
            _positive(getattr(lv, field_name), f"{key}.{field_name}")
        if lv.weight is not None and lv.weight < 0:
            raise QuestError(f"{key}.weight must be 0 or more, got {lv.weight}")


def validate(cfg: Config) -> None:
    """Check values that types alone do not: choices, ranges and architecture names."""
    from quest.models.zoo import MODEL_NAMES

    _choice(cfg.data.source, ("image_folder", "cifar10", "cifar100"), "data.source")
    _choice(cfg.data.on_corrupt, ("skip", "fail"), "data.on_corrupt")
    _choice(cfg.data.padding_mode, PADDING_MODES, "data.padding_mode")
    if cfg.features.pool < 1:
        raise QuestError(f"features.pool must be 1 (no pooling) or more, got {cfg.features.pool}: "
                         "fix it in params.yaml")
    _choice(cfg.data.loader, ("memory", "dataloader"), "data.loader")
    _choice(cfg.data.channels, (1, 3), "data.channels")  # type: ignore[arg-type]
    for key, vec in (("data.mean", cfg.data.mean), ("data.std", cfg.data.std)):
        if vec is not None and len(vec) != cfg.data.channels:
            raise QuestError(f"{key} needs {cfg.data.channels} values, got {len(vec)}")
    _choice(cfg.teacher.arch, MODEL_NAMES, "teacher.arch")
    _choice(cfg.student.arch, MODEL_NAMES, "student.arch")
    _choice(cfg.features.dtype, ("float32", "float16"), "features.dtype")
    _choice(cfg.codebook.backend, ("auto", "faiss", "torch"), "codebook.backend")
    _choice(cfg.runtime.progress, ("auto", "bar", "lines", "off"), "runtime.progress")
    _choice(cfg.runtime.amp, ("fp32", "bf16"), "runtime.amp")
    from quest.losses import PREDICTORS

    _choice(cfg.student.quest.predictor, PREDICTORS, "student.quest.predictor")
    _validate_levels(cfg)
    _positive(cfg.codebook.k, "codebook.k")
    _positive(cfg.codebook.iterations, "codebook.iterations")
    _positive(cfg.features.max_vectors, "features.max_vectors")
    from quest.methods import names

    if not cfg.student.methods:
        raise QuestError("student.methods is empty: list at least one of " + ", ".join(names()))
    for m in cfg.student.methods:
        _choice(m, names(), "student.methods entry")
    for name, opt in (("teacher.train", cfg.teacher.train), ("student.train", cfg.student.train)):
        _choice(opt.schedule, SCHEDULES, f"{name}.schedule")
        _positive(opt.epochs, f"{name}.epochs")
        _positive(opt.batch_size, f"{name}.batch_size")
        _positive(opt.lr, f"{name}.lr")
        _positive(opt.repeat, f"{name}.repeat")
    from quest.models.taps import resolve_layer
    from quest.models.zoo import build_model

    for key, arch, layer in (
        ("features.layer", cfg.teacher.arch, cfg.features.layer),
        ("student.layer", cfg.student.arch, cfg.student.layer),
    ):
        if layer is not None:
            try:
                resolve_layer(build_model(arch, 10), layer)
            except QuestError as exc:
                raise QuestError(f"{key}: {exc}") from None
    for key in ("gallery_words", "gallery_patches", "gallery_images", "patch_scale"):
        _positive(getattr(cfg.report, key), f"report.{key}")
    if not 0.0 <= cfg.promotion.min_top1 <= 1.0:
        raise QuestError(f"promotion.min_top1 is {cfg.promotion.min_top1}: use a value in [0, 1]")
    if cfg.runtime.device not in ("auto", "cpu") and not cfg.runtime.device.startswith("cuda"):
        raise QuestError(f"runtime.device is '{cfg.runtime.device}': use auto, cpu or cuda[:N]")
    _validate_checks(cfg.validation)


def _unit(value: float, key: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise QuestError(f"{key} is {value}: use a value in [0, 1]")


def _validate_checks(v: ValidationConfig) -> None:
    """Ranges of the validation thresholds: shares in [0, 1], bounds in order."""
    d = v.data
    _unit(d.min_class_share, "validation.data.min_class_share")
    _unit(d.max_duplicate_share, "validation.data.max_duplicate_share")
    if not 0.0 <= d.pixel_mean_min <= d.pixel_mean_max <= 255.0:
        raise QuestError(f"validation.data.pixel_mean_min/max are {d.pixel_mean_min}/"
                         f"{d.pixel_mean_max}: use 0 <= min <= max <= 255")
    if d.pixel_std_min < 0:
        raise QuestError(f"validation.data.pixel_std_min is {d.pixel_std_min}: use a value >= 0")
    f = v.features
    if not 0.0 <= f.norm_min <= f.norm_max:
        raise QuestError(f"validation.features.norm_min/norm_max are {f.norm_min}/{f.norm_max}: "
                         "use 0 <= norm_min <= norm_max")
    _unit(v.codebook.max_dead_share, "validation.codebook.max_dead_share")
    _unit(v.codebook.min_perplexity_share, "validation.codebook.min_perplexity_share")
    _positive(v.predictions.sum_tolerance, "validation.predictions.sum_tolerance")
    if v.predictions.min_top1_over_chance < 0:
        raise QuestError("validation.predictions.min_top1_over_chance is "
                         f"{v.predictions.min_top1_over_chance}: use a value >= 0")


def config_hash(section: Any) -> str:
    """A short stable hash of a config section (for cache keys and run provenance)."""
    import hashlib
    import json

    data = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
