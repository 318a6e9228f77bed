"""Read what a finished run wrote (metrics/, plots/, models/codebook/) for the report."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quest.infra.errors import QuestError
from quest.infra.io_utils import read_json
from quest.infra.paths import Paths, method_slug


@dataclass
class RunData:
    """The numbers of one finished run: evaluation, per-epoch histories, codebook health."""

    root: Path
    label: str
    evaluation: dict[str, Any]
    histories: dict[str, list[dict[str, Any]]]
    teacher: dict[str, Any] | None = None
    codebook: dict[str, Any] | None = None
    codebook_meta: dict[str, Any] | None = None
    usage: list[int] = field(default_factory=list)
    objective: list[float] = field(default_factory=list)

    @property
    def methods(self) -> list[str]:
        """The evaluated students, in evaluation order."""
        return [m for m in self.evaluation["models"] if m != "teacher"]


def _csv_column(path: Path, column: str, kind: type) -> list[Any]:
    """One column of a CSV file (empty when the file does not exist)."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return [kind(float(row[column])) for row in csv.DictReader(fh)]


def load_run(root: Path, label: str, where: str = "") -> RunData:
    """Read one run's outputs; a missing required file is a one-line error naming the stage."""
    paths = Paths(Path(root).resolve())
    there = f" in {paths.root}{where}"
    ev_path = paths.metrics / "evaluation.json"
    if not ev_path.is_file():
        raise QuestError(f"{ev_path} does not exist: run `quest evaluate` (or `quest run`)"
                         f"{there} before `quest report`")
    evaluation = read_json(ev_path)
    histories: dict[str, list[dict[str, Any]]] = {}
    for method in [m for m in evaluation.get("models", {}) if m != "teacher"]:
        path = paths.student_metrics(method)
        if not path.is_file():
            raise QuestError(f"{path} does not exist: run `quest student --method {method}`"
                             f"{there} before `quest report`")
        histories[method] = list(read_json(path).get("history") or [])
    teacher = paths.metrics / "teacher.json"
    codebook = paths.metrics / "codebook.json"
    usage_csv = paths.plots / "codebook_usage.csv"
    return RunData(
        root=paths.root,
        label=label,
        evaluation=evaluation,
        histories=histories,
        teacher=read_json(teacher) if teacher.is_file() else None,
        codebook=read_json(codebook) if codebook.is_file() else None,
        codebook_meta=read_json(paths.codebook_meta) if paths.codebook_meta.is_file() else None,
        usage=_csv_column(usage_csv, "count", int),
        objective=_csv_column(paths.plots / "codebook_objective.csv", "objective", float),
    )


def loss_terms(history: list[dict[str, Any]]) -> list[str]:
    """The named loss terms of a history: the keys the trainer writes between epoch and loss."""
    if not history or "loss" not in history[0]:
        return []
    keys = list(history[0])
    return [k for k in keys[: keys.index("loss")] if k != "epoch"]


def slug(method: str) -> str:
    """A method's file-name form (the same as the pipeline's)."""
    return method_slug(method)
