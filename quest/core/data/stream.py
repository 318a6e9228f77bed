"""Streaming data: image folders and WebDataset tar shards, decoded batch by batch.

For data that does not fit in memory, or whose images differ in size (ImageNet), the prepare
stage writes an index instead of arrays (data/prepared/meta.json with ``"format": "stream"``,
plus the file lists), and the loaders decode images in DataLoader worker processes:

- training: RandomResizedCrop to ``image_size``, horizontal flip, normalise
  (torchvision.transforms.v2);
- evaluation and teacher features: resize to ``image_size / eval_crop_ratio``, center-crop,
  normalise.

Every random draw is seeded by (seed, epoch, sample), so an epoch's batches do not depend on
worker scheduling or on whether the run was interrupted: a resumed run continues where it
stopped. Under torchrun each rank reads its own share: a disjoint slice of a seeded permutation
of the images (folders) or of the shards (tar archives, read with the `webdataset` library).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from quest.core.data.source import LoaderSettings, TrainOptions
from quest.infra.errors import QuestError

FORMAT = "stream"
SPLITS = ("train", "test")
LIST_FILES = {"train": "train.tsv", "test": "test.tsv"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")


# --------------------------------------------------------------------------------------------
# The index: which images (or shards) belong to which split and class
# --------------------------------------------------------------------------------------------


@dataclass
class StreamIndex:
    """What the prepare stage finds: classes, and per split the images (folder: relative path
    and label) or the shards (relative path and sample count)."""

    kind: str  # "folder" or "shards"
    root: Path
    classes: list[str]
    items: dict[str, list[tuple[str, int]]]
    skipped: list[str]
    class_counts: dict[str, list[int]]  # per split, images per label

    def count(self, split: str) -> int:
        """Number of images in a split."""
        if self.kind == "folder":
            return len(self.items[split])
        return sum(n for _, n in self.items[split])


def _sha_of_items(index: StreamIndex) -> str:
    """SHA-256 over the index: names, labels or counts, and each file's size and mtime, so that
    a changed image or shard changes the data hash downstream stages are keyed on."""
    h = hashlib.sha256()
    h.update(("\n".join(index.classes) + "\0").encode())
    for split in SPLITS:
        for rel, n in index.items[split]:
            st = os.stat(index.root / rel)
            h.update(f"{split}\t{rel}\t{n}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _check_header(path: Path) -> str | None:
    """None if Pillow can read the image's header, else the reason."""
    try:
        with Image.open(path) as img:
            w, h = img.size
        if w < 1 or h < 1:
            return "empty image"
        return None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return " ".join(str(err).split()) or type(err).__name__


def scan_folder(root: Path, on_corrupt: str,
                subset: tuple[int | None, int | None, int] | None = None) -> StreamIndex:
    """Index a folder with train/<class>/<image> and test/<class>/<image> (or val/<class>/...,
    ImageNet's layout, where there is no test/). Each image's header is read once: unreadable
    files are skipped or, with on_corrupt "fail", reported."""
    from quest.core.data.sources import _DirectoryReader, _find_root, _plan, _subset_plan

    reader = _DirectoryReader(root)
    prefix, test_name = _find_root(reader.entries, str(root))
    plan = _plan(reader.entries, prefix, test_name, str(root))
    if subset is not None:
        plan = _subset_plan(plan, subset)
    items: dict[str, list[tuple[str, int]]] = {}
    skipped: list[str] = []
    for split in SPLITS:
        kept = []
        for rel, label in plan.files[split]:
            if not rel.lower().endswith(IMAGE_SUFFIXES):
                skipped.append(rel)
                continue
            reason = _check_header(root / rel)
            if reason is not None:
                if on_corrupt == "fail":
                    raise QuestError(f"cannot read image {root / rel} ({reason}): remove or "
                                     "replace it, or set data.on_corrupt: skip")
                skipped.append(rel)
                continue
            kept.append((rel, label))
        if not kept:
            raise QuestError(f"{root}: no readable images in {prefix}{split}/ "
                             "(expected train/<class>/<image> and test/ or val/<class>/<image>)")
        items[split] = kept
    counts = {s: np.bincount([lab for _, lab in items[s]], minlength=len(plan.classes)).tolist()
              for s in SPLITS}
    return StreamIndex("folder", root, plan.classes, items, skipped, counts)


def _shard_split(name: str) -> str | None:
    """The split a shard file belongs to, from its name (train-000000.tar, test-..., val-...)."""
    stem = name.split("-")[0].split("_")[0].split(".")[0].lower()
    return {"train": "train", "test": "test", "val": "test"}.get(stem)


def _count_shard(path: Path) -> tuple[int, list[int]]:
    """Samples in one tar shard and their labels (the `.cls` member of each sample)."""
    labels: dict[str, int] = {}
    images: set[str] = set()
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if ext.lower() in SHARD_IMAGE_KEYS:
                    images.add(key)
                elif ext.lower() == "cls":
                    fh = tar.extractfile(member)
                    assert fh is not None
                    labels[key] = int(fh.read().decode().strip())
    except (tarfile.TarError, OSError, ValueError) as err:
        raise QuestError(f"cannot read shard {path} ({' '.join(str(err).split())}): rewrite "
                         "it (quest shards) or remove it") from err
    missing = sorted(images - labels.keys())
    if missing:
        raise QuestError(f"shard {path}: sample {missing[0]} has an image but no .cls label: "
                         "write each sample as KEY.jpg plus KEY.cls")
    return len(images), [labels[k] for k in sorted(images)]


def scan_shards(root: Path) -> StreamIndex:
    """Index WebDataset shards: root/{train,test,val}-*.tar, each sample an image (KEY.jpg,
    .png, ...) and its integer label (KEY.cls); class names from root/classes.txt if present."""
    shards: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    labels: dict[str, list[int]] = {s: [] for s in SPLITS}
    for path in sorted(root.glob("*.tar")):
        split = _shard_split(path.name)
        if split is None:
            continue
        n, found = _count_shard(path)
        if n:
            shards[split].append((path.name, n))
            labels[split] += found
    if min(min(v, default=0) for v in labels.values()) < 0:
        raise QuestError(f"{root}: a shard has a negative .cls label: labels are 0, 1, ...")
    top = max((max(v) for v in labels.values() if v), default=0)
    for split in SPLITS:
        if not shards[split]:
            raise QuestError(f"{root} has no {split} shards: expected {split}-000000.tar, ... "
                             "(write them with `quest shards`)")
    names_file = root / "classes.txt"
    if names_file.is_file():
        classes = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
        if len(classes) <= top:
            raise QuestError(f"{names_file} names {len(classes)} classes but the shards use "
                             f"label {top}: list one class name per label")
    else:
        classes = [str(i) for i in range(top + 1)]
    counts = {s: np.bincount(labels[s], minlength=len(classes)).tolist() for s in SPLITS}
    return StreamIndex("shards", root, classes, shards, [], counts)


def scan(location: Path, on_corrupt: str,
         subset: tuple[int | None, int | None, int] | None = None) -> StreamIndex:
    """Index a streaming source: a folder of shards (*.tar) or an image folder."""
    if not location.exists():
        raise QuestError(f"data path does not exist: {location} (set data.location to an "
                         "image folder or a folder of .tar shards)")
    if not location.is_dir():
        raise QuestError(f"data.format stream reads a folder, not the file {location}: unpack "
                         "it, or use data.format: prepared for an archive that fits in memory")
    if any(_shard_split(p.name) for p in location.glob("*.tar")):
        if subset is not None:
            raise QuestError("data.subset does not apply to shards: write a smaller set of "
                             "shards, or stream an image folder")
        return scan_shards(location)
    return scan_folder(location, on_corrupt, subset)


def write_index(index: StreamIndex, out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write the index into `out` (the file lists, then meta.json last as the commit marker),
    replacing any prepared arrays there; returns the meta written."""
    from quest.core.data.prepared import ARRAY_FILES, META_FILE, VAL_FILES
    from quest.infra.io_utils import write_json_atomic, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)
    for name in ARRAY_FILES + VAL_FILES:
        (out / name).unlink(missing_ok=True)
    for split in SPLITS:
        lines = "".join(f"{rel}\t{n}\n" for rel, n in index.items[split])
        write_text_atomic(out / LIST_FILES[split], lines)
    counts = {s: index.count(s) for s in SPLITS}
    full = {
        "format": FORMAT,
        "kind": index.kind,
        "location": str(index.root.resolve()),
        "data_sha256": _sha_of_items(index),
        "classes": list(index.classes),
        "num_classes": len(index.classes),
        "counts": counts,
        "class_counts": {s: dict(zip(index.classes, index.class_counts[s], strict=True))
                         for s in SPLITS},
        "skipped": {"count": len(index.skipped), "files": index.skipped[:20]},
        **meta,
    }
    write_json_atomic(out / META_FILE, full)
    return full


# --------------------------------------------------------------------------------------------
# Transforms and decoding
# --------------------------------------------------------------------------------------------


def make_transform(train: bool, image_size: int, mean: Sequence[float] | None,
                   std: Sequence[float] | None, *, flip: bool = True,
                   scale_min: float = 0.08, crop_ratio: float = 0.875) -> Any:
    """torchvision v2 transforms: training RandomResizedCrop + flip, evaluation resize +
    center-crop; normalised floats when mean/std are given, else uint8 (statistics, galleries)."""
    from torchvision.transforms import v2

    steps: list[Any] = [v2.ToImage()]
    if train:
        steps.append(v2.RandomResizedCrop(image_size, scale=(scale_min, 1.0), antialias=True))
        if flip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        steps += [v2.Resize(round(image_size / crop_ratio), antialias=True),
                  v2.CenterCrop(image_size)]
    if mean is not None and std is not None:
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def decode(data: bytes | Path, channels: int, where: str) -> Image.Image:
    """An image file's pixels in the target mode (RGB or L); a QuestError names the file."""
    try:
        with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as img:
            mode = "RGB" if channels == 3 else "L"
            return img.convert(mode) if img.mode != mode else img.copy()
    except (OSError, ValueError) as err:
        raise QuestError(f"cannot decode image {where} ({' '.join(str(err).split())}): "
                         "replace it and run `quest prepare` again") from err


def _seeded(transform: Any, img: Image.Image, seed: int) -> Tensor:
    """Apply a random transform with its own seed, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(img)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of one sample's augmentation: a function of (seed, epoch, position) only."""
    return ((seed * 1_000_003 + epoch) * 2_654_435_761 + position) & 0x7FFF_FFFF_FFFF


# --------------------------------------------------------------------------------------------
# Folders: a map-style dataset and a rank-aware, seeded sampler
# --------------------------------------------------------------------------------------------


# How far a broken image's replacement is looked for (the next images in index order), before
# a constant black image stands in for it.
REPLACEMENT_TRIES = 8


def _reason(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


class FolderDataset(Dataset):
    """Images of one split of an indexed folder; items are (index, augmentation seed) and give
    (image, label, index): the index is the image's position in the split's file list.

    An image that fails to decode in a worker is replaced by the next decodable image in index
    order (its label too), with the same augmentation seed, so the replacement is the same
    whatever the worker count; with ``faults`` set (StreamLoader sets it) items end with a
    fault naming the broken file and why ("" when there was none)."""

    def __init__(self, root: Path, items: list[tuple[str, int]], transform: Any,
                 channels: int) -> None:
        self.root, self.transform, self.channels = root, transform, channels
        # two arrays, not a list of tuples: no per-item Python objects for workers to copy
        self.paths = np.array([rel for rel, _ in items], dtype=object)
        self.labels = np.array([label for _, label in items], dtype=np.int64)
        self.faults = False

    def __len__(self) -> int:
        return len(self.labels)

    def _load(self, i: int) -> tuple[Image.Image, int]:
        path = self.root / str(self.paths[i])
        return decode(path, self.channels, str(path)), int(self.labels[i])

    def __getitem__(self, item: tuple[int, int]) -> tuple[Any, ...]:
        i, seed = item
        img, label, fault = _load_or_replace(
            lambda: self._load(i), self.faults, str(self.root / str(self.paths[i])),
            lambda: _replacement(self._load, i, len(self), self.channels, int(self.labels[i])))
        out = (_seeded(self.transform, img, seed), label, i)
        return (*out, fault) if self.faults else out


def _load_or_replace(load: Callable[[], tuple[Image.Image, int]], faults: bool, where: str,
                     replace: Callable[[], tuple[Image.Image, int]]) -> tuple[Any, int, str]:
    """`load()` and no fault; for an image that fails to decode, `replace()` and the fault line
    naming `where` and why when `faults` is set, else the error itself."""
    try:
        return (*load(), "")
    except QuestError as err:
        if not faults:
            raise
        return (*replace(), f"{where}\t{_reason(err.__cause__ or err)}")


def _black(channels: int) -> Image.Image:
    """The constant image that stands in where no decodable replacement was found."""
    return Image.new("RGB" if channels == 3 else "L", (8, 8))


def _replacement(load: Any, i: int, n: int, channels: int, label: int) -> tuple[Any, int]:
    """The first decodable of the next REPLACEMENT_TRIES items after i (wrapping), else a black
    image keeping the broken item's label."""
    for step in range(1, min(REPLACEMENT_TRIES, n - 1) + 1):
        try:
            return load((i + step) % n)
        except QuestError:
            continue
    return _black(channels), label


class RankSampler(Sampler):
    """This rank's share of an epoch: a seeded permutation (repeated `repeat` times, padded to
    a multiple of the ranks), every `world`-th position from `rank`; or the split in order for
    evaluation. Yields (index, augmentation seed); `start` skips already-trained samples."""

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int = 0, world: int = 1,
                 repeat: int = 1) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world, self.repeat = rank, world, repeat if shuffle else 1
        self.epoch = 0
        self.start = 0

    def order(self) -> Tensor:
        """The whole epoch's positions for every rank, before the rank's slice."""
        if not self.shuffle:
            return torch.arange(self.n)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.cat([torch.randperm(self.n, generator=gen) for _ in range(self.repeat)])
        pad = -len(order) % self.world
        return torch.cat([order, order[:pad]]) if pad else order

    def __len__(self) -> int:
        total = self.n * self.repeat
        return -(-total // self.world) - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        mine = self.order()[self.rank :: self.world].tolist()
        for pos in range(self.start, len(mine)):
            yield mine[pos], sample_seed(self.seed, self.epoch, pos * self.world + self.rank)


# --------------------------------------------------------------------------------------------
# Shards: WebDataset tar archives, split over ranks and workers
# --------------------------------------------------------------------------------------------


def assign_shards(shards: Sequence[str], *, shuffle: bool, seed: int, epoch: int, rank: int,
                  world: int) -> list[str]:
    """This rank's shards for an epoch: every `world`-th of a seeded permutation."""
    order = list(shards)
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[rank::world]


class ShardStream(IterableDataset):
    """Samples of this rank's shards, read with webdataset's tar reader, split over DataLoader
    workers, mixed in a seeded shuffle buffer and decoded in the worker. Training streams
    repeat with fresh shard orders, so every rank yields as many samples as it is asked for.
    Items are (image, label, index): the index is the sample's position in the split, the
    shards concatenated in the order of `shards`, each in its tar order (`counts`: samples
    per shard; without them, the position within its shard)."""

    def __init__(self, root: Path, shards: list[str], transform: Any, channels: int, *,
                 train: bool, seed: int, rank: int = 0, world: int = 1,
                 buffer: int = 1000, counts: Sequence[int] | None = None) -> None:
        self.root, self.shards, self.transform, self.channels = root, shards, transform, channels
        self.train, self.seed, self.rank, self.world = train, seed, rank, world
        self.buffer = buffer
        self.epoch = 0
        # each shard's first index, keyed by the url its samples carry
        starts = np.cumsum([0, *counts[:-1]]).tolist() if counts else [0] * len(shards)
        self.starts = {str(root / u): int(n) for u, n in zip(shards, starts, strict=True)}
        self.faults = False  # StreamLoader sets it: items end with a fault ("" or the sample)

    def _samples(self, urls: list[str]) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        def reraise(exn: Exception) -> bool:
            raise QuestError(f"cannot read a shard sample ({' '.join(str(exn).split())}): "
                             "rewrite the shard (quest shards)") from exn

        samples = wds.tarfile_to_samples(handler=reraise)(
            iter([{"url": str(self.root / u)} for u in urls]))
        url, pos = None, 0
        prev: dict[str, Any] | None = None
        for sample in samples:  # a shard is read whole by one worker, in its tar order
            if sample.get("__url__") != url:
                url, pos, prev = sample.get("__url__"), 0, None
            sample["__index__"] = self.starts.get(str(url), 0) + pos
            pos += 1
            # a sample that does not decode is replaced by the one before it in its shard: a
            # function of the shard's content, whatever the worker count or shuffle buffer
            sample["__prev__"] = prev
            prev = {k: v for k, v in sample.items() if k != "__prev__"}
            yield sample

    def __iter__(self) -> Iterator[tuple[Tensor, int, int]]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        cycle = 0
        while True:
            # training: the epoch's shard order, then fresh orders until the loader stops
            sub = self.epoch * 1_000 + cycle
            mine = assign_shards(self.shards, shuffle=self.train, seed=self.seed,
                                 epoch=sub, rank=self.rank, world=self.world)[wid::nworkers]
            if not mine:
                return
            rng = random.Random(sample_seed(self.seed, sub, self.rank * 1_000 + wid))
            buf: list[dict[str, Any]] = []
            for sample in self._samples(mine):
                if not self.train:
                    yield self._decode(sample, sub)
                    continue
                buf.append(sample)
                if len(buf) >= self.buffer:
                    yield self._decode(buf.pop(rng.randrange(len(buf))), sub)
            while buf:
                yield self._decode(buf.pop(rng.randrange(len(buf))), sub)
            if not self.train:
                return
            cycle += 1

    def _image(self, sample: dict[str, Any]) -> tuple[Image.Image, int]:
        data = next((sample[k] for k in SHARD_IMAGE_KEYS if k in sample), None)
        where = f"{sample.get('__url__', '?')}:{sample['__key__']}"
        if data is None or "cls" not in sample:
            raise QuestError(f"shard sample {where} lacks an image or a .cls label: write "
                             "each sample as KEY.jpg plus KEY.cls")
        return decode(data, self.channels, where), int(sample["cls"])

    def _replacement(self, sample: dict[str, Any]) -> tuple[Image.Image, int]:
        """The sample before a broken one in its shard, else a black image keeping the broken
        sample's label (0 where that is unreadable too)."""
        prev = sample.get("__prev__")
        try:
            if prev is None:
                raise QuestError("no sample before it in its shard")
            return self._image(prev)
        except QuestError:
            try:
                label = int(sample.get("cls", b"0"))
            except ValueError:
                label = 0
            return _black(self.channels), label

    def _decode(self, sample: dict[str, Any], epoch: int) -> tuple[Any, ...]:
        key = sample["__key__"]
        img, label, fault = _load_or_replace(
            lambda: self._image(sample), self.faults, f"{sample.get('__url__', '?')}:{key}",
            lambda: self._replacement(sample))
        digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=6).digest(), "big")
        out = (_seeded(self.transform, img, sample_seed(self.seed, epoch, digest)), label,
               int(sample["__index__"]))
        return (*out, fault) if self.faults else out


# --------------------------------------------------------------------------------------------
# The loader the Trainer and the stages use
# --------------------------------------------------------------------------------------------


@dataclass
class StreamData:
    """A prepared stream index, opened: classes, counts, and loaders over either split."""

    root: Path
    kind: str
    classes: list[str]
    items: dict[str, list[tuple[str, int]]]
    meta: dict[str, Any]
    # file -> samples replaced, filled by this data's StreamLoaders (see StreamLoader._faults)
    faults: dict[str, int] = field(default_factory=dict)
    streamed: ClassVar[bool] = True  # quest.core.data.source.ImageData

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the loaders yield."""
        size = int(self.meta["image_size"])
        return int(self.meta.get("channels", 3)), size, size

    def count(self, split: str) -> int:
        """Number of images in a split."""
        return int(self.meta["counts"][split])

    def split_size(self, split: str) -> int:
        """Number of images in the train, val or test split (0: no such split indexed)."""
        return self.count(split) if split in self.meta.get("counts", {}) else 0

    def train_labels(self) -> None:
        """None: a stream's labels are read with its images."""
        return None

    def fault_summary(self) -> dict[str, Any]:
        """The corrupt samples this data's loaders replaced (see `fault_summary`)."""
        return fault_summary(self)

    def eval_loader(self, split: str, batch_size: int, s: LoaderSettings) -> StreamLoader:
        """Un-augmented batches of a split, decoded by `s.workers` processes, in order."""
        return StreamLoader(self, split, train=False, batch_size=batch_size, mean=s.mean,
                            std=s.std, device=s.device, channels_last=s.channels_last,
                            workers=s.workers)

    def loaders(self, opt: TrainOptions, s: LoaderSettings) -> tuple[StreamLoader, StreamLoader]:
        """This rank's training batches and the test batches."""
        train = StreamLoader(self, "train", train=True, batch_size=opt.batch_size, mean=s.mean,
                             std=s.std, seed=opt.seed, device=s.device,
                             channels_last=s.channels_last, repeat=opt.repeat, rank=opt.rank,
                             world=opt.world, workers=s.workers, flip=s.flip,
                             drop_last=opt.drop_last)
        return train, self.eval_loader("test", 256, s)

    def dataset(self, split: str, transform: Any, *, train: bool, seed: int, rank: int = 0,
                world: int = 1) -> Dataset | IterableDataset:
        """The torch dataset of a split with the given transform."""
        channels = self.image_shape[0]
        if self.kind == "folder":
            return FolderDataset(self.root, self.items[split], transform, channels)
        return ShardStream(self.root, [rel for rel, _ in self.items[split]], transform,
                           channels, train=train, seed=seed, rank=rank, world=world,
                           buffer=int(self.meta.get("shuffle_buffer", 1000)),
                           counts=[n for _, n in self.items[split]])

    def sample_images(self, split: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Up to `n` evaluation-transformed uint8 images (N x C x H x W) and their labels: a
        seeded choice of files (folders) or the first samples in shard order."""
        transform = make_transform(False, self.image_shape[1], None, None,
                                   crop_ratio=float(self.meta.get("eval_crop_ratio", 0.875)))
        ds = self.dataset(split, transform, train=False, seed=seed)
        images, labels = [], []
        if isinstance(ds, FolderDataset):
            rng = np.random.default_rng(seed)
            pick = np.sort(rng.choice(len(ds), size=min(n, len(ds)), replace=False))
            pairs: Any = (ds[(int(i), 0)] for i in pick)
        else:
            pairs = ds
        ds.faults = True  # type: ignore[union-attr]
        fail = self.meta.get("on_corrupt", "skip") == "fail"
        for img, label, _, fault in pairs:
            if fault:  # a broken image is left out of the sample (or stops the run: fail)
                where, _, reason = fault.partition("\t")
                if fail:
                    raise QuestError(f"cannot decode image {where} ({reason}): replace or "
                                     "remove it, or set data.on_corrupt: skip")
                record_fault(self, where, reason)
                continue
            images.append(np.asarray(img, dtype=np.uint8))
            labels.append(label)
            if len(images) >= n:
                break
        return np.stack(images), np.asarray(labels, dtype=np.int64)


def open_stream(out: Path, meta: dict[str, Any]) -> StreamData:
    """Open the index the prepare stage wrote into `out` (meta already read)."""
    items: dict[str, list[tuple[str, int]]] = {}
    for split in SPLITS:
        path = out / LIST_FILES[split]
        if not path.is_file():
            raise QuestError(f"stream index incomplete: {path} is missing; run `quest prepare` "
                             "again")
        rows = [ln.rsplit("\t", 1) for ln in path.read_text(encoding="utf-8").splitlines()]
        items[split] = [(rel, int(n)) for rel, n in rows]
    root = Path(meta["location"])
    if not root.is_dir():
        raise QuestError(f"the streamed data is gone: {root} does not exist (mount it again, or "
                         "set data.location and run `quest prepare`)")
    return StreamData(root, str(meta["kind"]), [str(c) for c in meta["classes"]], items, meta)


class StreamLoader:
    """Batches of one split through a DataLoader with worker processes, in the loader protocol
    the Trainer uses: set_epoch, start_at (skip trained batches without decoding them, folders
    only), len, num_samples, and batches on the device: (images, labels, indices) in training,
    each sample's position in the split (FolderDataset, ShardStream), and (images, labels) in
    evaluation.

    Training batches are this rank's: `batch_size` is the global batch, each of `world` ranks
    loads batch_size / world of it, and every rank yields the same number of batches (the last
    one partial where `drop_last` is false)."""

    def __init__(self, data: StreamData, split: str, *, train: bool, batch_size: int,
                 mean: Sequence[float], std: Sequence[float], seed: int = 0,
                 device: str | torch.device = "cpu", channels_last: bool = False,
                 repeat: int = 1, rank: int = 0, world: int = 1, workers: int = 0,
                 flip: bool = True, drop_last: bool | None = None) -> None:
        if batch_size % world:
            raise QuestError(f"train.batch_size {batch_size} does not split over {world} "
                             "ranks: make it a multiple of the number of processes")
        self.data, self.split, self.train = data, split, train
        self.rank, self.world = (rank, world) if train else (0, 1)
        self.batch = batch_size // self.world
        self.seed, self.device = seed, torch.device(device)
        self.channels_last, self.workers = channels_last, workers
        self.repeat = repeat if train else 1
        self.drop_last = train if drop_last is None else drop_last
        meta = data.meta
        self.transform = make_transform(
            train, data.image_shape[1], mean, std, flip=flip,
            scale_min=float(meta.get("crop_scale_min", 0.08)),
            crop_ratio=float(meta.get("eval_crop_ratio", 0.875)))
        self.epoch = 0
        self.start = 0
        self.on_corrupt = str(meta.get("on_corrupt", "skip"))
        if data.kind == "shards" and train:
            n_shards = len(data.items[split])
            if n_shards < self.world:
                raise QuestError(f"{n_shards} {split} shards cannot feed {self.world} ranks: "
                                 "write at least one shard per rank (quest shards --size)")

    @property
    def num_samples(self) -> int:
        """Number of images in the split."""
        return self.data.count(self.split)

    def _per_rank(self) -> int:
        """Samples this rank loads per epoch."""
        return -(-self.num_samples * self.repeat // self.world)

    def __len__(self) -> int:
        per_rank = self._per_rank()
        if self.train and self.drop_last:
            return per_rank // self.batch
        if self.data.kind == "shards" and self._workers() > 1:
            # each worker batches its own shards, so each ends with its own partial batch
            counts = [n for _, n in self.data.items[self.split]]
            w = self._workers()
            return sum(-(-sum(counts[i::w]) // self.batch) for i in range(w))
        return -(-per_rank // self.batch)

    def _workers(self) -> int:
        """DataLoader workers: for shards at most one per shard of this rank's share (a worker
        without shards would end at once)."""
        if self.data.kind != "shards" or not self.workers:
            return self.workers
        share = len(self.data.items[self.split][self.rank :: self.world])
        return max(1, min(self.workers, share))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration reproduces."""
        self.epoch = int(epoch)
        self.start = 0

    def start_at(self, batches: int) -> None:
        """Begin the next iteration after `batches` batches (a resumed epoch)."""
        self.start = int(batches)

    def _loader(self) -> tuple[DataLoader, int]:
        ds = self.data.dataset(self.split, self.transform, train=self.train, seed=self.seed,
                               rank=self.rank, world=self.world)
        # workers never raise on a broken image: they tag the replaced sample, and this process
        # counts it (skip) or stops with one line naming the file (fail)
        ds.faults = True  # type: ignore[union-attr]
        workers = self._workers()
        skip = 0
        if isinstance(ds, ShardStream):
            ds.epoch = self.epoch
            skip = self.start  # shards cannot seek: the trained batches are read again
            kwargs: dict[str, Any] = {}
        else:
            sampler = RankSampler(len(ds), shuffle=self.train, seed=self.seed, rank=self.rank,
                                  world=self.world, repeat=self.repeat)
            sampler.epoch, sampler.start = self.epoch, self.start * self.batch
            kwargs = {"sampler": sampler}
        loader = DataLoader(ds, batch_size=self.batch, num_workers=workers,
                            drop_last=self.drop_last,
                            pin_memory=self.device.type == "cuda",
                            persistent_workers=False, **kwargs)
        return loader, skip

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        loader, skip = self._loader()
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        it = iter(loader)
        for _ in range(skip):
            self._faults(next(it)[3])
        # a training stream of shards never ends by itself: it stops after the epoch's batches,
        # the last one cut to the epoch's remainder when it is kept partial
        todo = len(self) - self.start if self.train else None
        last = self._per_rank() - (len(self) - 1) * self.batch
        n = 0
        for x, y, idx, faults in it:
            self._faults(faults)
            n += 1
            keep = last if todo is not None and n == todo else len(y)
            batch = (x[:keep].to(self.device, non_blocking=True).contiguous(memory_format=fmt),
                     y[:keep].to(self.device, non_blocking=True))
            yield (*batch, idx[:keep].to(self.device, non_blocking=True)) if self.train else batch
            if todo is not None and n >= todo:
                break
        self.start = 0

    def _faults(self, faults: Sequence[str]) -> None:
        """Count the samples of a batch that were replaced; under on_corrupt: fail, stop."""
        for fault in faults:
            if not fault:
                continue
            where, _, reason = fault.partition("\t")
            if self.on_corrupt == "fail":
                raise QuestError(f"cannot decode image {where} ({reason}): replace or remove it "
                                 "and run `quest prepare` again, or set data.on_corrupt: skip")
            record_fault(self.data, where, reason)


def record_fault(data: StreamData, where: str, reason: str) -> None:
    """Count one replaced sample of `data` (logged the first time its file is met)."""
    from quest.infra.progress import log

    if where not in data.faults:
        log.warning("corrupt image %s (%s): replaced by a neighbour and counted "
                    "(data.on_corrupt: skip)", where, reason)
    data.faults[where] = data.faults.get(where, 0) + 1


def fault_summary(data: Any) -> dict[str, Any]:
    """What a stage records of the corrupt samples its stream loaders replaced: the number of
    files, of replacements, and the first files (nothing for in-memory data)."""
    faults = getattr(data, "faults", None) or {}
    return {"files": len(faults), "replaced": sum(faults.values()), "first": sorted(faults)[:20]}
