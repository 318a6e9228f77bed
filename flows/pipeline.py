"""The QuEST pipeline as a Prefect flow: the CLI's stage functions as cached, retried tasks.

Each task calls the same ``quest.apps.stages`` function as ``quest <stage>`` and ``dvc repro``, and
passes only the project root, the resolved config (a small dict) and, for students, the method:
tensors never travel between tasks, files on disk do. Cache keys come from flows/cache.py
(input file hashes + config sections + code version), results are persisted as JSON under
``<root>/.quest/prefect/results``, so a second run with nothing changed is all ``Cached``.

Students are submitted together and run concurrently on the flow's task runner, the default
``ThreadPoolTaskRunner``. ``--runner dask`` runs them through prefect-dask's ``DaskTaskRunner``
instead: a temporary local cluster, or an existing scheduler with ``--dask-address``; the root
and the result storage must then be on a filesystem every Dask worker sees::

    from flows.pipeline import pipeline_with_runner

    pipeline_with_runner("dask", "tcp://scheduler-host:8786")(root="/shared/quest", preset="tiny")

Run it once from a shell (a temporary local Prefect server starts when PREFECT_API_URL is unset)::

    python -m flows.pipeline --root . --preset tiny
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.filesystems import LocalFileSystem
from prefect.futures import PrefectFuture
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from flows.cache import (
    cache_key_fn,
    output_digests,
    outputs_match,
    outputs_present,
)
from quest.apps.stage_table import STAGES, stage_for
from quest.core.levels import level_names
from quest.core.methods import needs_codebook
from quest.infra.config import Config, build_config, load_config, read_params
from quest.infra.errors import QuestError, one_line
from quest.infra.paths import Paths
from quest.infra.runlock import run_lock


class _QuestErrorsInOneLine(logging.Filter):
    """Prefect logs a failed task or flow run with its traceback; a QuestError is the user's
    (bad input or settings), and its one-line message, which the record keeps, is all they need."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, QuestError):
            record.exc_info, record.exc_text = None, None
        return True


# the loggers of Prefect's task and flow engines, whichever task runner (threads, Dask) ran it
for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_QuestErrorsInOneLine())


def retry_unless_quest_error(task: Any, task_run: Any, state: State) -> bool:
    """Prefect retry condition: retry transient failures, never a QuestError (bad input)."""
    try:
        state.result()
    except QuestError:
        return False
    except Exception:
        return True
    return True


# Every stage task: persisted JSON results (caching needs them), retries for transient failures
# (a worker killed mid-epoch resumes from the trainer's checkpoint), none for bad input.
_TASK_OPTIONS: dict[str, Any] = {
    "persist_result": True,
    "result_serializer": "json",
    "retries": 2,
    "retry_delay_seconds": 2,
    "retry_condition_fn": retry_unless_quest_error,
}


def _stage_result(stage: str, root: str, summary: Any, method: str | None = None) -> dict[str, Any]:
    """What a task returns: the stage's summary plus the hashes of the files it wrote."""
    paths = Paths(Path(root).resolve())
    return {"stage": stage, "method": method, "summary": summary,
            "outputs": output_digests(stage, paths, method)}


def _cfg_paths(root: str, config: dict[str, Any]) -> tuple[Config, Paths]:
    return build_config(config), Paths(Path(root).resolve())


_SUITE_SUMMARY = ("suite", "success", "evaluated", "passed", "failed")


def _stage_task(family: str, keyed: bool, name: str | None = None) -> Any:
    """The Prefect task of one stage family of the stage table (quest/apps/stage_table.py): it runs
    the table's function and returns its summary with the hashes of the files it wrote. Keyed
    tasks take the method, level or suite as `key` and show it in their run name."""

    def summary(root: str, config: dict[str, Any], key: str | None) -> dict[str, Any]:
        cfg, paths = _cfg_paths(root, config)
        out = stage_for(family, key).start(cfg, paths, key)
        if family == "validate":
            out = {k: out[k] for k in _SUITE_SUMMARY}
        return _stage_result(family, root, out, key)

    opts: dict[str, Any] = {"name": name or family, "cache_key_fn": cache_key_fn(family),
                            **_TASK_OPTIONS}
    if not keyed:
        def run(root: str, config: dict[str, Any]) -> dict[str, Any]:
            return summary(root, config, None)

        return task(**opts)(run)

    def run_keyed(root: str, config: dict[str, Any], key: str) -> dict[str, Any]:
        return summary(root, config, key)

    return task(task_run_name=f"{family}[{{key}}]", **opts)(run_keyed)


# One task per stage of the table; the validate-* stages share the keyed "validate" task.
TASKS: dict[str, Any] = {
    spec.name: _stage_task(spec.family, spec.per is not None,
                           spec.name if spec.per == "level" else None)
    for spec in STAGES if spec.suite is None
}
TASKS["validate"] = _stage_task("validate", True)


@task(name="track", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_quest_error)
def track_task(root: str, config: dict[str, Any], tracking_uri: str | None) -> dict[str, Any]:
    """Log the finished pipeline to MLflow and register its models (never cached)."""
    from quest.apps.tracking import track_pipeline

    cfg, paths = _cfg_paths(root, config)
    out = track_pipeline(cfg, paths, tracking_uri)
    return {k: v for k, v in out.items() if isinstance(v, str | int | float | dict)}


def result_storage(root: Path) -> LocalFileSystem:
    """The project's result storage block, <root>/.quest/prefect/results, saved server-side."""
    # Project-local results: a worker with another PREFECT_HOME finds the same cache, and
    # `rm -rf .quest` resets it. Prefect only accepts saved blocks as task result storage.
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    storage = LocalFileSystem(basepath=str(root / ".quest" / "prefect" / "results"))
    storage.save(f"quest-results-{digest}", overwrite=True)
    return storage


def _label(stage: str, method: str | None) -> str:
    return f"{stage}[{method}]" if method else stage


class _Runner:
    """Runs stage tasks with the project's result storage, and reruns stale cache hits."""

    def __init__(self, root: Path, config: dict[str, Any]) -> None:
        self.paths = Paths(root)
        self.config = config
        self.storage = result_storage(root)
        self.states: dict[str, str] = {}
        self.logger = get_run_logger()

    def _missing(self, stage: str, method: str | None) -> bool:
        if outputs_present(stage, self.paths, method):
            return False
        self.logger.info("%s: output files missing, (re)computing without a cache lookup",
                         _label(stage, method))
        return True

    def _task(self, task_obj: Any, refresh: bool) -> Any:
        opts: dict[str, Any] = {"result_storage": self.storage}
        if refresh:
            # overwrite the cache record: the key is right but the files it describes are gone
            opts["refresh_cache"] = True
        return task_obj.with_options(**opts)

    def _kwargs(self, stage: str, method: str | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"root": str(self.paths.root), "config": self.config}
        if method is not None:
            kwargs["key"] = method  # the method, level or suite of a keyed task
        return kwargs

    def _stale(self, stage: str, method: str | None, state: State, result: Any) -> bool:
        if state.name != "Cached" or outputs_match(result, self.paths):
            return False
        self.logger.warning("%s: cache hit, but its output files are missing or differ on disk; "
                            "recomputing", _label(stage, method))
        return True

    def run(self, task_obj: Any, stage: str, method: str | None = None) -> Any:
        """Run one stage task now and return its result."""
        refresh = self._missing(stage, method)
        state = self._task(task_obj, refresh)(**self._kwargs(stage, method), return_state=True)
        result = state.result()
        if self._stale(stage, method, state, result):
            state = self._task(task_obj, True)(**self._kwargs(stage, method), return_state=True)
            result = state.result()
        self.states[_label(stage, method)] = str(state.name)
        return result

    def run_many(self, task_obj: Any, stage: str, methods: list[str]) -> dict[str, Any]:
        """Submit one task per method so they run concurrently; return results by method."""
        todo = list(methods)
        results: dict[str, Any] = {}
        first = True
        while todo:
            futures: dict[str, PrefectFuture[Any]] = {}
            for m in todo:
                refresh = not first or self._missing(stage, m)
                futures[m] = self._task(task_obj, refresh).submit(**self._kwargs(stage, m))
            for f in futures.values():
                f.wait()  # let every student finish before the first failure is raised
            todo = []
            for m, f in futures.items():
                state = f.state
                results[m] = state.result()
                if first and self._stale(stage, m, state, results[m]):
                    todo.append(m)
                self.states[_label(stage, m)] = str(state.name)
            first = False
        return results


def config_for(root: str | os.PathLike[str], params: str = "params.yaml",
               preset: str | None = None, overrides: list[str] | None = None) -> Config:
    """The flow's configuration: params file (relative to root), preset, env and overrides."""
    p = Path(params)
    return load_config(p if p.is_absolute() else Path(root) / p, preset, overrides)


def dvc_commit(root: Path, cfg: Config) -> str:
    """Record the flow's outputs in dvc.lock (`dvc commit --force`) when root is a DVC repo."""
    if not (root / ".dvc").is_dir():
        return "not a DVC repo"
    # dvc.lock describes outputs by params.yaml: committing outputs made with other settings
    # (a preset, --set overrides, env overrides) would make DVC vouch for the wrong params
    params_file = root / "params.yaml"
    plain = read_params(params_file) if params_file.is_file() else None
    if plain is not None:
        plain.pop("presets", None)
    if plain is None or build_config(plain).to_dict() != cfg.to_dict():
        return "skipped: the flow's config differs from params.yaml, so dvc.lock was left alone"
    # DVC stage commands call `quest`: put this interpreter's bin dir first on PATH
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    dvc = shutil.which("dvc", path=env["PATH"])
    if dvc is None:
        raise QuestError(f"{root} is a DVC repo but dvc is not installed: pip install dvc")
    proc = subprocess.run([dvc, "commit", "--force", "--quiet"], cwd=root, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise QuestError(f"dvc commit failed in {root}: {lines[-1] if lines else proc.returncode}"
                         ": fix it and rerun the flow (finished stages stay cached)")
    return "committed"


@flow(name="quest-pipeline", task_runner=ThreadPoolTaskRunner())
def quest_pipeline(
    root: str = ".",
    params: str = "params.yaml",
    preset: str | None = None,
    overrides: list[str] | None = None,
    track: bool = False,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Run prepare, teacher, features, codebook, the students, evaluate and report as cached tasks.

    With ``track``, a run that recomputed anything is logged to MLflow as one parent run with a
    child run per stage, and its teacher and students are registered (an all-cached run is not
    logged again, so the registry gets no duplicate versions).
    """
    logger = get_run_logger()
    # the stages log through the "quest" logger; INFO lines reach Prefect's log when
    # PREFECT_LOGGING_EXTRA_LOGGERS=quest is set
    logging.getLogger("quest").setLevel(logging.INFO)
    root_path = Path(root).resolve()
    cfg = config_for(root_path, params, preset, overrides)
    # the same project lock as the CLI: a flow and a `quest`/`dvc repro` run never interleave
    with run_lock(root_path, "prefect flow quest-pipeline"):
        return _pipeline_body(root_path, cfg, track, tracking_uri, logger)


def _pipeline_body(root_path: Path, cfg: Config, track: bool, tracking_uri: str | None,
                   logger: Any) -> dict[str, Any]:
    """The flow's work, run while it holds the project's run lock."""
    config = cfg.to_dict()
    run = _Runner(root_path, config)
    methods = list(cfg.student.methods)
    # dvc.yaml always has features and codebook; without a QuEST student only DVC needs them
    quantize = needs_codebook(methods) or (root_path / ".dvc").is_dir()
    evaluation: dict[str, Any] = {}
    for spec in STAGES:  # the stage table's order; each suite gates the stage after it
        if spec.needs_codebook and not quantize:
            continue
        if spec.suite is not None:
            run.run(TASKS["validate"], "validate", spec.suite)
        elif spec.per == "method":
            run.run_many(TASKS[spec.name], spec.family, methods)
        elif spec.per == "level":
            for level in level_names(cfg):
                run.run(TASKS[spec.name], spec.family, level)
        else:
            result = run.run(TASKS[spec.name], spec.family)
            if spec.name == "evaluate":
                evaluation = result
    dvc = dvc_commit(root_path, cfg)
    recomputed = [k for k, v in run.states.items() if v != "Cached"]
    tracked = None
    if track and recomputed:
        tracked = track_task(str(root_path), config, tracking_uri)
    elif track:
        logger.info("every task was cached: nothing new to log to MLflow")
    logger.info("task states: %s; dvc: %s",
                ", ".join(f"{k}={v}" for k, v in run.states.items()), dvc)
    return {"states": run.states, "evaluation": evaluation["summary"], "dvc": dvc,
            "mlflow": tracked}


RUNNERS = ("threads", "dask")


def make_task_runner(runner: str = "threads", address: str | None = None,
                     threads: int = 4) -> Any:
    """The flow's task runner: threads, or Dask (a local in-process cluster, or `address`)."""
    if runner == "threads":
        return ThreadPoolTaskRunner()
    if runner != "dask":
        raise QuestError(f"unknown task runner '{runner}': choose one of {', '.join(RUNNERS)}")
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise QuestError("the dask runner needs prefect-dask: pip install prefect-dask==0.3.7"
                         ) from None
    if address:
        return DaskTaskRunner(address=address)
    # one in-process worker with a thread per student: torch releases the GIL, and the tasks
    # need no pickling or shared filesystem (a real cluster: pass its scheduler's address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": 1, "processes": False,
                                          "threads_per_worker": threads,
                                          "dashboard_address": None})


def pipeline_with_runner(runner: str = "threads", address: str | None = None) -> Any:
    """quest_pipeline on the chosen task runner (call the result like the flow itself)."""
    return quest_pipeline.with_options(task_runner=make_task_runner(runner, address))


def main(argv: list[str] | None = None) -> int:
    """Command line: run the flow once, print the task states and the accuracy table."""
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__)
    ap.add_argument("--root", default=".")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--runner", choices=RUNNERS, default="threads",
                    help="task runner for the students (default: threads)")
    ap.add_argument("--dask-address", default=None, metavar="tcp://HOST:8786",
                    help="with --runner dask: an existing scheduler (default: a local cluster)")
    args = ap.parse_args(argv)
    from quest.apps.stages.evaluate import format_table

    try:
        flow_fn = pipeline_with_runner(args.runner, args.dask_address)
        out = flow_fn(args.root, args.params, args.preset, args.overrides or None)
    except QuestError as exc:
        print(f"quest: error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(format_table(out["evaluation"]))
    print("tasks: " + ", ".join(f"{k}={v}" for k, v in out["states"].items()))
    print(f"dvc: {out['dvc']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
