"""Feature stage: the frozen teacher's layer vectors over the un-augmented training split."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quest.apps.provenance import machine
from quest.apps.stages.common import (
    eval_loader,
    load_data,
    norm_stats,
    resolve_device,
    split_size,
    to_device,
)
from quest.core.checkpoint import load_model_file
from quest.core.data.loader import InMemoryLoader
from quest.core.data.stream import StreamData
from quest.core.losses import pool_teacher_map
from quest.core.models.taps import FeatureTap
from quest.core.models.zoo import default_feature_layer
from quest.infra.config import Config
from quest.infra.io_utils import NpyAppender, atomic_path, file_sha256, write_json_atomic
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


# A stream's sample when features.max_vectors is unset: what FAISS's k-means samples at
# K = 4096 (256 points per centroid), so the file and the k-means over it stay bounded however
# large the dataset.
STREAM_MAX_VECTORS = 4096 * 256


def stream_keep(cfg: Config, positions: int) -> int:
    """How many vectors the features stage keeps of a stream's `positions`."""
    cap = cfg.features.max_vectors
    return min(STREAM_MAX_VECTORS if cap is None else cap, positions)


def _append_sampled(out: NpyAppender, loader: Any, model: torch.nn.Module, tap: FeatureTap,
                    layer: str, pool: int, total: int, keep: int, seed: int,
                    progress: str) -> None:
    """Stream the teacher over the loader, appending a seeded uniform sample of exactly `keep`
    of the `total` positions: each batch takes a hypergeometric share of what is still needed,
    so no index over all positions is ever held."""
    rng = np.random.default_rng(seed)
    remaining, needed = total, keep
    for x, _ in track(loader, len(loader), "features", progress, lines=True):
        model(x)
        fmap = pool_teacher_map(tap.outputs[layer].float(), pool)
        vecs = fmap.permute(0, 2, 3, 1).reshape(-1, fmap.shape[1])
        m = min(vecs.shape[0], remaining)
        take = int(rng.hypergeometric(needed, remaining - needed, m)) if needed else 0
        if take:
            rows = np.sort(rng.choice(m, size=take, replace=False))
            out.append(vecs[torch.as_tensor(rows, device=vecs.device)].cpu().numpy())
        remaining -= m
        needed -= take


def _run_stream_features(cfg: Config, paths: Paths, ds: StreamData, model: torch.nn.Module,
                         layer: str, device: torch.device) -> dict[str, Any]:
    """The features stage over a stream: un-augmented evaluation crops of the training split,
    sampled vectors appended to a .npy that grows as it goes."""
    f = cfg.features
    loader = eval_loader(ds, cfg, device, split="train", batch_size=f.batch_size)
    n_images = split_size(ds, "train")
    t0 = time.perf_counter()
    with FeatureTap(model, [layer]) as tap, torch.inference_mode():
        dummy = torch.zeros(1, *ds.image_shape, device=device)
        model(dummy)
        raw_shape = [int(v) for v in tap.outputs[layer].shape[1:]]
        c, h, w = pool_teacher_map(tap.outputs[layer], f.pool).shape[1:]
        total = n_images * h * w
        keep = stream_keep(cfg, total)
        with NpyAppender(paths.features, np.float16 if f.dtype == "float16" else np.float32,
                         int(c)) as out:
            _append_sampled(out, loader, model, tap, layer, f.pool, total, keep, f.seed,
                            cfg.runtime.progress)
        written = out.rows
    return {"raw_shape": raw_shape, "map": (int(c), int(h), int(w)), "images": n_images,
            "total": total, "keep": written, "sampled": written < total,
            "seconds": time.perf_counter() - t0, "device": device}


def run_features(cfg: Config, paths: Paths) -> dict[str, Any]:
    """Write data/features/teacher_features.npy (vectors x C) and its metadata."""
    device = resolve_device(cfg)
    ds = load_data(paths, mmap=True)
    model, meta = load_model_file(paths.teacher_model, "teacher model")
    model = to_device(model, device, cfg.runtime.channels_last).eval()
    layer = teacher_layer(cfg, str(meta["arch"]))
    f = cfg.features
    if ds.streamed:  # vectors appended as the stream is read (memory bounded)
        got = _run_stream_features(cfg, paths, ds, model, layer, device)
        return _write_meta(cfg, paths, meta, layer, got)
    mean, std = norm_stats(ds)
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
    got = {"raw_shape": raw_shape, "map": (int(c), int(h), int(w)), "images": n_images,
           "total": total, "keep": keep, "sampled": chosen is not None,
           "seconds": time.perf_counter() - t0, "device": device}
    return _write_meta(cfg, paths, meta, layer, got)


def _write_meta(cfg: Config, paths: Paths, meta: dict[str, Any], layer: str,
                got: dict[str, Any]) -> dict[str, Any]:
    """Write data/features/meta.json from what the extraction found; returns it."""
    f = cfg.features
    c, h, w = got["map"]
    seconds = got["seconds"]
    info = {
        "teacher_sha256": file_sha256(paths.teacher_model),
        "teacher_arch": meta["arch"],
        "layer": layer,
        "map_shape": [c, h, w],
        "pool": f.pool,
        "layer_shape": got["raw_shape"],
        "images": int(got["images"]),
        "positions": int(got["total"]),
        "vectors": int(got["keep"]),
        "sampled": bool(got["sampled"]),
        "seed": f.seed,
        "dtype": f.dtype,
        "seconds": round(seconds, 2),
        "images_per_s": round(got["images"] / max(seconds, 1e-9), 1),
        # the vectors' bits depend on the processor's kernels and the thread count too
        "machine": machine(got.get("device")),
    }
    write_json_atomic(paths.features_meta, info)
    log.info("features: %d vectors of %s (%dx%dx%d%s) in %.1fs", got["keep"], layer, c, h, w,
             f", pooled {f.pool}x{f.pool}" if f.pool > 1 else "", seconds)
    return info
