"""The QuEST head before and after, side by side in one process, and what it costs a step.

Times (1) the fused head alone, forward + backward over 128 x 8 x 8 positions, for the first
implementation (benchmarks/fused_quest_v1.py), the head as it was at commit PREVIOUS (read from
git, before the denormal floor and the single-pass maxima), and the current one
(quest/core/fused_quest.py), rounds interleaved, at K = 1024 and 4096; (2) whole SGD steps of
a resnet20 student with a resnet56 teacher for kd and quest (the current head), interleaved, at
each K. Writes benchmarks/results/head-<device>.json. Run on an otherwise idle machine:

    .venv/bin/python benchmarks/head_speed.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quest.apps.bench import machine_info  # noqa: E402
from quest.core import fused_quest  # noqa: E402
from quest.core.engine import make_optimizer  # noqa: E402
from quest.core.methods import build_distiller  # noqa: E402
from quest.core.models.zoo import build_model  # noqa: E402
from quest.infra.config import load_config  # noqa: E402
from quest.infra.io_utils import write_json_atomic  # noqa: E402

# the head before the denormal floor, amax, reused buffers and the transposed weight gradient
PREVIOUS = "13c213a"


def _load_head(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.fused_quest_kl


def _old_head() -> Any:
    return _load_head("fused_quest_v1", ROOT / "benchmarks" / "fused_quest_v1.py")


def _previous_head() -> Any:
    """quest/core/fused_quest.py as committed at PREVIOUS (needs the git history)."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{PREVIOUS}:quest/core/fused_quest.py"],
                          check=True, capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fused_quest_previous.py"
        path.write_text(text)
        return _load_head("fused_quest_previous", path)


def _median_ms(runs: dict[str, Any], rounds: int) -> dict[str, float]:
    """Median milliseconds per call of each callable, rounds interleaved."""
    for fn in runs.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(1000 * (time.perf_counter() - t0))
    return {name: round(statistics.median(v), 1) for name, v in times.items()}


def head_times(k: int, rounds: int) -> dict[str, float]:
    """Forward + backward of the head alone, earlier vs current, on random CIFAR-sized maps."""
    torch.manual_seed(0)
    n, c = 128 * 8 * 8, 64
    student = F.normalize(torch.randn(n, c), dim=1).requires_grad_()
    weight = (3 * F.normalize(torch.randn(k, c), dim=1)).requires_grad_()
    teacher, words = torch.randn(n, c).relu() * 2, torch.randn(k, c).relu() * 2

    def call(fn: Any) -> Any:
        return lambda: fn(student, weight, teacher, words, 5.0)[0].backward()

    out = _median_ms({"v1": call(_old_head()), "previous": call(_previous_head()),
                      "current": call(fused_quest.fused_quest_kl)}, rounds)
    return {"head_v1_ms": out["v1"], f"head_{PREVIOUS}_ms": out["previous"],
            "head_current_ms": out["current"], "current_block_rows": fused_quest._cpu_block(k),
            "ratio_current_over_v1": round(out["current"] / out["v1"], 3),
            f"ratio_current_over_{PREVIOUS}": round(out["current"] / out["previous"], 3)}


def step_times(k: int, rounds: int) -> dict[str, float]:
    """ms per SGD step of kd and quest (resnet56 -> resnet20, batch 128, channels-last)."""
    cfg = load_config(ROOT / "params.yaml")
    torch.manual_seed(0)
    teacher = build_model("resnet56", 10).to(memory_format=torch.channels_last).eval()
    x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))
    words = torch.randn(k, 64).relu()
    runs = {}
    for method in ("kd", "quest"):
        student = build_model("resnet20", 10).to(memory_format=torch.channels_last)
        d = build_distiller(method, student, teacher, codebook=words, teacher_layer="layer3",
                            student_layer="layer3", student_channels=64).train()
        opt = make_optimizer(d.trainable_parameters(), cfg.student.train)

        def step(d: Any = d, opt: Any = opt) -> None:
            _, losses = d.forward_train(x, y)
            opt.zero_grad(set_to_none=True)
            torch.stack(list(losses.values())).sum().backward()
            opt.step()

        runs[method] = step
    out = _median_ms(runs, rounds)
    return {"kd_ms_per_step": out["kd"], "quest_ms_per_step": out["quest"],
            "ratio_quest_over_kd": round(out["quest"] / out["kd"], 3)}


def main() -> None:
    """Measure both sections at K = 1024 and 4096 and write the JSON."""
    report: dict[str, Any] = {
        "benchmark": "benchmarks/head_speed.py",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
        "positions": 128 * 8 * 8,
    }
    for k in (1024, 4096):
        report[f"k{k}"] = {**head_times(k, rounds=9), **step_times(k, rounds=9)}
        print(k, report[f"k{k}"], flush=True)
    report["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    path = ROOT / "benchmarks" / "results" / "head-cpu.json"
    write_json_atomic(path, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
