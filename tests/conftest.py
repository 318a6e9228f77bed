"""Shared fixtures: the offline data and teacher in ../shared, and a prepared smoke slice."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tarfile
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

# A full Prefect server (`prefect server start`, as tests/test_prefect.py runs one for its module)
# inherits these. Its loop services poll the database every 5-20 s, about 6 CPU-s a minute while
# idle, and no test needs them: no scheduled or late runs, no paused or cancelled runs, no
# automations, no dashboard. The services that record task states and persist events stay on.
# (Temporary servers, the test harness's and a fan-out's, run only those already.) A value
# already in the environment wins.
PREFECT_TEST_SERVICES_OFF = ("CANCELLATION_CLEANUP", "FOREMAN", "LATE_RUNS", "SCHEDULER",
                             "PAUSE_EXPIRATIONS", "REPOSSESSOR", "CLEANUP_RECONCILER", "TRIGGERS")
for _service in PREFECT_TEST_SERVICES_OFF:
    os.environ.setdefault(f"PREFECT_SERVER_SERVICES_{_service}_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_UI_ENABLED", "false")


def shared_dir() -> Path:
    """../shared beside the repository (QUEST_SHARED_DIR overrides)."""
    return Path(os.environ.get("QUEST_SHARED_DIR", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not (path / "data" / "cifar10-jpeg.tar.gz").is_file():
        raise QuestError(f"offline data not found under {path}: set QUEST_SHARED_DIR")
    return path


# Images per class and split in the tests' slice of the real archive: enough for every preset
# and test (smoke: 30 train + 5 validation, 10 test; the largest test subset takes 50 train).
SLICE_PER_CLASS = {"train": 60, "test": 20}


def _write_slice(full: Path, target: Path) -> None:
    """The first SLICE_PER_CLASS images of each class and split of `full`, with its folders,
    in one streaming pass, written atomically as `target`."""
    kept: dict[tuple[str, str], int] = {}
    tmp = target.with_name(target.name + ".tmp")
    with tarfile.open(full, "r|gz") as src, tarfile.open(tmp, "w:gz", compresslevel=1) as dst:
        for member in src:
            parts = member.name.split("/")  # cifar10-jpeg/<split>/<class>/<file>
            if member.isfile() and len(parts) == 4:
                key = (parts[1], parts[2])
                if kept.get(key, 0) >= SLICE_PER_CLASS[parts[1]]:
                    continue
                kept[key] = kept.get(key, 0) + 1
                dst.addfile(member, src.extractfile(member))
            elif member.isdir():
                dst.addfile(member)
    os.replace(tmp, target)


@pytest.fixture(scope="session")
def cifar_archive(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A slice of the real CIFAR-10 JPEG archive, same name and layout, made once per session.

    Indexing the full archive (60,000 members) costs ~2.5 CPU-s per open, and the suite opens
    it about 20 times for presets that use at most 60 images per class and split. The slice is
    shared by the xdist workers (built under a lock in their common temporary folder);
    tests/test_data_sources.py reads the full archive itself."""
    base = tmp_path_factory.getbasetemp()
    common = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    target = common / "cifar-slice" / "cifar10-jpeg.tar.gz"
    target.parent.mkdir(exist_ok=True)
    with open(common / "cifar-slice.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            _write_slice(shared / "data" / "cifar10-jpeg.tar.gz", target)
    return target


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
