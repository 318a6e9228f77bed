"""`quest study --workers/--dask-address`: a study's runs fanned out on Dask through Prefect.

One test runs a study against a real `dask scheduler` and two `dask worker` processes on
127.0.0.1; another, on an in-process cluster (so that a run can be made to fail), shows that an
interrupted fan-out resumes and that a run's lock keeps a second runner from training it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import THREAD_VARS

from quest.apps.cli import main
from quest.apps.results import load_records
from quest.apps.study.runner import run_study
from quest.apps.study.spec import load_study
from quest.infra.errors import QuestError

FANOUT_STUDY = """
name: fan
description: four tiny runs to fan out
preset: tiny
set: {student.train.epochs: 1}
methods: [ce, quest]
seeds: [0, 1]
settings:
  - name: base
"""


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A temporary Prefect server for this module's flows (Dask workers reach it too: the
    task runner sends them the flow's settings)."""
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    env = {"DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with temporary_settings(updates={PREFECT_HOME: tmp_path_factory.mktemp("prefect")}), \
                prefect_test_harness(server_startup_timeout=90):
            yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def fan_root(smoke_root: Path) -> Path:
    (smoke_root / "studies").mkdir()
    (smoke_root / "studies" / "fan.yaml").write_text(FANOUT_STUDY)
    (smoke_root / "README.md").write_text("# project\n")
    return smoke_root


def _keys(root: Path) -> Counter[tuple[str, int]]:
    return Counter((r["method"], r["seed"]) for r in load_records(root / "results" / "fan"))


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """A real `dask scheduler` and two single-threaded `dask worker` processes on 127.0.0.1;
    yields the scheduler's address and the worker processes, and stops them all after."""
    from distributed import Client

    sched_file = tmp_path / "scheduler.json"
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    dask = [sys.executable, "-m", "dask"]
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], name: str) -> subprocess.Popen[bytes]:
        with open(logs / f"{name}.log", "wb") as out:
            # without the suite's OMP_NUM_THREADS=1 (conftest.py): the one thread per run
            # checked below must come from the fan-out, not from the test's environment
            proc = subprocess.Popen(dask + args, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=tmp_path, env=env)
        procs.append(proc)
        return proc

    try:
        start(["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
               "--scheduler-file", str(sched_file)], "scheduler")
        deadline = time.monotonic() + 60
        while not sched_file.is_file():
            assert procs[0].poll() is None, (logs / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "the scheduler wrote no scheduler file"
            time.sleep(0.2)
        workers = [start(["worker", "--scheduler-file", str(sched_file), "--nthreads", "1",
                          "--no-nanny", "--no-dashboard", "--name", f"w{i}"], f"worker{i}")
                   for i in range(2)]
        with Client(scheduler_file=str(sched_file), timeout="30s") as client:
            client.wait_for_workers(2, timeout=120)
            address = client.scheduler.address
        yield address, workers
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.slow
def test_study_on_a_real_scheduler_and_two_workers(
        fan_root: Path, prefect_api: None,
        dask_cluster: tuple[str, list[subprocess.Popen[bytes]]],
        capsys: pytest.CaptureFixture[str]) -> None:
    """Every run trains on one of the two `dask worker` processes and is recorded once; an
    error raised in a worker reaches the user as one line."""
    address, workers = dask_cluster
    study = load_study(fan_root / "studies" / "fan.yaml", fan_root)
    out = run_study(study, fan_root, dask_address=address)
    assert sorted((m["method"], m["seed"]) for m in out) == [("ce", 0), ("ce", 1),
                                                            ("quest", 0), ("quest", 1)]
    # trained in the worker processes, not here
    assert {m["pid"] for m in out} <= {w.pid for w in workers}
    assert all(m["worker"].startswith("tcp://127.0.0.1:") for m in out)
    # each on one thread (runtime.threads unset: one per worker slot), not one per core
    assert {m["threads"] for m in out} == {1}
    assert _keys(fan_root) == Counter({("ce", 0): 1, ("ce", 1): 1, ("quest", 0): 1,
                                       ("quest", 1): 1})
    for r in load_records(fan_root / "results" / "fan"):
        assert (r["study"], r["setting"]) == ("fan", "base")

    # a run that fails on a worker with a QuestError: one line, no traceback; the CLI
    # path, seed 2 of the same setting (its checkpoint is damaged before the fan-out)
    ckpt = fan_root / ".quest" / "studies" / "fan" / "base" / "seed-2" / ".quest" / \
        "checkpoints" / "student-ce.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint")
    (fan_root / "studies" / "fan.yaml").write_text(FANOUT_STUDY.replace("[0, 1]", "[0, 1, 2]"))
    capsys.readouterr()
    rc = main(["study", str(fan_root / "studies" / "fan.yaml"), "--root", str(fan_root),
               "--dask-address", address])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("quest: error: 1 of 2 study runs failed; first: base-ce-s2: "
                           "checkpoint "), last
    assert "student-ce.pt" in last and last.endswith("(finished runs are kept)")
    # the other run of seed 2 finished and is kept; nothing was trained twice
    keys = _keys(fan_root)
    assert keys[("quest", 2)] == 1 and ("ce", 2) not in keys
    assert max(keys.values()) == 1


@pytest.mark.slow
def test_interrupted_fan_out_resumes_and_a_locked_run_is_not_trained_twice(
        fan_root: Path, prefect_api: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fan-out that loses a run keeps the finished ones; while another runner holds the lost
    run's lock, a second runner leaves it alone; after that it trains just that run."""
    from distributed import LocalCluster

    import quest.apps.stages.student as student_stage
    from quest.apps.study.runs import stage_run, train_run
    from quest.apps.study.spec import planned_runs, study_results_dir
    from quest.infra.runlock import file_lock

    real = student_stage.run_student
    trained: list[tuple[str, int]] = []

    def flaky(cfg: Any, paths: Any, method: str, **kw: Any) -> dict[str, Any]:
        seed = cfg.student.train.seed
        if (method, seed) == ("quest", 0) and not os.environ.get("QUEST_TEST_HEALED"):
            raise RuntimeError("worker lost mid-run")  # the run dies, its runner goes on
        trained.append((method, seed))
        assert cfg.runtime.threads == 1  # a fan-out run trains on its one slot
        return real(cfg, paths, method, **kw)

    monkeypatch.setattr(student_stage, "run_student", flaky)
    study = load_study(fan_root / "studies" / "fan.yaml", fan_root)
    # an in-process cluster (worker threads of this process, so the patch applies)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=None) as cluster:
        with pytest.raises(QuestError, match=r"1 of 4 study runs failed; first: "
                                             r"base-quest-s0: .*worker lost mid-run"):
            run_study(study, fan_root, dask_address=cluster.scheduler_address)
        assert sorted(trained) == [("ce", 0), ("ce", 1), ("quest", 1)]
        assert sorted(_keys(fan_root)) == [("ce", 0), ("ce", 1), ("quest", 1)]

        # another runner is training quest seed 0 (it holds the run's lock): skipped here
        monkeypatch.setenv("QUEST_TEST_HEALED", "1")
        plan = [p for p in planned_runs(study, fan_root) if p[1:3] == ("quest", 0)]
        setting, method, seed, cfg, h = plan[0]
        job = stage_run(study, fan_root, setting, method, seed, cfg, h,
                        study_results_dir(fan_root, study))
        trained.clear()
        with file_lock(job.lock, "another runner"):
            assert run_study(study, fan_root, dask_address=cluster.scheduler_address) == []
        assert trained == []
        assert ("quest", 0) not in _keys(fan_root)

        # the rerun resumes: only the lost run trains
        out = run_study(study, fan_root, dask_address=cluster.scheduler_address)
        assert [(m["method"], m["seed"]) for m in out] == [("quest", 0)]
        assert trained == [("quest", 0)]
    assert _keys(fan_root) == Counter({("ce", 0): 1, ("ce", 1): 1, ("quest", 0): 1,
                                       ("quest", 1): 1})
    # a runner that planned the run before another recorded it skips it once it has the lock
    assert train_run(job) is None
    assert trained == [("quest", 0)] and _keys(fan_root)[("quest", 0)] == 1


def test_records_finishing_together_keep_their_own_files(tmp_path: Path) -> None:
    """Two runs of one method and seed recorded in the same second (two workers) get two
    files: a name is claimed atomically, never overwritten."""
    from quest.apps.results import write_record
    from quest.infra.io_utils import write_json_atomic

    rec = {"finished_at": "2026-12-07T10:00:00Z", "method": "ce", "student": "resnet20",
           "seed": 0}
    paths = [write_record(tmp_path, {**rec, "setting": s}) for s in ("a", "b", "c")]
    assert [p.name for p in paths] == ["20261207T100000Z-ce-resnet20-s0.json",
                                       "20261207T100000Z-ce-resnet20-s0-1.json",
                                       "20261207T100000Z-ce-resnet20-s0-2.json"]
    assert sorted(r["setting"] for r in load_records(tmp_path)) == ["a", "b", "c"]
    with pytest.raises(FileExistsError):
        write_json_atomic(paths[0], {"setting": "z"}, replace=False)
    assert json.loads(paths[0].read_text())["setting"] == "a"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_a_run_lock_is_refused_while_held_and_names_its_holder(tmp_path: Path) -> None:
    """file_lock: a second holder (another process, or another open here) is refused at once
    with the first holder's line; a waiting one would block; after release it is free."""
    from quest.infra.runlock import LockBusy, file_lock

    lock = tmp_path / "locks" / "run-x.lock"
    with file_lock(lock, "runner one"):
        with pytest.raises(LockBusy, match="runner one") as exc:
            with file_lock(lock, "runner two"):
                pass
        assert f"pid {os.getpid()}, runner one" in exc.value.holder
        held = subprocess.run(
            [sys.executable, "-c", "import sys\nfrom quest.infra.runlock import file_lock\n"
             f"with file_lock({str(lock)!r}, 'child'):\n    pass\n"],
            capture_output=True, text=True, check=False)
        assert held.returncode != 0 and "LockBusy" in held.stderr
    with file_lock(lock, "runner two"):
        assert "runner two" in lock.read_text()


def test_a_malformed_scheduler_address_is_one_line() -> None:
    from quest.apps.study.fanout import _check_scheduler

    with pytest.raises(QuestError, match=r"cannot reach the Dask scheduler at nonsense "
                                         r"\(missing port number"):
        _check_scheduler("nonsense")


def test_a_local_cluster_s_workers_run_without_the_profiler_or_work_stealing() -> None:
    """A fan-out's own cluster turns off what long single-run tasks do not need (the worker's
    stack profiler, work stealing) in the worker processes themselves; a cluster named by
    --dask-address keeps its settings."""
    import dask
    from distributed import Client, LocalCluster

    from quest.apps.study.fanout import LOCAL_CLUSTER_CONFIG, _local_cluster_config

    keys = list(LOCAL_CLUSTER_CONFIG)
    assert [dask.config.get(k) for k in keys] == [True, True]  # Dask's defaults
    with _local_cluster_config("tcp://127.0.0.1:8786"):
        assert [dask.config.get(k) for k in keys] == [True, True]
    with _local_cluster_config(None), LocalCluster(n_workers=1, threads_per_worker=1,
                                                   processes=True, dashboard_address=None) as c:
        with Client(c) as client:
            seen = client.run(lambda: [dask.config.get(k) for k in keys])
            assert list(seen.values()) == [[False, False]]
            assert not client.run_on_scheduler(
                lambda dask_scheduler: "stealing" in dask_scheduler.extensions)
    assert [dask.config.get(k) for k in keys] == [True, True]
