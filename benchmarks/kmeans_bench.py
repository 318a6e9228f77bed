"""Benchmark the FAISS and torch k-means backends on the same random data and the same init.

Usage: python benchmarks/kmeans_bench.py [--n 200000 --dim 64 --k 256 --iterations 20]
Writes benchmarks/results/kmeans.json (atomically) and prints a short summary.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "kmeans.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000, help="number of vectors")
    p.add_argument("--dim", type=int, default=64, help="vector dimension")
    p.add_argument("--k", type=int, default=256, help="number of centroids")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="fits per backend; the best is kept")
    p.add_argument("--device", default="cpu", help="cpu or cuda (torch backend; faiss if GPU)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for both (0: default)")
    p.add_argument(
        "--backends", default="faiss,torch", help="comma-separated subset of faiss,torch"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    return p.parse_args(argv)


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU jiffies of the whole machine from /proc/stat, or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
    except OSError:
        return None
    vals = [int(v) for v in fields]
    idle = vals[3] + vals[4]  # idle + iowait
    return sum(vals) - idle, sum(vals)


def _others_busy(before: tuple[int, int] | None, own_cpu_s: float) -> float | None:
    """Fraction of all cores busy with other processes since `before` (shared-machine noise)."""
    after = _cpu_jiffies()
    if before is None or after is None or after[1] <= before[1]:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    busy = (after[0] - before[0]) / tick
    total = (after[1] - before[1]) / tick
    return max(0.0, (busy - own_cpu_s) / total)


def machine_info(device: str) -> dict[str, Any]:
    """Platform, CPU and library versions, so numbers can be compared across machines."""
    import torch

    from quest import codebook

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "cuda_device": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "faiss": None,
        "faiss_gpu": False,
    }
    if codebook.faiss_available():
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_omp_threads"] = faiss.omp_get_max_threads()
        info["faiss_gpu"] = codebook.faiss_has_gpu()
    return info


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the JSON report."""
    args = parse_args(argv)
    if str(REPO_ROOT) not in sys.path:
        # Lets the script run from a checkout without installing the package.
        sys.path.insert(0, str(REPO_ROOT))
    import torch

    from quest import codebook
    from quest.io_utils import write_json_atomic

    if args.threads > 0:
        torch.set_num_threads(args.threads)
        if codebook.faiss_available():
            import faiss

            faiss.omp_set_num_threads(args.threads)

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if "faiss" in backends and not codebook.faiss_available():
        print("faiss is not installed: benchmarking the torch backend only", file=sys.stderr)
        backends = [b for b in backends if b != "faiss"]

    x = np.random.default_rng(args.seed).standard_normal((args.n, args.dim), dtype=np.float32)
    # Large enough that neither backend subsamples: both cluster every vector.
    mppc = -(-args.n // args.k)

    runs: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
    load_before = os.getloadavg()
    for rep in range(args.repeats):
        # Alternate the order so neither backend always runs first (warm caches, noisy
        # neighbours on a shared machine).
        order = backends if rep % 2 == 0 else list(reversed(backends))
        for backend in order:
            cpu0 = time.process_time()
            jiffies0 = _cpu_jiffies()
            res = codebook.fit_kmeans(
                x,
                args.k,
                iterations=args.iterations,
                seed=args.seed,
                backend=backend,
                max_points_per_centroid=mppc,
                device=args.device,
            )
            cpu_s = time.process_time() - cpu0
            runs[backend].append(
                {
                    "seconds": res.seconds,
                    "cpu_seconds": cpu_s,
                    "others_busy": _others_busy(jiffies0, cpu_s),
                    "final_objective": res.objective[-1],
                    "first_objective": res.objective[0],
                    "reseeded": res.reseeded,
                    "n_train": res.n_train,
                    "device": res.device,
                }
            )
            busy = runs[backend][-1]["others_busy"]
            print(
                f"[{rep + 1}/{args.repeats}] {backend:5s} {res.seconds:7.2f} s  "
                f"objective {res.objective[-1]:.6g}  "
                f"others busy {'n/a' if busy is None else f'{busy:.0%}'}",
                flush=True,
            )
    load_after = os.getloadavg()

    results: dict[str, Any] = {}
    for backend, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        results[backend] = {
            "seconds_best": min(secs),
            "seconds_median": statistics.median(secs),
            "seconds_all": secs,
            "cpu_seconds_all": [r["cpu_seconds"] for r in rs],
            # Share of the machine's cores used by other processes during each fit: the
            # timings are only comparable where this is near 0.
            "others_busy_all": [r["others_busy"] for r in rs],
            "final_objective": rs[0]["final_objective"],
            "final_objective_mean_per_vector": rs[0]["final_objective"] / rs[0]["n_train"],
            "first_objective": rs[0]["first_objective"],
            "reseeded": rs[0]["reseeded"],
            "n_train": rs[0]["n_train"],
            "device": rs[0]["device"],
        }

    comparison: dict[str, Any] = {}
    if "faiss" in results and "torch" in results:
        f, t = results["faiss"], results["torch"]
        ratio_best = t["seconds_best"] / f["seconds_best"]
        rel_obj = abs(t["final_objective"] - f["final_objective"]) / f["final_objective"]
        comparison = {
            "time_ratio_torch_over_faiss_best": ratio_best,
            "time_ratio_torch_over_faiss_median": t["seconds_median"] / f["seconds_median"],
            "objective_rel_diff": rel_obj,
            "faiss_at_least_1_5x_faster": ratio_best >= 1.5,
            "objective_within_1pct": rel_obj <= 0.01,
        }

    report = {
        "benchmark": "kmeans",
        "params": {
            "n": args.n,
            "dim": args.dim,
            "k": args.k,
            "iterations": args.iterations,
            "seed": args.seed,
            "repeats": args.repeats,
            "max_points_per_centroid": mppc,
            "data": "standard normal float32, numpy default_rng(seed)",
        },
        "machine": machine_info(args.device),
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "results": results,
        "comparison": comparison,
        "created_unix": time.time(),
    }
    write_json_atomic(args.out, report)

    for backend, r in results.items():
        print(
            f"{backend:5s} best {r['seconds_best']:.2f} s, median {r['seconds_median']:.2f} s, "
            f"final objective {r['final_objective']:.6g}"
        )
    if comparison:
        print(
            f"torch/faiss time (best) {comparison['time_ratio_torch_over_faiss_best']:.2f}x, "
            f"relative objective difference {comparison['objective_rel_diff']:.2e}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
