"""docs/presets.md, generated from quest/infra/presets/official.yaml (the packaged presets):
every official QuEST preset, the official configuration it carries over, and the published
numbers to read it against (RepDistiller's CIFAR-100 table with its CRD row, mdistiller's DKD on
CIFAR-100 and ImageNet).

Regenerate with ``python -m quest.apps.presets_doc`` (tests/test_presets.py fails when it is stale).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from quest.infra.config import PRESETS_DIR, Config, load_config
from quest.infra.errors import QuestError

OFFICIAL_FILE = "official.yaml"
DOC_PATH = Path("docs") / "presets.md"

# RepDistiller's README (HobbitLong/RepDistiller, "Benchmark Results on CIFAR-100"), top-1 %:
# (teacher, student alone, KD, FitNet, AT, CRD) per (teacher arch, student arch) of the zoo.
REPDISTILLER_CIFAR100: dict[tuple[str, str], tuple[float, float, float, float, float, float]] = {
    ("wrn_40_2", "wrn_16_2"): (75.61, 73.26, 74.92, 73.58, 74.08, 75.48),
    ("wrn_40_2", "wrn_40_1"): (75.61, 71.98, 73.54, 72.24, 72.77, 74.14),
    ("resnet56", "resnet20"): (72.34, 69.06, 70.66, 69.21, 70.55, 71.16),
    ("resnet110", "resnet20"): (74.31, 69.06, 70.67, 68.99, 70.22, 71.46),
    ("resnet110", "resnet32"): (74.31, 71.14, 73.08, 71.06, 72.31, 73.48),
    ("resnet32x4", "resnet8x4"): (79.42, 72.50, 73.33, 73.50, 73.44, 75.51),
    ("vgg13", "vgg8"): (74.64, 70.36, 72.98, 71.02, 71.43, 73.94),
    ("vgg13", "mobilenetv2_half"): (74.64, 64.60, 67.37, 64.14, 59.40, 69.73),
    ("resnet50_cifar", "mobilenetv2_half"): (79.34, 64.60, 67.35, 63.16, 58.58, 69.11),
    ("resnet50_cifar", "vgg8"): (79.34, 70.36, 73.81, 70.69, 71.84, 74.30),
    ("resnet32x4", "shufflev1"): (79.42, 70.50, 74.07, 73.59, 71.73, 75.11),
    ("resnet32x4", "shufflev2"): (79.42, 71.82, 74.45, 73.54, 72.73, 75.65),
    ("wrn_40_2", "shufflev1"): (75.61, 70.50, 74.83, 73.73, 73.32, 76.05),
}

# mdistiller's README (megvii-research/mdistiller, "Decoupled Knowledge Distillation", "Main
# Benchmark Results"), DKD top-1 % per (dataset, teacher arch, student arch) of the zoo. It gives
# none for resnet110 -> resnet20 or ResNet50 -> vgg8. Its ImageNet "ResNet50 -> MobileNet-V1"
# student is the network of the official RN50_MNv2 config (the zoo's mobilenet_v1).
MDISTILLER_DKD: dict[tuple[str, str, str], float] = {
    ("cifar100", "resnet56", "resnet20"): 71.97,
    ("cifar100", "resnet110", "resnet32"): 74.11,
    ("cifar100", "resnet32x4", "resnet8x4"): 76.32,
    ("cifar100", "wrn_40_2", "wrn_16_2"): 76.23,
    ("cifar100", "wrn_40_2", "wrn_40_1"): 74.81,
    ("cifar100", "vgg13", "vgg8"): 74.68,
    ("cifar100", "resnet32x4", "shufflev1"): 76.45,
    ("cifar100", "wrn_40_2", "shufflev1"): 76.70,
    ("cifar100", "vgg13", "mobilenetv2_half"): 69.71,
    ("cifar100", "resnet50_cifar", "mobilenetv2_half"): 70.35,
    # the README heads this column "ResNet32x4 / MobileNet-V2", but its KD figure (74.45) is
    # RepDistiller's resnet32x4 -> ShuffleNetV2 one, and mdistiller ships a DKD config for
    # res32x4 -> shuv2 (configs/cifar100/dkd/res32x4_shuv2.yaml) and none for res32x4 -> mv2
    ("cifar100", "resnet32x4", "shufflev2"): 77.07,
    ("imagenet", "resnet34", "resnet18"): 71.70,
    ("imagenet", "resnet50", "mobilenet_v1"): 72.05,
}
# pairs whose DKD cell carries a footnote mark (see the note under the table)
_DKD_RELABELLED = {("cifar100", "resnet32x4", "shufflev2")}

# The official repository's README publishes no accuracy for any configuration.
QUEST_OFFICIAL = "not published"

_SOURCE = re.compile(r"^# source: (?P<source>\S.*?)\s*$")
_TOP_KEY = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+):")


def preset_sources(text: str) -> dict[str, str]:
    """Preset name -> its official source, from the ``# source: ...`` comment line that
    precedes each top-level key of a presets file; a preset without one is an error."""
    sources: dict[str, str] = {}
    pending: str | None = None
    for line in text.splitlines():
        if m := _SOURCE.match(line):
            pending = m["source"]
        elif m := _TOP_KEY.match(line):
            if pending is None:
                raise QuestError(f"preset '{m['name']}' has no '# source: FILE' line above it")
            sources[m["name"]], pending = pending, None
    return sources


def _levels(cfg: Config) -> str:
    """The quantized levels as 'teacher layer [pooled] -> student layer (T, weight)'."""
    q = cfg.student.quest
    rows = [(cfg.features.layer, cfg.features.pool, cfg.student.layer, q.temperature, q.weight)]
    for lv in q.extra_levels.values():
        rows.append((lv.teacher_layer, lv.pool or 1, lv.student_layer,
                     lv.temperature if lv.temperature is not None else q.temperature,
                     lv.weight if lv.weight is not None else q.weight))
    return "; ".join(
        f"`{t}`{f' pooled {p}x{p}' if p > 1 else ''} → `{s}` "
        f"(T {temp:g}, weight {w:g})" for t, p, s, temp, w in rows)


def presets_markdown(params: str | Path = "params.yaml") -> str:
    """The docs/presets.md text for the packaged official presets, each loaded through
    `params` (its `presets:` must not shadow them)."""
    path = PRESETS_DIR / OFFICIAL_FILE
    text = path.read_text(encoding="utf-8")
    names = list(yaml.safe_load(text) or {})
    sources = preset_sources(text)
    lines = [
        "# Official QuEST configurations as presets",
        "",
        "Generated by `python -m quest.apps.presets_doc` from "
        "`quest/infra/presets/official.yaml` (shipped in the package); do not edit by hand "
        "(tests/test_presets.py fails when this file is stale). Run one with "
        "`quest run --preset NAME` from any directory; the comments in that file say where to put "
        "the data and the teacher checkpoints, and which official settings have no equivalent "
        "here.",
        "",
        "Anchors, top-1 (%) for the same teacher and student, \"—\" where none is published: "
        "teacher, student alone, KD, FitNet, AT and CRD on CIFAR-100 from RepDistiller's README "
        "(HobbitLong/RepDistiller, none for ImageNet or MIT-67); DKD on CIFAR-100 and ImageNet "
        "from mdistiller's README (megvii-research/mdistiller). QuEST: the official "
        "repository's README (valeoai/QuEST) publishes no accuracy.",
        "",
        "| preset | teacher → student | QuEST levels | official configuration "
        "| teacher | student alone | KD | FitNet | AT | CRD | DKD | QuEST (official) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        if name not in sources:
            raise QuestError(f"preset '{name}' in {path} has no '# source: FILE' line above it")
        cfg = load_config(params, name)
        pair = (cfg.teacher.arch, cfg.student.arch)
        dataset = _dataset(name, cfg)
        anchors = REPDISTILLER_CIFAR100.get(pair) if dataset == "cifar100" else None
        cells = [f"{v:.2f}" for v in anchors] if anchors else ["—"] * 6
        key = (str(dataset), *pair)
        dkd = MDISTILLER_DKD.get(key)
        mark = "¹" if key in _DKD_RELABELLED else ""
        cells.append(f"{dkd:.2f}{mark}" if dkd is not None else "—")
        lines.append(f"| `{name}` | {pair[0]} → {pair[1]} | {_levels(cfg)} | {sources[name]} | "
                     + " | ".join(cells) + f" | {QUEST_OFFICIAL} |")
    lines += [
        "",
        "¹ mdistiller's README heads this column \"ResNet32x4 / MobileNet-V2\"; its KD figure "
        "(74.45) is RepDistiller's resnet32x4 → ShuffleNetV2 one, and mdistiller's DKD configs "
        "cover resnet32x4 → ShuffleV2 (configs/cifar100/dkd/res32x4_shuv2.yaml), not → "
        "MobileNetV2, so it is read as resnet32x4 → shufflev2 here.",
    ]
    return "\n".join(lines) + "\n"


def _dataset(name: str, cfg: Config) -> str | None:
    """The benchmark a preset's anchors come from: cifar100, imagenet, or None (MIT-67)."""
    if cfg.data.source == "cifar100":
        return "cifar100"
    # ImageNet and MIT-67 are both image folders; the preset names tell them apart
    return "imagenet" if name.startswith("imagenet-") else None


def main(argv: list[str] | None = None) -> int:
    """Write docs/presets.md under the project root (argument 1, default: the current folder)."""
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]) if args else Path(".")
    out = root / DOC_PATH
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(presets_markdown(root / "params.yaml"), encoding="utf-8")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
