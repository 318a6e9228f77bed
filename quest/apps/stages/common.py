"""Helpers shared by the stages: devices, prepared data, loaders and model files."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quest.core.data.loader import InMemoryLoader, last_batch_size, make_dataloader
from quest.core.data.prepared import META_FILE, PreparedDataset, load_prepared
from quest.core.data.stream import FORMAT, StreamData, StreamLoader, fault_summary, open_stream
from quest.infra.config import Config, OptimConfig
from quest.infra.errors import QuestError
from quest.infra.io_utils import atomic_path, read_json
from quest.infra.paths import Paths


def resolve_device(cfg: Config) -> torch.device:
    """The torch device to use (auto: CUDA when present), after applying the thread setting."""
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    name = cfg.runtime.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise QuestError(
            "runtime.device asks for CUDA but no GPU is visible: set runtime.device: cpu"
        )
    return torch.device(name)


def resolve_location(location: str | None, root: Path) -> str | None:
    """A data or checkpoint path from params: relative paths are relative to the project root."""
    if location is None or "://" in location:
        return location
    p = Path(os.path.expanduser(location))
    return str(p if p.is_absolute() else (root / p))


Data = PreparedDataset | StreamData


def load_data(paths: Paths, mmap: bool = False) -> Data:
    """Open what the prepare stage wrote: the prepared arrays, or the index of a stream."""
    meta_path = paths.prepared / META_FILE
    if meta_path.is_file():
        try:
            meta = read_json(meta_path)
        except (OSError, ValueError):
            meta = {}  # load_prepared reports the damaged file
        if isinstance(meta, dict) and meta.get("format") == FORMAT:
            return open_stream(paths.prepared, meta)
    return load_prepared(paths.prepared, mmap=mmap)


def split_size(ds: Data, split: str) -> int:
    """Number of images in the train, val or test split (0: no validation split)."""
    if isinstance(ds, StreamData):
        return ds.count(split) if split in ds.meta.get("counts", {}) else 0
    part = getattr(ds, split)
    return 0 if part is None else len(part)


def eval_loader(ds: Data, cfg: Config, device: torch.device, split: str = "test",
                batch_size: int = 256) -> Any:
    """Un-augmented batches of a split, in order (evaluation, features, predictions)."""
    mean, std = norm_stats(ds)
    cl = cfg.runtime.channels_last
    if isinstance(ds, StreamData):
        return StreamLoader(ds, split, train=False, batch_size=batch_size, mean=mean, std=std,
                            device=device, channels_last=cl, workers=cfg.data.workers)
    part = getattr(ds, split)
    return InMemoryLoader(part.images, part.labels, batch_size=batch_size, mean=mean, std=std,
                          train=False, device=device, channels_last=cl)


def corrupt_metrics(ds: Data) -> dict[str, Any]:
    """The corrupt images a stage's stream loaders replaced (data.on_corrupt: skip), for its
    metrics JSON: nothing for in-memory data, whose prepare stage already skipped them."""
    if not isinstance(ds, StreamData):
        return {}
    summary = fault_summary(ds)
    if summary["files"]:
        from quest.infra.progress import log

        log.warning("%d corrupt image(s) were replaced %d time(s) while streaming (first: %s)",
                    summary["files"], summary["replaced"], ", ".join(summary["first"][:3]))
    return {"corrupt_samples": summary}


def norm_stats(ds: Data) -> tuple[list[float], list[float]]:
    """The per-channel mean and std recorded by the prepare stage."""
    try:
        return list(ds.meta["mean"]), list(ds.meta["std"])
    except KeyError:
        raise QuestError("prepared data has no normalisation stats: rerun quest prepare") from None


def make_loaders(
    ds: Data, cfg: Config, opt: OptimConfig, device: torch.device, rank: int = 0,
    world: int = 1,
) -> tuple[Any, Any]:
    """Train and test loaders: a stream's (this rank's share of every batch under torchrun),
    else the configured kind over the prepared arrays (in-memory or DataLoader)."""
    mean, std = norm_stats(ds)
    if isinstance(ds, StreamData):
        train = StreamLoader(ds, "train", train=True, batch_size=opt.batch_size, mean=mean,
                             std=std, seed=opt.seed, device=device,
                             channels_last=cfg.runtime.channels_last, repeat=opt.repeat,
                             rank=rank, world=world, workers=cfg.data.workers,
                             flip=cfg.data.flip, drop_last=opt.drop_last)
        return train, eval_loader(ds, cfg, device)
    common = {"mean": mean, "std": std, "padding": cfg.data.padding, "flip": cfg.data.flip,
              "padding_mode": cfg.data.padding_mode}
    if cfg.data.loader == "dataloader":
        train = make_dataloader(ds.train.images, ds.train.labels, batch_size=opt.batch_size,
                                train=True, seed=opt.seed, repeat=opt.repeat,
                                drop_last=opt.drop_last, **common)
        test = make_dataloader(ds.test.images, ds.test.labels, batch_size=256, train=False,
                               **common)
        return _EpochAware(train, device, cfg.runtime.channels_last), _EpochAware(
            test, device, cfg.runtime.channels_last)
    cl = cfg.runtime.channels_last
    train = InMemoryLoader(ds.train.images, ds.train.labels, batch_size=opt.batch_size,
                           train=True, seed=opt.seed, device=device, channels_last=cl,
                           repeat=opt.repeat, drop_last=opt.drop_last, **common)
    test = InMemoryLoader(ds.test.images, ds.test.labels, batch_size=256, train=False,
                          device=device, channels_last=cl, **common)
    return train, test


class _EpochAware:
    """Adapts a torch DataLoader to the loader protocol the Trainer uses (set_epoch, device)."""

    def __init__(self, loader: Any, device: torch.device, channels_last: bool) -> None:
        self.loader, self.device, self.channels_last = loader, device, channels_last
        gen = loader.generator
        self.base_seed = gen.initial_seed() if gen is not None else 0

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffling so that an epoch's order does not depend on earlier epochs."""
        if self.loader.generator is not None:
            self.loader.generator.manual_seed(self.base_seed * 1_000_003 + epoch)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def last_batch(self) -> int:
        """Size of an epoch's last batch (partial where it is kept)."""
        dl = self.loader
        return last_batch_size(len(dl.sampler), dl.batch_size, dl.drop_last)

    def __iter__(self):  # type: ignore[no-untyped-def]
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        # training batches carry each sample's index after the labels (ArrayDataset)
        for x, *rest in self.loader:
            x = x.to(self.device).contiguous(memory_format=fmt)
            yield (x, *(t.to(self.device) for t in rest))


def to_device(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Move a model to the device, in channels-last layout when asked (faster convolutions)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def write_csv_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows of dicts as CSV (union of keys, in first-seen order) atomically."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
