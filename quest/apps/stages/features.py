"""Feature stage: the frozen teacher's layer vectors over the un-augmented training split."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quest.apps.stages.common import load_data, norm_stats, resolve_device, to_device
from quest.core.checkpoint import load_model_file
from quest.core.data.loader import InMemoryLoader
from quest.core.losses import pool_teacher_map
from quest.core.models.taps import FeatureTap
from quest.core.models.zoo import default_feature_layer
from quest.infra.config import Config
from quest.infra.io_utils import atomic_path, file_sha256, write_json_atomic
from quest.infra.paths import Paths
from quest.infra.progress import log, track


def _reserve(path: Path) -> None:
    """Allocate a file's blocks up front where the OS and filesystem support it."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise


def teacher_layer(cfg: Config, arch: str) -> str:
    """The teacher layer to quantize: the configured one, or the architecture's default."""
    return cfg.features.layer or default_feature_layer(arch)


def _sample(total: int, max_vectors: int | None, seed: int) -> np.ndarray | None:
    """Sorted positions of a seeded sample of `max_vectors` of `total` (None: keep all)."""
    keep = total if max_vectors is None else min(max_vectors, total)
    if keep >= total:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size=keep, replace=False))


def _write_vectors(path: Path, loader: Any, model: torch.nn.Module, tap: FeatureTap,
                   layer: str, pool: int, shape: tuple[int, int], chosen: np.ndarray | None,
                   dtype: Any, progress: str) -> None:
    """Stream the teacher over the loader into a preallocated .npy of `shape` (rows x C)."""
    keep, c = shape
    start = written = 0
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(keep, c))
        # reserve the blocks now: a disk that fills while writing through the memory map
        # kills the process with SIGBUS; here it is an ENOSPC that atomic_path reports
        _reserve(tmp)
        for x, _ in track(loader, len(loader), "features", progress, lines=True):
            model(x)
            fmap = pool_teacher_map(tap.outputs[layer].float(), pool)
            vecs = fmap.permute(0, 2, 3, 1).reshape(-1, c)
            end = start + vecs.shape[0]
            if chosen is None:
                rows = vecs
            else:
                lo, hi = np.searchsorted(chosen, [start, end])
                rows = vecs[torch.as_tensor(chosen[lo:hi] - start, device=vecs.device)]
            out[written : written + rows.shape[0]] = rows.cpu().numpy().astype(dtype)
            written += rows.shape[0]
            start = end
        out.flush()
        del out


def run_features(cfg: Config, paths: Paths) -> dict[str, Any]:
    """Write data/features/teacher_features.npy (vectors x C) and its metadata."""
    device = resolve_device(cfg)
    ds = load_data(paths, mmap=True)
    mean, std = norm_stats(ds)
    model, meta = load_model_file(paths.teacher_model, "teacher model")
    model = to_device(model, device, cfg.runtime.channels_last).eval()
    layer = teacher_layer(cfg, str(meta["arch"]))
    f = cfg.features
    loader = InMemoryLoader(ds.train.images, ds.train.labels, batch_size=f.batch_size,
                            mean=mean, std=std, train=False, device=device,
                            channels_last=cfg.runtime.channels_last)
    n_images = loader.num_samples
    t0 = time.perf_counter()
    with FeatureTap(model, [layer]) as tap, torch.inference_mode():
        # one image tells the map shape, so the output can be preallocated
        first, _ = next(iter(loader))
        model(first[:1])
        raw_shape = [int(v) for v in tap.outputs[layer].shape[1:]]
        # the map k-means sees is the one the QuEST loss will assign: pooled alike
        c, h, w = pool_teacher_map(tap.outputs[layer], f.pool).shape[1:]
        total = n_images * h * w
        chosen = _sample(total, f.max_vectors, f.seed)
        keep = total if chosen is None else len(chosen)
        _write_vectors(paths.features, loader, model, tap, layer, f.pool, (keep, c), chosen,
                       np.float16 if f.dtype == "float16" else np.float32,
                       cfg.runtime.progress)
    seconds = time.perf_counter() - t0
    info = {
        "teacher_sha256": file_sha256(paths.teacher_model),
        "teacher_arch": meta["arch"],
        "layer": layer,
        "map_shape": [int(c), int(h), int(w)],
        "pool": f.pool,
        "layer_shape": raw_shape,
        "images": int(n_images),
        "positions": int(total),
        "vectors": int(keep),
        "sampled": chosen is not None,
        "seed": f.seed,
        "dtype": f.dtype,
        "seconds": round(seconds, 2),
        "images_per_s": round(n_images / seconds, 1),
    }
    write_json_atomic(paths.features_meta, info)
    log.info("features: %d vectors of %s (%dx%dx%d%s) in %.1fs", keep, layer, c, h, w,
             f", pooled {f.pool}x{f.pool}" if f.pool > 1 else "", seconds)
    return info
