"""Helpers shared by the stages: devices, prepared data, loaders and model files."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quest.core.data.prepared import META_FILE, load_prepared
from quest.core.data.source import ImageData, LoaderSettings, TrainOptions
from quest.core.data.stream import FORMAT, open_stream
from quest.infra.config import Config, OptimConfig
from quest.infra.errors import QuestError
from quest.infra.io_utils import atomic_path, read_json
from quest.infra.malloc import keep_freed_memory
from quest.infra.paths import Paths


def resolve_device(cfg: Config) -> torch.device:
    """The torch device to use (auto: CUDA when present), after applying the thread setting
    and glibc's allocator thresholds (quest/infra/malloc.py: freed activations are reused
    instead of mapped afresh each step; benchmarks/malloc_step.py)."""
    keep_freed_memory()
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


Data = ImageData


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
    return ds.split_size(split)


def loader_settings(ds: Data, cfg: Config, device: torch.device) -> LoaderSettings:
    """The batching settings of `cfg` for either data format."""
    mean, std = norm_stats(ds)
    d = cfg.data
    return LoaderSettings(mean=mean, std=std, device=device,
                          channels_last=cfg.runtime.channels_last, workers=d.workers,
                          flip=d.flip, padding=d.padding, padding_mode=d.padding_mode,
                          kind=d.loader)


def eval_loader(ds: Data, cfg: Config, device: torch.device, split: str = "test",
                batch_size: int = 256) -> Any:
    """Un-augmented batches of a split, in order (evaluation, features, predictions)."""
    return ds.eval_loader(split, batch_size, loader_settings(ds, cfg, device))


def corrupt_metrics(ds: Data) -> dict[str, Any]:
    """The corrupt images a stage's stream loaders replaced (data.on_corrupt: skip), for its
    metrics JSON: nothing for in-memory data, whose prepare stage already skipped them."""
    summary = ds.fault_summary()
    if summary is None:
        return {}
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
    return ds.loaders(TrainOptions(batch_size=opt.batch_size, seed=opt.seed, repeat=opt.repeat,
                                   drop_last=opt.drop_last, rank=rank, world=world),
                      loader_settings(ds, cfg, device))


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
