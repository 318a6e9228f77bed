"""Bad and untrusted input through the real CLI: one error line, no traceback, nothing lost.

Every case runs `python -m quest` in a subprocess on a project that already holds outputs,
and checks the exit code, that stderr ends in exactly one `quest: error: ...` line with no
traceback, and that every file that was there before is byte-for-byte and mtime unchanged.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import resource
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from quest.core.models.zoo import build_model
from quest.infra.io_utils import file_sha256

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def quest(root: Path, *args: str, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    """Run one quest command on `root` (smoke preset); optionally cap the size of written files."""
    preexec: Callable[[], None] | None = None
    if limit_bytes is not None:
        def preexec() -> None:
            # a file-size limit makes every larger write fail with EFBIG, as a full disk would
            # (Python ignores SIGXFSZ, so the write raises instead of killing the process)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    cmd = [sys.executable, "-m", "quest", args[0], "--root", str(root), "--preset", "smoke",
           "--set", "runtime.threads=1", *args[1:]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                          preexec_fn=preexec)


def assert_one_error(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit code 2, no traceback, and exactly one error line, the last one, holding `expected`."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in lines if line.startswith("quest: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Hash and mtime of every file under root, except logs and the run lock."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith("logs/") and rel != ".quest/run.lock":
            out[rel] = (file_sha256(p), p.stat().st_mtime_ns)
    return out


def png(seed: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            if name.endswith("/"):
                info = tarfile.TarInfo(name.rstrip("/"))
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


def good_files(size: int = 8) -> dict[str, bytes]:
    """An image folder with two classes: 3 train and 2 test images each."""
    files = {}
    for c, cls in enumerate(("cat", "dog")):
        for i in range(3):
            files[f"train/{cls}/{i}.png"] = png(10 * c + i, size)
        for i in range(2):
            files[f"test/{cls}/{i}.png"] = png(100 + 10 * c + i, size)
    return files


@pytest.fixture
def project(smoke_root: Path) -> Path:
    """The smoke project with outputs of every stage already in place (small stand-ins)."""
    root = smoke_root
    for rel, data in {
        "models/teacher/teacher.pt": b"previous teacher",
        "metrics/teacher.json": b'{"top1": 0.9}\n',
        "models/codebook/codebook.npy": b"previous codebook",
        "models/codebook/codebook.json": b"{}\n",
        "models/students/ce.pt": b"previous student",
        "metrics/students/ce.json": b"{}\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    feats = root / "data" / "features"
    feats.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(feats / "teacher_features.npy", rng.random((50, 64), dtype=np.float32))
    (feats / "teacher_features.json").write_text(
        json.dumps({"layer": "layer3", "teacher_sha256": "0" * 64}))
    return root


def run_unchanged(root: Path, *args: str, **kw: int) -> subprocess.CompletedProcess:
    """Run a command that must fail, and check that no existing output changed."""
    before = snapshot(root)
    proc = quest(root, *args, **kw)
    after = snapshot(root)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))
    assert list(root.rglob("*.tmp")) == []
    return proc


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

# the whole of a few-image folder: too few images per class to hold a validation split out too
WHOLE = ("--set", "data.subset.train_per_class=null", "--set", "data.subset.test_per_class=null",
         "--set", "data.validation_per_class=0")


@pytest.mark.slow
def test_corrupt_images_in_archive_fail_or_are_skipped(project: Path, tmp_path: Path) -> None:
    bad = {"train/dog/broken.png": png(7)[:40], "train/cat/notes.jpg": b"not an image at all"}
    src = write_tar(tmp_path / "bad.tar.gz", {**good_files(), **bad})
    proc = run_unchanged(project, "prepare", "--set", f"data.location={src}",
                         "--set", "data.on_corrupt=fail", *WHOLE)
    assert_one_error(proc, "cannot read image", "data.on_corrupt: skip")

    ok = quest(project, "prepare", "--set", f"data.location={src}", *WHOLE)
    assert ok.returncode == 0 and "Traceback" not in ok.stderr, ok.stderr
    assert "skipping unreadable file" in ok.stderr
    meta = json.loads((project / "data" / "prepared" / "meta.json").read_text())
    assert meta["skipped"]["count"] == 2 and set(meta["skipped"]["files"]) == set(bad)
    assert meta["counts"] == {"train": 6, "test": 4}


def _no_train() -> dict[str, bytes]:
    return {k: v for k, v in good_files().items() if not k.startswith("train/")}


def _empty_class() -> dict[str, bytes]:
    return {**good_files(), "train/eel/": b"", "test/eel/0.png": png(5)}


@pytest.mark.parametrize(("files", "expected"), [
    (_no_train, "has no train/ folder"),
    (_empty_class, "class folder train/eel"),
    (None, "data path does not exist"),
], ids=["no-train", "empty-class", "missing-path"])
@pytest.mark.slow
def test_bad_archive_layout_is_one_line(project: Path, tmp_path: Path,
                                        files: Callable[[], dict[str, bytes]] | None,
                                        expected: str) -> None:
    src = tmp_path / "layout.tar.gz"
    if files is not None:
        write_tar(src, files())
    proc = run_unchanged(project, "prepare", "--set", f"data.location={src}", *WHOLE)
    assert_one_error(proc, expected)


@pytest.mark.slow
def test_archive_escaping_its_root_is_refused(project: Path, tmp_path: Path) -> None:
    target = tmp_path / "sub"
    target.mkdir()
    src = write_tar(target / "evil.tar.gz", {**good_files(), "../../escaped.png": png(1)})
    proc = run_unchanged(project, "prepare", "--set", f"data.location={src}", *WHOLE)
    assert_one_error(proc, "refusing archive", "'..' component")
    assert not list(tmp_path.rglob("escaped.png"))
    assert not (tmp_path.parent / "escaped.png").exists()


# --------------------------------------------------------------------------------------------
# models, layers, codebook, training
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_teacher_checkpoint_of_another_architecture(project: Path, tmp_path: Path) -> None:
    other = tmp_path / "resnet8.pt"
    torch.save(build_model("resnet8", 10).state_dict(), other)  # bare: no arch recorded
    proc = run_unchanged(project, "teacher", "--set", f"teacher.checkpoint={other}")
    assert_one_error(proc, f"teacher checkpoint {other} does not fit", "missing",
                     "check the arch setting")


@pytest.mark.slow
def test_layer_that_does_not_exist(project: Path) -> None:
    proc = run_unchanged(project, "features", "--set", "features.layer=layer9")
    assert_one_error(proc, "features.layer", "unknown layer 'layer9'")


@pytest.mark.slow
def test_codebook_larger_than_the_feature_vectors(project: Path) -> None:
    proc = run_unchanged(project, "codebook", "--set", "codebook.k=64")
    assert_one_error(proc, "codebook size K=64 is larger than the 50 feature vectors",
                     "lower codebook.k")


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(project: Path) -> None:
    # epoch 1 trains normally; a step schedule then multiplies the learning rate by 1e12
    ckpt = project / ".quest" / "checkpoints" / "student-ce.pt"
    before = snapshot(project)
    proc = quest(project, "student", "--method", "ce", "--set", "student.arch=resnet8",
                 "--set", "student.train.schedule=step", "--set", "student.train.milestones=[1]",
                 "--set", "student.train.gamma=1.0e+12", "--set", "student.train.batch_size=100")
    assert_one_error(proc, "student[ce]: loss became", "in epoch 2",
                     f"the last good checkpoint stays in {ckpt}", "lower the learning rate")
    after = snapshot(project)
    assert {k: v for k, v in after.items() if not k.startswith(".quest/")} == before
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 0
    weights = [v for v in state["distiller"].values() if v.is_floating_point()]
    assert all(torch.isfinite(v).all() for v in weights)


# --------------------------------------------------------------------------------------------
# failing writes
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_disk_during_prepare_keeps_the_previous_data(project: Path, tmp_path: Path) -> None:
    # 20 train images of 32x32 make a 61 kB array: over the 16 kB cap, unlike the log lines
    files = {f"train/{c}/{i}.png": png(i + 50 * k, 32) for k, c in enumerate("ab")
             for i in range(10)}
    files.update({f"test/{c}/0.png": png(99 + k, 32) for k, c in enumerate("ab")})
    src = write_tar(tmp_path / "big.tar.gz", files)
    proc = run_unchanged(project, "prepare", "--set", f"data.location={src}", *WHOLE,
                         limit_bytes=16_000)
    assert_one_error(proc, "cannot write", "train_images.npy", "free disk space")


@pytest.mark.slow
def test_full_disk_while_saving_a_model_keeps_the_previous_one(project: Path) -> None:
    # the resnet56 teacher file is 3.5 MB: over a 1 MB cap
    proc = run_unchanged(project, "teacher", limit_bytes=1_000_000)
    assert_one_error(proc, "cannot write", "teacher.pt", "File too large")


# --------------------------------------------------------------------------------------------
# untrusted checkpoints
# --------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs code: it creates the file named in `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


@pytest.mark.slow
def test_checkpoint_with_code_is_refused_and_never_runs(project: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload is live: it runs when trusted
    assert marker.exists()
    marker.unlink()
    evil = tmp_path / "evil.pt"
    torch.save({"model": build_model("resnet56", 10).state_dict(), "x": Payload(marker)}, evil)
    proc = run_unchanged(project, "teacher", "--set", f"teacher.checkpoint={evil}")
    assert_one_error(proc, f"checkpoint {evil} holds more than weights and was refused",
                     "re-save it as a plain state_dict")
    assert not marker.exists()
    # a bare pickle (the pre-zip format) is refused just the same
    from quest.core.checkpoint import load_checkpoint
    from quest.infra.errors import QuestError

    evil.write_bytes(pickle.dumps({"model": Payload(marker)}))
    with pytest.raises(QuestError, match="refused") as err:
        load_checkpoint(evil)
    assert "\n" not in str(err.value) and not marker.exists()


# --------------------------------------------------------------------------------------------
# concurrent runs
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_runs_started_at_once_do_not_interleave(project: Path) -> None:
    args = ["student", "--method", "ce", "--set", "student.arch=resnet8",
            "--set", "student.train.batch_size=20", "--set", "student.train.epochs=1",
            "--set", "runtime.progress=lines"]
    procs: list[subprocess.CompletedProcess] = []
    threads = [threading.Thread(target=lambda: procs.append(quest(project, *args)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(p.returncode for p in procs)
    # either the lock refused one at once, or the second started after the first had finished
    assert codes in ([0, 0], [0, 2]), [p.stderr for p in procs]
    for p in procs:
        if p.returncode == 2:
            assert_one_error(p, "another quest run is using", "quest student")
    ev = json.loads((project / "metrics" / "students" / "ce.json").read_text())
    assert len(ev["history"]) == 1
    model = torch.load(project / "models" / "students" / "ce.pt", weights_only=True)
    assert model["arch"] == "resnet8" and model["method"] == "ce"
    assert not (project / ".quest" / "checkpoints" / "student-ce.pt").exists()
    assert list(project.rglob("*.tmp")) == []


# --------------------------------------------------------------------------------------------
# servers bind to localhost
# --------------------------------------------------------------------------------------------


def test_servers_bind_to_localhost_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.local_servers import server_command

    monkeypatch.delenv("QUEST_SERVER_HOST", raising=False)
    for kind in ("mlflow", "prefect"):
        cmd = server_command(kind, root=REPO)
        assert cmd[cmd.index("--host") + 1] == "127.0.0.1", cmd
    monkeypatch.setenv("QUEST_SERVER_HOST", "0.0.0.0")
    cmd = server_command("mlflow", root=REPO)
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    cmd = server_command("prefect", root=REPO, host="10.1.2.3", port=4300)
    assert cmd[cmd.index("--host") + 1] == "10.1.2.3" and "4300" in cmd
    # every server command the project documents or runs binds to the loopback interface
    for rel in ("Makefile", "README.md", "docs/operations.md", "flows/deployments.py",
                "flows/pipeline.py", "prefect.yaml"):
        text = (REPO / rel).read_text()
        assert all(h == "127.0.0.1" for h in re.findall(r"--host[ =](\S+)", text)), rel
        starts = re.findall(r"prefect server start[^\n]*", text)
        assert all("--host 127.0.0.1" in line for line in starts), rel
    assert "flows.local_servers mlflow" in (REPO / "Makefile").read_text()
    # the temporary server Prefect starts when PREFECT_API_URL is unset binds the loopback too
    import importlib.util

    spec = importlib.util.find_spec("prefect")
    assert spec is not None and spec.origin is not None
    ephemeral = (Path(spec.origin).parent / "server" / "api" / "server.py").read_text()
    assert 'sock.bind(("127.0.0.1", port))' in ephemeral
