"""`quest run` resumes the pipeline: after a kill -9 mid-student, the rerun skips every finished
stage (one line each), resumes the student from its checkpoint, and ends with the evaluation of an
uninterrupted run, byte for byte; a third run skips everything, and --force reruns."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quest.apps.cli import main
from quest.apps.stage_table import BY_NAME
from quest.apps.stages.resume import StageRecords, record_dir
from quest.infra.config import load_config
from quest.infra.paths import Paths

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _run_cmd(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "quest", "run", "--root", str(root), "--preset", "smoke",
            "--set", "student.methods=[ce,kd]", "--set", "student.arch=resnet8",
            "--set", "student.train.epochs=3", "--set", "student.train.batch_size=25",
            "--set", "data.subset.train_per_class=10", "--set", "data.subset.test_per_class=5",
            "--set", "runtime.threads=1", *extra]


def test_a_killed_run_reruns_only_the_unfinished_work(
        smoke_root: Path, tmp_path_factory: pytest.TempPathFactory,
        capsys: pytest.CaptureFixture[str]) -> None:
    reference = tmp_path_factory.mktemp("reference")
    shutil.copy(smoke_root / "params.yaml", reference / "params.yaml")
    shutil.copytree(smoke_root / "data", reference / "data")
    straight = subprocess.Popen(_run_cmd(reference), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    ckpt = smoke_root / ".quest" / "checkpoints" / "student-kd.pt"
    proc = subprocess.Popen(_run_cmd(smoke_root), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert ckpt.exists(), f"kd's first epoch did not finish in time (exit {proc.poll()})"
    proc.send_signal(signal.SIGKILL)  # no handler runs: the run lock stays behind, stale
    proc.communicate(timeout=60)
    assert not (smoke_root / "models" / "students" / "kd.pt").exists()
    assert (smoke_root / "models" / "students" / "ce.pt").exists()
    ce_before = (smoke_root / "models" / "students" / "ce.pt").stat().st_mtime_ns

    rerun = subprocess.run(_run_cmd(smoke_root), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    for stage in ("prepare", "validate[prepare]", "teacher", "student[ce]"):
        assert f"stage {stage} skipped" in rerun.stderr, stage
    assert "stage student[kd] skipped" not in rerun.stderr
    assert "resuming after epoch" in rerun.stderr  # kd from its checkpoint, not from scratch
    assert "skipped (finished, inputs unchanged; --force reruns): " in rerun.stdout
    assert (smoke_root / "models" / "students" / "ce.pt").stat().st_mtime_ns == ce_before

    _, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err
    for rel in ("metrics/evaluation.json", "metrics/per_class.json",
                "models/students/ce.pt", "models/students/kd.pt"):
        assert (smoke_root / rel).read_bytes() == (reference / rel).read_bytes(), rel

    # the third run through the same entry point in this process: the process boundary (a
    # killed run, its stale lock) is what the runs above are for; this one only reads records
    capsys.readouterr()
    assert main(_run_cmd(smoke_root)[3:]) == 0
    again = capsys.readouterr()
    assert "stage evaluate skipped" in again.err and "done in" not in again.err
    assert "top-1" in again.out or "top1" in again.out  # the table, from evaluation.json


def test_records_follow_the_key_and_force_ignores_them(smoke_root: Path) -> None:
    """Unit level: a record matches only the key it was written with and outputs unchanged."""
    cfg = load_config(smoke_root / "params.yaml", "smoke")
    paths = Paths(smoke_root)
    spec = BY_NAME["prepare"]
    records = StageRecords(cfg, paths)
    now = records.key(spec, None)
    assert not records.fresh(spec, None, now)  # nothing recorded yet
    records.done(spec, None, now)
    assert (record_dir(paths) / "prepare.json").is_file()
    assert records.fresh(spec, None, now)
    assert not records.fresh(spec, None, "another key")
    assert not StageRecords(cfg, paths, force=True).fresh(spec, None, now)
    other = load_config(smoke_root / "params.yaml", "smoke", ["data.subset.seed=3"])
    assert StageRecords(other, paths).key(spec, None) != now  # a setting prepare reads
    (paths.prepared / "meta.json").write_text("{}")  # an output edited by hand
    assert not records.fresh(spec, None, now)
