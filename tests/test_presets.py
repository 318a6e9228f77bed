"""The official QuEST configurations as presets (quest/infra/presets/official.yaml, shipped in
the package): each one loads with the settings of its official config file, its tapped teacher
and student maps line up as the QuEST loss needs, presets are found in params.yaml first, then in
the project's presets/*.yaml, then in the packaged file, and docs/presets.md is what the
generator writes."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml

from quest.apps.presets_doc import preset_sources, presets_markdown
from quest.core.levels import quest_levels
from quest.core.losses import match_spatial, pool_teacher_map
from quest.core.models.taps import FeatureTap, dummy_forward
from quest.core.models.zoo import build_model
from quest.infra.config import Config, load_config
from quest.infra.errors import QuestError

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
OFFICIAL = REPO / "quest" / "infra" / "presets" / "official.yaml"


class Level(NamedTuple):
    """One quantized level as the official config sets it, and the map shapes it implies
    (teacher channels = the codebook's embedding_dim, student channels = the predictor's
    num_channels, side = the spatial size both maps share after the teacher's pooling)."""

    teacher_layer: str
    student_layer: str
    k: int
    temperature: float
    weight: float
    pool: int
    teacher_channels: int
    student_channels: int
    side: int


class Row(NamedTuple):
    """One official configuration, written down from valeoai/QuEST's config files."""

    source: str
    teacher: str
    student: str
    lr: float
    padding_mode: str  # "stream": the 224-pixel presets, RandomResizedCrop instead
    predictor: str
    init_scale: float
    levels: tuple[Level, ...]  # the first level, then the extra ones


def _one(t_layer: str, s_layer: str, pool: int, t_ch: int, s_ch: int, side: int,
         weight: float = 1.0) -> tuple[Level, ...]:
    """The single CIFAR level: K 4096, T 5."""
    return (Level(t_layer, s_layer, 4096, 5.0, weight, pool, t_ch, s_ch, side),)


_TRANSFER = (Level("layer4", "layer4", 4096, 5.0, 10.0, 1, 512, 512, 7),
             Level("layer3", "layer3", 4096, 500.0, 10.0, 1, 256, 256, 14))
# RN34_VGG9_IMG*: extract_from ['21', '28'] are the max-pools after VGG9's fourth and fifth
# blocks (features.21, features.28), both 512 channels; quest_loss_coef 20
_TRANSFER_VGG9 = (Level("layer4", "features.28", 4096, 5.0, 20.0, 1, 512, 512, 7),
                  Level("layer3", "features.21", 4096, 500.0, 20.0, 1, 256, 512, 14))

TABLE: dict[str, Row] = {
    "cifar100-resnet56-resnet20": Row(
        "Config_CIFAR100/RN56_RN20.py", "resnet56", "resnet20", 0.05, "reflect",
        "learned_scale", 3.0, _one("layer3", "layer3", 1, 64, 64, 8)),
    "cifar100-resnet110-resnet20": Row(
        "Config_CIFAR100/RN110_RN20.py", "resnet110", "resnet20", 0.05, "reflect",
        "learned_scale", 3.0, _one("layer3", "layer3", 1, 64, 64, 8)),
    "cifar100-resnet110-resnet32": Row(
        "Config_CIFAR100/RN110_RN32.py", "resnet110", "resnet32", 0.05, "reflect",
        "learned_scale", 3.0, _one("layer3", "layer3", 1, 64, 64, 8)),
    "cifar100-resnet32x4-resnet8x4": Row(
        "Config_CIFAR100/RN32x4_RN8x4.py", "resnet32x4", "resnet8x4", 0.05, "reflect",
        "learned_scale", 3.0, _one("layer3", "layer3", 1, 256, 256, 8)),
    "cifar100-wrn_40_2-wrn_16_2": Row(
        "Config_CIFAR100/WRN40w2_WRN16w2.py", "wrn_40_2", "wrn_16_2", 0.05, "reflect",
        "learned_scale", 3.0, _one("relu", "relu", 1, 128, 128, 8)),
    "cifar100-wrn_40_2-wrn_40_1": Row(
        "Config_CIFAR100/WRN40w2_WRN40w1.py", "wrn_40_2", "wrn_40_1", 0.05, "reflect",
        "learned_scale", 3.0, _one("relu", "relu", 1, 128, 64, 8)),
    "cifar100-vgg13-vgg8": Row(  # block4's BN before its ReLU, on both sides; weight 2
        "Config_CIFAR100/VGG13_VGG8.py", "vgg13", "vgg8", 0.05, "reflect",
        "learned_scale", 3.0, _one("block4", "block4", 1, 512, 512, 4, weight=2.0)),
    "cifar100-resnet50-vgg8": Row(
        "Config_CIFAR100/RN50_VGG8.py", "resnet50_cifar", "vgg8", 0.05, "reflect",
        "learned_scale", 3.0, _one("layer4", "relu4", 1, 2048, 512, 4)),
    "cifar100-resnet50-mobilenetv2": Row(
        "Config_CIFAR100/RN50_MNv2.py", "resnet50_cifar", "mobilenetv2_half", 0.01, "reflect",
        "learned_scale", 3.0, _one("layer4", "conv2", 2, 2048, 1280, 2)),
    "cifar100-vgg13-mobilenetv2": Row(
        "Config_CIFAR100/VGG13_MNv2.py", "vgg13", "mobilenetv2_half", 0.01, "reflect",
        "learned_scale", 3.0, _one("block4", "conv2", 2, 512, 1280, 2)),
    "cifar100-resnet32x4-shufflev1": Row(
        "Config_CIFAR100/RN32x4_SNv1.py", "resnet32x4", "shufflev1", 0.01, "reflect",
        "learned_scale", 3.0, _one("layer3", "layer3", 2, 256, 960, 4)),
    "cifar100-resnet32x4-shufflev2": Row(
        "Config_CIFAR100/RN32x4_SNv2.py", "resnet32x4", "shufflev2", 0.01, "reflect",
        "learned_scale", 3.0, _one("layer3", "relu2", 2, 256, 1024, 4)),
    "cifar100-wrn_40_2-shufflev1": Row(
        "Config_CIFAR100/WRN40w2_SNv1.py", "wrn_40_2", "shufflev1", 0.01, "reflect",
        "learned_scale", 3.0, _one("relu", "layer3", 2, 128, 960, 4)),
    "imagenet-resnet34-resnet18": Row(
        "Config_ImageNet/RN34_RN18.py", "resnet34", "resnet18", 0.1, "stream",
        "learned_scale", 3.0, _one("layer4", "layer4", 1, 512, 512, 7)),
    "imagenet-resnet50-mobilenetv2": Row(
        "Config_ImageNet/RN50_MNv2.py", "resnet50", "mobilenet_v1", 0.1, "stream",
        "learned_scale", 3.0, _one("layer4", "features", 1, 2048, 1024, 7)),
    **{f"mit67-resnet34-resnet18-img{n}": Row(
        f"Config_TransferLearning/RN34_RN18_IMG{n}.py", "resnet34", "resnet18", 0.05, "stream",
        "fixed_scale_bias", 10.0, _TRANSFER) for n in (10, 25, 50, 80)},
    **{f"mit67-resnet34-vgg9-img{n}": Row(
        f"Config_TransferLearning/RN34_VGG9_IMG{n}.py", "resnet34", "vgg9", 0.01, "stream",
        "learned_scale", 3.0, _TRANSFER_VGG9) for n in (10, 25, 50, 80)},
}

# The training recipe and data of each family of configurations.
CIFAR_TRAIN = {"epochs": 240, "batch_size": 64, "momentum": 0.9, "nesterov": True,
               "weight_decay": 5e-4, "schedule": "step", "milestones": [150, 180, 210],
               "gamma": 0.1, "drop_last": True, "repeat": 1}
IMAGENET_TRAIN = {"epochs": 100, "batch_size": 256, "momentum": 0.9, "nesterov": True,
                  "weight_decay": 1e-4, "schedule": "step", "milestones": [30, 60, 90],
                  "gamma": 0.1, "drop_last": True, "repeat": 1}
TRANSFER_TRAIN = {"epochs": 200, "batch_size": 128, "momentum": 0.9, "nesterov": False,
                  "weight_decay": 5e-4, "schedule": "step", "milestones": [150], "gamma": 0.1}
# RN34_VGG9_IMG*: batch 32 (LUT_lr 0.01 until epoch 150, then 0.001, as Row.lr and milestones say)
TRANSFER_BATCH = {"resnet18": 128, "vgg9": 32}
# RN34_RN18_IMG* train through DataloaderSampler (use_ds_dataloader), which keeps each epoch's
# partial last batch; RN34_VGG9_IMG* through SimpleDataloader, which drops it
TRANSFER_DROP_LAST = {"resnet18": False, "vgg9": True}
# images per class trained on (the first 80% of the config's num_examples) and the sampler's
# repeat factor int(5360 / (67 x that))
TRANSFER_DATA = {10: (8, 10), 25: (20, 4), 50: (40, 2), 80: (64, 1)}
CIFAR_MEAN, CIFAR_STD = [0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@functools.cache
def _markdown() -> str:
    """What the generator writes for docs/presets.md (loads every preset: built once)."""
    return presets_markdown(PARAMS)


@functools.cache
def _config(name: str) -> Config:
    return load_config(PARAMS, name)


def _family(name: str) -> tuple[int, int]:
    """(number of classes, image side) of a preset's data."""
    if name.startswith("cifar100-"):
        return 100, 32
    return (1000, 224) if name.startswith("imagenet-") else (67, 224)


def test_the_table_covers_every_official_preset() -> None:
    names = list(yaml.safe_load(OFFICIAL.read_text()))
    assert sorted(names) == sorted(TABLE)
    sources = preset_sources(OFFICIAL.read_text())
    for name, row in TABLE.items():  # each preset's "# source:" comment names its config file
        assert sources[name].split()[0] == row.source, name


@pytest.mark.parametrize("name", list(TABLE))
def test_preset_carries_the_official_settings(name: str) -> None:
    row, cfg = TABLE[name], _config(name)
    q, t = cfg.student.quest, cfg.student.train
    assert (cfg.teacher.arch, cfg.student.arch) == (row.teacher, row.student)
    got = [(lv.teacher_layer, lv.student_layer, lv.k, lv.temperature, lv.weight, lv.pool)
           for lv in quest_levels(cfg)]
    assert got == [lv[:6] for lv in row.levels]
    assert all(lv.predictor == row.predictor and lv.init_scale == row.init_scale
               for lv in quest_levels(cfg))
    assert (q.predictor, q.init_scale) == (row.predictor, row.init_scale)
    assert t.lr == row.lr and cfg.data.flip
    if row.padding_mode == "stream":
        # torchvision's RandomResizedCrop(224) for training, Resize(256) + CenterCrop(224) for
        # testing, as the official ImageNet and transfer loaders
        assert (cfg.data.format, cfg.data.image_size) == ("stream", 224)
        assert (cfg.data.crop_scale_min, cfg.data.eval_crop_ratio) == (0.08, 0.875)
        assert round(224 / cfg.data.eval_crop_ratio) == 256
    else:
        assert cfg.data.format == "prepared" and cfg.data.padding_mode == row.padding_mode
        assert cfg.data.padding > 0
    assert (cfg.codebook.k, cfg.codebook.iterations) == (4096, 20)
    assert cfg.codebook.max_points_per_centroid >= 10_000_000  # FAISS: no sampling
    assert cfg.teacher.checkpoint  # imported, never trained here
    recipe = {k: getattr(t, k) for k in ("epochs", "batch_size", "momentum", "nesterov",
                                         "weight_decay", "schedule", "milestones", "gamma",
                                         "drop_last")}
    sub = cfg.data.subset
    if name.startswith("cifar100-"):
        assert recipe | {"repeat": t.repeat} == CIFAR_TRAIN
        assert (cfg.data.source, cfg.data.mean, cfg.data.std) == ("cifar100", CIFAR_MEAN,
                                                                  CIFAR_STD)
        assert (cfg.data.image_size, cfg.data.padding) == (None, 4)
        assert (sub.train_per_class, sub.test_per_class) == (None, None)
        assert cfg.features.max_vectors is None
        assert cfg.student.methods == ["ce", "kd", "quest"]
    elif name.startswith("imagenet-"):
        # RN50 -> MobileNetV2 trains with batch 210, RN34 -> RN18 with 256
        batch = {"imagenet-resnet50-mobilenetv2": 210}.get(name, 256)
        assert recipe | {"repeat": t.repeat} == IMAGENET_TRAIN | {"batch_size": batch}
        assert (cfg.data.source, cfg.data.image_size) == ("image_folder", 224)
        assert (cfg.data.mean, cfg.data.std) == (IMAGENET_MEAN, IMAGENET_STD)
        assert cfg.student.methods == ["ce", "kd", "quest"]
    else:
        assert recipe == TRANSFER_TRAIN | {"batch_size": TRANSFER_BATCH[row.student],
                                           "drop_last": TRANSFER_DROP_LAST[row.student]}
        assert (cfg.data.source, cfg.data.image_size) == ("image_folder", 224)
        assert (cfg.data.mean, cfg.data.std) == (IMAGENET_MEAN, IMAGENET_STD)
        per_class, repeat = TRANSFER_DATA[int(name.rsplit("img", 1)[1])]
        assert (sub.train_per_class, sub.test_per_class, t.repeat) == (per_class, None, repeat)
        assert cfg.features.max_vectors is None
        assert cfg.student.methods == ["ce", "quest"]  # an ImageNet teacher: no MIT-67 logits


@functools.cache
def _tapped(arch: str, num_classes: int, side: int, layers: tuple[str, ...]
            ) -> dict[str, tuple[int, ...]]:
    """Shapes of the tapped maps of one zoo model on one image (meta tensors: shapes only)."""
    with torch.device("meta"):
        model = build_model(arch, num_classes)
    with FeatureTap(model, layers) as tap:
        dummy_forward(model, (3, side, side))
        return {name: tuple(out.shape) for name, out in tap.outputs.items()}


@pytest.mark.parametrize("name", list(TABLE))
def test_tapped_maps_line_up(name: str) -> None:
    """Teacher map (after its pooling) and student map have the expected channels and one
    spatial size, which match_spatial (what the QuEST loss calls) accepts as it is."""
    row, cfg = TABLE[name], _config(name)
    classes, side = _family(name)
    levels = quest_levels(cfg)
    assert len(levels) == len(row.levels)
    t_maps = _tapped(row.teacher, classes, side, tuple(str(lv.teacher_layer) for lv in levels))
    s_maps = _tapped(row.student, classes, side, tuple(str(lv.student_layer) for lv in levels))
    for lv, want in zip(levels, row.levels, strict=True):
        teacher = pool_teacher_map(torch.empty(t_maps[str(lv.teacher_layer)], device="meta"),
                                   lv.pool)
        student = torch.empty(s_maps[str(lv.student_layer)], device="meta")
        assert teacher.shape[1:] == (want.teacher_channels, want.side, want.side), lv
        assert student.shape[1:] == (want.student_channels, want.side, want.side), lv
        t_out, s_out = match_spatial(teacher, student)
        assert t_out.shape == teacher.shape and s_out.shape == student.shape


def test_unknown_preset_is_one_line_listing_every_name() -> None:
    with pytest.raises(QuestError) as err:
        load_config(PARAMS, "nope")
    message = str(err.value)
    assert "\n" not in message and message.startswith("unknown preset 'nope'")
    every = [*yaml.safe_load(PARAMS.read_text())["presets"], *TABLE]
    assert all(name in message for name in every)


def test_params_presets_come_first_then_preset_files(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("presets:\n  a: {codebook: {k: 8}}\n")
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "x.yaml").write_text("a: {codebook: {k: 16}}\n"
                                                 "b: {codebook: {k: 32}}\n")
    assert load_config(tmp_path / "params.yaml", "a").codebook.k == 8
    assert load_config(tmp_path / "params.yaml", "b").codebook.k == 32
    (tmp_path / "presets" / "y.yaml").write_text("b: {codebook: {k: 64}}\n")
    with pytest.raises(QuestError, match="preset 'b' is defined in both"):
        load_config(tmp_path / "params.yaml", "b")
    (tmp_path / "presets" / "y.yaml").write_text("c: [1, 2]\n")
    with pytest.raises(QuestError, match="must be a mapping of settings"):
        load_config(tmp_path / "params.yaml", "c")


@pytest.mark.slow
def test_docs_table_is_up_to_date() -> None:
    """docs/presets.md is exactly what `python -m quest.apps.presets_doc` writes."""
    assert (REPO / "docs" / "presets.md").read_text(encoding="utf-8") == _markdown()


@pytest.mark.slow
def test_docs_carry_crd_and_dkd_anchors_next_to_repdistillers() -> None:
    """RepDistiller's CRD and mdistiller's DKD figures sit in each preset's row, "—" where
    those READMEs publish none for the pair."""
    lines = _markdown().splitlines()
    rows = {line.split(" | ")[0].strip("| `"): line.split(" | ")
            for line in lines if line.startswith("| `")}
    header = next(line for line in lines if line.startswith("| preset"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    crd, dkd, kd = cols.index("CRD"), cols.index("DKD"), cols.index("KD")

    def cell(name: str, col: int) -> str:
        return rows[name][col].strip(" |")

    # resnet56 -> resnet20: RepDistiller's README (KD 70.66, CRD 71.16), mdistiller's (DKD 71.97)
    assert [cell("cifar100-resnet56-resnet20", c) for c in (kd, crd, dkd)] == [
        "70.66", "71.16", "71.97"]
    assert cell("cifar100-resnet50-vgg8", crd) == "74.30"
    assert cell("cifar100-resnet50-vgg8", dkd) == "—"  # mdistiller gives no ResNet50 -> vgg8
    assert cell("cifar100-resnet110-resnet20", dkd) == "—"
    assert cell("cifar100-resnet32x4-shufflev2", dkd) == "77.07¹"  # the relabelled column
    # ImageNet: DKD only (RepDistiller's README has no ImageNet table); MIT-67: none at all
    assert [cell("imagenet-resnet50-mobilenetv2", c) for c in (kd, crd, dkd)] == [
        "—", "—", "72.05"]
    assert all(cell(n, c) == "—" for n in rows if n.startswith("mit67-") for c in (crd, dkd))
