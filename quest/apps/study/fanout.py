"""A study's runs trained at once: one Prefect task per run on prefect-dask's DaskTaskRunner.

`quest study FILE --workers N` starts a local Dask cluster of N single-threaded worker
processes; `--dask-address tcp://HOST:8786` uses an existing scheduler instead, whose workers
must see the project root at the same path (a shared filesystem) and run this package::

    dask scheduler --host 0.0.0.0 --port 8786
    dask worker tcp://HOST:8786 --nthreads 1 --nworkers 2    # on each machine
    quest study studies/main-job.yaml --dask-address tcp://HOST:8786

The study runner (quest/apps/study/runner.py) has already built the shared upstream outputs
(prepared data, teacher, features, codebooks) and staged every run before the fan-out, so a
task only trains its run and writes its record (atomically, under a unique name). Each run
holds its own lock while it trains, so two runners never train the same run; a finished run is
recorded and never redone, so an interrupted fan-out resumes where it stopped. Tensors never
travel: a task gets the run's settings and paths, and returns its metrics.

A run that fails on bad input fails its task with the one-line QuestError message (no
traceback); the other runs still finish, and the runner then raises one QuestError naming the
failed runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from quest.apps.study.runs import RunJob, train_run
from quest.infra.errors import QuestError
from quest.infra.malloc import keep_freed_memory
from quest.infra.progress import log, setup_logging

# Dask's defaults suit many short tasks; a study gives each single-threaded worker one run for
# minutes. The worker's statistical profiler samples every thread's stack 100 times a second on
# its event loop, and the scheduler rebalances queued tasks by work stealing every 100 ms: neither
# helps a run that holds its worker, and both take CPU from it on a small machine
# (benchmarks/dask_worker_overhead.py). Applied to the local cluster only; a cluster of one's own
# (--dask-address) keeps its own settings.
LOCAL_CLUSTER_CONFIG: dict[str, Any] = {"distributed.worker.profile.enabled": False,
                                        "distributed.scheduler.work-stealing": False}


def make_study_runner(workers: int | None, address: str | None) -> Any:
    """The DaskTaskRunner of a fan-out: `address`'s scheduler, or a local cluster of `workers`
    single-threaded worker processes (one run per core; Dask's nanny also sets
    OMP_NUM_THREADS=1 in them, and every run sets torch's thread count from runtime.threads)."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise QuestError("quest study --workers needs prefect-dask: pip install "
                         "prefect-dask==0.3.7") from None
    if address:
        return DaskTaskRunner(address=address)
    if workers is None or workers < 1:
        raise QuestError(f"--workers must be 1 or more, not {workers}")
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "processes": True,
                                          "threads_per_worker": 1,
                                          "dashboard_address": None})


@contextlib.contextmanager
def _prefect_api() -> Iterator[None]:
    """Make sure the flow has a Prefect API its Dask workers can reach too.

    Without PREFECT_API_URL, Prefect starts a temporary server for the process that needs one:
    each worker process would then start its own. Start it here instead, once, and name it in
    the settings the task runner sends with every task. (Workers on other machines need a
    server they can reach: set PREFECT_API_URL, see docs/studies.md.)"""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    # no network at run time: the server's telemetry service would phone home (as `make`
    # targets already say with DO_NOT_TRACK, a direct `quest study` must say it too)
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    server = SubprocessASGIServer()  # one per process, stopped when the process exits
    # Prefect's default wait (20 s) is too short on a busy machine: starting the server
    # (migrations included) takes longer when every core is training
    wait = max(int(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()), 120)
    try:
        server.start(timeout=wait)
    except RuntimeError as exc:
        raise QuestError(f"the temporary Prefect server did not start ({exc}): start one with "
                         "`prefect server start` and set PREFECT_API_URL") from None
    log.info("a temporary Prefect server for the fan-out at %s", server.api_url)
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


@contextlib.contextmanager
def _own_console() -> Iterator[None]:
    """Keep the quest logger's lines to its own handlers while Prefect runs: Prefect puts a
    console handler on the root logger, which would print every line a second time."""
    logger = logging.getLogger("quest")
    before = logger.propagate
    logger.propagate = False
    try:
        yield
    finally:
        logger.propagate = before


@contextlib.contextmanager
def _local_cluster_config(address: str | None) -> Iterator[None]:
    """LOCAL_CLUSTER_CONFIG while the flow makes (and its nannies configure) a local cluster."""
    if address:
        yield
        return
    import dask

    with dask.config.set(LOCAL_CLUSTER_CONFIG):
        yield


def _train_on_worker(job: RunJob, label: str, runner_pid: int) -> Any:
    """The body of one run's Prefect task, on a Dask worker: train the run, or fail the task
    with the one-line message of a QuestError."""
    from prefect.states import Failed

    keep_freed_memory()  # undo the nanny's MALLOC_TRIM_THRESHOLD_ (quest/infra/malloc.py)
    if os.getpid() != runner_pid:  # a worker process: the run logs to a file of its own
        setup_logging(str(job.root / "logs" / f"study-{job.study}-{label}-"
                          f"{time.strftime('%Y%m%d-%H%M%S')}.log"))
    try:
        with _own_console():
            metrics = train_run(job)
    except QuestError as exc:
        return Failed(message=f"{label}: {exc}")
    try:
        from distributed import get_worker

        worker = get_worker().address
    except (ImportError, ValueError):  # not on a Dask worker
        worker = None
    import torch

    # the thread count the run trained with (runtime.threads, 1 unless set): reported back
    return {"label": label, "metrics": metrics, "worker": worker, "pid": os.getpid(),
            "threads": torch.get_num_threads()}


def _outcome(job: RunJob, future: Any) -> dict[str, Any]:
    """What became of one submitted run: its task's return value, or {"error": one line}."""
    future.wait()
    dask_future = future.wrapped_future
    if dask_future.status == "error":  # the worker died, or the task engine itself failed
        exc = dask_future.exception()
        return {"label": job.label, "error": f"{type(exc).__name__}: {exc}"}
    state = future.state
    if state.is_completed():
        return state.result()
    message = state.message or state.name
    return {"label": job.label, "error": message if job.label in message
            else f"{job.label}: {message}"}


def _check_scheduler(address: str) -> None:
    """Connect to the scheduler once before the flow starts, so that a wrong address is one
    line here rather than a crashed flow run with Prefect's traceback."""
    from distributed import Client
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        # a malformed address first: a Client made from one lingers and times out later
        scheme, location = parse_address(address)
        if scheme != "inproc":  # inproc:// (a cluster in this process) has no port
            parse_host_port(location)
        with Client(address, timeout="30s", set_as_default=False):
            pass
    except (OSError, ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise QuestError(f"cannot reach the Dask scheduler at {address} ({reason}): start it "
                         "with `dask scheduler` or check --dask-address") from None


def fan_out_runs(study: str, jobs: list[RunJob], workers: int | None,
                 address: str | None) -> list[dict[str, Any]]:
    """Train staged runs at once on Dask through a Prefect flow; return the metrics of those
    trained, each with the address, process id and torch thread count of the Dask worker
    that trained it. Raise one QuestError naming the failed runs after every run has
    finished or failed."""
    if not jobs:
        return []
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    # no Prefect cache or result files: the records under results/ are the study's state
    train = task(name="study-run", task_run_name="{label}", cache_policy=NO_CACHE,
                 persist_result=False)(_train_on_worker)

    @flow(name="quest-study", flow_run_name=f"study-{study}", persist_result=False,
          task_runner=make_study_runner(workers, address), log_prints=False)
    def study_flow(jobs: list[RunJob]) -> list[dict[str, Any]]:
        futures = [train.submit(job, job.label, os.getpid()) for job in jobs]
        out = []
        for job, fut in zip(jobs, futures, strict=True):
            result = _outcome(job, fut)
            if "error" in result:
                log.error("study %s: %s failed: %s", study, job.label, result["error"])
            elif result["metrics"] is None:
                log.info("study %s: %s skipped on %s (another runner has it)", study,
                         job.label, result["worker"])
            else:
                log.info("study %s: %s done on %s: top-1 %.4f", study, job.label,
                         result["worker"], result["metrics"]["top1"])
            out.append(result)
        return out

    if address:
        _check_scheduler(address)
    where = address or f"a local Dask cluster of {workers} worker process(es)"
    log.info("study %s: %d runs on %s", study, len(jobs), where)
    with _prefect_api(), _own_console(), _local_cluster_config(address):
        results = study_flow(jobs)
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        more = f" (and {len(failed) - 1} more, see the log)" if len(failed) > 1 else ""
        raise QuestError(f"{len(failed)} of {len(jobs)} study runs failed; first: {failed[0]}"
                         f"{more}: fix it and rerun the study (finished runs are kept)")
    return [{**r["metrics"], "worker": r["worker"], "pid": r["pid"], "threads": r["threads"]}
            for r in results if r["metrics"] is not None]
