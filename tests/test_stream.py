"""The streaming data path: image folders and WebDataset shards of mixed-size images, indexed
by `quest prepare` (data.format: stream) and decoded batch by batch; seeded per sample, so an
epoch does not depend on worker count or on an interruption; ranks read disjoint shares."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from quest.apps.cli import main as quest_main
from quest.apps.shards import make_image_folder, write_shards
from quest.core.data.stream import (
    RankSampler,
    StreamLoader,
    assign_shards,
    open_stream,
    scan,
)
from quest.infra.config import load_config
from quest.infra.errors import QuestError
from quest.infra.io_utils import NpyAppender, read_json
from quest.infra.paths import Paths

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 classes of JPEGs 64-160 px of mixed aspect: 6 train and 2 test images per class."""
    return make_image_folder(tmp_path_factory.mktemp("stream") / "images", classes=10,
                             train_per_class=6, test_per_class=2, seed=0)


@pytest.fixture(scope="module")
def shards(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "shards"
    made = write_shards(folder, out, size=16, seed=0)
    assert made == {"train": 4, "test": 2}  # 60 train / 16 per shard, 20 test
    return out


def _cfg(location: Path, *extra: str) -> object:
    return load_config(REPO / "params.yaml", "stream-tiny",
                       [f"data.location={location}", "data.workers=0", *extra])


def _prepared(cfg: object, root: Path) -> Path:
    from quest.apps.stages.prepare import run_prepare

    run_prepare(cfg, Paths(root))  # type: ignore[arg-type]
    return root / "data" / "prepared"


def _batches(loader: StreamLoader) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t.clone() for t in batch) for batch in loader]


def test_npy_appender_grows_then_writes_its_header_and_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "v.npy"
    with NpyAppender(path, np.float16, 3) as out:
        for i in range(5):
            out.append(np.full((i, 3), i))
        assert not path.exists()  # nothing under the final name until the block ends
    got = np.load(path, mmap_mode="r")
    assert got.shape == (10, 3) and got.dtype == np.float16
    assert got[:, 0].tolist() == [1, 2, 2, 3, 3, 3, 4, 4, 4, 4]
    with pytest.raises(RuntimeError), NpyAppender(path, np.float32, 3) as out:
        out.append(np.zeros((2, 3)))
        raise RuntimeError("interrupted")
    assert np.load(path).shape == (10, 3)  # the earlier file is intact, no temporary left
    assert [p.name for p in tmp_path.iterdir()] == ["v.npy"]


def test_rank_sampler_splits_each_epoch_into_disjoint_equal_shares() -> None:
    n = 11
    shares = []
    for rank in range(2):
        s = RankSampler(n, shuffle=True, seed=3, rank=rank, world=2, repeat=2)
        s.epoch = 5
        shares.append([i for i, _ in s])
        assert len(s) == len(shares[-1]) == 11  # 22 positions over 2 ranks
    merged = sorted(shares[0] + shares[1])
    assert merged == sorted(list(range(n)) * 2)  # every image twice (repeat 2), none lost
    s = RankSampler(n, shuffle=True, seed=3, rank=1, world=2, repeat=2)
    s.epoch, s.start = 5, 4
    assert [i for i, _ in s] == shares[1][4:]  # a resumed share continues where it stopped
    s.epoch, s.start = 6, 0
    assert [i for i, _ in s] != shares[1]  # another epoch, another order


def test_shards_are_assigned_disjointly_per_rank_and_reshuffled_per_epoch() -> None:
    names = [f"train-{i:06d}.tar" for i in range(7)]
    epoch0 = [assign_shards(names, shuffle=True, seed=0, epoch=0, rank=r, world=3)
              for r in range(3)]
    assert sorted(sum(epoch0, [])) == names
    assert all(not set(a) & set(b) for a in epoch0 for b in epoch0 if a is not b)
    epoch1 = [assign_shards(names, shuffle=True, seed=0, epoch=1, rank=r, world=3)
              for r in range(3)]
    assert epoch1 != epoch0


def test_folder_and_its_shards_index_the_same_images(folder: Path, shards: Path,
                                                     tmp_path: Path) -> None:
    a = scan(folder, "skip")
    b = scan(shards, "skip")
    assert (a.kind, b.kind) == ("folder", "shards")
    assert a.classes == b.classes == [f"class{c:03d}" for c in range(10)]
    assert a.count("train") == b.count("train") == 60 and a.count("test") == b.count("test") == 20
    assert a.class_counts == b.class_counts
    # every shard sample holds the bytes of one folder image, under its class's label
    with tarfile.open(shards / "test-000000.tar") as tar:
        names = tar.getnames()
    assert len(names) == 2 * 16 and names[0].endswith((".cls", ".jpg"))


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_an_epoch_is_reproducible_whatever_the_workers_and_resumes_mid_epoch(
        source: str, folder: Path, shards: Path, tmp_path: Path) -> None:
    location = folder if source == "folder" else shards
    data = open_stream(*_open(_cfg(location), tmp_path))

    def loader(workers: int) -> StreamLoader:
        return StreamLoader(data, "train", train=True, batch_size=8, mean=MEAN, std=STD,
                            seed=1, workers=workers)

    one = loader(0)
    one.set_epoch(2)
    first = _batches(one)
    assert len(first) == len(one) == 60 // 8
    assert all(x.shape == (8, 3, 64, 64) for x, *_ in first)  # crops of mixed-size images
    # folders: per-sample seeds give the same batches with 0 or 2 workers; shards: each
    # worker reads its own shards, so the same worker count gives the same batches
    two = loader(2 if source == "folder" else 0)
    two.set_epoch(2)
    again = _batches(two)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
               for a, b in zip(first, again, strict=True))
    if source == "shards":
        mixed = loader(2)
        mixed.set_epoch(2)
        assert sum(len(y) for _, y, _ in mixed) == 56  # 2 workers: 7 full batches all the same
    one.set_epoch(3)
    assert not torch.equal(_batches(one)[0][0], first[0][0])  # another epoch, other crops
    one.set_epoch(2)
    one.start_at(3)  # the Trainer's resume: skip 3 trained batches
    tail = _batches(one)
    assert len(tail) == len(first) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
               for a, b in zip(first[3:], tail, strict=True))


def _open(cfg: object, root: Path) -> tuple[Path, dict]:
    out = _prepared(cfg, root)
    return out, read_json(out / "meta.json")


def test_evaluation_crops_every_test_image_once_in_order(folder: Path, tmp_path: Path) -> None:
    out, meta = _open(_cfg(folder), tmp_path)
    assert meta["format"] == "stream" and meta["counts"] == {"train": 60, "test": 20}
    assert len(meta["mean"]) == 3 and meta["stats_from_images"] == 60
    data = open_stream(out, meta)
    ev = StreamLoader(data, "test", train=False, batch_size=8, mean=MEAN, std=STD, workers=2)
    labels = torch.cat([y for _, y in ev]).tolist()
    assert labels == [lab for _, lab in data.items["test"]]
    assert len(ev) == 3  # 8 + 8 + 4: evaluation keeps the last partial batch


def test_shard_evaluation_reads_every_test_image_once_with_several_workers(
        shards: Path, tmp_path: Path) -> None:
    """Each worker batches its own shards (16 + 4 test images here): all 20 arrive, in the
    number of batches len() promises."""
    data = open_stream(*_open(_cfg(shards), tmp_path))
    ev = StreamLoader(data, "test", train=False, batch_size=8, mean=MEAN, std=STD, workers=2)
    batches = list(ev)
    assert len(batches) == len(ev) == 2 + 1  # worker 0: 16 = 8 + 8; worker 1: 4
    labels = sorted(torch.cat([y for _, y in batches]).tolist())
    assert labels == sorted(lab for lab, n in enumerate(data.meta["class_counts"]["test"].values())
                            for _ in range(n))


def test_stream_refuses_bad_settings_and_inputs_in_one_line(folder: Path, shards: Path,
                                                            tmp_path: Path) -> None:
    with pytest.raises(QuestError, match="needs data.image_size"):
        _prepared(_cfg(folder, "data.image_size=null"), tmp_path / "a")
    archive = tmp_path / "images.tar.gz"
    archive.write_bytes(b"not really")
    with pytest.raises(QuestError, match="reads a folder, not the file"):
        _prepared(_cfg(archive), tmp_path / "b")
    with pytest.raises(QuestError, match="data path does not exist"):
        _prepared(_cfg(tmp_path / "nowhere"), tmp_path / "c")
    # a corrupt image: skipped (and listed) by default, named by on_corrupt: fail
    bad = tmp_path / "bad"
    make_image_folder(bad, classes=2, train_per_class=3, test_per_class=1, seed=1)
    (bad / "train" / "class000" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out, meta = _open(_cfg(bad), tmp_path / "d")
    assert meta["skipped"]["files"] == ["train/class000/broken.jpg"]
    assert meta["counts"]["train"] == 6
    with pytest.raises(QuestError, match=r"cannot read image .*broken\.jpg.*on_corrupt: skip"):
        _prepared(_cfg(bad, "data.on_corrupt=fail"), tmp_path / "e")
    # a shard sample without its label
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    for split in ("train", "test"):
        with tarfile.open(lonely / f"{split}-000000.tar", "w") as tar:
            buf = io.BytesIO()
            Image.new("RGB", (8, 8)).save(buf, "JPEG")
            info = tarfile.TarInfo("k0.jpg")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    with pytest.raises(QuestError, match=r"k0 has an image but no \.cls label"):
        _prepared(_cfg(lonely), tmp_path / "f")
    # more ranks than shards
    data = open_stream(*_open(_cfg(shards), tmp_path / "g"))
    with pytest.raises(QuestError, match="2 test shards cannot feed 3 ranks"):
        StreamLoader(data, "test", train=True, batch_size=9, mean=MEAN, std=STD, world=3)


def test_prepared_format_points_mixed_sizes_and_oversized_data_to_the_stream(
        folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from quest.core.data import sources

    with pytest.raises(QuestError, match="set data.image_size to resize them, or "
                                         "data.format: stream"):
        _prepared(_cfg(folder, "data.format=prepared", "data.image_size=null"), tmp_path / "a")
    monkeypatch.setattr(sources, "_available_memory", lambda: 1 << 20)
    with pytest.raises(QuestError, match=r"80 images of 64x64x3 need about .* GiB to prepare "
                                         r"in memory, 0\.0 GiB is available: set data\.format: "
                                         "stream"):
        _prepared(_cfg(folder, "data.format=prepared"), tmp_path / "b")


def test_data_suite_checks_a_stream(folder: Path, tmp_path: Path) -> None:
    """The Great Expectations data suite on a stream: crops of a sample, the index's counts."""
    from quest.apps.validation import run_validation

    cfg = _cfg(folder)
    _prepared(cfg, tmp_path)
    rep = run_validation("data", cfg, Paths(tmp_path))  # type: ignore[arg-type]
    assert rep["passed"] == rep["evaluated"] > 5
    observed = read_json(tmp_path / "reports" / "validation" / "data.json")["observed"]
    assert observed["images"] == {"train": 60, "test": 20}
    assert observed["class_counts"]["train"]["class003"] == 6


def _quest(args: list[str], cwd: Path, env_extra: dict[str, str] | None = None) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env_extra or {})}
    for key in ("QUEST_DATA_LOCATION", "QUEST_TEACHER_CHECKPOINT", "QUEST_PRESET",
                "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_streaming_pipeline_under_two_torchrun_processes(folder: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An ImageNet-shaped folder (10 classes, 64-160 px of mixed aspect) through prepare,
    features, codebook, a QuEST student epoch and evaluation. torchrun with 2 CPU processes
    launches features and the student: the student trains on both ranks, each reading its own
    share; features runs once, on rank 0, as every stage but the student does (one branch of
    the CLI for all of them). Prepare, codebook and evaluate run in this process: a torchrun
    launch costs three interpreters and torch imports, and checks nothing more for them.
    (Shards take the same stages: the loader tests above.)"""
    from quest.core.checkpoint import save_model_file
    from quest.core.models.zoo import build_model

    cfg = _cfg(folder, "data.workers=1", "student.methods=[quest]",
               "student.train.batch_size=20")
    (tmp_path / "params.yaml").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    torch.manual_seed(0)
    classes = [f"class{c:03d}" for c in range(10)]
    save_model_file(tmp_path / "models" / "teacher" / "teacher.pt", build_model("resnet20", 10),
                    arch="resnet20", num_classes=10, classes=classes, mean=MEAN, std=STD)
    run = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "quest"]
    for key in ("QUEST_DATA_LOCATION", "QUEST_TEACHER_CHECKPOINT", "QUEST_PRESET"):
        monkeypatch.delenv(key, raising=False)  # params.yaml alone, as in the torchrun stages
    for stage in ("prepare", "features", "codebook", "student", "evaluate"):
        if stage in ("features", "student"):
            _quest([*run, stage], tmp_path)
        else:
            assert quest_main([stage, "--root", str(tmp_path)]) == 0, stage
    meta = read_json(tmp_path / "data" / "prepared" / "meta.json")
    assert (meta["format"], meta["kind"]) == ("stream", "folder")
    feats = np.load(tmp_path / "data" / "features" / "teacher_features.npy", mmap_mode="r")
    # 60 images x 16 x 16 positions of layer3 at 64 px, all kept (under max_vectors 20000)
    assert feats.shape == (60 * 16 * 16, 64) and np.isfinite(feats).all()
    assert np.load(tmp_path / "models" / "codebook" / "codebook.npy").shape == (32, 64)
    metrics = read_json(tmp_path / "metrics" / "students" / "quest.json")
    assert metrics["epochs"] == 1 and len(metrics["history"]) == 1
    epoch = metrics["history"][0]
    # the epoch's per-sample means of its terms and monitors (rank 0's share): a term left out
    # of the total, or sums divided by the wrong count, breaks the sum or leaves a range
    assert epoch["ce"] > 0 and epoch["quest"] > 0
    assert epoch["loss"] == pytest.approx(epoch["ce"] + epoch["quest"], rel=1e-5)
    assert 0.0 <= epoch["word_accuracy"] <= 1.0
    assert 1 / 32 <= epoch["mean_max_assignment"] <= 1.0  # a softmax over the 32 words
    assert 1.0 <= epoch["teacher_perplexity"] <= 32.0
    evaluation = read_json(tmp_path / "metrics" / "evaluation.json")
    assert evaluation["num_test_images"] == 20
    assert set(evaluation["models"]) == {"teacher", "quest"}
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    # the student ran on both ranks; features ran on rank 0 alone (rank 1 said so and left)
    assert any(n.startswith("student-") and n.endswith("-rank1.log") for n in logs)
    rank1_features = [n for n in logs if n.startswith("features-") and n.endswith("rank1.log")]
    assert "runs on rank 0 only" in (tmp_path / "logs" / rank1_features[0]).read_text()


@pytest.mark.slow
def test_dvc_tracks_an_external_image_folder_without_copying_it(folder: Path,
                                                               tmp_path: Path) -> None:
    """The README's recipe for large data: `dvc import-url --no-download` records the external
    folder's hash in a .dvc file and copies nothing; `dvc update --no-download` records the
    new hash once the data changes; `quest prepare` indexes the folder where it lies."""
    import shutil

    import yaml

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_STUDIO_OFFLINE": "true",
           "HOME": str(tmp_path / "home"), "GIT_CONFIG_NOSYSTEM": "1",
           "DVC_GLOBAL_CONFIG_DIR": str(tmp_path / "dvc-global"),
           "DVC_SYSTEM_CONFIG_DIR": str(tmp_path / "dvc-system"),
           "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site-cache")}

    def run(*args: str) -> None:
        proc = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"{args}: {proc.stdout}{proc.stderr}"

    external = tmp_path / "mnt" / "images"
    shutil.copytree(folder, external)
    project = tmp_path / "project"
    (project / "data" / "raw").mkdir(parents=True)
    run("git", "init", "-q")
    run(str(bin_dir / "dvc"), "init", "-q")
    run(str(bin_dir / "dvc"), "import-url", "--no-download", str(external), "data/raw/images")
    spec = yaml.safe_load((project / "data" / "raw" / "images.dvc").read_text())
    dep = spec["deps"][0]
    assert (dep["path"], dep["nfiles"]) == (str(external), 80) and dep["md5"].endswith(".dir")
    assert not (project / "data" / "raw" / "images").exists()
    assert not [f for _, _, files in os.walk(project / ".dvc" / "cache") for f in files]
    victim = external / "train" / "class000" / "train_0_00000.jpg"
    Image.new("RGB", (90, 70), (200, 10, 10)).save(victim)
    run(str(bin_dir / "dvc"), "update", "--no-download", "data/raw/images.dvc")
    again = yaml.safe_load((project / "data" / "raw" / "images.dvc").read_text())["deps"][0]
    assert again["md5"] != dep["md5"] and again["nfiles"] == 80
    meta = _open(_cfg(external), project)[1]
    assert meta["location"] == str(external) and meta["counts"]["train"] == 60


@pytest.fixture(scope="module")
def numbered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """3 classes x 6 training PNGs of one flat colour each (blue 10 * id + 5: any crop of an
    image names it) and of mixed sizes, 1 test image per class; returns the folder and each
    training file's id."""
    root = tmp_path_factory.mktemp("numbered") / "images"
    ids: dict[str, int] = {}
    for split, n in (("train", 6), ("test", 1)):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                rel = f"{split}/class{c}/img{i}.png"
                num = len(ids) if split == "train" else 0
                side = 40 + 7 * ((c + i) % 4)
                Image.new("RGB", (side, side + 9), (40 * c, 100, 10 * num + 5)).save(root / rel)
                if split == "train":
                    ids[rel] = num
    return root, ids


def _image_ids(images: torch.Tensor) -> list[int]:
    """The ids the flat colours of a normalised batch name."""
    blue = (images[:, 2].mean(dim=(1, 2)) * STD[2] + MEAN[2]) * 255
    return ((blue - 5) / 10).round().long().tolist()


def _shard_ids(location: Path, shards: list[str]) -> list[int]:
    """The id of each training sample in the order the index promises: the shards in their
    listed order, each in its tar order (read here with tarfile, independently of webdataset)."""
    ids: list[int] = []
    for name in shards:
        with tarfile.open(location / name) as tar:
            for member in tar:
                if member.name.endswith(".png"):
                    fh = tar.extractfile(member)
                    assert fh is not None
                    ids.append(Image.open(io.BytesIO(fh.read())).getpixel((0, 0))[2] // 10)
    return ids


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_training_batches_carry_each_sample_index_whatever_workers_and_ranks(
        source: str, numbered: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    """A training batch's indices are the samples' positions in the split (the folder's file
    list; the shards concatenated in tar order): the same sample has the same index with 0 or
    2 workers and on either of 2 ranks, and the ranks' shares cover the split."""
    folder, ids = numbered
    location = folder
    if source == "shards":
        location = tmp_path / "shards"
        assert write_shards(folder, location, size=5, seed=0)["train"] == 4  # 5 + 5 + 5 + 3
    data = open_stream(*_open(_cfg(location), tmp_path))
    rel_ids = ([ids[rel] for rel, _ in data.items["train"]] if source == "folder"
               else _shard_ids(location, [rel for rel, _ in data.items["train"]]))
    assert sorted(rel_ids) == list(range(18))
    labels = [rel_ids[i] // 6 for i in range(18)]  # classes hold ids 0-5, 6-11, 12-17
    for workers, world in ((0, 1), (2, 1), (0, 2), (2, 2)):
        seen: list[int] = []
        for rank in range(world):
            loader = StreamLoader(data, "train", train=True, batch_size=3 * world, mean=MEAN,
                                  std=STD, seed=4, workers=workers, rank=rank, world=world)
            loader.set_epoch(1)
            for images, y, idx in loader:
                where = (workers, world, rank)
                assert _image_ids(images) == [rel_ids[i] for i in idx.tolist()], where
                assert y.tolist() == [labels[i] for i in idx.tolist()], where
                seen += idx.tolist()
        if source == "folder" or world == workers + 1 == 1:
            # folders: a seeded permutation split over ranks; one reader reads every shard once
            assert sorted(seen) == list(range(18)), (workers, world)
        else:
            assert set(seen) <= set(range(18)) and len(seen) == 18
    # drop_last false (the official transfer sampler): 18 x 2 samples in batches of 8 end with
    # one of 4; on 2 ranks, 18 each in batches of 4 end with one of 2
    for world, sizes in ((1, [8, 8, 8, 8, 4]), (2, [4, 4, 4, 4, 2])):
        for rank in range(world):
            kept = StreamLoader(data, "train", train=True, batch_size=8, mean=MEAN, std=STD,
                                seed=4, repeat=2, rank=rank, world=world, drop_last=False)
            batches = list(kept)
            assert [len(y) for _, y, _ in batches] == sizes and len(kept) == len(sizes)
            assert all(_image_ids(x) == [rel_ids[i] for i in idx.tolist()]
                       for x, _, idx in batches)
