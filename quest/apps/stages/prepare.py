"""Prepare stage: read the configured source into the prepared uint8 format under data/."""

from __future__ import annotations

from typing import Any

from quest.apps.stages.common import resolve_location
from quest.core.data.loader import channel_stats
from quest.core.data.prepared import save_prepared
from quest.core.data.sources import prepare_dataset
from quest.infra.config import Config
from quest.infra.paths import Paths
from quest.infra.progress import bars_enabled, log


def run_prepare(cfg: Config, paths: Paths) -> dict[str, Any]:
    """Read, optionally subset, compute normalisation stats and write data/prepared/."""
    d = cfg.data
    sub = d.subset
    wants_subset = sub.train_per_class is not None or sub.test_per_class is not None
    ds = prepare_dataset(
        d.source,
        resolve_location(d.location, paths.root),
        image_size=d.image_size,
        channels=d.channels,
        on_corrupt=d.on_corrupt,
        download=d.download,
        progress=bars_enabled(cfg.runtime.progress),
        subset=(sub.train_per_class, sub.test_per_class, sub.seed) if wants_subset else None,
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
        "classes": len(ds.classes),
        "image_shape": list(ds.train.images.shape[1:]),
        "mean": mean,
        "std": std,
    }
    log.info("prepared %s: %d train, %d test, %d classes, images %s",
             d.source, summary["train"], summary["test"], summary["classes"],
             "x".join(map(str, summary["image_shape"])))
    return summary
