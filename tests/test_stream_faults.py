"""Corrupt files in the streaming path: a sample that fails to decode in a DataLoader worker is
replaced deterministically and counted under data.on_corrupt: skip, and stops the run with one
line naming the file under fail. Cases: a truncated JPEG, a zero-byte file and a text file named
.jpg, written after indexing (so that they reach the workers), in a folder and in shards."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from quest.apps.shards import make_image_folder, write_shards
from quest.core.data.stream import StreamLoader, open_stream
from quest.infra.config import load_config
from quest.infra.errors import QuestError
from quest.infra.io_utils import read_json
from quest.infra.paths import Paths

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
TEXT = b"this is not an image\n"


def _break(data: bytes, how: str) -> bytes:
    return {"truncated": data[: len(data) // 3], "empty": b"", "text": TEXT}[how]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("faults") / "images", classes=4,
                             train_per_class=4, test_per_class=2, seed=0)


@pytest.fixture(scope="module")
def shards(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faults-shards") / "shards"
    write_shards(folder, out, size=8, seed=0)
    return out


def _prepare(location: Path, root: Path, on_corrupt: str) -> Path:
    from quest.apps.stages.prepare import run_prepare

    cfg = load_config(REPO / "params.yaml", "stream-tiny",
                      [f"data.location={location}", "data.workers=0",
                       f"data.on_corrupt={on_corrupt}"])
    run_prepare(cfg, Paths(root))
    return root / "data" / "prepared"


def _broken_folder(folder: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    """A copy of the folder, indexed while whole; then three train images are broken."""
    copy = tmp_path / "images"
    shutil.copytree(folder, copy)
    victims = sorted((copy / "train").rglob("*.jpg"))[1:8:3]
    return copy, victims


def _break_files(victims: list[Path]) -> None:
    for path, how in zip(victims, ("truncated", "empty", "text"), strict=False):
        path.write_bytes(_break(path.read_bytes(), how))


def _break_shard(shards: Path, tmp_path: Path) -> Path:
    """A copy of the shards whose first train shard has three broken images."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    first = sorted(copy.glob("train-*.tar"))[0]
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]  # type: ignore
    hows = ["truncated", "empty", "text"]
    jpgs = 0
    with tarfile.open(first, "w") as tar:
        for member, data in members:
            if member.name.endswith(".jpg"):
                jpgs += 1
                if jpgs % 2 and hows:  # the 1st, 3rd and 5th image of the shard
                    data = _break(data, hows.pop(0))
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return copy


def _loader(prepared: Path, workers: int) -> StreamLoader:
    data = open_stream(prepared, read_json(prepared / "meta.json"))
    loader = StreamLoader(data, "train", train=True, batch_size=4, mean=MEAN, std=STD, seed=1,
                          workers=workers)
    loader.set_epoch(0)
    return loader


def test_a_folder_s_broken_images_are_replaced_alike_for_any_worker_count(
        folder: Path, tmp_path: Path) -> None:
    location, victims = _broken_folder(folder, tmp_path)
    prepared = _prepare(location, tmp_path / "root", "skip")
    _break_files(victims)
    runs = []
    for workers in (0, 2):
        loader = _loader(prepared, workers)
        runs.append([(x.clone(), y.clone()) for x, y, *_ in loader])
        # every broken file counted once per epoch, under its own name
        assert loader.data.faults == {str(p): 1 for p in victims}
    assert len(runs[0]) == 16 // 4
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(*runs, strict=True))


def test_a_broken_image_under_fail_stops_with_one_line_naming_it(folder: Path,
                                                                  tmp_path: Path) -> None:
    location, victims = _broken_folder(folder, tmp_path)
    prepared = _prepare(location, tmp_path / "root", "fail")
    _break_files(victims[:1])
    with pytest.raises(QuestError) as err:
        list(_loader(prepared, 2))
    msg = str(err.value)
    assert "\n" not in msg and "Caught" not in msg and "Traceback" not in msg
    assert str(victims[0]) in msg and "data.on_corrupt: skip" in msg


def test_broken_shard_samples_are_replaced_and_counted_or_stop_the_run(
        shards: Path, tmp_path: Path) -> None:
    broken = _break_shard(shards, tmp_path)
    prepared = _prepare(broken, tmp_path / "skip", "skip")
    counts = []
    for workers in (0, 2):
        loader = _loader(prepared, workers)
        batches = list(loader)
        assert len(batches) == len(loader)
        counts.append(sum(loader.data.faults.values()))
    assert counts == [3, 3]
    with pytest.raises(QuestError) as err:  # prepare's statistics sample meets it first
        list(_loader(_prepare(broken, tmp_path / "fail", "fail"), 2))
    assert "\n" not in str(err.value) and "train-000000.tar" in str(err.value)


def test_a_stream_run_goes_on_under_skip_and_stops_in_one_line_under_fail(
        folder: Path, tmp_path: Path) -> None:
    """`quest teacher` on a folder with a truncated JPEG that passes the index: exit 0 and the
    count in the stage's metrics under skip; exit 2 with one line under fail."""
    location, victims = _broken_folder(folder, tmp_path)

    def quest(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "quest", *args, "--root", str(root), "--params",
             str(REPO / "params.yaml"), "--preset", "stream-tiny",
             "--set", f"data.on_corrupt={root.name}",
             "--set", f"data.location={location}", "--set", "data.workers=2",
             "--set", "teacher.train.epochs=1",
             "--set", "teacher.train.batch_size=8", "--set", "data.image_size=32",
             "--set", "teacher.arch=resnet8"], capture_output=True, text=True, cwd=REPO)

    for mode in ("skip", "fail"):
        root = tmp_path / mode
        out = quest(root, "prepare")
        assert out.returncode == 0, out.stderr
    _break_files(victims[:1])
    ok = quest(tmp_path / "skip", "teacher")
    assert ok.returncode == 0, ok.stderr
    metrics = read_json(tmp_path / "skip" / "metrics" / "teacher.json")
    assert metrics["corrupt_samples"]["files"] == 1
    assert str(victims[0]) in metrics["corrupt_samples"]["first"]
    bad = quest(tmp_path / "fail", "teacher")
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and str(victims[0]) in lines[0], bad.stderr
    assert not (tmp_path / "fail" / "models" / "teacher" / "teacher.pt").exists()


def test_any_quest_error_from_a_dataloader_worker_is_one_line() -> None:
    """torch re-raises a worker's QuestError wrapped in "Caught ... in DataLoader worker" and a
    traceback; the CLI prints one_line of it: the original message alone."""
    from torch.utils.data import DataLoader, Dataset

    from quest.infra.errors import one_line

    class Broken(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> int:
            raise QuestError(f"sample {i} is bad: fix it")

    with pytest.raises(QuestError) as err:
        list(DataLoader(Broken(), num_workers=1))
    assert "Caught QuestError in DataLoader worker" in str(err.value)
    assert one_line(err.value) == "sample 0 is bad: fix it"
    assert one_line(QuestError("plain\n  message")) == "plain message"
