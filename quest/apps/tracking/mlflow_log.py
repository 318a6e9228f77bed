"""Log a finished pipeline run to MLflow: one parent run, a child run per stage, the registry.

Everything is read from the files the stages wrote (metrics/, plots/, models/), so tracking can run
after `quest run`, after `dvc repro`, or from a Prefect flow, and never changes the results.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quest.apps.results import git_commit
from quest.infra.config import Config
from quest.infra.errors import QuestError
from quest.infra.io_utils import file_sha256, read_json, write_json_atomic
from quest.infra.paths import Paths, method_slug

RUN_FILE = "mlflow_run.json"
# MLflow's log_batch limits per request
_MAX_METRICS, _MAX_PARAMS = 1000, 100


def default_tracking_uri(root: Path) -> str:
    """sqlite:///<root>/mlflow.db: a registry-capable store inside the project."""
    return f"sqlite:///{(Path(root).resolve() / 'mlflow.db').as_posix()}"


def resolve_tracking_uri(root: Path, tracking_uri: str | None = None) -> str:
    """The tracking URI: the argument, else $MLFLOW_TRACKING_URI, else the project SQLite."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at `uri` for the block, then restore what was there before."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    # set_tracking_uri also exports MLFLOW_TRACKING_URI; undo both so callers see no change
    before_global = getattr(tracking_utils, "_tracking_uri", None)
    before_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before_global)
        if before_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before_env


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (None for other stores)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {dotted.key: value} (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, full))
        else:
            out[full] = value
    return out


def _need(path: Path, fix: str) -> Any:
    if not path.is_file():
        raise QuestError(f"{path} does not exist: {fix}")
    return read_json(path)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    """Get or create the experiment; local stores keep artifacts beside the database."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise QuestError(f"MLflow experiment '{name}' is deleted: restore it or pass "
                             "--experiment with another name")
        return str(exp.experiment_id)
    location = None
    db = sqlite_path(uri)
    if db is not None:
        # without this MLflow would put artifacts in ./mlruns of whatever the working directory is
        folder = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        location = (db.parent / "mlruns" / folder).resolve().as_uri()
    return str(client.create_experiment(name, artifact_location=location))


def _log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), _MAX_PARAMS):
        client.log_batch(run_id, params=items[i : i + _MAX_PARAMS])


def _log_metrics(client: Any, run_id: str, rows: list[tuple[str, float, int]]) -> None:
    """Log (name, value, step) triples in batches: one transaction each, not one per value."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, int(s)) for k, v, s in rows]
    for i in range(0, len(items), _MAX_METRICS):
        client.log_batch(run_id, metrics=items[i : i + _MAX_METRICS])


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def history_metrics(history: list[dict[str, Any]]) -> list[tuple[str, float, int]]:
    """Every numeric per-epoch value (losses, lr, accuracies, word accuracy...) with step=epoch."""
    rows = []
    for record in history:
        epoch = int(record["epoch"])
        rows += [(k, v, epoch) for k, v in record.items() if k != "epoch" and _numeric(v)]
    return rows


def _read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _log_files(pattern_dirs: list[tuple[Path, str, str]]) -> None:
    """Log files matching a glob under each directory, keeping their relative layout."""
    import mlflow

    for base, pattern, dest in pattern_dirs:
        for f in sorted(base.glob(pattern)) if base.is_dir() else []:
            if f.is_file() and f.name != RUN_FILE and not f.name.startswith("."):
                rel = f.parent.relative_to(base).as_posix()
                mlflow.log_artifact(str(f), dest if rel == "." else f"{dest}/{rel}")


def _validation_metrics(paths: Paths) -> list[tuple[str, float, int]]:
    """validation.<suite>.passed / .failed / .success from reports/validation/<suite>.json."""
    rows: list[tuple[str, float, int]] = []
    for f in sorted((paths.root / "reports" / "validation").glob("*.json")):
        try:
            rep = read_json(f)
        except (OSError, ValueError):
            continue  # a damaged report is logged as an artifact, never as numbers
        if isinstance(rep, dict) and {"suite", "passed", "failed"} <= rep.keys():
            rows += [(f"validation.{rep['suite']}.passed", rep["passed"], 0),
                     (f"validation.{rep['suite']}.failed", rep["failed"], 0),
                     (f"validation.{rep['suite']}.success", float(rep["failed"] == 0), 0)]
    return rows


def metric_name(name: str) -> str:
    """`name` with what MLflow refuses in metric names replaced by '_' (quest+kd -> quest_kd)."""
    return re.sub(r"[^\w\-. :/]", "_", name)


# A model's final numbers: test top-1/top-5 (reported), validation top-1/top-5 (what the
# challenger pick and the promotion gate read), size.
_FINAL_KEYS = ("top1", "top5", "val_top1", "val_top5", "params", "macs")


def _evaluation_metrics(evaluation: dict[str, Any]) -> list[tuple[str, float, int]]:
    """(name, value, step) for every model's top1, top5, val_top1, val_top5, params and MACs."""
    return [
        (metric_name(f"{name}.{key}"), r[key], 0)
        for name, r in evaluation["models"].items()
        for key in _FINAL_KEYS if _numeric(r.get(key))
    ]


def _val_tags(result: dict[str, Any]) -> dict[str, Any]:
    """The val_top1/val_top5 tags of a registered version (none without a validation split)."""
    return {k: result[k] for k in ("val_top1", "val_top5") if _numeric(result.get(k))}


@dataclass
class _Collected:
    """Everything a finished pipeline left that track_pipeline logs (read before logging)."""

    teacher: dict[str, Any]
    evaluation: dict[str, Any]
    students: dict[str, dict[str, Any]]
    codebook: dict[str, Any] | None
    codebook_meta: dict[str, Any]
    commit: str
    data_sha: str | None


def _collect(cfg: Config, paths: Paths) -> _Collected:
    """Read the pipeline's metrics; a missing one is a one-line error naming its stage (the
    earliest stage first)."""
    teacher = _need(paths.metrics / "teacher.json", "run `quest teacher` first")
    evaluation = _need(paths.metrics / "evaluation.json", "run `quest evaluate` first")
    students = {
        m: _need(paths.student_metrics(m), f"run `quest student --method {m}` first")
        for m in cfg.student.methods
    }
    codebook = None
    if (paths.metrics / "codebook.json").is_file() and paths.codebook_meta.is_file():
        codebook = read_json(paths.metrics / "codebook.json")
    return _Collected(
        teacher=teacher,
        evaluation=evaluation,
        students=students,
        codebook=codebook,
        codebook_meta=read_json(paths.codebook_meta) if paths.codebook_meta.is_file() else {},
        commit=git_commit(paths.root) or "unknown",  # the run records' helper (-dirty if edited)
        data_sha=next((s["data_sha256"] for s in students.values() if "data_sha256" in s),
                      None))


def _log_parent_files(paths: Paths) -> None:
    """The run's reports, metrics, plots and codebook metadata as the parent's artifacts."""
    import mlflow

    # the Great Expectations reports and Data Docs (the same artifact paths as a reports/ glob
    # would give them, so logging both never duplicates an artifact)
    _log_files([(paths.root / "reports" / "validation", "**/*", "reports/validation")])
    _log_files([(paths.metrics, "**/*.json", "metrics"), (paths.plots, "**/*.csv", "plots")])
    # `quest report`'s HTML page, Markdown and figures, when the run has one
    _log_files([(paths.reports, "**/*", "reports")])
    if paths.codebook_meta.is_file():
        mlflow.log_artifact(str(paths.codebook_meta), "models/codebook")


def _log_teacher(client: Any, rid: str, cfg: Config, paths: Paths, c: _Collected,
                 example: Any) -> int | None:
    """The teacher child run: settings, final numbers, history; its registered version."""
    from quest.apps.tracking import registry

    _log_params(client, rid, flatten({"teacher": cfg.to_dict()["teacher"]}))
    _log_metrics(client, rid, [
        (k, c.teacher[k], 0) for k in _FINAL_KEYS if _numeric(c.teacher.get(k))
    ] + history_metrics(c.teacher.get("history") or []))
    if example is None:
        return None
    return registry.log_and_register(
        paths.teacher_model, registry.TEACHER_MODEL, example, _num_classes(paths.teacher_model),
        {"role": "teacher", "arch": c.teacher["arch"],
         "test_top1": c.evaluation["models"]["teacher"]["top1"],
         **_val_tags(c.evaluation["models"]["teacher"]),
         "data_sha256": c.data_sha or "unknown", "git_commit": c.commit,
         "model_sha256": file_sha256(paths.teacher_model)})


def _log_codebook(client: Any, rid: str, cfg: Config, paths: Paths, c: _Collected) -> None:
    """The codebook child run: settings, statistics and the k-means objective curve."""
    import mlflow

    assert c.codebook is not None
    _log_params(client, rid, flatten({"codebook": cfg.to_dict()["codebook"]}))
    rows = [(k, v, 0) for k, v in c.codebook.items() if _numeric(v)]
    curve = paths.plots / "codebook_objective.csv"
    if curve.is_file():
        rows += [("objective", float(r["objective"]), int(r["iteration"]))
                 for r in _read_csv(curve)]
    _log_metrics(client, rid, rows)
    mlflow.set_tag("codebook_sha256", c.codebook_meta.get("codebook_sha256", ""))
    mlflow.log_artifact(str(paths.codebook_meta), "models/codebook")


def _log_student(client: Any, rid: str, method: str, cfg: Config, paths: Paths, c: _Collected,
                 example: Any, teacher_version: Any) -> int | None:
    """One student's child run: settings, per-epoch history, files; its registered version."""
    import mlflow

    from quest.apps.tracking import registry

    sm = c.students[method]
    from quest.core.methods import settings_dict

    _log_params(client, rid, {"method": method, **flatten(
        {"student": settings_dict(cfg.student)})})
    _log_metrics(client, rid, [
        # final numbers under names the per-epoch history does not use
        (k, sm[k], 0) for k in ("top1", "top5", "val_top1", "val_top5", "params", "seconds")
        if _numeric(sm.get(k))
    ] + history_metrics(sm.get("history") or []))
    for f in (paths.student_metrics(method), paths.student_curve(method)):
        if f.is_file():
            mlflow.log_artifact(str(f), f"students/{method_slug(method)}")
    if example is None:
        return None
    ev = c.evaluation["models"].get(method_slug(method), {})
    top1 = ev.get("top1", sm["top1"])
    return registry.log_and_register(
        paths.student_model(method), registry.STUDENT_MODEL, example,
        _num_classes(paths.student_model(method)), {
            "role": "student", "method": method, "arch": sm["arch"],
            "teacher_version": teacher_version or "unknown",
            "codebook_sha256": sm.get("codebook_sha256")
            or c.codebook_meta.get("codebook_sha256", "none"),
            "data_sha256": sm.get("data_sha256", "unknown"), "git_commit": c.commit,
            "test_top1": top1, **_val_tags(ev if "val_top1" in ev else sm),
            "model_sha256": file_sha256(paths.student_model(method))})


def _log_children(client: Any, child: Any, cfg: Config, paths: Paths, c: _Collected,
                  example: Any, result: dict[str, Any], children: dict[str, str]
                  ) -> dict[str, int]:
    """The child runs (teacher, codebook, each student, evaluate); the students' versions."""
    with child("teacher") as run:
        children["teacher"] = run.info.run_id
        tv = _log_teacher(client, run.info.run_id, cfg, paths, c, example)
        if tv is not None:
            result["teacher_version"] = tv
    if c.codebook is not None:
        with child("codebook") as run:
            children["codebook"] = run.info.run_id
            _log_codebook(client, run.info.run_id, cfg, paths, c)
    versions: dict[str, int] = {}
    for method in c.students:
        with child(f"student[{method}]", **{"quest.method": method}) as run:
            children[f"student[{method}]"] = run.info.run_id
            sv = _log_student(client, run.info.run_id, method, cfg, paths, c, example,
                              result.get("teacher_version"))
            if sv is not None:
                versions[method] = sv
    with child("evaluate") as run:
        children["evaluate"] = run.info.run_id
        _log_metrics(client, run.info.run_id, _evaluation_metrics(c.evaluation))
        _log_files([(paths.metrics, "evaluation.json", "metrics"),
                    (paths.metrics, "per_class.json", "metrics")])
    return versions


def track_pipeline(
    cfg: Config,
    paths: Paths,
    tracking_uri: str | None = None,
    experiment: str = "quest",
    register: bool = True,
) -> dict[str, Any]:
    """Log the finished pipeline to MLflow (parent + child runs), register its models."""
    import mlflow

    from quest.apps.tracking import registry

    root = paths.root
    c = _collect(cfg, paths)
    uri = resolve_tracking_uri(root, tracking_uri)
    result: dict[str, Any] = {"tracking_uri": uri, "experiment": experiment,
                              "git_commit": c.commit}
    example = registry.example_images(paths.prepared) if register else None
    with using_tracking_uri(uri):
        client = mlflow.MlflowClient()
        exp_id = result["experiment_id"] = _experiment_id(client, experiment, uri)
        children: dict[str, str] = {}
        base_tags = {"quest.git_commit": c.commit, "quest.root": str(root)}

        def child(stage: str, **tags: str) -> Any:
            return mlflow.start_run(experiment_id=exp_id, run_name=stage, nested=True,
                                    tags={**base_tags, "quest.stage": stage, **tags})

        with mlflow.start_run(experiment_id=exp_id, run_name="pipeline",
                              tags={**base_tags, "quest.stage": "pipeline"}) as parent:
            pid = result["parent_run_id"] = parent.info.run_id
            from quest.core.methods import config_dict

            _log_params(client, pid, flatten(config_dict(cfg)))
            _log_metrics(client, pid,
                         _evaluation_metrics(c.evaluation) + _validation_metrics(paths))
            _log_parent_files(paths)
            student_versions = _log_children(client, child, cfg, paths, c, example,
                                             result, children)
        result["child_run_ids"] = children
        if register and student_versions:
            result.update(_set_challenger(client, list(c.students), student_versions))
    write_json_atomic(paths.metrics / RUN_FILE, result)
    return result


def _set_challenger(client: Any, methods: list[str], versions: dict[str, int]) -> dict[str, Any]:
    """Point @challenger at the student with the best validation top-1 just registered (the
    first listed wins a tie). Test accuracy never chooses: without a validation split (a preset
    replicating an official configuration), no challenger is set."""
    from quest.apps.tracking import registry

    scored = {m: _tag_val_top1(client, versions[m]) for m in methods}
    candidates = [m for m in methods if scored[m] is not None]
    out: dict[str, Any] = {"student_versions": versions}
    if not candidates:
        out["challenger"] = None
        out["challenger_note"] = ("no student has a validation accuracy (data."
                                  "validation_per_class is 0): no challenger chosen")
        return out
    best = max(candidates, key=lambda m: scored[m])  # type: ignore[arg-type, return-value]
    registry.set_alias(client, registry.STUDENT_MODEL, registry.CHALLENGER, versions[best])
    out["challenger"] = {"method": best, "version": versions[best], "val_top1": scored[best]}
    return out


def _num_classes(model_file: Path) -> int:
    from quest.core.checkpoint import load_checkpoint

    return int(load_checkpoint(model_file)["num_classes"])


def _tag_val_top1(client: Any, version: int) -> float | None:
    """A registered student's val_top1 tag, or None when it has none."""
    from quest.apps.tracking.registry import STUDENT_MODEL, version_tags

    value = version_tags(client, STUDENT_MODEL, version).get("val_top1")
    return None if value is None else float(value)
