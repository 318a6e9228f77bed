"""What glibc's allocator thresholds cost a training step (quest/infra/malloc.py).

Runs SGD steps of a resnet20 student (batch 128, 32 px, 1 thread) in fresh processes under three
allocator settings, interleaved over ROUNDS so that load from other work hits each alike:
- `plain`: glibc's defaults (a `quest run` before the fix);
- `dask`: MALLOC_TRIM_THRESHOLD_=65536, what Dask's nanny sets in every worker;
- `tuned`: `keep_freed_memory()` called first, as every stage and study worker now does.
Writes CPU seconds per step, minor page faults per step and the ratios to `plain` to
benchmarks/results/malloc-step-cpu.json. Run on an otherwise idle machine:

    .venv/bin/python benchmarks/malloc_step.py [--rounds 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from quest.apps.bench import machine_info  # noqa: E402
from quest.infra.io_utils import write_json_atomic  # noqa: E402

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(1)
if sys.argv[1] == "tuned":
    from quest.infra.malloc import keep_freed_memory
    assert keep_freed_memory()
from quest.core.models.zoo import build_model
torch.manual_seed(0)
m = build_model("resnet20", 10)
opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
def step():
    opt.zero_grad()
    torch.nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
for _ in range(3):
    step()
steps = int(sys.argv[2])
f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
for _ in range(steps):
    step()
print(json.dumps({"cpu_s_per_step": (time.process_time() - t0) / steps,
                  "faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
                  / steps}))
"""
MODES = ("plain", "dask", "tuned")


def run(mode: str, steps: int) -> dict[str, float]:
    """One fresh process's steps under `mode`'s allocator setting."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
    if mode == "dask":
        env["MALLOC_TRIM_THRESHOLD_"] = "65536"
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(steps)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    """Interleave the modes over the rounds, write the medians and ratios."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    got: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for _ in range(a.rounds):
        for mode in MODES:
            got[mode].append(run(mode, a.steps))
    res = {m: {k: round(statistics.median(r[k] for r in rows), 4) for k in rows[0]}
           for m, rows in got.items()}
    base = res["plain"]["cpu_s_per_step"]
    out = {"benchmark": "malloc_step", "rounds": a.rounds, "steps": a.steps,
           "machine": machine_info(torch.device("cpu")), "load_average": os.getloadavg(),
           "modes": res,
           "cpu_ratio_to_plain": {m: round(res[m]["cpu_s_per_step"] / base, 3) for m in MODES}}
    path = Path(a.out_dir) / "malloc-step-cpu.json"
    write_json_atomic(path, out)
    print(json.dumps(out["modes"], indent=1), out["cpu_ratio_to_plain"], path)


if __name__ == "__main__":
    main()
