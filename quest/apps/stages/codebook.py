"""Codebook stage: k-means over the teacher's feature vectors, written to models/codebook/."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from quest.apps.provenance import code_fingerprint, machine
from quest.apps.stages.common import resolve_device, write_csv_atomic
from quest.core.codebook import KMeansResult, codebook_stats, fit_kmeans, sample_training_set
from quest.infra.config import Config
from quest.infra.errors import QuestError
from quest.infra.io_utils import file_sha256, read_json, save_npy_atomic, write_json_atomic
from quest.infra.paths import Paths
from quest.infra.progress import Progress, log


def run_codebook(cfg: Config, paths: Paths) -> dict[str, Any]:
    """Fit the visual-word vocabulary and record its objective, usage and perplexity."""
    if not paths.features.is_file():
        raise QuestError(f"{paths.features} does not exist: run `quest features` first")
    c = cfg.codebook
    device = resolve_device(cfg)
    feats = np.load(paths.features, mmap_mode="r")
    log.info("codebook: k-means K=%d on %d x %d vectors (%s backend)", c.k, *feats.shape,
             c.backend)
    with Progress(c.iterations, "codebook k-means", cfg.runtime.progress) as progress:
        result = fit_kmeans(
            feats, c.k, iterations=c.iterations, seed=c.seed, backend=c.backend,
            max_points_per_centroid=c.max_points_per_centroid, device=str(device),
            # runtime.threads reaches FAISS too: its thread count can change the codebook's bits
            threads=cfg.runtime.threads,
            on_iteration=lambda i, n, obj, split: progress.update(
                info=f"objective {obj:.6g}" + (f", {split} re-seeded" if split else "")))
    # statistics over the same points k-means saw (all of them when they fit)
    sample, _ = sample_training_set(
        feats, c.k, seed=c.seed, max_points_per_centroid=c.max_points_per_centroid
    )
    stats = codebook_stats(sample, result.centroids, device=str(device))
    save_npy_atomic(paths.codebook, result.centroids.astype(np.float32))
    write_json_atomic(paths.codebook_meta, _codebook_meta(cfg, paths, result, device))
    metrics = {
        "k": c.k,
        "perplexity": stats["perplexity"],
        "dead_words": stats["dead_words"],
        "reseeded": result.reseeded,
        "objective_mean": stats["objective_mean"],
        "usage_max": stats["usage_max"],
        "usage_min": stats["usage_min"],
        "seconds": round(result.seconds, 2),
        "backend": result.backend,
    }
    _write_metrics(paths, metrics, result.objective, stats["usage"])
    log.info("codebook: perplexity %.1f of K=%d, %d dead words, %d re-seeded, %.1fs",
             stats["perplexity"], c.k, stats["dead_words"], result.reseeded, result.seconds)
    return metrics


def _codebook_meta(cfg: Config, paths: Paths, result: KMeansResult,
                   device: torch.device) -> dict[str, Any]:
    """codebook_meta.json: what the words were fitted from and with, and on which machine."""
    c = cfg.codebook
    feats_meta = read_json(paths.features_meta)
    meta = {
        "k": c.k,
        "dim": int(result.centroids.shape[1]),
        "layer": feats_meta["layer"],
        # what training must apply to the teacher's map before assigning words (older
        # features metadata has no pool: it was unpooled)
        "pool": int(feats_meta.get("pool", 1)),
        "map_shape": feats_meta.get("map_shape"),
        "teacher_sha256": feats_meta["teacher_sha256"],
        "features_sha256": file_sha256(paths.features),
        "codebook_sha256": file_sha256(paths.codebook),
        "backend": result.backend,
        "device": result.device,
        "iterations": c.iterations,
        "seed": c.seed,
        "max_points_per_centroid": c.max_points_per_centroid,
        "trained_on": result.n_train,
        "seconds": round(result.seconds, 2),
        # what else the bits depend on (docs/provenance.md): the processor and thread counts
        "machine": machine(device),
        "code_fingerprint": code_fingerprint(),
    }
    if result.backend == "faiss" and cfg.runtime.threads:
        meta["machine"]["faiss_threads"] = cfg.runtime.threads  # the fit's, restored after
    return meta


def _write_metrics(paths: Paths, metrics: dict[str, Any], objective: list[float],
                   usage_counts: Any) -> None:
    """metrics/codebook.json, the k-means objective per iteration and the word-usage histogram."""
    write_json_atomic(paths.codebook_metrics, metrics)
    write_csv_atomic(
        paths.codebook_plot("objective"),
        [{"iteration": i + 1, "objective": v} for i, v in enumerate(objective)],
    )
    usage = np.asarray(usage_counts)
    order = np.argsort(-usage, kind="stable")
    # the word-usage histogram, most used first (rank for plotting, word for lookup)
    write_csv_atomic(
        paths.codebook_plot("usage"),
        [{"rank": r + 1, "word": int(w), "count": int(usage[w])} for r, w in enumerate(order)],
    )
