"""The Prefect flow's students run through prefect-dask's DaskTaskRunner on a real local cluster."""

from __future__ import annotations

import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # make test-fast leaves it out; make test runs it

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def test_runner_choice_is_checked() -> None:
    """threads is the default runner; an unknown name is a one-line QuestError."""
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.pipeline import make_task_runner
    from quest.infra.errors import QuestError

    assert isinstance(make_task_runner(), ThreadPoolTaskRunner)
    remote = make_task_runner("dask", "tcp://scheduler.example:8786")
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://scheduler.example:8786"
    with pytest.raises(QuestError, match="unknown task runner 'ray'"):
        make_task_runner("ray")


def test_tiny_pipeline_students_run_on_dask_workers(
    tmp_path: Path, cifar_archive: Path, teacher_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tiny preset end to end with --runner dask: every student task ran on a Dask worker."""
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    import quest.apps.stages.student as student_stage
    from flows.pipeline import pipeline_with_runner

    for key, value in {"DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
                       "QUEST_DATA_LOCATION": str(cifar_archive),
                       "QUEST_TEACHER_CHECKPOINT": str(teacher_checkpoint)}.items():
        monkeypatch.setenv(key, value)
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    ran_on: dict[str, Any] = {}
    real = student_stage.run_student

    def recording(cfg: Any, paths: Any, method: str) -> dict[str, Any]:
        from distributed import get_worker

        ran_on[method] = (get_worker().address, threading.current_thread().name)
        return real(cfg, paths, method)

    monkeypatch.setattr(student_stage, "run_student", recording)
    with temporary_settings(updates={PREFECT_HOME: tmp_path / "prefect-home"}), \
            prefect_test_harness(server_startup_timeout=90):
        out = pipeline_with_runner("dask")(root=str(root), preset="tiny",
                                           overrides=["runtime.threads=1"])
    students = {k: v for k, v in out["states"].items() if k.startswith("student[")}
    assert students == {"student[ce]": "Completed", "student[kd]": "Completed",
                        "student[quest]": "Completed"}
    assert sorted(ran_on) == ["ce", "kd", "quest"]
    # one in-process worker of the local cluster ran all three, each in its own thread
    assert len({addr for addr, _ in ran_on.values()}) == 1
    assert len({name for _, name in ran_on.values()}) == 3
    assert set(out["evaluation"]["models"]) >= {"teacher", "ce", "kd", "quest"}
    assert (root / "models" / "students" / "quest.pt").is_file()
