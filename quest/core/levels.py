"""QuEST's quantized levels: the first (features.layer, student.layer, codebook.k) and the named
`student.quest.extra_levels`, each with its own features, codebook and loss term.

The features and codebook stages know nothing of levels: a level runs them on the config
`level_config` derives (its teacher layer, pooling and K put where the stages read them) and
the paths `level_paths` gives (its own files), so every level is the same two stages again.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import Tensor

from quest.infra.config import Config
from quest.infra.paths import Paths


@dataclass(frozen=True)
class QuestLevel:
    """One quantized level, with every setting resolved."""

    name: str  # "" for the first level
    teacher_layer: str | None  # None: the teacher architecture's default layer
    student_layer: str | None  # None: the student architecture's default layer
    k: int
    temperature: float
    weight: float
    init_scale: float
    predictor: str
    pool: int

    @property
    def loss_name(self) -> str:
        """The name of the level's loss term: quest, then quest_<name> for extra levels."""
        return "quest" if not self.name else f"quest_{self.name}"


@dataclass
class LevelInputs:
    """What the QuEST method needs to train one extra level: its settings, the codebook fit
    for it, and the layers as resolved when the codebook was made."""

    level: QuestLevel
    codebook: Tensor
    teacher_layer: str
    student_layer: str
    student_channels: int
    teacher_pool: int


def quest_levels(cfg: Config) -> list[QuestLevel]:
    """The first level, then every extra level in the order params.yaml lists them."""
    q = cfg.student.quest
    first = QuestLevel("", cfg.features.layer, cfg.student.layer, cfg.codebook.k, q.temperature,
                       q.weight, q.init_scale, q.predictor, cfg.features.pool)
    out = [first]
    for name, lv in q.extra_levels.items():
        out.append(QuestLevel(
            name, lv.teacher_layer, lv.student_layer,
            lv.k if lv.k is not None else first.k,
            lv.temperature if lv.temperature is not None else first.temperature,
            lv.weight if lv.weight is not None else first.weight,
            lv.init_scale if lv.init_scale is not None else first.init_scale,
            lv.predictor if lv.predictor is not None else first.predictor,
            lv.pool if lv.pool is not None else 1))
    return out


def level_names(cfg: Config) -> list[str]:
    """Names of the extra levels ("", the first level, is not listed)."""
    return list(cfg.student.quest.extra_levels)


def get_level(cfg: Config, name: str) -> QuestLevel:
    """The level called `name` ("" is the first)."""
    from quest.infra.errors import QuestError

    for level in quest_levels(cfg):
        if level.name == name:
            return level
    known = ", ".join(level_names(cfg)) or "none"
    raise QuestError(f"unknown QuEST level {name!r}: student.quest.extra_levels has {known}")


def level_config(cfg: Config, name: str) -> Config:
    """The config the features and codebook stages run with for level `name`."""
    if not name:
        return cfg
    level = get_level(cfg, name)
    out = copy.deepcopy(cfg)
    out.features.layer = level.teacher_layer
    out.features.pool = level.pool
    out.codebook.k = level.k
    out.student.quest.temperature = level.temperature
    return out


def level_paths(paths: Paths, name: str) -> Paths:
    """Where level `name`'s features and codebook live."""
    return Paths(paths.root, paths.results_dir, level=name)
