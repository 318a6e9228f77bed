"""Shared fixtures: the offline data and teacher in ../shared, and a prepared smoke slice."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from quest.infra.errors import QuestError

# One intra-op thread for torch, FAISS and OpenMP in this process and in every process a test
# starts (they inherit the environment): the tests' batches are tiny, and on a shared 2-core
# machine a second spinning OpenMP thread burns CPU time for nothing. Set before anything imports
# torch; a value already in the environment wins. Tests about thread counts set their own.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
for _var in THREAD_VARS:
    os.environ.setdefault(_var, "1")

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """../shared beside the repository (QUEST_SHARED_DIR overrides)."""
    return Path(os.environ.get("QUEST_SHARED_DIR", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not (path / "data" / "cifar10-jpeg.tar.gz").is_file():
        raise QuestError(f"offline data not found under {path}: set QUEST_SHARED_DIR")
    return path


@pytest.fixture(scope="session")
def cifar_archive(shared: Path) -> Path:
    return shared / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def teacher_checkpoint(shared: Path) -> Path:
    return shared / "models" / "resnet56-cifar10-jpeg.pth"


@pytest.fixture(scope="session")
def smoke_prepared(tmp_path_factory: pytest.TempPathFactory, cifar_archive: Path) -> Path:
    """data/prepared/ of the smoke preset (30 train / 10 test per class), made once per session."""
    from quest.apps.stages.prepare import run_prepare
    from quest.infra.config import load_config
    from quest.infra.paths import Paths

    root = tmp_path_factory.mktemp("smoke-prepared")
    cfg = load_config(REPO / "params.yaml", "smoke", [f"data.location={cifar_archive}"])
    run_prepare(cfg, Paths(root))
    return root / "data" / "prepared"


@pytest.fixture
def smoke_root(tmp_path: Path, smoke_prepared: Path, cifar_archive: Path,
               teacher_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh project root holding params.yaml and the prepared smoke data."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(smoke_prepared, tmp_path / "data" / "prepared")
    monkeypatch.setenv("QUEST_DATA_LOCATION", str(cifar_archive))
    monkeypatch.setenv("QUEST_TEACHER_CHECKPOINT", str(teacher_checkpoint))
    return tmp_path


def wait_http_ok(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Poll `url` until it answers 200; fail if `proc` (the server) exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{what} exited during startup"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what} at {url} did not answer within {timeout}s")
