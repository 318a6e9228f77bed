"""Prefect orchestration: content-keyed caching, DVC agreement, deployments on a real server.

One git+DVC project root (dvc.yaml, the tiny preset resolved into params.yaml, a copy of quest/)
is shared by the whole module: the flow computes it once, then every test reruns the flow there
against a temporary Prefect database and checks task states, files and `dvc status`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import wait_http_ok

pytestmark = pytest.mark.slow  # make test-fast leaves it out; make test runs it

REPO = Path(__file__).resolve().parents[1]
# flows/ is a top-level package of the repository, not part of the installed distribution
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
VENV_BIN = Path(sys.executable).parent
QUIET = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}
STAGES = ["prepare", "teacher", "features", "codebook", "student[ce]", "student[kd]",
          "student[quest]", "evaluate", "report", "validate[data]", "validate[features]",
          "validate[codebook]", "validate[predictions]"]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **QUIET, **extra}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(cmd: list[str], cwd: Path, **extra: str) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(**extra), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def dvc_status(root: Path) -> dict[str, Any]:
    """`dvc status --json` of a project root ({} when nothing needs reproducing)."""
    return json.loads(_run([str(VENV_BIN / "dvc"), "status", "--json"], root) or "{}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    wait_http_ok(f"{url}/health", proc, timeout, "prefect server")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process started in its own session, and everything it started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return
    os.killpg(proc.pid, signal.SIGKILL)  # a child outlived its parent
    raise AssertionError(f"processes of group {proc.pid} were still running")


@pytest.fixture(scope="module")
def server_process(tmp_path_factory: pytest.TempPathFactory, cifar_archive: Path,
                   teacher_checkpoint: Path) -> Iterator[dict[str, Any]]:
    """Start a real Prefect server on 127.0.0.1 (PREFECT_HOME, database in a temporary dir)."""
    home = tmp_path_factory.mktemp("prefect-home")
    url = f"http://127.0.0.1:{_free_port()}/api"
    mp = pytest.MonkeyPatch()
    for key, value in {**QUIET, "PREFECT_HOME": str(home), "PREFECT_API_URL": url,
                       "QUEST_DATA_LOCATION": str(cifar_archive),
                       "QUEST_TEACHER_CHECKPOINT": str(teacher_checkpoint)}.items():
        mp.setenv(key, value)
    # no scheduler service: the deployments' cron runs are never created, so a worker can only
    # pick up the run a test triggers (even when the suite runs just before 02:00 UTC)
    proc = subprocess.Popen(
        [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
         "--port", url.split(":")[-1].split("/")[0]],
        cwd=home, env=_env(PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield {"proc": proc, "url": url, "home": home, "started": time.perf_counter()}
    finally:
        _stop(proc)
        mp.undo()


@pytest.fixture(scope="module")
def server(server_process: dict[str, Any]) -> Iterator[str]:
    """The server's API URL once healthy; this process's flows and the worker run against it."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    url = server_process["url"]
    _wait_healthy(url, server_process["proc"])
    print(f"prefect server healthy {time.perf_counter() - server_process['started']:.1f}s "
          "after its start")
    # prefect reads its settings once at import: environment changes alone come too late
    with temporary_settings(updates={PREFECT_HOME: server_process["home"],
                                     PREFECT_API_URL: url}):
        yield url
        # send queued logs and events while the server is up: otherwise the process retries
        # them at exit for a minute or more (as prefect_test_harness does on teardown)
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=15)
        EventsWorker.drain_all(timeout=15)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, server_process: dict[str, Any],
            request: pytest.FixtureRequest) -> dict[str, Any]:
    """A git+DVC root with the tiny preset as params.yaml, after one full flow run."""
    from flows.pipeline import quest_pipeline
    from quest.infra.config import load_config

    # set up the project while the server starts
    root = tmp_path_factory.mktemp("dvc-project")
    _run(["git", "init", "-q"], root)
    _run([str(VENV_BIN / "dvc"), "init", "-q"], root)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    # the committed folder the DVC student stages depend on (extra QuEST levels' codebooks)
    shutil.copytree(REPO / "models" / "levels", root / "models" / "levels")
    shutil.copytree(REPO / "quest", root / "quest",
                    ignore=shutil.ignore_patterns("__pycache__"))
    # what `quest config --preset tiny` prints (JSON is YAML), with the shared files' absolute
    # paths from the env overrides, so dvc.yaml's params and the flow's config are one and the same
    resolved = load_config(REPO / "params.yaml", "tiny").to_dict()
    (root / "params.yaml").write_text(json.dumps(resolved, indent=2) + "\n")
    request.getfixturevalue("server")
    t0 = time.perf_counter()
    out = quest_pipeline(root=str(root))
    return {"root": root, "first": out, "seconds": time.perf_counter() - t0}


def _task_states(flow_run_id: Any) -> dict[str, str]:
    """Task run name -> state name of one flow run, read back through the Prefect API."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.state.name for r in runs if r.state is not None}


def _stage_states(states: dict[str, str]) -> dict[str, str]:
    """Task run names ('prepare-3f2', 'student[ce]') reduced to stage labels."""
    out: dict[str, str] = {}
    for name, state in states.items():
        label = name if name.startswith("student[") else name.rsplit("-", 1)[0]
        # a stage rerun after a stale cache hit has two runs (Cached, Completed): it recomputed
        out[label] = state if label not in out or state != "Cached" else out[label]
    return out


def _fingerprint(root: Path) -> dict[str, str]:
    """Content hash of every output file (not mtimes: `dvc commit` relinks outputs from its
    cache). The task states read back from the API are what show that nothing ran."""
    from flows.cache import file_digest

    return {str(p.relative_to(root)): file_digest(p)
            for top in ("data", "models", "metrics", "plots") for p in (root / top).rglob("*")
            if p.is_file()}


def test_first_run_computes_every_stage_and_agrees_with_dvc(project: dict[str, Any]) -> None:
    """The first run computes all stages, and `dvc commit` leaves nothing for dvc to reproduce."""
    first = project["first"]
    assert first["states"] == dict.fromkeys(STAGES, "Completed")
    assert first["dvc"] == "committed"
    assert set(first["evaluation"]["models"]) == {"teacher", "ce", "kd", "quest"}
    # the flow carries the tiny preset's validation split from prepare to evaluate
    assert all("val_top1" in m for m in first["evaluation"]["models"].values())
    root = project["root"]
    assert (root / "dvc.lock").is_file()
    assert dvc_status(root) == {}
    print(f"first run: {project['seconds']:.1f}s")
    # each task's result is persisted under the key recomputed here from the files on disk
    from flows.cache import stage_key
    from flows.pipeline import config_for

    config = config_for(root).to_dict()
    results = root / ".quest" / "prefect" / "results"
    for label in STAGES:
        stage, _, method = label.partition("[")
        key = stage_key(stage, root, config, method.rstrip("]") or None)
        assert (results / key).is_file(), f"no persisted result for {label}: {key}"


def test_second_run_is_all_cached(project: dict[str, Any]) -> None:
    """Nothing changed: every task run reports Cached and no output file is rewritten."""
    from flows.pipeline import quest_pipeline

    root = project["root"]
    before = _fingerprint(root)
    state = quest_pipeline(root=str(root), return_state=True)
    assert state.is_completed()
    assert state.result()["states"] == dict.fromkeys(STAGES, "Cached")
    api_states = _task_states(state.state_details.flow_run_id)
    assert sorted(_stage_states(api_states)) == sorted(STAGES)
    assert set(api_states.values()) == {"Cached"}, api_states
    assert _fingerprint(root) == before


def test_codebook_k_change_recomputes_codebook_quest_student_and_evaluate(
    project: dict[str, Any],
) -> None:
    """Editing codebook.k reruns codebook, the QuEST student and evaluate; the rest stay cached."""
    from flows.pipeline import dvc_commit, quest_pipeline
    from quest.infra.config import load_config

    root = project["root"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["codebook"]["k"] = 16 if params["codebook"]["k"] != 16 else 24
    (root / "params.yaml").write_text(json.dumps(params, indent=2) + "\n")
    assert "codebook" in dvc_status(root)  # DVC sees the change too
    state = quest_pipeline(root=str(root), return_state=True)
    states = _stage_states(_task_states(state.state_details.flow_run_id))
    recomputed = {"codebook", "student[quest]", "evaluate", "report", "validate[codebook]",
                  "validate[predictions]"}
    # ce and kd do not read the codebook, so their keys do not include it
    assert states == {s: "Completed" if s in recomputed else "Cached" for s in STAGES}
    assert json.loads((root / "models/codebook/codebook.json").read_text())["k"] == \
        params["codebook"]["k"]
    assert dvc_status(root) == {}
    # outputs made with settings other than params.yaml's are never committed to dvc.lock
    other = load_config(root / "params.yaml", None, ["codebook.k=3"])
    assert dvc_commit(root, other).startswith("skipped")


def test_deleted_or_edited_output_is_recomputed(project: dict[str, Any]) -> None:
    """A cache hit whose files are gone or differ reruns its task instead of trusting the record;
    a recomputation with identical results (k-means is seeded) does not cascade downstream."""
    from flows.pipeline import quest_pipeline

    root = project["root"]
    expected = {s: "Completed" if s == "codebook" else "Cached" for s in STAGES}
    codebook = root / "models" / "codebook" / "codebook.npy"
    words = codebook.read_bytes()
    (root / "plots" / "codebook_usage.csv").unlink()
    out = quest_pipeline(root=str(root))
    assert out["states"] == expected  # seen missing before the run: refreshed directly
    assert (root / "plots" / "codebook_usage.csv").is_file()
    assert codebook.read_bytes() == words  # so the QuEST student's key did not change
    curve = root / "plots" / "codebook_objective.csv"
    good = curve.read_text()
    curve.write_text("iteration,objective\n")
    state = quest_pipeline(root=str(root), return_state=True)
    assert state.result()["states"] == expected
    # the cache hit, found stale after the fact, then the recomputation
    runs = _task_states(state.state_details.flow_run_id)
    assert sorted(v for k, v in runs.items() if k.startswith("codebook")) == ["Cached",
                                                                               "Completed"]
    assert curve.read_text().splitlines()[0] == good.splitlines()[0]
    assert len(curve.read_text().splitlines()) == len(good.splitlines())


def test_quest_error_is_not_retried(server: str, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad input fails the task once (no retries); other failures would be retried."""
    from prefect.states import Failed

    from flows.pipeline import quest_pipeline, retry_unless_quest_error
    from quest.infra.errors import QuestError

    assert retry_unless_quest_error(None, None, Failed(data=OSError("disk hiccup")))
    assert not retry_unless_quest_error(None, None, Failed(data=QuestError("bad input")))
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.setenv("QUEST_DATA_LOCATION", str(tmp_path / "no-such-archive.tar.gz"))
    state = quest_pipeline(root=str(tmp_path), preset="tiny", return_state=True)
    assert state.is_failed()
    with pytest.raises(QuestError):
        state.result()
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert [(r.name.rsplit("-", 1)[0], r.state.name, r.run_count) for r in runs] == [
        ("prepare", "Failed", 1)]


def test_promotion_flow_fails_once_on_a_missing_registry(server: str, tmp_path: Path) -> None:
    """The promotion flow calls the real promote(); its QuestError fails the task unretried."""
    from flows.promotion import quest_promotion
    from quest.infra.errors import QuestError

    uri = f"sqlite:///{tmp_path / 'no-registry.db'}"
    state = quest_promotion(min_top1=0.5, tracking_uri=uri, return_state=True)
    assert state.is_failed()
    with pytest.raises(QuestError):
        state.result()
    runs = _task_states(state.state_details.flow_run_id)
    assert list(_stage_states(runs).items()) == [("promote", "Failed")]
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        (run,) = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert run.run_count == 1


def test_serve_deployments_match_prefect_yaml() -> None:
    """flows/deployments.py (no work pool) and prefect.yaml (work pool) define the same
    schedules."""
    from flows.deployments import build_deployments

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    from_yaml = {
        d["name"]: (d["entrypoint"], [(s["cron"], s["timezone"]) for s in d["schedules"]])
        for d in spec["deployments"]
    }
    from_serve = {
        d.name: (d.entrypoint, [(s.schedule.cron, s.schedule.timezone) for s in d.schedules])
        for d in build_deployments()
    }
    assert from_serve == from_yaml
    assert from_yaml["nightly"][1] == [("0 2 * * *", "UTC")]


def test_deployments_on_a_real_server(server: str, project: dict[str, Any],
                                      tmp_path: Path) -> None:
    """prefect.yaml deploys both flows with their crons; a worker runs the pipeline deployment."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    root = project["root"]
    prefect = str(VENV_BIN / "prefect")
    # deploy from a copy of the project files: `prefect deploy` records its working directory
    # as the one the worker runs flows in, and the repository must not be written to
    proj = tmp_path / "proj"
    shutil.copytree(REPO / "flows", proj / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", proj / "prefect.yaml")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    worker: subprocess.Popen[bytes] | None = None
    try:
        with get_client(sync_client=True) as client:
            # what `prefect work-pool create quest-process --type process` does
            client.create_work_pool(WorkPoolCreate(
                name="quest-process", type="process",
                base_job_template=ProcessWorker.get_default_base_job_template()))
            _run([prefect, "--no-prompt", "deploy", "--all"], proj)
            timings["deploy"] = time.perf_counter() - t0
            crons = {}
            for name in ("quest-pipeline/nightly", "quest-promotion/nightly-promotion"):
                dep = client.read_deployment_by_name(name)
                assert dep.work_pool_name == "quest-process"
                crons[name] = [(s.schedule.cron, s.schedule.timezone, s.active)
                               for s in client.read_deployment_schedules(dep.id)]
            assert crons == {"quest-pipeline/nightly": [("0 2 * * *", "UTC", True)],
                             "quest-promotion/nightly-promotion": [("0 4 * * *", "UTC", True)]}
            pipeline = client.read_deployment_by_name("quest-pipeline/nightly")
            run = client.create_flow_run_from_deployment(
                pipeline.id, parameters={"root": str(root)})
            # --run-once: poll once, run what is due (our run), wait for it, exit
            worker = subprocess.Popen(
                [prefect, "worker", "start", "--pool", "quest-process", "--run-once"],
                cwd=proj, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True)
            log = worker.communicate(timeout=240)[0].decode(errors="replace")[-3000:]
            timings["worker run"] = time.perf_counter() - t0
            final = client.read_flow_run(run.id)
            assert final.state is not None and final.state.name == "Completed", log
        # the worker ran the flow from the recorded directory on the same root: all cached
        assert _stage_states(_task_states(run.id)) == dict.fromkeys(STAGES, "Cached"), log
        assert dvc_status(root) == {}
    finally:
        if worker is not None:
            _stop(worker)
    print("real server timings (s, cumulative): "
          + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))


def test_an_extra_quest_level_runs_as_its_own_cached_tasks(project: dict[str, Any]) -> None:
    """A level is a features and a codebook task of its own, cached per level; ce and kd, which
    read no codebook, stay cached."""
    from flows.pipeline import quest_pipeline

    root = project["root"]
    level = ("student.quest.extra_levels={l2: {teacher_layer: layer2, student_layer: layer2, "
             "k: 16, temperature: 500.0}}")
    states = quest_pipeline(root=str(root), overrides=[level])["states"]
    assert {k: states[k] for k in ("features[l2]", "codebook[l2]", "student[quest]")} == \
        dict.fromkeys(("features[l2]", "codebook[l2]", "student[quest]"), "Completed")
    assert states["features"] == states["codebook"] == states["student[ce]"] == "Cached"
    assert (root / "models" / "levels" / "l2" / "codebook.npy").is_file()
    history = json.loads((root / "metrics" / "students" / "quest.json").read_text())["history"]
    assert history[-1]["quest_l2"] > 0
    again = quest_pipeline(root=str(root), overrides=[level])["states"]
    assert set(again.values()) == {"Cached"}, again
    # back to params.yaml: the first level's student again, and DVC agrees
    quest_pipeline(root=str(root))
    assert dvc_status(root) == {}


def test_a_user_error_in_a_task_is_one_line_on_threads_and_on_dask(
        server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    """A QuestError raised in a Prefect task, run by the flow's threads or submitted to a Dask
    worker (DaskTaskRunner), reaches the user as one line: no traceback in Prefect's log."""
    from prefect import flow

    from flows.pipeline import TASKS, main, make_task_runner
    from quest.infra.config import load_config
    from quest.infra.errors import QuestError, one_line

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    missing = tmp_path / "no-such-archive.tar.gz"
    monkeypatch.setenv("QUEST_DATA_LOCATION", str(missing))
    capfd.readouterr()
    assert main(["--root", str(tmp_path), "--preset", "tiny"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("quest: error:")]
    assert len(lines) == 1 and str(missing) in lines[0], err

    config = load_config(tmp_path / "params.yaml", "tiny").to_dict()

    @flow(task_runner=make_task_runner("dask"))
    def on_dask() -> Any:
        return TASKS["prepare"].submit(str(tmp_path), config).result()

    with pytest.raises(QuestError) as exc:
        on_dask()
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    assert "\n" not in one_line(exc.value) and str(missing) in one_line(exc.value)


def test_the_promotion_flow_promotes_a_better_challenger(server: str, tmp_path: Path) -> None:
    """The success path: the registered challenger beats the champion and the bar."""
    import mlflow

    from flows.promotion import quest_promotion
    from quest.apps.tracking.registry import set_alias

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)
    client.create_registered_model("m")
    for val, test in ((0.5, 0.9), (0.6, 0.1)):  # the gate reads val; test is only reported
        mv = client.create_model_version("m", source=str(tmp_path / "artifacts"))
        client.set_model_version_tag("m", mv.version, "val_top1", str(val))
        client.set_model_version_tag("m", mv.version, "test_top1", str(test))
    set_alias(client, "m", "champion", 1)
    set_alias(client, "m", "challenger", 2)
    out = quest_promotion(min_top1=0.6, tracking_uri=uri, model_name="m")
    assert out["promoted"] and out["version"] == 2 and out["previous_champion"] == 1
    assert str(client.get_model_version_by_alias("m", "champion").version) == "2"
    assert client.get_model_version("m", "2").tags["promoted_from"] == "1"
