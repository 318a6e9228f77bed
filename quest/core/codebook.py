"""Codebook (visual-word vocabulary) maths: k-means with FAISS or torch, assignment, usage stats.

Both backends see the same training set and start from the same centroids, and report the same
per-iteration objective (total squared distance at that iteration's assignment step), so a run
with one can be checked against the other. FAISS is optional and imported lazily.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from quest.infra.errors import QuestError

BACKENDS = ("auto", "faiss", "torch")

# Relative perturbation used when an empty cluster is re-seeded by splitting another one; the
# same value as FAISS (a bit above float16 machine epsilon), so both backends split alike.
_SPLIT_EPS = 1.0 / 1024.0

# Elements of the (points x centroids) distance block computed at once. On CPU a block that stays
# near cache size is faster than one huge matmul; on GPU bigger blocks keep the device busy.
_CPU_BLOCK_ELEMENTS = 1 << 21
_GPU_BLOCK_ELEMENTS = 1 << 27

# Called after each k-means iteration with (iteration from 1, iterations, objective, re-seeds).
IterationCallback = Callable[[int, int, float, int], None]


def faiss_available() -> bool:
    """Return True if the faiss module can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_has_gpu() -> bool:
    """Return True if faiss is installed with GPU support and sees at least one GPU."""
    if not faiss_available():
        return False
    import faiss

    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    if get_num_gpus is None:
        return False
    try:
        return int(get_num_gpus()) > 0
    except RuntimeError:
        return False


def auto_backend(device: str) -> str:
    """Backend `auto` picks: FAISS, but on CUDA only its GPU build, else torch on the GPU."""
    if str(device).startswith("cuda"):
        return "faiss" if faiss_has_gpu() else "torch"
    return "faiss" if faiss_available() else "torch"


@dataclass
class KMeansResult:
    """Outcome of one k-means fit."""

    centroids: np.ndarray
    objective: list[float]
    reseeded: int
    backend: str
    seconds: float
    n_train: int = 0
    device: str = "cpu"


def _as_features(x: Any, name: str = "x") -> np.ndarray:
    """Validate a feature matrix and return it as contiguous float32."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise QuestError(
            f"{name} must be a 2-D (vectors x channels) array, got shape {arr.shape}: "
            "flatten the spatial positions into rows first"
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise QuestError(f"{name} has dtype {arr.dtype}: pass float32 feature vectors")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    # Checked after the cast: float64 values beyond float32 range become inf here.
    if not np.isfinite(arr).all():
        bad = int(arr.size - np.isfinite(arr).sum())
        raise QuestError(
            f"{name} contains {bad} NaN/Inf values: check the feature extraction "
            "(teacher weights, input normalisation) before fitting the codebook"
        )
    return arr


def _resolve_device(device: str) -> torch.device:
    """Turn a device string into a torch.device, failing with a one-line fix if unusable."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise QuestError(f"unknown device '{device}': use 'cpu' or 'cuda[:N]'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuestError(f"device '{device}' requested but CUDA is not available: set device: cpu")
    return dev


def _block_rows(k: int, dev: torch.device) -> int:
    """Rows per distance block so that rows x k stays within the memory budget."""
    budget = _GPU_BLOCK_ELEMENTS if dev.type == "cuda" else _CPU_BLOCK_ELEMENTS
    return max(1, budget // max(k, 1))


def sample_training_set(
    x: np.ndarray, k: int, *, seed: int = 0, max_points_per_centroid: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Return (training points, initial centroids) exactly as both k-means backends use them."""
    n = x.shape[0]
    limit = k * max_points_per_centroid
    if n > limit:
        # Sorted so the gather reads memory in order; a fresh generator per draw keeps the
        # initial centroids of a subsampled fit equal to those of a fit on that subsample.
        idx = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
        x = np.ascontiguousarray(x[idx])
    init_idx = np.random.default_rng(seed).choice(x.shape[0], size=k, replace=False)
    return x, np.ascontiguousarray(x[init_idx])


def _nearest(
    x: torch.Tensor,
    c: torch.Tensor,
    x_sq: torch.Tensor,
    rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid and squared distance for every row of x, one bounded block at a time."""
    n, k = x.shape[0], c.shape[0]
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    dists = torch.empty(n, dtype=x.dtype, device=x.device)
    c_sq = (c * c).sum(dim=1)
    ct = c.t()
    buf = torch.empty(min(rows, n), k, dtype=x.dtype, device=x.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        block = buf[: stop - start]
        # ||x||^2 is constant per row, so the argmin only needs ||c||^2 - 2 x.c.
        torch.addmm(c_sq, x[start:stop], ct, beta=1.0, alpha=-2.0, out=block)
        torch.min(block, dim=1, out=(dists[start:stop], labels[start:stop]))
    dists.add_(x_sq).clamp_(min=0.0)  # clamp: cancellation can make tiny distances negative
    return labels, dists


def _split_empty(centroids: torch.Tensor, counts: torch.Tensor) -> int:
    """Re-seed empty clusters by splitting the largest one, as FAISS does; return the count."""
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return 0
    c = centroids.cpu().numpy()
    hassign = counts.cpu().numpy().astype(np.float64)
    sign = np.where(np.arange(c.shape[1]) % 2 == 0, 1.0, -1.0).astype(np.float32)
    for ci in empty:
        cj = int(np.argmax(hassign))
        # Two centroids nudged apart symmetrically around the old one; the next assignment
        # step divides that cluster between them.
        c[ci] = c[cj] * (1.0 + _SPLIT_EPS * sign)
        c[cj] = c[cj] * (1.0 - _SPLIT_EPS * sign)
        # Assume an even split, so several empties in one step don't all pick the same cluster.
        hassign[ci] = hassign[cj] / 2
        hassign[cj] -= hassign[ci]
    centroids.copy_(torch.from_numpy(c))
    return len(empty)


def _fit_torch(
    x: np.ndarray, init: np.ndarray, iterations: int, dev: torch.device, verbose: bool,
    on_iteration: IterationCallback | None = None,
) -> tuple[np.ndarray, list[float], int]:
    """Lloyd's algorithm in torch; returns (centroids, objective per iteration, re-seeds)."""
    k = init.shape[0]
    # a read-only (memory-mapped) sample is copied: torch tensors over it would be writable
    xt = torch.from_numpy(x if x.flags.writeable else x.copy()).to(dev)
    c = torch.from_numpy(init.copy()).to(dev)
    x_sq = (xt * xt).sum(dim=1)
    rows = _block_rows(k, dev)
    objective: list[float] = []
    reseeded = 0
    t0 = time.perf_counter()
    for it in range(iterations):
        labels, dists = _nearest(xt, c, x_sq, rows)
        objective.append(float(dists.sum(dtype=torch.float64).item()))
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, labels, xt)
        # Empty clusters get a zero centroid here and are re-seeded just below.
        c = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
        nsplit = _split_empty(c, counts)
        reseeded += nsplit
        if verbose:
            print(
                f"  iteration {it} ({time.perf_counter() - t0:.2f} s): "
                f"objective={objective[-1]:.6g} nsplit={nsplit}",
                flush=True,
            )
        if on_iteration is not None:
            on_iteration(it + 1, iterations, objective[-1], nsplit)
    return c.cpu().numpy(), objective, reseeded


def _fit_faiss(
    x: np.ndarray, init: np.ndarray, iterations: int, seed: int, use_gpu: bool, verbose: bool,
    on_iteration: IterationCallback | None = None,
) -> tuple[np.ndarray, list[float], int]:
    """faiss.Kmeans from the given centroids; returns (centroids, objective, re-seeds).

    With `on_iteration`, FAISS is run one iteration per call, each starting from the last
    centroids, to report progress; the result is bitwise the same as one call (FAISS starts
    every call from the given centroids, and its empty-cluster split uses a fixed seed).
    """
    import faiss

    n, d = x.shape
    k = init.shape[0]

    def kmeans(niter: int) -> Any:
        return faiss.Kmeans(
            d,
            k,
            niter=niter,
            seed=seed,
            verbose=verbose,
            spherical=False,
            gpu=use_gpu,
            # x is already subsampled; these keep faiss from drawing its own sample or printing
            # a "too few points" warning to stderr from C++.
            max_points_per_centroid=max(1, -(-n // k)),
            min_points_per_centroid=1,
        )

    steps = [iterations] if on_iteration is None else [1] * iterations
    centroids = init
    stats: list[Any] = []
    for step in steps:
        km = kmeans(step)
        km.train(x, init_centroids=centroids)
        centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
        stats += list(km.iteration_stats or [])
        if on_iteration is not None:
            on_iteration(len(stats), iterations, float(stats[-1]["obj"]),
                         int(stats[-1]["nsplit"]))
    objective = [float(s["obj"]) for s in stats]
    reseeded = int(sum(int(s["nsplit"]) for s in stats))
    return centroids, objective, reseeded


@contextlib.contextmanager
def faiss_threads(threads: int | None) -> Iterator[None]:
    """FAISS's OpenMP thread count set to `threads` inside the block (None: unchanged)."""
    if threads is None:
        yield
        return
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(threads))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _check_backend(backend: str) -> None:
    """One-line errors for an unknown backend or a FAISS that is not installed."""
    if backend not in BACKENDS:
        raise QuestError(
            f"unknown k-means backend '{backend}': choose one of {', '.join(BACKENDS)} "
            "(set codebook.backend)"
        )
    if backend == "faiss" and not faiss_available():
        raise QuestError(
            "k-means backend 'faiss' requested but faiss is not installed: "
            "pip install faiss-cpu, or set codebook.backend: torch"
        )


def _check_sizes(k: int, n: int, iterations: int, max_points_per_centroid: int) -> None:
    """One-line errors for a codebook bigger than its data and other impossible settings."""
    if k < 2:
        raise QuestError(f"codebook size K={k} is too small: set codebook.k to at least 2")
    if k > n:
        raise QuestError(
            f"codebook size K={k} is larger than the {n} feature vectors: lower codebook.k "
            "or extract more features (features.max_vectors)"
        )
    if iterations < 1:
        raise QuestError(
            f"k-means needs at least 1 iteration, got {iterations}: set codebook.iterations >= 1"
        )
    if max_points_per_centroid < 1:
        raise QuestError(
            f"max_points_per_centroid={max_points_per_centroid} must be >= 1: "
            "set codebook.max_points_per_centroid"
        )


def fit_kmeans(
    x: np.ndarray,
    k: int,
    *,
    iterations: int = 20,
    seed: int = 0,
    backend: str = "auto",
    max_points_per_centroid: int = 256,
    device: str = "cpu",
    verbose: bool = False,
    on_iteration: IterationCallback | None = None,
    threads: int | None = None,
) -> KMeansResult:
    """Fit a plain squared-Euclidean k-means codebook of k words to the rows of x.

    `on_iteration(i, iterations, objective, reseeded)` is called after every iteration of
    either backend (progress reporting). `threads`: FAISS's OpenMP threads for this fit (its
    own runtime, which torch.set_num_threads does not reach; None leaves it as it is). On one
    machine a fit is byte-identical for a given input, seed and thread count.
    """
    t0 = time.perf_counter()
    _check_backend(backend)
    resolved = backend if backend != "auto" else auto_backend(device)
    x = _as_features(x)
    k = int(k)
    _check_sizes(k, x.shape[0], iterations, max_points_per_centroid)
    dev = _resolve_device(device)

    x_train, init = sample_training_set(
        x, k, seed=seed, max_points_per_centroid=max_points_per_centroid
    )
    if x_train.shape[0] == k:
        # Every point is its own word; both backends would only copy the data (FAISS does).
        return KMeansResult(centroids=x_train.copy(), objective=[0.0], reseeded=0,
                            backend=resolved, seconds=time.perf_counter() - t0, n_train=k,
                            device=str(dev))

    if resolved == "faiss":
        use_gpu = dev.type == "cuda" and faiss_has_gpu()
        with faiss_threads(threads):
            centroids, objective, reseeded = _fit_faiss(
                x_train, init, iterations, seed, use_gpu, verbose, on_iteration
            )
        used_device = str(dev) if use_gpu else "cpu"
    else:
        with torch.inference_mode():
            centroids, objective, reseeded = _fit_torch(
                x_train, init, iterations, dev, verbose, on_iteration
            )
        used_device = str(dev)
    return KMeansResult(centroids=centroids, objective=objective, reseeded=reseeded,
                        backend=resolved, seconds=time.perf_counter() - t0,
                        n_train=int(x_train.shape[0]), device=used_device)


def _assign_with_distances(
    x: np.ndarray, centroids: np.ndarray, chunk: int, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (int64) and squared distance (float32) per row, computed in chunks."""
    x = _as_features(x)
    c = _as_features(centroids, "centroids")
    if c.shape[1] != x.shape[1]:
        raise QuestError(
            f"features have {x.shape[1]} channels but the codebook has {c.shape[1]}: "
            "extract features at the layer the codebook was fitted on"
        )
    if chunk < 1:
        raise QuestError(f"assign chunk={chunk} must be >= 1")
    dev = _resolve_device(device)
    labels = np.empty(x.shape[0], dtype=np.int64)
    dists = np.empty(x.shape[0], dtype=np.float32)
    with torch.inference_mode():
        ct = torch.from_numpy(c).to(dev)
        rows = min(chunk, _block_rows(c.shape[0], dev))
        # Chunks are moved to the device one at a time so x itself may exceed device memory.
        for start in range(0, x.shape[0], chunk):
            # a copy: x may be a read-only memory map, which torch cannot wrap safely
            xb = torch.tensor(x[start : start + chunk], device=dev)
            lab, dis = _nearest(xb, ct, (xb * xb).sum(dim=1), rows)
            labels[start : start + xb.shape[0]] = lab.cpu().numpy()
            dists[start : start + xb.shape[0]] = dis.cpu().numpy()
    return labels, dists


def assign(
    x: np.ndarray, centroids: np.ndarray, *, chunk: int = 65536, device: str = "cpu"
) -> np.ndarray:
    """Index (int64) of the nearest centroid, in squared Euclidean distance, for every row of x."""
    return _assign_with_distances(x, centroids, chunk, device)[0]


def usage_perplexity(counts: np.ndarray) -> float:
    """exp(entropy) of the empirical distribution given by counts: K if uniform, 1 if one word."""
    p = np.asarray(counts, dtype=np.float64)
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p[p > 0] / total
    return float(math.exp(-(p * np.log(p)).sum()))


def codebook_stats(
    x: np.ndarray, centroids: np.ndarray, *, chunk: int = 65536, device: str = "cpu"
) -> dict[str, Any]:
    """Word usage histogram, perplexity, dead words and k-means objective of x on a codebook."""
    labels, dists = _assign_with_distances(x, centroids, chunk, device)
    k = int(np.asarray(centroids).shape[0])
    counts = np.bincount(labels, minlength=k)
    total = float(dists.sum(dtype=np.float64))
    n = int(labels.shape[0])
    return {
        "k": k,
        "n": n,
        "usage": [int(v) for v in counts],
        "perplexity": usage_perplexity(counts),
        "dead_words": int((counts == 0).sum()),
        "usage_max": int(counts.max()) if k else 0,
        "usage_min": int(counts.min()) if k else 0,
        "objective_total": total,
        "objective_mean": total / n if n else 0.0,
    }
