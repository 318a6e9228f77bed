"""The prepared dataset format: uint8 images, int64 labels and a meta.json, written atomically."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from quest.core.data.loader import EpochLoader, InMemoryLoader, make_dataloader
from quest.core.data.source import LoaderSettings, TrainOptions
from quest.infra.errors import QuestError
from quest.infra.io_utils import atomic_path, read_json, write_json_atomic

FORMAT_VERSION = 1
META_FILE = "meta.json"
# Order matters: data_sha256 hashes the arrays' bytes in exactly this order.
ARRAY_FILES = ("train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy")
# The validation split's arrays: written only when it has images (data.validation_per_class),
# and hashed after the four above, so a dataset without one keeps the data_sha256 it had.
VAL_FILES = ("val_images.npy", "val_labels.npy")


@dataclass
class Split:
    """One split of a dataset: images (uint8, N x C x H x W) and labels (int64, N)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        """Number of samples."""
        return int(self.labels.shape[0])


@dataclass
class PreparedDataset:
    """Train and test splits, class names in label order, provenance metadata, and the
    validation split held out of the training pool (None: there is none)."""

    train: Split
    test: Split
    classes: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    val: Split | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    streamed: ClassVar[bool] = False  # quest.core.data.source.ImageData

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        c, h, w = self.train.images.shape[1:]
        return int(c), int(h), int(w)

    def split_size(self, split: str) -> int:
        """Number of images in the train, val or test split (0: no validation split)."""
        part = getattr(self, split)
        return 0 if part is None else len(part)

    def sample_images(self, split: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Up to `n` images of a split (N x C x H x W, uint8) and their labels, a seeded choice
        kept in index order."""
        part = getattr(self, split)
        k = len(part)
        pick = np.sort(np.random.default_rng(seed).choice(k, size=min(n, k), replace=False))
        return np.ascontiguousarray(part.images[pick]), np.asarray(part.labels[pick])

    def train_labels(self) -> np.ndarray:
        """The training split's labels in index order."""
        return self.train.labels

    def fault_summary(self) -> None:
        """None: the prepare stage already skipped (or refused) the corrupt images."""
        return None

    def eval_loader(self, split: str, batch_size: int, s: LoaderSettings) -> InMemoryLoader:
        """Un-augmented batches of a split from memory, in order."""
        part = getattr(self, split)
        return InMemoryLoader(part.images, part.labels, batch_size=batch_size, mean=s.mean,
                              std=s.std, train=False, device=s.device,
                              channels_last=s.channels_last)

    def loaders(self, opt: TrainOptions, s: LoaderSettings) -> tuple[Any, Any]:
        """Training and test loaders of the configured kind: batched tensors in memory, or a
        torch DataLoader with per-sample transforms (`s.kind == "dataloader"`)."""
        common = {"mean": s.mean, "std": s.std, "padding": s.padding, "flip": s.flip,
                  "padding_mode": s.padding_mode}
        if s.kind == "dataloader":
            train = make_dataloader(self.train.images, self.train.labels,
                                    batch_size=opt.batch_size, train=True, seed=opt.seed,
                                    repeat=opt.repeat, drop_last=opt.drop_last, **common)
            test = make_dataloader(self.test.images, self.test.labels, batch_size=256,
                                   train=False, **common)
            return (EpochLoader(train, s.device, s.channels_last),
                    EpochLoader(test, s.device, s.channels_last))
        cl = s.channels_last
        train = InMemoryLoader(self.train.images, self.train.labels, batch_size=opt.batch_size,
                               train=True, seed=opt.seed, device=s.device, channels_last=cl,
                               repeat=opt.repeat, drop_last=opt.drop_last, **common)
        test = InMemoryLoader(self.test.images, self.test.labels, batch_size=256, train=False,
                              device=s.device, channels_last=cl, **common)
        return train, test


def class_counts(labels: np.ndarray, classes: list[str]) -> dict[str, int]:
    """Number of samples per class name, in label order."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    return {name: int(counts[i]) for i, name in enumerate(classes)}


def count_meta(train: Split, test: Split, classes: list[str],
               val: Split | None = None) -> dict[str, Any]:
    """The per-split and per-class count entries of meta, computed from the arrays (the
    validation split's only when it has images)."""
    splits = {"train": train, "test": test}
    if val is not None and len(val):
        splits["val"] = val
    return {
        "counts": {name: len(split) for name, split in splits.items()},
        "class_counts": {name: class_counts(split.labels, classes)
                         for name, split in splits.items()},
    }


def _arrays(ds: PreparedDataset) -> list[np.ndarray]:
    """The arrays data_sha256 covers, in hashing order (the validation split's last, if any)."""
    out = [ds.train.images, ds.train.labels, ds.test.images, ds.test.labels]
    if ds.val is not None and len(ds.val):
        out += [ds.val.images, ds.val.labels]
    return out


def arrays_sha256(ds: PreparedDataset) -> str:
    """SHA-256 over the raw bytes of train images, train labels, test images, test labels, then
    the validation images and labels when there is a validation split."""
    h = hashlib.sha256()
    for arr in _arrays(ds):
        # Hash in slices so a memory-mapped array is never copied whole into memory.
        flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        step = 64 << 20
        for start in range(0, flat.shape[0], step):
            h.update(flat[start : start + step].data)
    return h.hexdigest()


def _check_split(name: str, split: Split, num_classes: int) -> Split:
    """Validate dtypes and shapes before writing; returns the split with int64 labels."""
    images, labels = split.images, np.asarray(split.labels)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"{name} images must be uint8 N x C x H x W, got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} labels must be a 1-D integer array, got {labels.dtype}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{name}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name} labels must lie in [0, {num_classes})")
    return Split(images, labels.astype(np.int64, copy=False))


def save_prepared(ds: PreparedDataset, out_dir: str | Path) -> str:
    """Write the dataset's four arrays and meta.json into out_dir atomically; return data_sha256."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = _check_split("train", ds.train, len(ds.classes))
    test = _check_split("test", ds.test, len(ds.classes))
    if train.images.shape[1:] != test.images.shape[1:]:
        raise ValueError(f"train {train.images.shape[1:]} and test {test.images.shape[1:]} differ")
    val = (_check_split("val", ds.val, len(ds.classes))
           if ds.val is not None and len(ds.val) else None)
    if val is not None and val.images.shape[1:] != train.images.shape[1:]:
        raise ValueError(f"val {val.images.shape[1:]} and train {train.images.shape[1:]} differ")
    checked = PreparedDataset(train, test, list(ds.classes), ds.meta, val)
    digest = arrays_sha256(checked)
    # Every array goes to a temporary file first: a failing write (a full disk) removes them
    # and leaves the previous version whole. Only then is meta.json, the commit marker, dropped
    # and the arrays renamed into place (leaving the stack renames them), so that a crash
    # during the renames leaves a directory that load_prepared reports as unprepared, never a
    # mixed one.
    files = ARRAY_FILES + (VAL_FILES if val is not None else ())
    with contextlib.ExitStack() as stack:
        for fname, arr in zip(files, _arrays(checked), strict=True):
            tmp = stack.enter_context(atomic_path(out / fname))
            with open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)
        (out / META_FILE).unlink(missing_ok=True)
        if val is None:  # an earlier preparation's validation split is not this one's
            for fname in VAL_FILES:
                (out / fname).unlink(missing_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "data_sha256": digest,
        "classes": list(ds.classes),
        "num_classes": len(ds.classes),
        "image_shape": list(checked.image_shape),
    }
    meta.update({k: v for k, v in ds.meta.items() if k not in meta})
    meta.update(count_meta(train, test, list(ds.classes), val))
    write_json_atomic(out / META_FILE, meta)
    return digest


def _read_meta(out: Path) -> dict[str, Any]:
    """Read meta.json, turning a missing or damaged file into a QuestError."""
    path = out / META_FILE
    if not out.is_dir():
        raise QuestError(f"no prepared data at {out}: run `quest prepare` first")
    if not path.is_file():
        raise QuestError(f"prepared data incomplete: {path} is missing; run `quest prepare` first")
    try:
        meta = read_json(path)
    except (OSError, ValueError) as err:
        raise QuestError(f"cannot read {path} ({err}): run `quest prepare` again") from err
    if not isinstance(meta, dict) or "data_sha256" not in meta or "classes" not in meta:
        raise QuestError(f"{path} is not a quest meta.json: run `quest prepare` again")
    return meta


def load_prepared(out_dir: str | Path, mmap: bool = False, verify: bool = False) -> PreparedDataset:
    """Load a prepared dataset; mmap maps the arrays read-only, verify re-checks data_sha256."""
    out = Path(out_dir)
    meta = _read_meta(out)
    arrays = []
    # meta's counts name a validation split when one was written
    has_val = int(meta.get("counts", {}).get("val", 0) or 0) > 0
    for fname in ARRAY_FILES + (VAL_FILES if has_val else ()):
        path = out / fname
        if not path.is_file():
            raise QuestError(
                f"prepared data incomplete: {path} is missing; run `quest prepare` first"
            )
        try:
            arrays.append(np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False))
        except (OSError, ValueError) as err:
            raise QuestError(f"cannot read {path} ({err}): run `quest prepare` again") from err
    train = Split(arrays[0], arrays[1])
    test = Split(arrays[2], arrays[3])
    val = Split(arrays[4], arrays[5]) if has_val else None
    for name, split in (("train", train), ("test", test), ("val", val)):
        if split is None:
            continue
        if split.images.shape[0] != split.labels.shape[0]:
            raise QuestError(
                f"prepared {name} split in {out} has {split.images.shape[0]} images but "
                f"{split.labels.shape[0]} labels: run `quest prepare` again"
            )
    classes = [str(c) for c in meta["classes"]]
    ds = PreparedDataset(train, test, classes, {k: v for k, v in meta.items() if k != "classes"},
                         val)
    if verify and arrays_sha256(ds) != meta["data_sha256"]:
        raise QuestError(
            f"prepared data in {out} does not match the data_sha256 in its meta.json "
            "(files changed or damaged): run `quest prepare` again"
        )
    return ds


def data_hash(out_dir: str | Path) -> str:
    """The data_sha256 recorded in out_dir/meta.json."""
    return str(_read_meta(Path(out_dir))["data_sha256"])
