"""The DVC pipeline (dvc.yaml) run for real on the tiny preset in a temporary git + DVC project.

One module-scoped project is reproduced once; the tests then check what reruns after each kind of
change, metrics and plots, an experiment, and push / clone / pull through a local remote.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from quest.apps.cli import main as quest_main
from quest.infra.config import Config

pytestmark = pytest.mark.slow  # make test-fast leaves it out; make test runs it

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: `quest` and `dvc` live here
# The project trains one student, quest+kd (a '+' in stage names and file paths, and the code
# path that needs teacher and codebook): every stage process costs ~4 s of imports, so each extra
# student costs ~6 s per repro. The graph of all four methods is checked statically instead
# (test_dag_of_all_methods).
METHODS = ["quest+kd"]
ALL_METHODS = ["ce", "kd", "quest", "quest+kd"]
STUDENTS = {f"student@{m}" for m in METHODS}
# the Great Expectations gates between stages (quest validate --what W)
VALIDATE = {"validate-data", "validate-features", "validate-codebook", "validate-predictions"}
ALL_STAGES = {"prepare", "teacher", "features", "codebook", *STUDENTS, "evaluate", "report",
              *VALIDATE}
# settings dvc.yaml deliberately leaves out of every stage's params (see its header)
UNTRACKED = {"runtime.device", "runtime.threads", "runtime.channels_last", "runtime.progress",
             "runtime.amp", "runtime.compile",
             "data.download", "data.workers", "features.batch_size",
             # read by `quest promote` against the MLflow registry, not by any DVC stage
             "promotion.min_top1", "promotion.model_name"}
TIMINGS: dict[str, float] = {}


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    # params.yaml must be the whole truth: no environment overrides of data or teacher paths
    for key in ("QUEST_DATA_LOCATION", "QUEST_TEACHER_CHECKPOINT", "QUEST_PRESET", "QUEST_DEVICE"):
        env.pop(key, None)
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "DVC_STUDIO_OFFLINE": "true",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # keep DVC's global/system config and its site cache out of the user's directories
        "DVC_GLOBAL_CONFIG_DIR": str(tmp / "dvc-global"),
        "DVC_SYSTEM_CONFIG_DIR": str(tmp / "dvc-system"),
        "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site-cache"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(tmp / "home"),
        "DVC_PAGER": "cat",
    })
    return env


class Project:
    """A temporary copy of the repository with its own git history, DVC cache and remote."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.dag_dot = ""  # `dvc dag --dot` with all four methods
        self.full_output = ""  # output of the first, full `dvc repro`

    def run(self, *args: str, cwd: Path | None = None, label: str | None = None) -> str:
        """Run a command in the project; fail the test with its output if it fails."""
        t0 = time.perf_counter()
        proc = subprocess.run(args, cwd=cwd or self.root, env=self.env, capture_output=True,
                              text=True, timeout=600)
        if label:
            TIMINGS[label] = round(time.perf_counter() - t0, 1)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{out}"
        return out

    def dvc(self, *args: str, **kw: Any) -> str:
        """Run `dvc ARGS`."""
        return self.run(str(BIN / "dvc"), *args, **kw)

    def git(self, *args: str, **kw: Any) -> str:
        """Run `git ARGS`."""
        return self.run("git", *args, **kw)

    def commit(self, message: str) -> None:
        """Commit everything (params.yaml, dvc.lock) so the next step starts clean."""
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)

    def params(self) -> dict[str, Any]:
        """The project's params.yaml."""
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def set_param(self, dotted: str, value: Any) -> None:
        """Edit one setting in params.yaml."""
        raw = self.params()
        node = raw
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
        (self.root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def ran_stages(output: str) -> set[str]:
    """Stages DVC executed (or restored from its run cache) according to its output."""
    ran = set(re.findall(r"Running stage '([^']+)'", output))
    return ran | set(re.findall(r"Stage '([^']+)' is cached", output))


def project_files() -> list[str]:
    """What a clone of the repository holds: tracked files plus untracked, non-ignored ones."""
    listed = set()
    for extra in ([], ["--others", "--exclude-standard"]):
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", *extra],
                             capture_output=True, text=True, check=True).stdout
        listed.update(p for p in out.split("\0") if p)
    return sorted(p for p in listed if (REPO / p).is_file())


def tiny_params(cifar_archive: Path, teacher_checkpoint: Path, methods: list[str]) -> str:
    """params.yaml for the test: `quest config --preset tiny --format yaml` with shared paths."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = quest_main([
            "config", "--params", str(REPO / "params.yaml"), "--preset", "tiny",
            "--format", "yaml",
            "--set", f"data.location={cifar_archive}",
            "--set", f"teacher.checkpoint={teacher_checkpoint}",
            "--set", f"student.methods=[{', '.join(methods)}]",
            # one intra-op thread: tiny batches gain nothing from two, and on a shared 2-core
            # machine spinning OpenMP workers slow every stage down (runtime.* is not a DVC param)
            "--set", "runtime.threads=1",
        ])
    assert rc == 0
    return buf.getvalue()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, cifar_archive: Path,
            teacher_checkpoint: Path) -> Iterator[Project]:
    """A git + DVC project, reproduced once, committed and clean."""
    with pytest.MonkeyPatch.context() as mp:
        for key in ("QUEST_DATA_LOCATION", "QUEST_TEACHER_CHECKPOINT", "QUEST_DEVICE"):
            mp.delenv(key, raising=False)
        for key, value in (("DVC_NO_ANALYTICS", "1"), ("DO_NOT_TRACK", "true"),
                           ("MLFLOW_DISABLE_TELEMETRY", "true"),
                           ("PREFECT_SERVER_ANALYTICS_ENABLED", "false")):
            mp.setenv(key, value)
        yield from _make_project(tmp_path_factory, cifar_archive, teacher_checkpoint)


def _make_project(tmp_path_factory: pytest.TempPathFactory, cifar_archive: Path,
                  teacher_checkpoint: Path) -> Iterator[Project]:
    tmp = tmp_path_factory.mktemp("dvc")
    root = tmp / "project"
    for rel in project_files():
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest)
    (tmp / "home").mkdir()
    proj = Project(root, _env(tmp))
    proj.git("init", "-q")
    proj.git("config", "user.name", "quest test")
    proj.git("config", "user.email", "quest-test@example.invalid")
    if not (root / ".dvc" / "config").is_file():
        proj.dvc("init", "-q")
    # the committed default remote lies outside the project; the test's one lives in tmp
    proj.dvc("remote", "add", "-d", "-f", "storage", str(tmp / "remote"))
    # the stage graph with all four methods (static: nothing runs)
    (root / "params.yaml").write_text(tiny_params(cifar_archive, teacher_checkpoint, ALL_METHODS))
    proj.dag_dot = proj.dvc("dag", "--dot")
    text = tiny_params(cifar_archive, teacher_checkpoint, METHODS)
    (root / "params.yaml").write_text(text)
    assert yaml.safe_load(text)["student"]["methods"] == METHODS
    proj.commit("tiny project")
    proj.full_output = proj.dvc("repro", label="repro: full")
    proj.commit("reproduced")
    yield proj
    print("\nDVC timings (s):", json.dumps(TIMINGS))


def status_clean(proj: Project, cwd: Path | None = None) -> bool:
    """Whether `dvc status` reports nothing to do."""
    return "Data and pipelines are up to date" in proj.dvc("status", cwd=cwd)


def stage_params(dvc_yaml: dict[str, Any]) -> dict[str, list[str]]:
    """The params each stage (template) of dvc.yaml lists."""
    out = {}
    for name, stage in dvc_yaml["stages"].items():
        body = stage.get("do", stage)
        out[name] = [p for p in body.get("params", []) if isinstance(p, str)]
    return out


def leaves(tree: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted keys of every leaf setting (lists count as leaves)."""
    keys = set()
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        # an empty mapping (student.quest.extra_levels: {}) is tracked as one param
        keys |= leaves(value, dotted + ".") if isinstance(value, dict) and value else {dotted}
    return keys


def test_dvc_yaml_params_cover_every_setting() -> None:
    # a setting missing from every stage's params would change results without any rerun
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    # a per-level stage tracks its own entry of student.quest.extra_levels
    listed = {p.removesuffix(".${key}") for ps in stage_params(spec).values() for p in ps}
    from quest.core.methods import config_dict

    # every setting: the schema's sections and each registered method's own section
    settings = leaves(config_dict(Config()))
    assert listed <= settings, f"unknown params in dvc.yaml: {sorted(listed - settings)}"
    assert UNTRACKED <= settings
    missing = settings - listed - UNTRACKED - {"student.methods"}
    assert not missing, f"settings no stage tracks: {sorted(missing)}"
    # DVC fails on a listed param absent from params.yaml, so the repo's file must spell them all
    repo_params = yaml.safe_load((REPO / "params.yaml").read_text())
    repo_params.pop("presets", None)
    spelled = leaves(repo_params)
    # a mapping param (student.quest.extra_levels) is spelled by its entries when it has some
    absent = {p for p in listed - spelled if not any(s.startswith(p + ".") for s in spelled)}
    assert not absent, f"params.yaml lacks {sorted(absent)}"
    # the methods list drives the foreach and is what evaluate reads
    assert spec["stages"]["student"]["foreach"] == "${student.methods}"
    assert "student.methods" in stage_params(spec)["evaluate"]


def test_config_yaml_is_a_resolved_params_file(tmp_path: Path, cifar_archive: Path,
                                               teacher_checkpoint: Path) -> None:
    from quest.infra.config import load_config

    text = tiny_params(cifar_archive, teacher_checkpoint, ALL_METHODS)
    assert "presets" not in yaml.safe_load(text)
    (tmp_path / "params.yaml").write_text(text)
    expected = load_config(REPO / "params.yaml", "tiny", [
        f"data.location={cifar_archive}", f"teacher.checkpoint={teacher_checkpoint}",
        "student.methods=[ce, kd, quest, quest+kd]", "runtime.threads=1"]).to_dict()
    assert load_config(tmp_path / "params.yaml").to_dict() == expected


def test_dag_of_all_methods(project: Project) -> None:
    dot = project.dag_dot
    edges = set(re.findall(r'"([^"]+)" -> "([^"]+)"', dot))
    nodes = set(re.findall(r'^"([^"]+)";$', dot, re.M))
    students = {f"student@{m}" for m in ALL_METHODS}
    assert nodes == {"prepare", "teacher", "features", "codebook", "evaluate", "report",
                     *students, *VALIDATE}
    # each suite sits between the stage it checks and the next one (through its .passed gate)
    assert {("prepare", "validate-data"), ("validate-data", "teacher"),
            ("features", "validate-features"), ("validate-features", "codebook"),
            ("codebook", "validate-codebook"), ("evaluate", "validate-predictions")} <= edges
    assert all(("validate-codebook", student) in edges for student in students)
    for student in students:
        # evaluate's directory dependency (models/students) links it to every student stage
        assert (student, "evaluate") in edges
        assert {("codebook", student), ("teacher", student), ("prepare", student)} <= edges
    assert {("prepare", "teacher"), ("teacher", "features"), ("features", "codebook"),
            ("prepare", "evaluate"), ("teacher", "evaluate")} <= edges
    assert ("codebook", "evaluate") not in edges
    # the report reads evaluation.json and every student's history (metrics/students)
    assert {("evaluate", "report"), ("codebook", "report")} <= edges
    assert all((student, "report") in edges for student in students)


def test_full_repro_runs_every_stage(project: Project) -> None:
    assert ran_stages(project.full_output) == ALL_STAGES
    ev = json.loads((project.root / "metrics" / "evaluation.json").read_text())
    assert set(ev["models"]) == {"teacher", *METHODS}
    assert ev["models"]["teacher"]["top1"] > 0.5
    # dvc repro carries the tiny preset's validation split from prepare to evaluate
    assert ev["num_val_images"] == 30 and all("val_top1" in m for m in ev["models"].values())
    for method in METHODS:
        assert (project.root / "models" / "students" / f"{method}.pt").is_file()
        assert (project.root / "plots" / "students" / f"{method}.csv").is_file()
    lock = yaml.safe_load((project.root / "dvc.lock").read_text())
    assert set(lock["stages"]) == ALL_STAGES


def test_second_repro_does_nothing(project: Project) -> None:
    out = project.dvc("repro", label="repro: no-op")
    assert ran_stages(out) == set()
    for stage in ALL_STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in out
    # bytecode inside a code dependency directory is .dvcignore'd: it must not trigger reruns
    pyc = project.root / "quest" / "core" / "models" / "__pycache__" / "zoo.cpython-311.pyc"
    pyc.parent.mkdir(exist_ok=True)
    pyc.write_bytes(b"not source")
    try:
        assert status_clean(project)
    finally:
        shutil.rmtree(pyc.parent)


def test_metrics_and_plots_show(project: Project) -> None:
    shown = json.loads(project.dvc("metrics", "show", "--json"))
    data = shown[""]["data"]
    models = data["metrics/evaluation.json"]["data"]["models"]
    assert set(models) == {"teacher", *METHODS}
    assert all(0 <= models[m]["top1"] <= 1 for m in models)
    teacher_top1 = data["metrics/teacher.json"]["data"]["top1"]
    assert teacher_top1 == pytest.approx(models["teacher"]["top1"], abs=1e-6)
    assert data["metrics/codebook.json"]["data"]["k"] == 32
    plots = json.loads(project.dvc("plots", "show", "--json"))["data"]
    codebook = ["plots/codebook_objective.csv", "plots/codebook_usage.csv"]
    for name in [f"plots/students/{m}.csv" for m in METHODS] + codebook:
        assert name in plots, sorted(plots)
    curve = plots[f"plots/students/{METHODS[0]}.csv"][0]["content"]
    assert curve["encoding"]["x"]["field"] == "epoch"
    fields = {row["field"] for row in curve["data"]["values"]}
    assert {"test_accuracy", "train_accuracy"} <= fields


def test_push_then_pull_in_a_fresh_clone(project: Project, tmp_path: Path) -> None:
    project.dvc("push", label="push")
    clone = tmp_path / "clone"
    project.git("clone", "-q", str(project.root), str(clone))
    assert not (clone / "models" / "students" / "quest+kd.pt").exists()
    project.dvc("pull", cwd=clone, label="pull")
    for rel in ("data/prepared", "data/features", "models/codebook/codebook.npy",
                "models/teacher/teacher.pt", "models/students/quest+kd.pt",
                "metrics/evaluation.json", "plots/students/quest+kd.csv"):
        assert (clone / rel).exists(), rel
    assert status_clean(project, cwd=clone)
    out = project.dvc("repro", cwd=clone, label="repro: clone no-op")
    assert ran_stages(out) == set()
    same = ("metrics/evaluation.json", "models/students/quest+kd.pt",
            "models/codebook/codebook.npy")
    for rel in same:
        assert (clone / rel).read_bytes() == (project.root / rel).read_bytes(), rel


def test_an_experiment_of_three_changes_reruns_only_their_stages(project: Project) -> None:
    """A student setting, the codebook's K and an extra QuEST level, in one `dvc exp run`:
    `dvc status` first shows what each change alone makes stale (each stage process costs
    seconds, so one run checks the three), then the experiment runs exactly the union of their
    downstream stages, and every student reads the new codebook."""
    base = (project.root / "params.yaml").read_text()
    for dotted, value, stale in (("student.train.lr", 0.02, STUDENTS),
                                 ("codebook.k", 16, {"codebook"})):
        project.set_param(dotted, value)
        assert set(json.loads(project.dvc("status", "--json"))) == stale, dotted
        (project.root / "params.yaml").write_text(base)
    # the official transfer setting's second level: layer2 of both nets, its own K and T
    project.set_param("student.quest.extra_levels",
                      {"l2": {"teacher_layer": "layer2", "student_layer": "layer2", "k": 16,
                              "temperature": 500.0}})
    dot = project.dvc("dag", "--dot")
    edges = set(re.findall(r'"([^"]+)" -> "([^"]+)"', dot))
    assert {("teacher", "features-level@l2"), ("features-level@l2", "codebook-level@l2"),
            ("codebook-level@l2", "student@quest+kd")} <= edges
    out = project.dvc("exp", "run", "-S", "student.train.lr=0.02", "-S", "codebook.k=16",
                      label="exp run: lr, codebook.k, extra level")
    # a foreach template has one deps list: every student depends on models/levels
    assert ran_stages(out) == {"codebook", "validate-codebook", "features-level@l2",
                               "codebook-level@l2", *STUDENTS, "evaluate", "report",
                               "validate-predictions"}
    params = project.params()
    assert (params["student"]["train"]["lr"], params["codebook"]["k"]) == (0.02, 16)
    exps = json.loads(project.dvc("exp", "show", "--json"))
    found = []
    for row in exps:
        for exp in row.get("experiments") or []:
            for rev in exp["revs"]:
                shown = rev["data"]["params"]["params.yaml"]["data"]
                metrics = rev["data"]["metrics"]["metrics/evaluation.json"]["data"]
                found.append((shown["student"]["train"]["lr"], shown["codebook"]["k"],
                              sorted(metrics["models"])))
    assert found == [(0.02, 16, sorted(["teacher", *METHODS]))]
    assert json.loads((project.root / "metrics" / "codebook.json").read_text())["k"] == 16
    meta = json.loads((project.root / "models/levels/l2/codebook.json").read_text())
    assert (meta["layer"], meta["k"]) == ("layer2", 16)
    # dvc.lock: each student read the new k = 16 codebook (its dependency's hash is the
    # codebook stage's output hash), so the clean status below means no student kept the old one
    lock = yaml.safe_load((project.root / "dvc.lock").read_text())["stages"]
    out_md5 = {o["path"]: o["md5"] for o in lock["codebook"]["outs"]}
    for student in STUDENTS:
        deps = {d["path"]: d["md5"] for d in lock[student]["deps"]}
        shared = set(deps) & set(out_md5)
        assert shared and all(deps[p] == out_md5[p] for p in shared), student
    metrics = project.root / "metrics" / "students" / "quest+kd.json"
    assert json.loads(metrics.read_text())["history"][-1]["quest_l2"] > 0
    project.commit("lr 0.02, codebook k 16, extra level l2")
    assert status_clean(project)


def test_dvc_yaml_is_written_from_the_stage_table() -> None:
    from flows.dvc_yaml import main as dvc_yaml

    # the committed file is what the table gives (python -m flows.dvc_yaml rewrites it)
    assert dvc_yaml(["--check"]) == 0


def test_one_table_drives_dvc_params_and_the_prefect_key(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    """Dropping a setting from a stage in the table drops it from dvc.yaml and from that
    stage's Prefect cache key alike."""
    import dataclasses

    import flows.cache as fc
    import quest.apps.stage_table as table
    from flows.dvc_yaml import render
    from quest.infra.config import load_config
    from quest.infra.paths import Paths

    cfg = load_config(REPO / "params.yaml")
    paths = Paths(tmp_path)
    other = load_config(REPO / "params.yaml", None, ["features.seed=7"])
    assert fc.stage_config("features", cfg, paths) != fc.stage_config("features", other, paths)
    spec = table.BY_NAME["features"]
    fewer = dataclasses.replace(
        spec, params=lambda key: [p for p in spec.params(key) if p != "features.seed"])
    monkeypatch.setitem(table.BY_NAME, "features", fewer)
    monkeypatch.setattr(table, "STAGES",
                        tuple(fewer if s.name == "features" else s for s in table.STAGES))
    import flows.dvc_yaml

    monkeypatch.setattr(flows.dvc_yaml, "STAGES", table.STAGES)
    rendered = yaml.safe_load(render((REPO / "dvc.yaml").read_text()))
    assert "features.seed" not in rendered["stages"]["features"]["params"]
    assert fc.stage_config("features", cfg, paths) == fc.stage_config("features", other, paths)
    # and the code a stage's key hashes is the code dvc.yaml lists
    listed = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["codebook"]["deps"]
    for rel in fc.code_files("quest.apps.stages.codebook"):
        assert any(rel == d or rel.startswith(d + "/") for d in listed), rel
