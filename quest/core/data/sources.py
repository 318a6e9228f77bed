"""Turn CIFAR pickles or image folders/archives into one PreparedDataset."""

from __future__ import annotations

import codecs
import io
import logging
import os
import pickle
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from quest.core.data.prepared import PreparedDataset, Split, count_meta
from quest.core.data.safe_archive import (
    ARCHIVE_SUFFIXES,
    ArchiveReader,
    Entry,
    archive_kind,
    one_line,
)
from quest.infra.errors import QuestError

log = logging.getLogger(__name__)

SOURCES = ("cifar10", "cifar100", "image_folder")
# The same variable quest.infra.config maps onto data.location; read here too for direct API use.
DATA_LOCATION_ENV = "QUEST_DATA_LOCATION"
_MAX_LISTED = 20  # skipped file names kept in meta and warned about one by one
_IGNORED_TOP = {"__MACOSX"}  # macOS zip resource-fork folder


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def prepare_dataset(
    source: str,
    location: str | None,
    *,
    image_size: int | None = None,
    channels: int = 3,
    on_corrupt: str = "skip",
    download: bool = False,
    progress: bool = True,
    subset: tuple[int | None, int | None, int] | None = None,
    validation: tuple[int, int] | None = None,
) -> PreparedDataset:
    """Read a cifar10/cifar100 root or an image folder/archive into a PreparedDataset.

    ``subset`` = (train_per_class, test_per_class, seed) keeps a seeded, class-balanced slice;
    image folders pick it from the file names before decoding, so a small slice is fast.
    ``validation`` = (per_class, seed) holds a validation split out of the training pool (see
    `carve_validation`); None or 0 per class: none.
    """
    if source not in SOURCES:
        raise QuestError(
            f"unknown data source '{source}': choose one of {', '.join(SOURCES)} (set data.source)"
        )
    if channels not in (1, 3):
        raise QuestError(f"data.channels must be 1 or 3, got {channels!r} (set data.channels)")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise QuestError(
            f"data.image_size must be a positive integer or null, got {image_size!r} "
            "(set data.image_size)"
        )
    if on_corrupt not in ("skip", "fail"):
        raise QuestError(
            f"data.on_corrupt must be 'skip' or 'fail', got {on_corrupt!r} (set data.on_corrupt)"
        )
    location = location or os.environ.get(DATA_LOCATION_ENV) or None
    if source == "image_folder":
        if not location:
            raise QuestError(
                f"image_folder needs a location: set data.location (or {DATA_LOCATION_ENV}) to "
                f"a folder or a {'/'.join(ARCHIVE_SUFFIXES)} archive holding train/ and test/"
            )
        return _prepare_image_folder(
            Path(location).expanduser(), image_size, channels, on_corrupt, progress, subset,
            validation
        )
    ds = _prepare_cifar(_CIFAR[source], location, image_size, channels, download)
    if subset is None and not (validation and validation[0]):
        return ds
    train_pc, test_pc, seed = subset if subset is not None else (None, None, 0)
    return smoke_subset(ds, train_pc, test_pc, seed, validation=validation)


# --------------------------------------------------------------------------------------------
# CIFAR (torchvision's python-pickle layout)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarSpec:
    """Where torchvision keeps one CIFAR variant and which pickle keys it uses."""

    kind: str
    pretty: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    names_key: str
    labels_key: str
    tarball: str
    torchvision_class: str

    @property
    def all_files(self) -> tuple[str, ...]:
        """Every file the layout must contain."""
        return (*self.train_files, *self.test_files, self.meta_file)


_CIFAR = {
    "cifar10": _CifarSpec(
        "cifar10", "CIFAR-10", "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
        "label_names", "labels", "cifar-10-python.tar.gz", "CIFAR10",
    ),
    "cifar100": _CifarSpec(
        "cifar100", "CIFAR-100", "cifar-100-python", ("train",), ("test",), "meta",
        "fine_label_names", "fine_labels", "cifar-100-python.tar.gz", "CIFAR100",
    ),
}  # fmt: skip


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The numpy callables that pickled arrays reference, under old and new module paths."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray}
    allowed[("numpy", "dtype")] = np.dtype
    for pkg in ("numpy.core", "numpy._core"):
        allowed[(f"{pkg}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{pkg}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{pkg}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


# Constructors of plain values only: none of them can run code, touch files or import modules.
_HARMLESS_BUILTINS = (
    "bytearray", "bytes", "str", "int", "float", "complex", "bool",
    "list", "dict", "tuple", "set", "frozenset", "range", "slice",
)  # fmt: skip


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that rebuilds only numpy arrays and plain Python values."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def __init__(self, file: io.BufferedIOBase, source: str = "pickle") -> None:
        """Unpickle from `file`; `source` names it in error messages."""
        super().__init__(file, encoding="latin1")
        self._source = source

    @classmethod
    def allowed(cls) -> dict[tuple[str, str], Any]:
        """The (module, name) globals this unpickler will resolve."""
        if cls._allowed is None:
            table = _numpy_globals()
            # Python 2 pickles name the builtins module __builtin__.
            for mod in ("builtins", "__builtin__"):
                for name in _HARMLESS_BUILTINS:
                    table[(mod, name)] = getattr(__import__("builtins"), name)
            # Protocol 0-2 pickles written by Python 3 store bytes as _codecs.encode(str, codec).
            table[("_codecs", "encode")] = codecs.encode
            cls._allowed = table
        return cls._allowed

    def find_class(self, module: str, name: str) -> Any:
        """Resolve a global only if it is on the allow-list; refuse anything else."""
        obj = self.allowed().get((module, name))
        if obj is None:
            raise QuestError(
                f"refusing to unpickle {module}.{name} from {self._source}: CIFAR files hold "
                "only numpy arrays, lists and strings (the file is not a genuine CIFAR batch)"
            )
        return obj


def restricted_load(path: Path) -> Any:
    """Unpickle a file with RestrictedUnpickler, turning damage into a one-line QuestError."""
    try:
        with open(path, "rb") as fh:
            return RestrictedUnpickler(fh, str(path)).load()
    except QuestError:
        raise
    except Exception as err:  # a damaged pickle can raise nearly anything
        raise QuestError(
            f"cannot read {path} ({type(err).__name__}: {one_line(err)}): the file is "
            "damaged; replace it with a fresh copy"
        ) from err


def _str_keys(obj: Any, path: Path) -> dict[str, Any]:
    """A pickled dict with bytes keys (Python 3 re-pickles) or str keys (torchvision) as str."""
    if not isinstance(obj, dict):
        raise QuestError(f"{path} is not a CIFAR batch (expected a dict, got {type(obj).__name__})")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _read_cifar_batch(path: Path, spec: _CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 3 x 32 x 32 uint8, labels int64) from one CIFAR batch pickle."""
    entry = _str_keys(restricted_load(path), path)
    if "data" not in entry or spec.labels_key not in entry:
        raise QuestError(
            f"{path} lacks the 'data' or '{spec.labels_key}' entry of a {spec.pretty} batch: "
            "replace it with a fresh copy"
        )
    data = np.asarray(entry["data"])
    labels = np.asarray(entry[spec.labels_key], dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise QuestError(
            f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 N x 3072; "
            "replace it with a fresh copy"
        )
    if labels.shape[0] != data.shape[0]:
        raise QuestError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels; replace it")
    # Rows are 1024 red, 1024 green, 1024 blue values, each plane row-major: already CHW.
    return data.reshape(-1, 3, 32, 32), labels


def _find_cifar_dir(root: Path, spec: _CifarSpec) -> Path | None:
    """The folder holding the spec's files: root/<folder>, or root itself if it is that folder."""
    for cand in (root / spec.folder, root):
        if all((cand / f).is_file() for f in spec.all_files):
            return cand
    return None


def _download_cifar(root: Path, spec: _CifarSpec) -> None:
    """Fetch the dataset with torchvision; a failure becomes a QuestError on how to go offline."""
    import torchvision  # deferred: only this path needs it

    try:
        dataset_cls = getattr(torchvision.datasets, spec.torchvision_class)
        for train in (True, False):
            dataset_cls(root=str(root), train=train, download=True)
    except Exception as err:  # urllib, socket, checksum and extraction errors alike
        raise QuestError(
            f"could not download {spec.pretty} into {root} ({type(err).__name__}: "
            f"{one_line(err)}): without a network, extract {spec.tarball} so that "
            f"{root / spec.folder} exists, or point data.location or {DATA_LOCATION_ENV} at a "
            f"folder holding {spec.folder}/"
        ) from err


def _cifar_folder(spec: _CifarSpec, location: str | None, download: bool) -> Path:
    """The folder holding torchvision's CIFAR files, fetched first when allowed and missing."""
    if not location:
        raise QuestError(
            f"no location for {spec.pretty}: set data.location (or the environment variable "
            f"{DATA_LOCATION_ENV}) to a folder holding {spec.folder}/"
        )
    root = Path(location).expanduser()
    folder = _find_cifar_dir(root, spec)
    if folder is None and download:
        _download_cifar(root, spec)
        folder = _find_cifar_dir(root, spec)
    if folder is None:
        raise QuestError(
            f"{spec.pretty} not found: expected {root / spec.folder}/ containing "
            f"{', '.join(spec.all_files)} (torchvision's layout); extract {spec.tarball} there, "
            f"point data.location or {DATA_LOCATION_ENV} at it, or set data.download: true"
        )
    return folder


def _prepare_cifar(
    spec: _CifarSpec,
    location: str | None,
    image_size: int | None,
    channels: int,
    download: bool,
) -> PreparedDataset:
    """Read torchvision's CIFAR layout under `location` (downloading first if allowed)."""
    folder = _cifar_folder(spec, location, download)
    meta_obj = _str_keys(restricted_load(folder / spec.meta_file), folder / spec.meta_file)
    if spec.names_key not in meta_obj:
        raise QuestError(
            f"{folder / spec.meta_file} lacks '{spec.names_key}': replace it with a fresh copy"
        )
    classes = [
        n.decode("latin1") if isinstance(n, bytes) else str(n) for n in meta_obj[spec.names_key]
    ]

    splits: dict[str, Split] = {}
    for split_name, files in (("train", spec.train_files), ("test", spec.test_files)):
        parts = [_read_cifar_batch(folder / f, spec) for f in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise QuestError(
                f"{spec.pretty} {split_name} labels fall outside 0..{len(classes) - 1}: "
                f"the files in {folder} do not belong together; replace them"
            )
        splits[split_name] = Split(_convert_array(images, image_size, channels), labels)

    train, test = splits["train"], splits["test"]
    meta: dict[str, Any] = {
        "source": spec.kind,
        "location": str(folder.resolve()),
        "image_size": list(train.images.shape[2:]),
        "channels": channels,
        "resize": None if image_size in (None, 32) else f"bilinear to {image_size}x{image_size}",
        "grayscale_handling": (
            "source images are RGB; kept as 3 channels"
            if channels == 3
            else "RGB converted to luma, L = 0.299 R + 0.587 G + 0.114 B (as Pillow convert('L'))"
        ),
        "input_modes": {"RGB": len(train) + len(test)},
        "label_key": spec.labels_key,
        **count_meta(train, test, classes),
        "skipped": {"count": 0, "files": []},
        "ignored": {"count": 0, "files": []},
    }
    return PreparedDataset(train, test, classes, meta)


def _convert_array(images: np.ndarray, image_size: int | None, channels: int) -> np.ndarray:
    """Apply the channels and image_size settings to an RGB N x 3 x H x W uint8 array."""
    out = images
    if channels == 1:
        # Pillow's fixed-point ITU-R 601-2 luma, so CIFAR and image folders agree exactly.
        rgb = out.astype(np.uint32)
        luma = (rgb[:, 0] * 19595 + rgb[:, 1] * 38470 + rgb[:, 2] * 7471 + 0x8000) >> 16
        out = luma.astype(np.uint8)[:, None]
    if image_size is not None and out.shape[2:] != (image_size, image_size):
        resized = np.empty((out.shape[0], out.shape[1], image_size, image_size), np.uint8)
        for i, img in enumerate(out):
            pil = Image.fromarray(img[0] if channels == 1 else img.transpose(1, 2, 0))
            arr = np.asarray(pil.resize((image_size, image_size), Image.Resampling.BILINEAR))
            resized[i] = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
        out = resized
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------------------------
# Image folders: a directory or an archive with train/<class>/* and test/<class>/*
# --------------------------------------------------------------------------------------------


class _DirectoryReader:
    """The same entries/read interface as ArchiveReader, over a folder on disk."""

    def __init__(self, root: Path) -> None:
        """List every file and folder under root (symlinks followed, cycles cut)."""
        self.root = root
        self.entries: list[Entry] = []
        seen: set[tuple[int, int]] = set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:
                dirnames[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            dirnames.sort()
            rel = Path(dirpath).relative_to(root).as_posix()
            prefix = "" if rel == "." else rel + "/"
            if prefix:
                self.entries.append(Entry(prefix[:-1], True))
            self.entries.extend(Entry(prefix + f, False) for f in sorted(filenames))

    def read(self, name: str) -> bytes:
        """The bytes of file `name` (relative to root)."""
        return (self.root / name).read_bytes()

    def close(self) -> None:
        """Nothing to release."""


def _hidden(parts: list[str]) -> bool:
    """Dotfiles/dot-folders (.DS_Store, macOS ._* twins) and __MACOSX are never data."""
    return parts[0] in _IGNORED_TOP or any(p.startswith(".") for p in parts)


def _folders(entries: list[Entry]) -> set[str]:
    """Every folder named by the entries: listed ones and those anything lies inside."""
    dirs: set[str] = set()
    for e in entries:
        parts = e.name.split("/")
        if _hidden(parts):
            continue
        upto = len(parts) if e.is_dir else len(parts) - 1
        dirs.update("/".join(parts[:i]) for i in range(1, upto + 1))
    return dirs


def _test_folder(dirs: set[str], prefix: str) -> str:
    """The test split's folder name: test/, else val/ (ImageNet's layout, train/ + val/)."""
    return "val" if f"{prefix}test" not in dirs and f"{prefix}val" in dirs else "test"


def _find_root(entries: list[Entry], where: str) -> tuple[str, str]:
    """The prefix ('' or 'top/') under which train/ and test/ (or val/) live, and the test
    split's folder name ('test' or 'val'); else a QuestError."""
    dirs = _folders(entries)
    tops = {d for d in dirs if "/" not in d}
    if tops & {"train", "test", "val"}:
        prefix = ""
    elif len(tops) == 1:
        prefix = next(iter(tops)) + "/"
    else:
        prefix = None
    wanted = ("train", "test" if prefix is None else _test_folder(dirs, prefix))
    missing = [s for s in wanted if prefix is None or f"{prefix}{s}" not in dirs]
    if missing:
        what = " and ".join(f"{s}/" for s in missing) + (
            " folders" if len(missing) > 1 else " folder"
        )
        raise QuestError(
            f"{where} has no {what}: expected train/<class>/<image> and "
            "test/<class>/<image> (or val/<class>/<image>), optionally inside one top-level folder"
        )
    assert prefix is not None
    return prefix, wanted[1]


@dataclass
class _Plan:
    """Which files belong to which split and class, found from the names alone."""

    classes: list[str]
    files: dict[str, list[tuple[str, int]]]  # split -> [(entry name, label)], storage order
    ignored: list[str]


def _plan(entries: list[Entry], prefix: str, test_name: str, where: str) -> _Plan:
    """Assign files to (split, class), the test split read from `test_name`/ (test/ or val/,
    as `_find_root` found); classes are train/'s sorted subfolder names."""
    class_dirs: dict[str, set[str]] = {"train": set(), "test": set()}
    raw_files: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    ignored: list[str] = []
    split_of = {"train": "train", test_name: "test"}
    for e in entries:
        parts = e.name.split("/")
        if _hidden(parts):
            if not e.is_dir:
                ignored.append(e.name)
            continue
        if not e.name.startswith(prefix):
            if not e.is_dir:
                ignored.append(e.name)
            continue
        rel = e.name[len(prefix) :].split("/")
        split = split_of.get(rel[0], "")
        if split not in class_dirs:
            if not e.is_dir:
                ignored.append(e.name)
            continue
        if len(rel) >= 2 and (e.is_dir or len(rel) >= 3):
            class_dirs[split].add(rel[1])
        if not e.is_dir:
            if len(rel) >= 3:
                raw_files[split].append((e.name, rel[1]))
            else:
                ignored.append(e.name)  # a loose file directly in train/ or test/
    classes = sorted(class_dirs["train"])
    if not classes:
        raise QuestError(
            f"{where}: {prefix}train/ has no class folders (expected train/<class>/<image>)"
        )
    if class_dirs["test"] != class_dirs["train"]:
        only_train = sorted(class_dirs["train"] - class_dirs["test"])
        only_test = sorted(class_dirs["test"] - class_dirs["train"])
        raise QuestError(
            f"{where}: {test_name}/ and train/ must have the same class folders "
            f"(only in train: {only_train or 'none'}; only in {test_name}: {only_test or 'none'})"
        )
    index = {c: i for i, c in enumerate(classes)}
    files = {s: [(n, index[c]) for n, c in raw_files[s]] for s in raw_files}
    return _Plan(classes, files, ignored)


class _Decoder:
    """Decodes image bytes to H x W x C uint8 arrays with Pillow, enforcing one size."""

    def __init__(self, channels: int, image_size: int | None) -> None:
        """Set the target mode and size; the first image fixes the size when none is given."""
        self.mode = "RGB" if channels == 3 else "L"
        self.image_size = image_size
        self.size: tuple[int, int] | None = (
            (image_size, image_size) if image_size is not None else None
        )
        self.size_from = ""
        self.modes: Counter[str] = Counter()

    def decode(self, data: bytes, name: str) -> np.ndarray:
        """Decode one image; raises on unreadable data, QuestError on a size mismatch."""
        # The extension is only a hint to skip format sniffing; a mislabelled file still opens.
        hint = _FORMAT_HINTS.get(os.path.splitext(name)[1].lower())
        try:
            img = Image.open(io.BytesIO(data), formats=hint)
        except Image.UnidentifiedImageError:
            if hint is None:
                raise
            img = Image.open(io.BytesIO(data))
        with img:
            self.modes[img.mode] += 1
            # Convert before resizing: bilinear filtering of palette indices would be nonsense.
            conv = img if img.mode == self.mode else img.convert(self.mode)
            if self.image_size is not None:
                if conv.size != self.size:
                    conv = conv.resize(
                        (self.image_size, self.image_size), Image.Resampling.BILINEAR
                    )
            elif self.size is None:
                self.size, self.size_from = conv.size, name
            elif conv.size != self.size:
                (w0, h0), (w1, h1) = self.size, conv.size
                raise QuestError(
                    f"images have different sizes ({w0}x{h0} and {w1}x{h1}, e.g. "
                    f"{self.size_from} and {name}): set data.image_size to resize them, or "
                    "data.format: stream to crop them as they are read"
                )
            # frombuffer(tobytes()) is measurably faster than asarray() for tiny images.
            w, h = conv.size
            return np.frombuffer(conv.tobytes(), np.uint8).reshape(h, w, len(self.mode))


_FORMAT_HINTS = {
    ".jpg": ("JPEG",), ".jpeg": ("JPEG",), ".png": ("PNG",), ".bmp": ("BMP",),
    ".gif": ("GIF",), ".webp": ("WEBP",), ".tif": ("TIFF",), ".tiff": ("TIFF",),
}  # fmt: skip


def _progress(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar if tqdm is installed and enabled, else a no-op stand-in."""
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, unit="img", mininterval=0.5, leave=False)
        except ImportError:
            pass
    return _NoBar()


class _NoBar:
    """A do-nothing progress bar."""

    def update(self, n: int = 1) -> None:
        """Ignore progress."""

    def close(self) -> None:
        """Nothing to close."""


def _assemble(split: str, buffer: np.ndarray | None, found: list[tuple[int, str]],
              plan: _Plan, display: Callable[[str], str]) -> Split:
    """One split's N x C x H x W array in (label, path) order; an empty class is an error."""
    counts = Counter(label for label, _ in found)
    for label, cls in enumerate(plan.classes):
        if counts[label] == 0:
            n_files = sum(1 for _, lab in plan.files[split] if lab == label)
            why = f"all {n_files} files unreadable" if n_files else "it is empty"
            where = (f"the validation split's class {cls} (held out of train/{cls})"
                     if split == "val" else f"class folder {split}/{cls}")
            raise QuestError(
                f"{where} in {display('')} has no readable images "
                f"({why}): add images or remove the class from train/ and test/"
            )
    assert buffer is not None  # every class has an image, so the split has a buffer
    # Sort by (label, path) so that a folder and its archive give identical arrays,
    # whatever order the archive stores members in (as torchvision's ImageFolder orders).
    order = sorted(range(len(found)), key=found.__getitem__)
    images = buffer[np.asarray(order, dtype=np.int64)].transpose(0, 3, 1, 2)
    labels = np.asarray([found[i][0] for i in order], dtype=np.int64)
    return Split(np.ascontiguousarray(images), labels)


def _decode_all(
    reader: ArchiveReader | _DirectoryReader,
    plan: _Plan,
    decoder: _Decoder,
    display: Callable[[str], str],
    on_corrupt: str,
    progress: bool,
) -> tuple[dict[str, Split], list[str]]:
    """Decode every planned file in storage order; returns the splits and skipped names."""
    wanted = {name: (split, label) for split, fs in plan.files.items() for name, label in fs}
    capacity = {s: len(fs) for s, fs in plan.files.items()}
    buffers: dict[str, np.ndarray] = {}
    keys: dict[str, list[tuple[int, str]]] = {split: [] for split in plan.files}
    skipped: list[str] = []
    bar = _progress(len(wanted), progress, "decoding images")
    try:
        for name in _in_storage_order(reader.entries, wanted):
            split, label = wanted[name]
            bar.update()
            try:
                arr = decoder.decode(reader.read(name), name)
            except QuestError:
                raise
            except Exception as err:  # Pillow raises many types for bad data
                if on_corrupt == "fail":
                    raise QuestError(
                        f"cannot read image {display(name)} ({one_line(err)}): fix or remove "
                        "it, or set data.on_corrupt: skip to skip it"
                    ) from err
                skipped.append(name)
                if len(skipped) <= _MAX_LISTED:
                    log.warning("skipping unreadable file %s (%s)", display(name), one_line(err))
                continue
            if split not in buffers:
                # Preallocate from the first image's shape (the decoder holds every image to
                # it): stacking 60k small arrays would double peak memory and time. Rows stay
                # H x W x C here, a plain copy; one transpose at the end is cheaper.
                _check_fits(capacity, arr.shape)
                buffers[split] = np.empty((capacity[split], *arr.shape), np.uint8)
            buffers[split][len(keys[split])] = arr
            keys[split].append((label, name))
    finally:
        bar.close()
    if len(skipped) > _MAX_LISTED:
        log.warning("skipped %d unreadable files in total (first %d listed in meta)",
                    len(skipped), _MAX_LISTED)  # fmt: skip

    splits = {split: _assemble(split, buffers.get(split), keys[split], plan, display)
              for split in plan.files}
    return splits, skipped


def _available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_fits(capacity: dict[str, int], shape: tuple[int, ...]) -> None:
    """Refuse, before allocating, a prepared array that cannot fit in memory: the assembly
    needs about twice the decoded bytes (buffer plus its transposed copy)."""
    need = 2 * sum(capacity.values()) * int(np.prod(shape))
    avail = _available_memory()
    if avail is not None and need > avail:
        n = sum(capacity.values())
        raise QuestError(
            f"{n} images of {'x'.join(map(str, shape))} need about {need / 2**30:.1f} GiB to "
            f"prepare in memory, {avail / 2**30:.1f} GiB is available: set data.format: stream "
            "(with data.image_size) to read them batch by batch")


def _in_storage_order(entries: list[Entry], wanted: dict[str, Any]) -> Iterator[str]:
    """Wanted names in archive order, so a compressed tar is read front to back once."""
    for e in entries:
        if not e.is_dir and e.name in wanted:
            yield e.name


def balanced_choice(groups: list[Any], classes: list[str], per_class: int,
                    rng: np.random.Generator, split: str, setting: str) -> list[np.ndarray]:
    """Per class, `per_class` positions drawn without replacement from that class's candidates
    (`groups[label]`, in the caller's order); one-line errors name `setting` to lower."""
    if per_class < 1:
        raise QuestError(f"{setting} must be at least 1, got {per_class}")
    picks = []
    for group, cls in zip(groups, classes, strict=True):
        if len(group) < per_class:
            raise QuestError(
                f"class '{cls}' has only {len(group)} {split} images, fewer than the "
                f"{per_class} per class asked for: lower {setting}")
        picks.append(rng.choice(len(group), size=per_class, replace=False))
    return picks


# Mixed into the validation draw's seed, so that data.validation_seed 0 and data.subset.seed 0
# start unrelated random streams.
_VALIDATION_STREAM = 0x76616C


def validation_meta(per_class: int, seed: int, whole_pool: bool) -> dict[str, Any]:
    """What meta.json (and the data report) says about the validation split."""
    return {"per_class": per_class, "seed": seed,
            "drawn_from": ("carved out of the whole training pool: training keeps the rest"
                           if whole_pool else "the training pool outside the training subset")}


def carve_validation(groups: list[Any], train_picks: list[np.ndarray] | None, per_class: int,
                     seed: int, classes: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per class, the positions into `groups[label]` (the class's training pool, in the
    caller's order) that train and that validate.

    With `train_picks` (a training subset was drawn) the validation images are drawn from the
    pool outside it, which leaves the training subset as it was; without (the whole pool
    trains) they are carved out of the pool, and training keeps the rest. The draw has its own
    seed, so a validation split never moves the training subset."""
    rng = np.random.default_rng([seed, _VALIDATION_STREAM])
    train_out, val_out = [], []
    for label, (group, cls) in enumerate(zip(groups, classes, strict=True)):
        everything = np.arange(len(group))
        if train_picks is None:
            if len(group) <= per_class:
                raise QuestError(
                    f"class '{cls}' has only {len(group)} training images: a validation split "
                    f"of {per_class} per class leaves none to train on: lower "
                    "data.validation_per_class")
            val = np.sort(rng.choice(len(group), size=per_class, replace=False))
            train_out.append(np.setdiff1d(everything, val))
        else:
            rest = np.setdiff1d(everything, train_picks[label])
            if len(rest) < per_class:
                raise QuestError(
                    f"class '{cls}' has {len(group)} training images, {len(rest)} of them "
                    f"outside the training subset: fewer than data.validation_per_class "
                    f"{per_class}: lower it or data.subset.train_per_class")
            val = np.sort(rest[rng.choice(len(rest), size=per_class, replace=False)])
            train_out.append(np.sort(train_picks[label]))
        val_out.append(val)
    return train_out, val_out


def _subset_plan(plan: _Plan, subset: tuple[int | None, int | None, int] | None,
                 validation: tuple[int, int] | None = None) -> _Plan:
    """Keep a seeded, class-balanced choice of files per split (None keeps a split whole), and
    hold `validation` = (per_class, seed) files of the training pool out as a "val" split."""
    rng = np.random.default_rng(subset[2] if subset is not None else 0)
    sizes = (subset[0], subset[1]) if subset is not None else (None, None)
    files: dict[str, list[tuple[str, int]]] = {}
    train_picks = None

    def groups_of(split: str) -> list[list[str]]:
        return [sorted(n for n, lab in plan.files[split] if lab == label)
                for label in range(len(plan.classes))]

    for split, per_class in zip(("train", "test"), sizes, strict=True):
        if per_class is None:
            files[split] = plan.files[split]
            continue
        groups = groups_of(split)
        picks = balanced_choice(groups, list(plan.classes), per_class, rng, split,
                                f"data.subset.{split}_per_class")
        if split == "train":
            train_picks = picks
        keep = {names[i] for names, pick in zip(groups, picks, strict=True) for i in pick}
        files[split] = [(n, lab) for n, lab in plan.files[split] if n in keep]
    if validation is not None and validation[0] > 0:
        groups = groups_of("train")
        trains, vals = carve_validation(groups, train_picks, validation[0], validation[1],
                                        list(plan.classes))
        train_keep = {g[i] for g, pos in zip(groups, trains, strict=True) for i in pos}
        val_keep = {g[i] for g, pos in zip(groups, vals, strict=True) for i in pos}
        files["train"] = [(n, lab) for n, lab in plan.files["train"] if n in train_keep]
        files["val"] = [(n, lab) for n, lab in plan.files["train"] if n in val_keep]
    return _Plan(plan.classes, files, plan.ignored)


def _open_source(location: Path) -> tuple[ArchiveReader | _DirectoryReader, str | None]:
    """A reader over a folder or an archive, and the archive's kind (None for a folder)."""
    if not location.exists():
        raise QuestError(
            f"data path does not exist: {location} (set data.location to a folder or archive)"
        )
    if location.is_dir():
        return _DirectoryReader(location), None
    if archive_kind(location) is not None:
        reader = ArchiveReader(location)
        return reader, reader.kind
    raise QuestError(
        f"unsupported archive type for {location}: use a folder or a "
        f"{', '.join(ARCHIVE_SUFFIXES)} archive"
    )


def _prepare_image_folder(
    location: Path,
    image_size: int | None,
    channels: int,
    on_corrupt: str,
    progress: bool,
    subset: tuple[int | None, int | None, int] | None = None,
    validation: tuple[int, int] | None = None,
) -> PreparedDataset:
    """Read a folder or archive holding train/<class>/* and test/<class>/* (and hold a
    validation split out of train/, see `carve_validation`)."""
    reader, archive = _open_source(location)

    def display(name: str) -> str:
        """A member name as the user can find it."""
        if archive is None:
            return str(location / name) if name else str(location)
        return f"{location}:{name}" if name else str(location)

    try:
        prefix, test_name = _find_root(reader.entries, str(location))
        plan = _plan(reader.entries, prefix, test_name, str(location))
        wants_val = validation is not None and validation[0] > 0
        if subset is not None or wants_val:
            plan = _subset_plan(plan, subset, validation)
        decoder = _Decoder(channels, image_size)
        splits, skipped = _decode_all(reader, plan, decoder, display, on_corrupt, progress)
    finally:
        reader.close()

    train, test, val = splits["train"], splits["test"], splits.get("val")
    non_target = sum(n for m, n in decoder.modes.items() if m != decoder.mode)
    meta: dict[str, Any] = {
        "source": "image_folder",
        "location": str(location.resolve()),
        "archive": archive,
        "root_in_source": prefix.rstrip("/"),
        "image_size": list(train.images.shape[2:]),
        "channels": channels,
        "resize": None if image_size is None else f"bilinear to {image_size}x{image_size}",
        "grayscale_handling": (
            "Pillow convert('RGB'): grayscale replicated to 3 channels, palette converted, "
            f"alpha dropped ({non_target} images converted)"
            if channels == 3
            else f"Pillow convert('L'): colour reduced to luma ({non_target} images converted)"
        ),
        "input_modes": dict(sorted(decoder.modes.items())),
        **count_meta(train, test, plan.classes, val),
        "skipped": {"count": len(skipped), "files": skipped[:_MAX_LISTED]},
        "ignored": {"count": len(plan.ignored), "files": plan.ignored[:_MAX_LISTED]},
    }
    if subset is not None:
        meta["subset"] = dict(zip(("train_per_class", "test_per_class", "seed"), subset,
                                  strict=True))
    if val is not None:
        assert validation is not None
        meta["validation"] = validation_meta(validation[0], validation[1],
                                             subset is None or subset[0] is None)
    return PreparedDataset(train, test, plan.classes, meta, val)


# --------------------------------------------------------------------------------------------
# Subsets
# --------------------------------------------------------------------------------------------


def smoke_subset(
    ds: PreparedDataset, train_per_class: int | None, test_per_class: int | None, seed: int,
    validation: tuple[int, int] | None = None,
) -> PreparedDataset:
    """A seeded, class-balanced subset with exactly n images per class (None: split kept whole),
    with `validation` = (per_class, seed) training-pool images held out as the validation split
    (see `carve_validation`)."""
    rng = np.random.default_rng(seed)
    splits: dict[str, Split] = {}
    train_picks = None
    for split_name, split, per_class in (
        ("train", ds.train, train_per_class),
        ("test", ds.test, test_per_class),
    ):
        if per_class is None:
            splits[split_name] = Split(split.images, np.asarray(split.labels, dtype=np.int64))
            continue
        labels = np.asarray(split.labels)
        groups = [np.flatnonzero(labels == label) for label in range(len(ds.classes))]
        picks = balanced_choice(groups, list(ds.classes), per_class, rng, split_name,
                                f"{split_name}_per_class")
        if split_name == "train":
            train_picks = picks
        chosen = [idx[pick] for idx, pick in zip(groups, picks, strict=True)]
        # Keep the source order inside the subset; the loader shuffles anyway.
        keep = np.sort(np.concatenate(chosen))
        splits[split_name] = Split(np.asarray(split.images[keep]), labels[keep].astype(np.int64))
    val = None
    if validation is not None and validation[0] > 0:
        labels = np.asarray(ds.train.labels)
        groups = [np.flatnonzero(labels == label) for label in range(len(ds.classes))]
        trains, vals = carve_validation(groups, train_picks, validation[0], validation[1],
                                        list(ds.classes))
        keep = np.sort(np.concatenate([g[p] for g, p in zip(groups, trains, strict=True)]))
        held = np.sort(np.concatenate([g[p] for g, p in zip(groups, vals, strict=True)]))
        splits["train"] = Split(np.asarray(ds.train.images[keep]),
                                labels[keep].astype(np.int64))
        val = Split(np.asarray(ds.train.images[held]), labels[held].astype(np.int64))
    meta = dict(ds.meta)
    meta.pop("data_sha256", None)  # describes the full set, not this subset
    meta.update(count_meta(splits["train"], splits["test"], ds.classes, val))
    meta["subset"] = {
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "seed": seed,
    }
    if val is not None:
        assert validation is not None
        meta["validation"] = validation_meta(validation[0], validation[1],
                                             train_per_class is None)
    return PreparedDataset(splits["train"], splits["test"], list(ds.classes), meta, val)
