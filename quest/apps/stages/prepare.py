"""Prepare stage: read the configured source into the prepared uint8 format under data/."""

from __future__ import annotations

from typing import Any

from quest.apps.stages.common import resolve_location
from quest.core.data.loader import channel_stats
from quest.core.data.prepared import save_prepared
from quest.core.data.sources import prepare_dataset
from quest.core.data.stream import StreamData, scan, write_index
from quest.infra.config import Config
from quest.infra.errors import QuestError
from quest.infra.paths import Paths
from quest.infra.progress import bars_enabled, log


def run_prepare(cfg: Config, paths: Paths) -> dict[str, Any]:
    """Read, optionally subset, compute normalisation stats and write data/prepared/."""
    d = cfg.data
    sub = d.subset
    wants_subset = sub.train_per_class is not None or sub.test_per_class is not None
    validation = (d.validation_per_class, d.validation_seed) if d.validation_per_class else None
    if d.format == "stream":
        if validation is not None:
            raise QuestError("data.format stream has no validation split yet: set "
                             "data.validation_per_class: 0, or use data.format: prepared")
        return _prepare_stream(cfg, paths, (sub.train_per_class, sub.test_per_class, sub.seed)
                               if wants_subset else None)
    ds = prepare_dataset(
        d.source,
        resolve_location(d.location, paths.root),
        image_size=d.image_size,
        channels=d.channels,
        on_corrupt=d.on_corrupt,
        download=d.download,
        progress=bars_enabled(cfg.runtime.progress),
        subset=(sub.train_per_class, sub.test_per_class, sub.seed) if wants_subset else None,
        validation=validation,
    )
    if d.mean is not None and d.std is not None:
        mean, std = list(d.mean), list(d.std)
    else:
        mean, std = channel_stats(ds.train.images)
    ds.meta.update({"mean": mean, "std": std})
    save_prepared(ds, paths.prepared)
    summary = {
        "train": int(len(ds.train.labels)),
        "test": int(len(ds.test.labels)),
        "val": len(ds.val) if ds.val is not None else 0,
        "classes": len(ds.classes),
        "image_shape": list(ds.train.images.shape[1:]),
        "mean": mean,
        "std": std,
    }
    if "validation" in ds.meta:
        summary["validation"] = ds.meta["validation"]
    log.info("prepared %s: %d train, %d validation, %d test, %d classes, images %s%s",
             d.source, summary["train"], summary["val"], summary["test"], summary["classes"],
             "x".join(map(str, summary["image_shape"])),
             f" (validation {ds.meta['validation']['drawn_from']})" if summary["val"] else "")
    return summary


# images whose pixel statistics estimate the normalisation of a stream (when not configured)
STATS_SAMPLE = 512


def _prepare_stream(cfg: Config, paths: Paths,
                    subset: tuple[int | None, int | None, int] | None) -> dict[str, Any]:
    """Index an image folder or WebDataset shards for streaming (nothing is decoded whole)."""
    d = cfg.data
    if d.source != "image_folder":
        raise QuestError(f"data.format stream reads image folders and shards, not {d.source}: "
                         "set data.format: prepared for CIFAR pickles")
    if d.image_size is None:
        raise QuestError("data.format stream needs data.image_size (the side of the training "
                         "crop and the evaluation center-crop): set it, e.g. 224 for ImageNet")
    location = resolve_location(d.location, paths.root)
    if location is None:
        raise QuestError("data.location is not set: point it at an image folder or shards")
    from pathlib import Path

    index = scan(Path(location), d.on_corrupt, subset)
    settings = {"image_size": d.image_size, "channels": d.channels,
                "crop_scale_min": d.crop_scale_min, "eval_crop_ratio": d.eval_crop_ratio,
                "shuffle_buffer": d.shuffle_buffer, "on_corrupt": d.on_corrupt}
    stats: dict[str, Any] = {"mean": d.mean, "std": d.std}
    if d.mean is None or d.std is None:
        # the normalisation from a seeded sample of evaluation crops: bounded work and memory;
        # computed before anything is written, so the index never lacks it
        sample, _ = StreamData(index.root, index.kind, index.classes, index.items,
                               settings).sample_images("train", STATS_SAMPLE, d.subset.seed)
        mean, std = channel_stats(sample)
        stats = {"mean": mean, "std": std, "stats_from_images": len(sample)}
    meta = write_index(index, paths.prepared, {**settings, **stats})
    summary = {
        "format": "stream",
        "kind": index.kind,
        "train": index.count("train"),
        "test": index.count("test"),
        "classes": len(index.classes),
        "image_shape": [d.channels, d.image_size, d.image_size],
        "mean": meta["mean"],
        "std": meta["std"],
        "skipped": len(index.skipped),
    }
    log.info("indexed %s for streaming (%s): %d train, %d test, %d classes, crops %dx%d%s",
             location, index.kind, summary["train"], summary["test"], summary["classes"],
             d.image_size, d.image_size,
             f", {len(index.skipped)} unreadable files skipped" if index.skipped else "")
    return summary
