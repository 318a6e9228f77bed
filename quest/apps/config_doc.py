"""docs/configuration.md, generated from the pydantic settings (quest/infra/config.py, and each
registered method's own section model under quest/core/methods/): every key of params.yaml with
its type, its default and what it means.

Types and defaults come from the schema; the meaning is the comment params.yaml gives the key
(on its line, or the comment block right above it), so the file a user edits and the reference
say the same thing. Regenerate with ``python -m quest.apps.config_doc``; tests/test_docs.py fails
when the page is stale or when a schema key is missing from it.
"""

from __future__ import annotations

import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from quest.infra.config import Config, StudentConfig
from quest.infra.io_utils import write_text_atomic

DOC_PATH = Path("docs") / "configuration.md"
PARAMS = Path("params.yaml")
# meanings of the keys params.yaml leaves uncommented (a key's own comment or its field's
# `description` wins); `train.X` applies to teacher.train and student.train alike
FALLBACK = {
    "data.location": "the archive, folder or shard folder to read (relative to the project root; "
                     "QUEST_DATA_LOCATION overrides it)",
    "data.std": "per-channel std for normalisation; null: from the prepared training split",
    "data.padding": "training augmentation: pixels of padding before the random crop back to size",
    "data.flip": "training augmentation: random horizontal flips",
    "data.subset.test_per_class": "test images kept per class (null: all of them)",
    "data.subset.seed": "seed of the class-balanced subset draw",
    "teacher.arch": "teacher architecture from the zoo (`quest models` lists them)",
    "train.epochs": "epochs of training",
    "train.batch_size": "images per SGD step",
    "train.lr": "peak learning rate",
    "train.momentum": "SGD momentum",
    "train.nesterov": "Nesterov momentum",
    "train.weight_decay": "L2 weight decay",
    "train.schedule": "step (milestones x gamma) | cosine | onecycle (warm-up, then cosine)",
    "train.milestones": "step schedule: epochs at which the lr is multiplied by gamma",
    "train.gamma": "step schedule: the lr factor at each milestone",
    "train.warmup_fraction": "onecycle: share of training spent warming the lr up from lr / 25",
    "train.seed": "seed of initialisation, shuffling and augmentation",
    "features.dtype": "dtype of the stored teacher features",
    "features.batch_size": "images per forward pass of the teacher while extracting features",
    "features.seed": "seed of the spatial-vector sample (max_vectors)",
    "codebook.iterations": "k-means iterations",
    "codebook.seed": "seed of the k-means initialisation",
    "codebook.max_points_per_centroid": "FAISS subsampling: at most this many vectors per word",
    "student.arch": "student architecture from the zoo (`quest models` lists them)",
    "student.layer": "student layer whose map predicts the words; null: its last conv stage",
    "student.methods": "methods to train, one student each (`quest config` lists the registered "
                       "ones)",
    "student.quest.temperature": "T of the teacher's soft assignment softmax(-T * sq. distance)",
    "student.quest.weight": "weight of the QuEST term beside CE",
    "student.quest.extra_levels.teacher_layer": "the level's teacher layer",
    "student.quest.extra_levels.student_layer": "the level's student layer",
    "student.quest.extra_levels.k": "the level's vocabulary size (null: codebook.k)",
    "student.quest.extra_levels.temperature": "the level's T (null: student.quest.temperature)",
    "student.quest.extra_levels.weight": "the level's loss weight (null: student.quest.weight)",
    "student.quest.extra_levels.init_scale": "the level's predictor scale (null: the first "
                                             "level's)",
    "student.quest.extra_levels.predictor": "the level's predictor (null: the first level's)",
    "student.quest.extra_levels.pool": "teacher-side pooling of the level (null: 1)",
    "runtime.threads": "torch CPU threads; null: torch's default",
    "runtime.channels_last": "channels-last memory format for convolutions",
    "promotion.model_name": "MLflow registered model name",
    "report.seed": "seed of the gallery's image sample",
    "validation.data.pixel_mean_max": "upper bound of each split's mean pixel value (0..255)",
    "validation.features.norm_max": "upper bound of every feature vector's L2 norm",
}
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w+-]*):(?P<rest>.*)$")


def _type_name(tp: Any) -> str:
    """A readable name of a field's annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _section_of(tp: Any) -> type[BaseModel] | None:
    """The settings section a field holds directly (None for a leaf value)."""
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _mapped_section(tp: Any) -> type[BaseModel] | None:
    """The section type of a `dict[str, Section]` field (the extra QuEST levels)."""
    if typing.get_origin(tp) is dict:
        return _section_of(typing.get_args(tp)[1])
    return None


def schema_keys(model: type[BaseModel] = Config,
                prefix: str = "") -> list[tuple[str, FieldInfo, Any]]:
    """(dotted key, field, default) of every leaf setting, sections walked depth first; a
    mapping of sections is walked under the placeholder NAME."""
    out: list[tuple[str, FieldInfo, Any]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _section_of(field.annotation)
        mapped = _mapped_section(field.annotation)
        if sub is not None:
            out += schema_keys(sub, f"{key}.")
        elif mapped is not None:
            out.append((key, field, {}))
            out += schema_keys(mapped, f"{key}.NAME.")
        else:
            out.append((key, field, field.get_default(call_default_factory=True)))
    if model is StudentConfig:
        # the methods' own sections (student.kd, ...): each model lives in its method's module
        for name, section in _method_sections().items():
            out += schema_keys(section, f"{prefix}{name}.")
    return out


def _method_sections() -> dict[str, type[BaseModel]]:
    from quest.core.methods import sections

    return dict(sections())


def params_comments(text: str) -> dict[str, str]:
    """The comment params.yaml gives each dotted key: the one on the key's line, else the
    comment block right above it. Only the active configuration is read (not `presets:`)."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    above: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        m = _KEY.match(line)
        if not m:
            above = [] if not stripped else above
            continue
        indent, key, rest = len(m["indent"]), m["key"], m["rest"]
        if indent == 0 and key == "presets":
            break
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        dotted = ".".join(k for _, k in stack)
        trailing = rest.split("#", 1)[1].strip() if "#" in rest else ""
        text_ = trailing or " ".join(a for a in above if a)
        if text_:
            out[dotted] = text_
        above = []
    return out


def meaning_of(key: str, comments: dict[str, str]) -> str:
    """What a dotted key means: the field's description, else params.yaml's comment, else the
    FALLBACK table (by key, then by its `train.X` suffix); "" when nobody says."""
    plain = key.replace(".NAME.", ".")
    model: Any = Config
    field = None
    for part in key.split("."):
        if part == "NAME":
            continue
        field = model.model_fields.get(part) if model is not None else None
        if field is None and model is StudentConfig and part in _method_sections():
            model = _method_sections()[part]
            continue
        if field is None:
            break
        model = _section_of(field.annotation) or _mapped_section(field.annotation)
    if field is not None and field.description:
        return " ".join(field.description.split())
    if plain in comments:
        return comments[plain]
    if plain in FALLBACK:
        return FALLBACK[plain]
    if ".train." in plain:
        return FALLBACK.get("train." + plain.rsplit(".", 1)[1], "")
    return ""


def _default_text(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{value}`"


# a field's declared range (Field(gt=..., le=...)), as the reference's type column shows it
_BOUNDS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))


def field_bounds(field: FieldInfo) -> list[tuple[str, Any]]:
    """The bounds a field declares, as (gt|ge|lt|le, value) pairs; [] when it declares none."""
    return [(attr, getattr(m, attr)) for m in field.metadata for attr, _ in _BOUNDS
            if getattr(m, attr, None) is not None]


def range_text(field: FieldInfo) -> str:
    """The range a field declares, e.g. "> 0" or "≥ 0, ≤ 1"; "" when it declares none."""
    signs = dict(_BOUNDS)
    return ", ".join(f"{signs[attr]} {value}" for attr, value in field_bounds(field))


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def configuration_markdown(params_text: str) -> str:
    """The whole reference page."""
    comments = params_comments(params_text)
    lines = [
        "# Configuration reference",
        "",
        "<!-- generated by `python -m quest.apps.config_doc` from quest/infra/config.py and the "
        "comments of params.yaml; do not edit -->",
        "",
        "Every key `params.yaml` accepts, with its type and default (the schema's default: the "
        "shipped params.yaml overrides some of them for the main job). Set one on the command "
        "line with `--set key=value`; `quest config` prints the resolved settings. Unknown keys "
        "and wrong types are one-line errors that name the key (and the closest known one).",
        "",
    ]
    section = None
    for key, field, default in schema_keys():
        top = key.split(".", 1)[0]
        if top != section:
            section = top
            doc = (Config.model_fields[top].annotation.__doc__ or "").strip()
            lines += ["", f"## `{top}`", "", " ".join(doc.split()), "",
                      "| key | type | default | meaning |", "|---|---|---|---|"]
        meaning = meaning_of(key, comments)
        bounds = range_text(field)
        kind = _type_name(field.annotation) + (f" ({bounds})" if bounds else "")
        lines.append(f"| `{key}` | {_escape(kind)} | "
                     f"{_escape(_default_text(default))} | {_escape(meaning)} |")
    return "\n".join(lines).rstrip() + "\n"


def write(root: Path = Path(".")) -> Path:
    """Regenerate docs/configuration.md under `root`."""
    text = configuration_markdown((root / PARAMS).read_text(encoding="utf-8"))
    write_text_atomic(root / DOC_PATH, text)
    return root / DOC_PATH


if __name__ == "__main__":
    sys.stdout.write(f"wrote {write()}\n")
