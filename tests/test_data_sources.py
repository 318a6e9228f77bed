"""Data sources (CIFAR pickles, image folders, archives) and the prepared on-disk format."""

from __future__ import annotations

import errno
import io
import logging
import os
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from quest.core.data import (
    PreparedDataset,
    Split,
    data_hash,
    load_prepared,
    prepare_dataset,
    save_prepared,
    smoke_subset,
)
from quest.core.data.prepared import ARRAY_FILES, arrays_sha256
from quest.core.data.sources import DATA_LOCATION_ENV
from quest.infra.errors import QuestError

SHARED = Path(
    os.environ.get("QUEST_SHARED_DIR", Path(__file__).resolve().parents[1].parent / "shared")
)
CIFAR10_JPEG = SHARED / "data" / "cifar10-jpeg.tar.gz"
CIFAR10_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# CIFAR pickles, written the way the official archives were: Python 2 cPickle, protocol 2
# --------------------------------------------------------------------------------------------


class Py2StylePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes str/bytes as Python 2 byte strings and numpy's pre-2.0 module path.

    The official CIFAR pickles come from Python 2, so their keys and the array payload are
    py2 `str` opcodes that torchvision decodes with encoding='latin1', and the array is rebuilt
    through numpy.core.multiarray._reconstruct.
    """

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def py2_pickle(obj: Any) -> bytes:
    buf = io.BytesIO()
    Py2StylePickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def fake_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar100(root: Path, n_train: int = 12, n_test: int = 6, n_classes: int = 5) -> dict:
    """A tiny cifar-100-python folder in the official format; returns what was written."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written: dict[str, Any] = {"names": [f"fine_{i}" for i in range(n_classes)]}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = fake_rows(n, seed=len(split))
        fine = rng.integers(0, n_classes, size=n).tolist()
        entry = {
            "filenames": [f"img_{i}.png" for i in range(n)],
            "batch_label": f"{split}ing batch 1 of 1",
            "fine_labels": fine,
            "coarse_labels": [f // 2 for f in fine],
            "data": rows,
        }
        (folder / split).write_bytes(py2_pickle(entry))
        written[split] = (rows, fine)
    meta = {"fine_label_names": written["names"], "coarse_label_names": ["c0", "c1", "c2"]}
    (folder / "meta").write_bytes(py2_pickle(meta))
    return written


def write_cifar10(root: Path, style: str, per_batch: int = 4) -> dict:
    """A tiny cifar-10-batches-py folder.

    style: 'py2' as the official files (Python 2 str keys), 'py3' (str keys, protocol 5, which
    torchvision also reads) or 'bytes' (bytes keys, as left by a load with encoding='bytes' and
    a re-pickle; torchvision cannot read those, we accept them).
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = CIFAR10_NAMES

    def dump(obj: dict) -> bytes:
        if style == "py2":
            return py2_pickle(obj)
        if style == "py3":
            return pickle.dumps(obj, protocol=5)  # arrays go through numpy's _frombuffer
        return pickle.dumps({k.encode(): v for k, v in obj.items()}, protocol=5)

    written: dict[str, Any] = {"train": ([], []), "test": ([], [])}
    batches = [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "test")]
    for i, (fname, split) in enumerate(batches):
        rows = fake_rows(per_batch, seed=10 + i)
        labels = [(i + j) % 10 for j in range(per_batch)]
        entry = {"batch_label": fname, "labels": labels, "data": rows, "filenames": ["x"] * 4}
        (folder / fname).write_bytes(dump(entry))
        written[split][0].append(rows)
        written[split][1].extend(labels)
    label_names = [n.encode() for n in names] if style == "bytes" else names
    meta = {"num_cases_per_batch": per_batch, "label_names": label_names, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(dump(meta))
    return {s: (np.concatenate(r), lab) for s, (r, lab) in written.items()}


def test_cifar100_reads_torchvision_layout(tmp_path: Path) -> None:
    written = write_cifar100(tmp_path)
    ds = prepare_dataset("cifar100", str(tmp_path), progress=False)
    assert ds.classes == written["names"]
    for split, n in ((ds.train, 12), (ds.test, 6)):
        assert split.images.shape == (n, 3, 32, 32) and split.images.dtype == np.uint8
        assert split.labels.dtype == np.int64
    rows, fine = written["train"]
    np.testing.assert_array_equal(ds.train.labels, fine)
    # Row layout is R plane, G plane, B plane: pixel (y=1, x=2) of channel g is at g*1024+34.
    np.testing.assert_array_equal(ds.train.images[3], rows[3].reshape(3, 32, 32))
    assert ds.train.images[3, 1, 1, 2] == rows[3][1024 + 32 + 2]
    np.testing.assert_array_equal(ds.test.labels, written["test"][1])
    assert ds.meta["source"] == "cifar100" and ds.meta["counts"] == {"train": 12, "test": 6}
    assert sum(ds.meta["class_counts"]["train"].values()) == 12
    # Pointing at the cifar-100-python folder itself works too.
    again = prepare_dataset("cifar100", str(tmp_path / "cifar-100-python"), progress=False)
    np.testing.assert_array_equal(again.test.images, ds.test.images)


@pytest.mark.parametrize("style", ["py2", "py3", "bytes"])
def test_cifar10_reads_str_and_bytes_keys(tmp_path: Path, style: str) -> None:
    written = write_cifar10(tmp_path, style)
    ds = prepare_dataset("cifar10", str(tmp_path), progress=False)
    assert ds.classes == CIFAR10_NAMES
    assert ds.train.images.shape == (20, 3, 32, 32)
    assert ds.test.images.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(ds.train.images.reshape(20, -1), written["train"][0])
    np.testing.assert_array_equal(ds.train.labels, written["train"][1])
    np.testing.assert_array_equal(ds.test.labels, written["test"][1])


@pytest.mark.parametrize(
    ("source", "style"), [("cifar100", "py2"), ("cifar10", "py2"), ("cifar10", "py3")]
)
def test_cifar_matches_torchvision_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, style: str
) -> None:
    """torchvision's own CIFAR classes read the test files the same way (md5 check bypassed)."""
    import torchvision.datasets.cifar as tv_cifar

    if source == "cifar100":
        write_cifar100(tmp_path)
    else:
        write_cifar10(tmp_path, style)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    tv_cls = tv_cifar.CIFAR100 if source == "cifar100" else tv_cifar.CIFAR10
    ours = prepare_dataset(source, str(tmp_path), progress=False)
    for split, train in ((ours.train, True), (ours.test, False)):
        tv = tv_cls(str(tmp_path), train=train, download=False)
        np.testing.assert_array_equal(split.images, tv.data.transpose(0, 3, 1, 2))
        np.testing.assert_array_equal(split.labels, tv.targets)
        assert ours.classes == tv.classes


def test_cifar_channels_and_resize(tmp_path: Path) -> None:
    write_cifar10(tmp_path, "py2")
    rgb = prepare_dataset("cifar10", str(tmp_path), progress=False)
    gray = prepare_dataset("cifar10", str(tmp_path), channels=1, progress=False)
    assert gray.train.images.shape == (20, 1, 32, 32)
    # Same luma as Pillow's convert('L'), so CIFAR and image folders agree.
    pil_l = np.asarray(Image.fromarray(rgb.train.images[0].transpose(1, 2, 0)).convert("L"))
    np.testing.assert_array_equal(gray.train.images[0, 0], pil_l)
    small = prepare_dataset("cifar10", str(tmp_path), image_size=16, progress=False)
    assert small.train.images.shape == (20, 3, 16, 16)
    assert small.meta["image_size"] == [16, 16]


def test_cifar_missing_files_and_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(QuestError, match="cifar-100-python") as err:
        prepare_dataset("cifar100", str(tmp_path), progress=False)
    assert "\n" not in str(err.value)
    monkeypatch.delenv(DATA_LOCATION_ENV, raising=False)
    with pytest.raises(QuestError, match=DATA_LOCATION_ENV):
        prepare_dataset("cifar10", None, progress=False)
    write_cifar10(tmp_path, "py2")
    monkeypatch.setenv(DATA_LOCATION_ENV, str(tmp_path))
    assert len(prepare_dataset("cifar10", None, progress=False).train) == 20


def test_cifar_download_failure_and_success(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    def offline(root: str, train: bool, download: bool) -> None:
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(QuestError, match="could not download CIFAR-100") as err:
        prepare_dataset("cifar100", str(tmp_path / "root"), download=True, progress=False)
    assert DATA_LOCATION_ENV in str(err.value) and "cifar-100-python" in str(err.value)

    calls = []

    def fake_download(root: str, train: bool, download: bool) -> None:
        calls.append(train)
        if not (Path(root) / "cifar-10-batches-py").exists():
            write_cifar10(Path(root), "py2")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_download)
    ds = prepare_dataset("cifar10", str(tmp_path / "dl"), download=True, progress=False)
    assert calls and len(ds.train) == 20


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


class _CallsEval:
    def __reduce__(self) -> tuple:
        return (eval, ("1+1",))


@pytest.mark.parametrize("kind", ["system", "eval"])
def test_malicious_pickle_is_refused(tmp_path: Path, kind: str) -> None:
    write_cifar10(tmp_path, "py2")
    marker = tmp_path / "pwned"
    payload = _RunsShell(marker) if kind == "system" else _CallsEval()
    evil = {"data": payload, "labels": [0]}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(QuestError, match="refusing to unpickle") as err:
        prepare_dataset("cifar10", str(tmp_path), progress=False)
    # Protocol 2 names builtins "__builtin__"; either way the callable is named.
    assert ("posix.system" if kind == "system" else "builtin__.eval") in str(err.value)
    assert not marker.exists()


def test_damaged_pickle_is_reported(tmp_path: Path) -> None:
    write_cifar10(tmp_path, "py2")
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(QuestError, match="data_batch_3.*damaged"):
        prepare_dataset("cifar10", str(tmp_path), progress=False)


# --------------------------------------------------------------------------------------------
# Image folders and archives
# --------------------------------------------------------------------------------------------

CLASSES = ["bird", "cat", "dog"]  # created in non-alphabetical order below on purpose


def image_bytes(mode: str, size: tuple[int, int], seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "P":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("P")
    else:
        bands = len(Image.new(mode, (1, 1)).getbands())
        arr = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
        img = Image.fromarray(arr[:, :, 0] if bands == 1 else arr, mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def folder_files(sizes: dict[str, tuple[int, int]] | None = None) -> dict[str, bytes]:
    """relative path -> bytes for a small train/test tree; PNG and JPEG, L, RGBA and P images."""
    files: dict[str, bytes] = {}
    seed = 0
    for split, per_class in (("train", 3), ("test", 2)):
        for cls in ("dog", "bird", "cat"):
            for i in range(per_class):
                seed += 1
                name = f"{split}/{cls}/{i:03d}"
                size = (sizes or {}).get(name, (8, 8))
                if (split, cls, i) == ("train", "cat", 1):
                    files[name + ".png"] = image_bytes("L", size, seed, "PNG")
                elif (split, cls, i) == ("train", "dog", 2):
                    files[name + ".png"] = image_bytes("RGBA", size, seed, "PNG")
                elif (split, cls, i) == ("test", "bird", 0):
                    files[name + ".png"] = image_bytes("P", size, seed, "PNG")
                elif i % 2:
                    files[name + ".jpg"] = image_bytes("RGB", size, seed, "JPEG")
                else:
                    files[name + ".png"] = image_bytes("RGB", size, seed, "PNG")
    return files


def write_dir(root: Path, files: dict[str, bytes], dirs: tuple[str, ...] = ()) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    return root


def write_tar(path: Path, files: dict[str, bytes], extra: Sequence[tarfile.TarInfo] = ()) -> Path:
    mode = "w:gz" if path.name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as tf:
        for rel, data in files.items():
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return path


def write_zip(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for rel, data in files.items():
            zf.writestr(rel, data)
        for rel, target in (links or {}).items():
            info = zipfile.ZipInfo(rel)
            info.create_system = 3
            info.external_attr = 0o120777 << 16  # S_IFLNK: content is the link target
            zf.writestr(info, target)
    return path


def make_source(tmp_path: Path, kind: str, files: dict[str, bytes]) -> Path:
    if kind == "dir":
        return write_dir(tmp_path / "imgs", files)
    if kind == "tar.gz":
        # Wrapped in one top-level folder, like cifar10-jpeg/train/...
        return write_tar(tmp_path / "imgs.tar.gz", {f"wrap/{k}": v for k, v in files.items()})
    if kind == "tar":
        return write_tar(tmp_path / "imgs.tar", files)
    return write_zip(tmp_path / "imgs.zip", files)


@pytest.mark.parametrize("kind", ["dir", "tar.gz", "tar", "zip"])
def test_image_folder_sources(tmp_path: Path, kind: str) -> None:
    files = folder_files()
    ds = prepare_dataset("image_folder", str(make_source(tmp_path, kind, files)), progress=False)
    assert ds.classes == CLASSES
    assert ds.train.images.shape == (9, 3, 8, 8) and ds.train.images.dtype == np.uint8
    assert ds.test.images.shape == (6, 3, 8, 8)
    np.testing.assert_array_equal(ds.train.labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(ds.test.labels, [0, 0, 1, 1, 2, 2])
    assert ds.train.labels.dtype == np.int64
    assert ds.meta["counts"] == {"train": 9, "test": 6}
    assert ds.meta["class_counts"]["test"] == {"bird": 2, "cat": 2, "dog": 2}
    assert ds.meta["input_modes"] == {"L": 1, "P": 1, "RGB": 12, "RGBA": 1}
    assert ds.meta["channels"] == 3 and ds.meta["image_size"] == [8, 8]
    assert ds.meta["skipped"]["count"] == 0
    # Grayscale is replicated: train/cat/001.png (label 1, second image) has equal channels.
    gray = ds.train.images[4]
    np.testing.assert_array_equal(gray[0], gray[1])
    np.testing.assert_array_equal(
        gray[0], np.asarray(Image.open(io.BytesIO(files["train/cat/001.png"])))
    )
    # A lossless RGB PNG comes through exactly, in CHW order.
    png = np.asarray(Image.open(io.BytesIO(files["train/bird/000.png"])))
    np.testing.assert_array_equal(ds.train.images[0], png.transpose(2, 0, 1))
    # RGBA: alpha dropped, colour kept.
    rgba = np.asarray(Image.open(io.BytesIO(files["train/dog/002.png"])))
    np.testing.assert_array_equal(ds.train.images[8], rgba[:, :, :3].transpose(2, 0, 1))


def test_archive_and_folder_give_identical_arrays(tmp_path: Path) -> None:
    files = folder_files()
    a = prepare_dataset("image_folder", str(make_source(tmp_path, "dir", files)), progress=True)
    # Members stored in reverse order must not change the result.
    reversed_files = dict(reversed(list(files.items())))
    b = prepare_dataset(
        "image_folder", str(make_source(tmp_path, "zip", reversed_files)), progress=False
    )
    for x, y in ((a.train, b.train), (a.test, b.test)):
        np.testing.assert_array_equal(x.images, y.images)
        np.testing.assert_array_equal(x.labels, y.labels)


def test_image_folder_grayscale_and_resize(tmp_path: Path) -> None:
    sizes = {"train/dog/000": (40, 30), "test/cat/001": (5, 12)}
    files = folder_files(sizes)
    src = make_source(tmp_path, "tar.gz", files)
    with pytest.raises(QuestError, match=r"different sizes \((8x8 and 40x30|40x30 and 8x8)") as err:
        prepare_dataset("image_folder", str(src), progress=False)
    assert "data.image_size" in str(err.value)
    ds = prepare_dataset("image_folder", str(src), image_size=16, progress=False)
    assert ds.train.images.shape == (9, 3, 16, 16) and ds.test.images.shape == (6, 3, 16, 16)
    assert ds.meta["resize"] == "bilinear to 16x16"
    big = Image.open(io.BytesIO(files["train/dog/000.png"])).convert("RGB")
    expected = np.asarray(big.resize((16, 16), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    np.testing.assert_array_equal(ds.train.images[6], expected)
    gray = prepare_dataset("image_folder", str(src), image_size=6, channels=1, progress=False)
    assert gray.train.images.shape == (9, 1, 6, 6)
    assert "convert('L')" in gray.meta["grayscale_handling"]


@pytest.mark.parametrize("kind", ["dir", "zip"])
def test_corrupt_file_skip_or_fail(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    files = folder_files()
    files["train/cat/bad.jpg"] = b"\xff\xd8\xff\xe0 definitely not a jpeg"
    files["test/dog/notes.txt"] = b"hello"
    files["train/.DS_Store"] = b"\0\0\0\1Bud1"  # hidden files are never data
    src = make_source(tmp_path, kind, files)
    with caplog.at_level(logging.WARNING, logger="quest.core.data.sources"):
        ds = prepare_dataset("image_folder", str(src), progress=False)
    assert len(ds.train) == 9 and len(ds.test) == 6
    assert ds.meta["skipped"]["count"] == 2
    assert sorted(ds.meta["skipped"]["files"]) == ["test/dog/notes.txt", "train/cat/bad.jpg"]
    assert ds.meta["ignored"]["files"] == ["train/.DS_Store"]
    assert "bad.jpg" in caplog.text and "notes.txt" in caplog.text
    with pytest.raises(QuestError, match=r"set data.on_corrupt: skip to skip it") as err:
        prepare_dataset("image_folder", str(src), on_corrupt="fail", progress=False)
    assert ("bad.jpg" in str(err.value)) or ("notes.txt" in str(err.value))


@pytest.mark.parametrize("kind", ["dir", "tar.gz"])
def test_val_folder_is_the_test_split_when_there_is_no_test_folder(tmp_path: Path,
                                                                   kind: str) -> None:
    """ImageNet's own layout, train/ + val/, reads as train + test; test/ wins over val/."""
    from quest.core.data.stream import scan_folder

    files = folder_files()
    as_val = {("val/" + k[5:] if k.startswith("test/") else k): v for k, v in files.items()}
    ref = prepare_dataset("image_folder", str(write_dir(tmp_path / "ref", files)),
                          progress=False)
    ds = prepare_dataset("image_folder", str(make_source(tmp_path, kind, as_val)), progress=False)
    assert len(ds.train) == len(ref.train) and len(ds.test) == len(ref.test)
    assert np.array_equal(ds.test.images, ref.test.images)
    assert np.array_equal(ds.test.labels, ref.test.labels)
    both = {**files, "val/cat/extra.png": files[next(k for k in files if k.startswith("test/"))]}
    root = write_dir(tmp_path / "both", both)
    assert len(prepare_dataset("image_folder", str(root), progress=False).test) == len(ref.test)
    if kind == "dir":  # the streaming path indexes the same files
        test_items = scan_folder(tmp_path / "imgs", "skip").items["test"]
        ref_items = scan_folder(tmp_path / "ref", "skip").items["test"]
        assert sorted(test_items) == sorted(("val/" + r[5:], lab) for r, lab in ref_items)
    bad = {k: v for k, v in as_val.items() if not k.startswith("val/dog/")}
    with pytest.raises(QuestError, match=r"val/ and train/ must have the same class folders"):
        prepare_dataset("image_folder", str(write_dir(tmp_path / "bad", bad)), progress=False)


def test_layout_errors(tmp_path: Path) -> None:
    files = folder_files()
    no_train = {k: v for k, v in files.items() if not k.startswith("train/")}
    with pytest.raises(QuestError, match=r"has no train/ folder"):
        prepare_dataset("image_folder", str(write_dir(tmp_path / "a", no_train)), progress=False)
    no_test = {k: v for k, v in files.items() if not k.startswith("test/")}
    with pytest.raises(QuestError, match=r"has no test/ folder"):
        prepare_dataset("image_folder", str(write_tar(tmp_path / "b.tgz", no_test)))
    with pytest.raises(QuestError, match=r"has no train/ and test/ folders"):
        prepare_dataset("image_folder", str(write_dir(tmp_path / "c", {"x/y.png": b"1"})))
    # An empty class folder, in a directory and in a zip holding only the folder entry.
    src = write_dir(tmp_path / "d", files, dirs=("train/fish", "test/fish"))
    with pytest.raises(QuestError, match=r"train/fish .*no readable images"):
        prepare_dataset("image_folder", str(src), progress=False)
    zpath = write_zip(tmp_path / "e.zip", files)
    with zipfile.ZipFile(zpath, "a") as zf:
        zf.writestr("train/fish/", b"")
        zf.writestr("test/fish/", b"")
    with pytest.raises(QuestError, match=r"train/fish .*no readable images"):
        prepare_dataset("image_folder", str(zpath), progress=False)
    # A class whose only file is unreadable is empty too.
    broken = dict(files, **{"train/eel/x.jpg": b"junk", "test/eel/y.jpg": b"junk"})
    with pytest.raises(QuestError, match=r"train/eel .*all 1 files unreadable"):
        prepare_dataset("image_folder", str(write_dir(tmp_path / "f", broken)), progress=False)
    mismatch = dict(files, **{"train/eel/x.png": files["train/cat/000.png"]})
    with pytest.raises(QuestError, match=r"only in train: \['eel'\]"):
        prepare_dataset("image_folder", str(write_dir(tmp_path / "g", mismatch)), progress=False)
    with pytest.raises(QuestError, match="does not exist"):
        prepare_dataset("image_folder", str(tmp_path / "nowhere"), progress=False)
    rar = tmp_path / "data.rar"
    rar.write_bytes(b"Rar!")
    with pytest.raises(QuestError, match="unsupported archive type"):
        prepare_dataset("image_folder", str(rar), progress=False)
    broken_gz = tmp_path / "broken.tar.gz"
    broken_gz.write_bytes(b"\x1f\x8b\x08 truncated")
    with pytest.raises(QuestError, match="cannot read archive"):
        prepare_dataset("image_folder", str(broken_gz), progress=False)


def test_bad_options_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(QuestError, match="unknown data source 'svhn'"):
        prepare_dataset("svhn", str(tmp_path))
    with pytest.raises(QuestError, match="data.on_corrupt"):
        prepare_dataset("image_folder", str(tmp_path), on_corrupt="ignore")
    with pytest.raises(QuestError, match="data.channels"):
        prepare_dataset("image_folder", str(tmp_path), channels=4)
    with pytest.raises(QuestError, match="data.image_size"):
        prepare_dataset("image_folder", str(tmp_path), image_size=0)


def _link(name: str, target: str, hard: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info


@pytest.mark.parametrize(
    ("member", "message"),
    [
        ("../evil", "'..' component"),
        ("train/cat/../../../evil.png", "'..' component"),
        ("/etc/evil.png", "absolute path"),
    ],
)
def test_tar_member_names_are_validated(tmp_path: Path, member: str, message: str) -> None:
    files = dict(folder_files(), **{member: image_bytes("RGB", (8, 8), 0, "PNG")})
    src = write_tar(tmp_path / "evil.tar.gz", files)
    with pytest.raises(QuestError, match=message):
        prepare_dataset("image_folder", str(src), progress=False)
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


@pytest.mark.parametrize(
    "link",
    [
        _link("train/cat/passwd.png", "../../../etc/passwd"),
        _link("train/cat/abs.png", "/etc/passwd"),
        _link("train/cat/hard.png", "../outside.png", hard=True),
    ],
)
def test_tar_links_escaping_are_refused(tmp_path: Path, link: tarfile.TarInfo) -> None:
    src = write_tar(tmp_path / "links.tar", folder_files(), extra=[link])
    with pytest.raises(QuestError, match="refusing archive .*(outside|absolute)"):
        prepare_dataset("image_folder", str(src), progress=False)


def test_zip_escapes_are_refused(tmp_path: Path) -> None:
    src = write_zip(tmp_path / "l.zip", folder_files(), links={"train/cat/x.png": "../../../x"})
    with pytest.raises(QuestError, match="points outside the archive"):
        prepare_dataset("image_folder", str(src), progress=False)
    src = write_zip(tmp_path / "d.zip", dict(folder_files(), **{"../evil.png": b"x"}))
    with pytest.raises(QuestError, match="'..' component"):
        prepare_dataset("image_folder", str(src), progress=False)


def test_links_inside_the_archive_are_followed(tmp_path: Path) -> None:
    links = [
        _link("train/cat/copy.png", "000.png"),
        _link("test/cat/hard.png", "train/cat/000.png", hard=True),
    ]
    ds = prepare_dataset(
        "image_folder", str(write_tar(tmp_path / "ok.tar", folder_files(), links)), progress=False
    )
    assert ds.meta["class_counts"]["train"]["cat"] == 4
    assert ds.meta["class_counts"]["test"]["cat"] == 3
    zsrc = write_zip(tmp_path / "ok.zip", folder_files(), links={"train/cat/copy.png": "000.png"})
    zds = prepare_dataset("image_folder", str(zsrc), progress=False)
    assert zds.meta["class_counts"]["train"]["cat"] == 4
    np.testing.assert_array_equal(zds.train.images[3], zds.train.images[6])  # 000 and copy


# --------------------------------------------------------------------------------------------
# Prepared format
# --------------------------------------------------------------------------------------------


def tiny_dataset() -> PreparedDataset:
    rng = np.random.default_rng(0)
    train = Split(rng.integers(0, 256, (12, 3, 4, 4), dtype=np.uint8), np.arange(12) % 3)
    test = Split(rng.integers(0, 256, (6, 3, 4, 4), dtype=np.uint8), np.arange(6) % 3)
    return PreparedDataset(
        train, test, ["a", "b", "c"], {"source": "test", "skipped": {"count": 0}}
    )


@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_roundtrip(tmp_path: Path, mmap: bool) -> None:
    ds = tiny_dataset()
    digest = save_prepared(ds, tmp_path / "prep")
    assert sorted(p.name for p in (tmp_path / "prep").iterdir()) == sorted(
        [*ARRAY_FILES, "meta.json"]
    )
    back = load_prepared(tmp_path / "prep", mmap=mmap, verify=True)
    assert isinstance(back.train.images, np.memmap) == mmap
    for a, b in ((ds.train, back.train), (ds.test, back.test)):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert b.labels.dtype == np.int64
    assert back.classes == ["a", "b", "c"]
    assert back.meta["source"] == "test" and back.meta["counts"] == {"train": 12, "test": 6}
    assert back.meta["class_counts"]["train"] == {"a": 4, "b": 4, "c": 4}
    assert data_hash(tmp_path / "prep") == digest == arrays_sha256(ds) == back.meta["data_sha256"]
    # Saving again (e.g. from the loaded copy) gives the same hash and still no stray files.
    assert save_prepared(back, tmp_path / "prep") == digest
    assert not [p for p in (tmp_path / "prep").iterdir() if p.name.endswith(".tmp")]


def test_changed_data_changes_hash_and_fails_verify(tmp_path: Path) -> None:
    ds = tiny_dataset()
    digest = save_prepared(ds, tmp_path / "p")
    ds.train.images[0, 0, 0, 0] ^= 1
    assert arrays_sha256(ds) != digest
    np.save(tmp_path / "p" / "train_images.npy", ds.train.images)  # tampered behind our back
    assert len(load_prepared(tmp_path / "p").train) == 12  # verify is opt-in
    with pytest.raises(QuestError, match="does not match the data_sha256"):
        load_prepared(tmp_path / "p", verify=True)


def test_failed_save_leaves_no_partial_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "prep"
    save_prepared(tiny_dataset(), out)  # an older, complete version is there first
    calls = {"n": 0}
    real_save = np.save

    def flaky_save(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(*args, **kwargs)

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(np, "save", flaky_save)
    newer = tiny_dataset()
    newer.train.images[0, 0, 0, 0] ^= 1
    with pytest.raises(QuestError, match="cannot write .*No space left on device"):
        save_prepared(newer, out)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    # the arrays are written to temporary files first: the older version is still whole
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert len(load_prepared(out, verify=True).train) == 12


def test_load_missing_is_a_quest_error(tmp_path: Path) -> None:
    with pytest.raises(QuestError, match="run `quest prepare` first"):
        load_prepared(tmp_path / "absent")
    with pytest.raises(QuestError, match="run `quest prepare` first"):
        data_hash(tmp_path / "absent")
    save_prepared(tiny_dataset(), tmp_path / "p")
    (tmp_path / "p" / "test_images.npy").unlink()
    with pytest.raises(QuestError, match="test_images.npy is missing; run `quest prepare` first"):
        load_prepared(tmp_path / "p")


def test_smoke_subset_is_balanced_and_seeded() -> None:
    ds = tiny_dataset()
    sub = smoke_subset(ds, train_per_class=2, test_per_class=1, seed=3)
    assert np.bincount(sub.train.labels).tolist() == [2, 2, 2]
    assert np.bincount(sub.test.labels).tolist() == [1, 1, 1]
    again = smoke_subset(ds, 2, 1, seed=3)
    np.testing.assert_array_equal(sub.train.images, again.train.images)
    whole_test = smoke_subset(ds, 1, None, seed=0)
    assert len(whole_test.train) == 3 and whole_test.test.images is ds.test.images
    with pytest.raises(QuestError, match="fewer than the 5 per class"):
        smoke_subset(ds, 5, 1, seed=0)


# --------------------------------------------------------------------------------------------
# The real CIFAR-10 JPEG archive
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar10_jpeg() -> PreparedDataset:
    # How long this takes is measured by benchmarks/prepare_cifar10.py, not asserted here.
    assert CIFAR10_JPEG.is_file(), f"missing {CIFAR10_JPEG}: set QUEST_SHARED_DIR"
    return prepare_dataset("image_folder", str(CIFAR10_JPEG), progress=False)


@pytest.mark.slow
def test_real_cifar10_jpeg_archive(cifar10_jpeg: PreparedDataset) -> None:
    ds = cifar10_jpeg
    assert ds.classes == CIFAR10_NAMES == sorted(CIFAR10_NAMES)
    assert ds.train.images.shape == (50_000, 3, 32, 32)
    assert ds.test.images.shape == (10_000, 3, 32, 32)
    assert np.bincount(ds.train.labels).tolist() == [5000] * 10
    assert np.bincount(ds.test.labels).tolist() == [1000] * 10
    assert ds.meta["skipped"]["count"] == 0 and ds.meta["root_in_source"] == "cifar10-jpeg"
    # Channel means documented for this archive in shared/data/README.md.
    means = ds.train.images.mean(axis=(0, 2, 3)) / 255.0
    np.testing.assert_allclose(means, [0.4913, 0.4821, 0.4465], atol=5e-4)


def test_real_cifar10_smoke_subset(cifar10_jpeg: PreparedDataset) -> None:
    ds = cifar10_jpeg
    sub = smoke_subset(ds, train_per_class=50, test_per_class=10, seed=0)
    assert np.bincount(sub.train.labels, minlength=10).tolist() == [50] * 10
    assert np.bincount(sub.test.labels, minlength=10).tolist() == [10] * 10
    assert sub.classes == ds.classes
    assert sub.meta["counts"] == {"train": 500, "test": 100}
    assert sub.meta["subset"] == {"train_per_class": 50, "test_per_class": 10, "seed": 0}
    again = smoke_subset(ds, 50, 10, seed=0)
    other = smoke_subset(ds, 50, 10, seed=1)
    np.testing.assert_array_equal(sub.train.images, again.train.images)
    assert not np.array_equal(sub.train.images, other.train.images)
    # Every subset image is an image of the source, with the source's label.
    first_bird = int(np.flatnonzero(sub.train.labels == 2)[0])
    hits = np.flatnonzero((ds.train.images == sub.train.images[first_bird]).all(axis=(1, 2, 3)))
    assert hits.size >= 1 and (ds.train.labels[hits] == 2).all()
