"""dvc.yaml entries from the stage table (quest/apps/stage_table.py): each stage's cmd, data
deps, params and outs, and a whole dvc.yaml for a project outside the repository (`quest init`).

flows/dvc_yaml.py adds each stage's code deps (its import closure) for the repository's own
dvc.yaml; a project of one's own runs the installed quest, whose files are not in the project, so
its stages depend on data and params only (reinstalling quest does not rerun them by itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from quest.apps.stage_table import LEVEL_ITEM, METHOD_ITEM, STAGES, Stage
from quest.infra.paths import Paths

# what the "foreach" of a per-method or per-level stage iterates over in params.yaml
FOREACH = {"method": "${student.methods}", "level": "${student.quest.extra_levels}"}

METRICS = ["metrics/evaluation.json", "metrics/teacher.json", "metrics/codebook.json"]
PLOTS: list[dict[str, Any]] = [
    {"plots/students": {"x": "epoch", "y": ["train_accuracy", "test_accuracy", "test_top5"],
                        "x_label": "epoch", "y_label": "accuracy"}},
    {"plots/codebook_objective.csv": {
        "x": "iteration", "y": "objective",
        "title": "k-means objective (mean squared distance to the nearest word)"}},
    {"plots/codebook_usage.csv": {"x": "rank", "y": "count",
                                  "title": "visual-word usage, most to least used"}},
]

PROJECT_HEADER = """\
# The QuEST pipeline as DVC stages, written by `quest init` from quest's stage table. Every stage
# calls the installed `quest` CLI, which reads params.yaml here; each stage lists the settings it
# reads, so editing one reruns only the stages that read it.
#
#   dvc repro                                  # run what changed (everything, the first time)
#   dvc exp run -S student.train.lr=0.02       # one experiment
#   dvc metrics show / dvc plots show          # evaluation table / training curves
#
# Inputs outside the project (data.location, teacher.checkpoint) are tracked by their params, not
# hashed: after replacing them in place, force the stage (`dvc repro -f prepare`). Stages do not
# depend on quest's code: after upgrading quest, `dvc repro -f` reruns everything.
"""


def template_key(spec: Stage) -> str | None:
    """The dvc.yaml template variable of a per-method or per-level stage (None: a plain one)."""
    return {"method": METHOD_ITEM, "level": LEVEL_ITEM}.get(spec.per or "")


def stage_data_entry(spec: Stage) -> dict[str, Any]:
    """cmd, data deps, params and outs of one stage as dvc.yaml lists them (relative paths)."""
    key = template_key(spec)
    paths = Paths(Path("."))
    return {"cmd": spec.cmd, "deps": [p.as_posix() for p in spec.deps(None, paths, key)],
            "params": list(dict.fromkeys(spec.params(key))),
            "outs": [p.as_posix() for p in spec.outs(paths, key)]}


def project_dvc_yaml() -> str:
    """A whole dvc.yaml for a project outside the repository: every table stage (per-method and
    per-level ones as foreach templates), the metrics and the plots."""
    stages: dict[str, Any] = {}
    for spec in STAGES:
        body = {k: v for k, v in stage_data_entry(spec).items() if v}  # no empty deps: list
        stages[spec.name] = {"foreach": FOREACH[spec.per], "do": body} if spec.per else body
    text = yaml.safe_dump({"stages": stages, "metrics": METRICS, "plots": PLOTS},
                          sort_keys=False, width=100)
    return PROJECT_HEADER + text
