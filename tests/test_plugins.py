"""A method from outside the package: a toy distribution in a temporary directory, declared under
the entry-point group ``quest.methods`` and put on PYTHONPATH, appears in `quest config` and the
CLI help, runs under `quest run` and `quest study`, and is tracked by MLflow, with no file of
quest edited."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quest.apps.results import history_keys, load_records
from quest.core import methods

TOY = '''"""quest_toy: CE plus a weighted squared distance to the teacher's logits."""

import torch.nn.functional as F
from pydantic import Field

from quest.core.distill import Distiller, FrozenTeacher
from quest.core.methods import MethodSpec
from quest.infra.config import Section


class ToySettings(Section):
    """student.toy: the logit-matching weight."""

    weight: float = Field(0.01, description="weight of the logit MSE")


class LogitMatch(Distiller):
    name = "toy"

    def __init__(self, student, teacher, weight):
        super().__init__(student)
        self.teacher = FrozenTeacher(teacher)
        self.weight = weight

    def forward_train(self, x, y):
        t_logits = self.teacher(x).clone()
        logits = self.student(x)
        return logits, {"ce": F.cross_entropy(logits, y),
                        "match": self.weight * F.mse_loss(logits, t_logits)}


def build(ctx):
    return LogitMatch(ctx.student, ctx.teacher, ctx.settings.section("toy", ToySettings).weight)


SPEC = MethodSpec("toy", build, needs_teacher=True, settings=("toy",), owns={"toy": ToySettings},
                  loss_terms=("ce", "match"), description="logit matching (an outside plug-in)")
'''

STUDY = """
name: toy-study
description: the outside plug-in in a study
preset: tiny
methods: [toy]
seeds: [0]
settings:
  - name: base
    set: {student.train.epochs: 1, student.toy.weight: 0.02}
"""


@pytest.fixture
def plugin_env(tmp_path: Path, smoke_root: Path) -> dict[str, str]:
    """PYTHONPATH holding the toy package and its .dist-info (name, version, entry point), and
    the smoke root's data and teacher (set by its fixture)."""
    site = tmp_path / "site"
    (site / "quest_toy").mkdir(parents=True)
    (site / "quest_toy" / "__init__.py").write_text(TOY)
    info = site / "quest_toy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: quest-toy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[quest.methods]\ntoy = quest_toy:SPEC\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "GIT_PYTHON_REFRESH": "quiet"}
    return env


def _quest(env: dict[str, str], root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quest", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_plugin_is_not_loaded_here() -> None:
    assert "toy" not in methods.names() and "match" not in history_keys()


@pytest.mark.slow
def test_an_installed_plugin_runs_through_config_run_study_and_mlflow(
        plugin_env: dict[str, str], smoke_root: Path) -> None:
    root, env = smoke_root, plugin_env
    out = _quest(env, root, "config", "--preset", "tiny", "--set", "student.methods=[toy]")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["student"]["toy"] == {"weight": 0.01}  # its section, defaults
    bad = _quest(env, root, "config", "--preset", "tiny", "--set", "student.toy.wieght=1")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "quest: error: unknown setting 'student.toy.wieght' (did you mean 'student.toy.weight'?)"
        ": remove or rename it in params.yaml")

    sets = ["--preset", "tiny", "--set", "student.methods=[toy]"]
    run = _quest(env, root, "run", "--no-validate", *sets)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "toy" in run.stdout  # the accuracy table
    metrics = json.loads((root / "metrics" / "students" / "toy.json").read_text())
    assert {"ce", "match", "loss"} <= set(metrics["history"][0])
    (rec,) = load_records(root / "results" / "runs")
    assert rec["method"] == "toy" and rec["settings"]["toy"] == {"weight": 0.01}
    assert "match" in rec["history"][0]  # the record keeps the plug-in's loss terms

    track = _quest(env, root, "track", *sets)
    assert track.returncode == 0, track.stderr[-2000:]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    run_ids = json.loads((root / "metrics" / "mlflow_run.json").read_text())["child_run_ids"]
    child = client.get_run(run_ids["student[toy]"])
    assert child.data.params["student.toy.weight"] == "0.01"
    assert "match" in child.data.metrics

    (root / "studies").mkdir()
    (root / "studies" / "toy.yaml").write_text(STUDY)
    (root / "README.md").write_text("# project\n")
    study = _quest(env, root, "study", "studies/toy.yaml", "--root", str(root))
    assert study.returncode == 0, study.stderr[-2000:]
    recs = load_records(root / "results" / "toy-study")
    assert [r["method"] for r in recs] == ["toy"] and recs[0]["settings"]["toy"] == {
        "weight": 0.02}
