"""Typed configuration: params.yaml sections as pydantic models, presets, overrides, validation.

The settings schema lives here, in the infrastructure layer, so that every layer above can read
it; each choice is a ``Literal`` type named for what it chooses (`Schedule`, `Predictor`, ...),
and the core module that acts on it derives its list of choices from that type. A method's own
settings (``student.kd`` and the like) are not typed here: each method's module owns its model,
and `StudentConfig` keeps those sections as raw mappings. Checks that need the core
(architecture and method names, method sections, layer names of a built network) run when a stage
starts: `quest.core.checks.check_runnable`.
"""

from __future__ import annotations

import copy
import difflib
import functools
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quest.infra.errors import QuestError

Schedule = Literal["step", "cosine", "onecycle"]
PaddingMode = Literal["constant", "reflect"]
DataSource = Literal["image_folder", "cifar10", "cifar100"]
OnCorrupt = Literal["skip", "fail"]
LoaderKind = Literal["memory", "dataloader"]
DataFormat = Literal["prepared", "stream"]
FeatureDtype = Literal["float32", "float16"]
Backend = Literal["auto", "faiss", "torch"]
Predictor = Literal["learned_scale", "fixed_scale_bias"]
ProgressMode = Literal["auto", "bar", "lines", "off"]
Amp = Literal["fp32", "bf16"]


class Section(BaseModel):
    """A params.yaml section: unknown keys are errors, values keep their YAML types (an int is
    accepted where a float is expected, nothing else is converted)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class SubsetConfig(Section):
    """A seeded, class-balanced slice of the data (for smoke runs and CPU-sized jobs)."""

    train_per_class: int | None = None
    test_per_class: int | None = None
    seed: int = 0


class DataConfig(Section):
    """Where the data comes from and how it is turned into the prepared format."""

    source: DataSource = "image_folder"
    location: str | None = "../shared/data/cifar10-jpeg.tar.gz"
    image_size: int | None = None
    channels: Literal[1, 3] = 3
    on_corrupt: OnCorrupt = "skip"
    download: bool = False
    mean: list[float] | None = None
    std: list[float] | None = None
    padding: int = 4
    # how the crop's border is filled: constant (zeros, RepDistiller) or reflect (official QuEST)
    padding_mode: PaddingMode = "constant"
    flip: bool = True
    loader: LoaderKind = "memory"
    # prepared: decode everything once into uint8 arrays (CIFAR-sized data); stream: index the
    # image folder or WebDataset shards and decode batch by batch in worker processes
    format: DataFormat = "prepared"
    workers: int = 2  # stream: DataLoader worker processes per rank
    crop_scale_min: float = 0.08  # stream training: RandomResizedCrop's smallest area share
    eval_crop_ratio: float = 0.875  # stream evaluation: resize to image_size / ratio, center-crop
    shuffle_buffer: int = 1000  # stream shards: samples mixed across shards in each worker
    subset: SubsetConfig = Field(default_factory=SubsetConfig)
    # images per class held out of training to choose on (defaults, best-of rows, the MLflow
    # champion): drawn with their own seed from the training pool outside the training subset,
    # or carved out of it when the training subset is the whole pool; 0: no validation split
    validation_per_class: int = Field(0, ge=0)
    validation_seed: int = 0


class OptimConfig(Section):
    """SGD recipe shared by teacher and student training."""

    epochs: int = Field(240, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(0.05, gt=0)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: Schedule = "step"
    milestones: list[int] = Field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1
    warmup_fraction: float = 0.15
    seed: int = 0
    # passes over the training set per epoch, each a fresh shuffle (the official few-images
    # sampler: a small subset repeated so that an epoch keeps the full set's step count)
    repeat: int = Field(1, gt=0)
    # false: an epoch ends with its partial batch, as the official transfer-learning sampler
    # (valeoai/QuEST's DataloaderSampler) does: 42 steps, not 41, at 10 images per class
    drop_last: bool = True


class TeacherConfig(Section):
    """Teacher: an architecture, and either a checkpoint to import or a recipe to train it."""

    arch: str = "resnet56"
    checkpoint: str | None = None
    train: OptimConfig = Field(default_factory=OptimConfig)


class FeaturesConfig(Section):
    """Which teacher layer to quantize and how many of its spatial vectors to keep."""

    layer: str | None = None
    max_vectors: int | None = Field(None, gt=0)
    dtype: FeatureDtype = "float32"
    batch_size: int = 256
    seed: int = 0
    # teacher-side average pooling (kernel = stride = pool) before k-means and in training alike:
    # the official "downscale" of the cross-architecture pairs is 2
    pool: int = Field(1, ge=1)


class CodebookConfig(Section):
    """k-means over the teacher's spatial vectors."""

    k: int = Field(4096, gt=0)
    iterations: int = Field(20, gt=0)
    seed: int = 0
    backend: Backend = "auto"
    max_points_per_centroid: int = 256


class QuestLevelConfig(Section):
    """One more quantized level (the official transfer setting quantizes layer3 and layer4):
    its own teacher and student layers and codebook; unset values are the first level's."""

    teacher_layer: str = ""
    student_layer: str = ""
    k: int | None = Field(None, gt=0)  # None: codebook.k
    temperature: float | None = Field(None, gt=0)  # None: student.quest.temperature, and so on
    weight: float | None = Field(None, ge=0)
    init_scale: float | None = Field(None, gt=0)
    predictor: Predictor | None = None
    pool: int | None = Field(None, gt=0)  # None: 1 (features.pool is the first level's)


class QuestConfig(Section):
    """QuEST loss settings (DESIGN.md defaults). The first quantized level is features.layer
    against student.layer with codebook.k words; `extra_levels` names further ones."""

    temperature: float = 5.0
    weight: float = 1.0
    init_scale: float = 3.0
    predictor: Predictor = "learned_scale"
    extra_levels: dict[str, QuestLevelConfig] = Field(default_factory=dict)


class StudentConfig(Section):
    """Student architecture, the methods to train, and the training recipe. Every other key is
    a method's own section (`student.kd`, `student.dkd`, ...), kept raw here and validated
    against the model in the method's module when a stage, `quest config` or a study starts
    (docs/methods.md)."""

    model_config = ConfigDict(extra="allow", strict=True)

    arch: str = "resnet20"
    layer: str | None = None
    methods: list[str] = Field(default_factory=lambda: ["ce", "kd", "quest"])
    train: OptimConfig = Field(default_factory=OptimConfig)
    quest: QuestConfig = Field(default_factory=QuestConfig)


class RuntimeConfig(Section):
    """Where and how computation runs."""

    device: str = "auto"
    threads: int | None = None
    channels_last: bool = True
    progress: ProgressMode = "auto"
    amp: Amp = "fp32"
    compile: bool = False


class PromotionConfig(Section):
    """Gates for moving the registry's champion alias to a new student."""

    min_top1: float = Field(0.0, ge=0, le=1)
    model_name: str = "quest-student"


class ReportConfig(Section):
    """What `quest report` shows: the visual-word gallery's size and sample."""

    gallery_words: int = Field(8, gt=0)
    gallery_patches: int = Field(16, gt=0)
    gallery_images: int = Field(500, gt=0)
    patch_scale: float = Field(3.0, gt=0)
    seed: int = 0


class DataChecksConfig(Section):
    """Thresholds of the prepared-data suite (run after prepare, before the teacher)."""

    min_class_share: float = Field(0.5, ge=0, le=1)
    max_duplicate_share: float = Field(0.01, ge=0, le=1)
    pixel_mean_min: float = Field(20.0, ge=0, le=255)  # and <= pixel_mean_max (_validate_checks)
    pixel_mean_max: float = Field(235.0, ge=0, le=255)
    pixel_std_min: float = Field(10.0, ge=0)


class FeatureChecksConfig(Section):
    """Thresholds of the teacher-feature suite (run after features, before the codebook)."""

    norm_min: float = Field(0.01, ge=0)  # and <= norm_max (_validate_checks)
    norm_max: float = 1000.0


class CodebookChecksConfig(Section):
    """Thresholds of the codebook suite (run after codebook, before the students)."""

    max_dead_share: float = Field(0.05, ge=0, le=1)
    min_perplexity_share: float = Field(0.1, ge=0, le=1)


class PredictionChecksConfig(Section):
    """Thresholds of the students' test-set predictions suite (run after evaluate)."""

    sum_tolerance: float = Field(0.001, gt=0)
    min_top1_over_chance: float = Field(1.0, ge=0)


class ValidationConfig(Section):
    """Great Expectations suites that gate the pipeline between stages."""

    data: DataChecksConfig = Field(default_factory=DataChecksConfig)
    features: FeatureChecksConfig = Field(default_factory=FeatureChecksConfig)
    codebook: CodebookChecksConfig = Field(default_factory=CodebookChecksConfig)
    predictions: PredictionChecksConfig = Field(default_factory=PredictionChecksConfig)


class Config(Section):
    """The whole pipeline configuration."""

    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    codebook: CodebookConfig = Field(default_factory=CodebookConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of all settings."""
        return self.model_dump()


# Environment variables that point the pipeline at an offline mirror without editing params.yaml.
ENV_OVERRIDES = {
    "QUEST_DATA_LOCATION": "data.location",
    "QUEST_TEACHER_CHECKPOINT": "teacher.checkpoint",
    "QUEST_DEVICE": "runtime.device",
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "a mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _walk(loc: tuple[Any, ...], root: type[BaseModel], prefix: str = ""
          ) -> tuple[str, Any, list[str]]:
    """The dotted key of an error location (under `prefix`, the key of `root`), the annotation
    found there, and the field names of the section holding it (for did-you-mean hints)."""
    model: Any = root
    tp: Any = root
    names: list[str] = list(root.model_fields)
    key = prefix
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
            inner = [a for a in typing.get_args(tp) if a is not type(None)]  # drop Optional
            if inner and typing.get_origin(inner[0]) is list:
                inner = list(typing.get_args(inner[0]))
            tp = inner[0] if inner else tp
            continue
        key = f"{key}.{part}" if key else str(part)
        if model is not None and part in model.model_fields:
            names = list(model.model_fields)
            tp = model.model_fields[part].annotation
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            tp = None
        inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        model = inner[0] if isinstance(inner[0], type) and issubclass(inner[0], BaseModel) else None
        if model is not None:
            names = list(model.model_fields)
    return key, tp, names


def one_line_error(exc: ValidationError, root: type[BaseModel] = Config,
                   prefix: str = "") -> QuestError:
    """The first problem of a pydantic validation error of `root` (a section found at the dotted
    key `prefix`; the whole config by default) as the project's one-line error."""
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden":
        key, _, names = _walk(loc[:-1], root, prefix)
        name = str(loc[-1])
        full = f"{key}.{name}" if key else name
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean '{key + '.' if key else ''}{close[0]}'?)" if close else ""
        return QuestError(f"unknown setting '{full}'{hint}: remove or rename it in params.yaml")
    key, tp, _ = _walk(loc, root, prefix)
    value = err.get("input")
    literals = [a for a in (tp, *typing.get_args(tp)) if typing.get_origin(a) is Literal]
    if err["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        # a range a section declares with Field(gt=..., le=...)
        bound = str(err["msg"]).replace("Input should be", "use a value")
        return QuestError(f"{key} is {value}: {bound} (fix it in params.yaml)")
    if err["type"] == "literal_error" and literals:
        choices = ", ".join(map(str, typing.get_args(literals[0])))
        return QuestError(f"{key} is '{value}': choose one of {choices}")
    return QuestError(f"{key or 'params'} must be {_type_name(tp)}, got {value!r}: "
                      "fix it in params.yaml")


def deep_merge(base: dict[str, Any], over: dict[str, Any], whole: tuple[str, ...] = (),
               prefix: str = "") -> dict[str, Any]:
    """Recursively merge `over` into a copy of `base`: mappings merge, everything else replaces,
    and so does a mapping at a dotted key listed in `whole` (`prefix`: the dotted key of
    `base` itself, for the recursion)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict) and dotted not in whole:
            out[key] = deep_merge(out[key], value, whole, dotted + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


# Settings a preset that names them replaces whole instead of merging into (`deep_merge`'s
# `whole`): a preset's quantized levels are its own set, so the main job's layer2 level never
# leaks into a single-level preset (which says `extra_levels: {}`) nor joins a transfer preset's
# layer3 level.
PRESET_REPLACES = ("student.quest.extra_levels",)


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


# libyaml's loader where PyYAML was built with it (the safe subset either way): the pure-Python
# one spends ~30 ms on params.yaml, and a study resolves it once for every planned run
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.lru_cache(maxsize=32)
def _parse_yaml(text: str) -> Any:
    """The parsed document of `text`, kept per text; callers get a deep copy to mutate."""
    return yaml.load(text, Loader=_SAFE_LOADER)  # noqa: S506 - a safe loader


def _read_mapping(p: Path, what: str, holds: str) -> dict[str, Any]:
    """Parse the YAML file `p` (a `what` holding `holds`, for messages) into a dict; an empty
    file gives an empty dict."""
    try:
        raw = copy.deepcopy(_parse_yaml(p.read_text(encoding="utf-8"))) or {}
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


# The official QuEST configurations ship inside the package (quest/infra/presets/official.yaml,
# package data), so `--preset NAME` works from any directory. A project may add its own: the
# params file's `presets:` and every *.yaml in a presets/ folder beside it (PROJECT_PRESETS_DIR),
# each a mapping of name -> overrides shaped like params.yaml. The project's presets win over the
# packaged ones of the same name: params.yaml's `presets:` first, then presets/*.yaml, then these.
PRESETS_DIR = Path(__file__).resolve().parent / "presets"
PROJECT_PRESETS_DIR = "presets"


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


def preset_lookup(
    raw: dict[str, Any], preset_dir: str | os.PathLike[str] | None = None,
) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """Where presets come from, first match wins: the params file's ``presets:``, the project's
    `preset_dir` (its ``*.yaml`` files; None: skipped), then the packaged official presets."""
    sources = [("params.yaml presets:", dict(raw.get("presets") or {}))]
    if preset_dir is not None:
        sources.append((f"{Path(preset_dir) / '*.yaml'}", read_preset_files(preset_dir)))
    sources.append(("the packaged official presets", read_preset_files(PRESETS_DIR)))
    return sources


def preset_names(raw: dict[str, Any],
                 preset_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Every preset name `raw` can use (project and packaged), sorted."""
    return sorted({str(n) for _, found in preset_lookup(raw, preset_dir) for n in found})


def find_preset(raw: dict[str, Any], preset: str,
                preset_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The overrides of preset `preset` (see `preset_lookup` for the order); an unknown name is
    a one-line QuestError with the closest names and every choice."""
    sources = preset_lookup(raw, preset_dir)
    for _, found in sources:
        if preset in found:
            return found[preset]
    names = sorted({str(n) for _, found in sources for n in found})
    close = difflib.get_close_matches(preset, names, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    where = ", ".join(w for w, _ in sources)
    raise QuestError(f"unknown preset '{preset}': {hint}choose one of "
                     f"{', '.join(names) or 'none defined'} (from {where})")


def resolve_raw(
    raw: dict[str, Any],
    preset: str | None = None,
    overrides: list[str] | None = None,
    preset_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Apply a named preset, then environment overrides, then ``key=value`` overrides.

    The preset is looked up in `raw`'s ``presets:`` first, then in the ``*.yaml`` files of
    the project's `preset_dir` (None: none), then in the packaged official presets."""
    raw = copy.deepcopy(raw)
    if preset:
        raw = deep_merge(raw, find_preset(raw, preset, preset_dir), PRESET_REPLACES)
    raw.pop("presets", None)
    for env, dotted in ENV_OVERRIDES.items():
        if os.environ.get(env):
            set_dotted(raw, dotted, os.environ[env])
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    return raw


def build_config(raw: dict[str, Any]) -> Config:
    """Turn a resolved settings dict into a validated Config (types by the schema, ranges by
    `validate`); the first problem is a one-line QuestError naming the key and the fix."""
    if not isinstance(raw, dict):
        raise QuestError(f"params must be a mapping of sections, got {raw!r}")
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise one_line_error(exc) from None
    validate(cfg)
    return cfg


def load_config(
    path: str | os.PathLike[str] = "params.yaml",
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Load params.yaml, apply a preset (from its ``presets:``, else the presets/*.yaml files
    beside it, else the packaged official ones) and overrides, and validate everything."""
    return build_config(resolve_raw(read_params(path), preset, overrides,
                                    preset_dir=Path(path).parent / PROJECT_PRESETS_DIR))


def _validate_levels(cfg: Config) -> None:
    """Each extra QuEST level: a file-name-safe name, both layer names given, sane values (the
    layers themselves are checked against the networks when a stage starts)."""
    import re

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


def validate(cfg: Config) -> None:
    """Check values that types alone do not: ranges and consistency. Names that only the core
    knows (architectures, methods, layers) are checked when a stage starts
    (`quest.core.checks.check_runnable`)."""
    for key, vec in (("data.mean", cfg.data.mean), ("data.std", cfg.data.std)):
        if vec is not None and len(vec) != cfg.data.channels:
            raise QuestError(f"{key} needs {cfg.data.channels} values, got {len(vec)}")
    _validate_levels(cfg)
    if not cfg.student.methods:
        raise QuestError("student.methods is empty: list at least one method "
                         "(`quest methods` lists them)")
    if cfg.runtime.device not in ("auto", "cpu") and not cfg.runtime.device.startswith("cuda"):
        raise QuestError(f"runtime.device is '{cfg.runtime.device}': use auto, cpu or cuda[:N]")
    _validate_checks(cfg.validation)


def _validate_checks(v: ValidationConfig) -> None:
    """The validation thresholds' bounds in order (each one's own range is its field's)."""
    d = v.data
    if d.pixel_mean_min > d.pixel_mean_max:
        raise QuestError(f"validation.data.pixel_mean_min/max are {d.pixel_mean_min}/"
                         f"{d.pixel_mean_max}: use 0 <= min <= max <= 255")
    f = v.features
    if f.norm_min > f.norm_max:
        raise QuestError(f"validation.features.norm_min/norm_max are {f.norm_min}/{f.norm_max}: "
                         "use 0 <= norm_min <= norm_max")


def config_hash(section: Any) -> str:
    """A short stable hash of a config section (for cache keys and run provenance)."""
    import hashlib
    import json

    data = section.model_dump() if isinstance(section, BaseModel) else section
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
