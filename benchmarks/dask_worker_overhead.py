"""What a Dask worker spends beside the run it trains: Dask's defaults against the study's.

A study fan-out holds each single-threaded worker for minutes with one run. This trains the same
fixed job (resnet20, batches of 128 random CIFAR-sized images, SGD, one torch thread) in a fresh
local cluster of one worker process, once with Dask's default settings and once with the
settings `quest study --workers N` gives its local cluster (quest/apps/study/fanout.py:
LOCAL_CLUSTER_CONFIG), alternating `--repeats` times. Inside the task it reads the worker
process's CPU time (every thread) and the training thread's own, so the difference is what the
worker's other threads spent meanwhile: its event loop, heartbeats and, with Dask's defaults,
the statistical profiler that samples every thread's stack 100 times a second. CPU seconds,
not wall time, so a shared machine blurs the result less. Writes
benchmarks/results/dask-worker-overhead-cpu.json.

    .venv/bin/python benchmarks/dask_worker_overhead.py [--steps 60] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quest.apps.bench import machine_info  # noqa: E402
from quest.infra.io_utils import write_json_atomic  # noqa: E402


def train_job(steps: int) -> dict[str, float]:
    """`steps` SGD steps of resnet20 on one thread; the worker's CPU seconds meanwhile, all
    threads and the training thread alone."""
    import torch

    from quest.core.models.zoo import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    process0 = usage.ru_utime + usage.ru_stime
    thread0, wall0 = time.thread_time(), time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"process_cpu_s": usage.ru_utime + usage.ru_stime - process0,
            "train_thread_cpu_s": time.thread_time() - thread0,
            "wall_s": time.perf_counter() - wall0}


def one(config: dict[str, Any], steps: int) -> dict[str, float]:
    """The job in a fresh one-worker local cluster made under `config`."""
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set(config), LocalCluster(n_workers=1, threads_per_worker=1,
                                               processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            client.submit(train_job, 2, pure=False).result()  # warm-up: imports, first call
            out = client.submit(train_job, steps, pure=False).result()
    out["other_threads_cpu_s"] = out["process_cpu_s"] - out["train_thread_cpu_s"]
    return out


def run(steps: int, repeats: int) -> dict[str, Any]:
    """Dask's defaults and the study's settings, alternated `repeats` times."""
    import torch

    from quest.apps.study.fanout import LOCAL_CLUSTER_CONFIG

    load_before = os.getloadavg()
    rows: dict[str, list[dict[str, float]]] = {"dask_defaults": [], "study_settings": []}
    for _ in range(repeats):
        rows["dask_defaults"].append(one({}, steps))
        rows["study_settings"].append(one(LOCAL_CLUSTER_CONFIG, steps))

    def median(name: str, key: str) -> float:
        return round(statistics.median(r[key] for r in rows[name]), 3)

    summary = {name: {key: median(name, key) for key in rows[name][0]} for name in rows}
    default, study = summary["dask_defaults"], summary["study_settings"]
    return {
        "benchmark": "CPU a single-threaded Dask worker spends beside the run it trains",
        "command": f"python benchmarks/dask_worker_overhead.py --steps {steps} "
                   f"--repeats {repeats}",
        "job": f"{steps} SGD steps of resnet20 on 128 random 3x32x32 images, one torch thread",
        "study_settings": LOCAL_CLUSTER_CONFIG,
        "medians": summary,
        "other_threads_share": {
            "dask_defaults": round(default["other_threads_cpu_s"] / default["process_cpu_s"], 4),
            "study_settings": round(study["other_threads_cpu_s"] / study["process_cpu_s"], 4),
        },
        "process_cpu_ratio_defaults_over_study": round(
            default["process_cpu_s"] / study["process_cpu_s"], 3),
        "runs": rows,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "machine": machine_info(torch.device("cpu")),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    out = run(args.steps, args.repeats)
    path = ROOT / "benchmarks" / "results" / "dask-worker-overhead-cpu.json"
    write_json_atomic(path, out)
    print(json.dumps({k: out[k] for k in ("medians", "other_threads_share",
                                          "process_cpu_ratio_defaults_over_study")}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
