"""Measure train/eval images per second of zoo models and student steps per method, on one device.

Usage: python benchmarks/throughput.py [--batch 128] [--steps 8] [--device cpu]
Writes benchmarks/results/throughput.json (machine, versions, numbers).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F

from quest.distill import build_distiller
from quest.io_utils import write_json_atomic
from quest.models.zoo import build_model


def _timed(fn, steps: int, warmup: int = 2) -> float:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def measure_model(arch: str, batch: int, steps: int, device: torch.device) -> dict[str, float]:
    """Train-step and eval images/s of one architecture at 32x32, channels-last."""
    torch.manual_seed(0)
    model = build_model(arch, 10).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def train_step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    t_train = _timed(train_step, steps)
    model.eval()
    with torch.inference_mode():
        t_eval = _timed(lambda: model(x), steps)
    return {"train_images_per_s": batch / t_train, "eval_images_per_s": batch / t_eval}


def measure_methods(batch: int, steps: int, device: torch.device, k: int) -> dict[str, float]:
    """ms per training step of a resnet20 student with a resnet56 teacher, per method."""
    out = {}
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    for method in ("ce", "kd", "quest"):
        torch.manual_seed(0)
        student = build_model("resnet20", 10).to(device, memory_format=torch.channels_last)
        teacher = build_model("resnet56", 10).to(device, memory_format=torch.channels_last)
        d = build_distiller(method, student, teacher, codebook=torch.randn(k, 64, device=device),
                            teacher_layer="layer3", student_layer="layer3", student_channels=64)
        d.to(device).train()
        opt = torch.optim.SGD(d.trainable_parameters(), lr=0.01, momentum=0.9)

        def step(d=d, opt=opt) -> None:  # type: ignore[no-untyped-def]
            _, losses = d.forward_train(x, y)
            opt.zero_grad(set_to_none=True)
            torch.stack(list(losses.values())).sum().backward()
            opt.step()

        out[f"{method}_ms_per_step"] = 1000 * _timed(step, steps)
    out["quest_over_ce"] = out["quest_ms_per_step"] / out["ce_ms_per_step"]
    out["quest_over_kd"] = out["quest_ms_per_step"] / out["kd_ms_per_step"]
    return out


def main() -> None:
    """Run the measurements and write the JSON result."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/throughput.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    models = {a: measure_model(a, args.batch, args.steps, device) for a in ("resnet20", "resnet56")}
    methods = measure_methods(args.batch, args.steps, device, args.k)
    result = {
        "command": "python benchmarks/throughput.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "device": str(device),
                    "device_name": torch.cuda.get_device_name(device)
                    if device.type == "cuda" else platform.processor()},
        "versions": {"torch": torch.__version__},
        "batch": args.batch,
        "models": {a: {k: round(v, 1) for k, v in m.items()} for a, m in models.items()},
        "student_step_resnet56_to_resnet20": {k: round(v, 3) for k, v in methods.items()},
    }
    write_json_atomic(args.out, result)
    for arch, m in result["models"].items():
        print(f"{arch}: train {m['train_images_per_s']} img/s, eval {m['eval_images_per_s']} img/s")
    print(result["student_step_resnet56_to_resnet20"])


if __name__ == "__main__":
    main()
