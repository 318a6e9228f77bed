"""Peak memory of the streaming path against the dataset's size.

Generates two ImageNet-shaped folders (10 classes, JPEGs of 64-160 px of mixed aspect) of
2,000 and 8,000 training images, then runs prepare, features, codebook, a QuEST student epoch
and evaluate on each with the `stream-tiny` preset (64-px crops, resnet20 teacher saved with
random weights so no teacher training is timed, resnet8 student), every stage in its own
process. The peak resident set of a stage is the largest of the process and its DataLoader
workers (wait4's ru_maxrss). Writes benchmarks/results/stream-rss-<device>.json with both
sizes and their ratio per stage; the streaming path should keep the ratio near 1 (< 1.2).

    .venv/bin/python benchmarks/stream_rss.py [--sizes 2000,8000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quest.apps.bench import machine_info  # noqa: E402
from quest.apps.shards import make_image_folder  # noqa: E402
from quest.infra.io_utils import write_json_atomic  # noqa: E402

STAGES = ("prepare", "features", "codebook", "student", "evaluate")


def _stage(stage: str, root: Path, location: Path) -> dict[str, Any]:
    """Run one stage in a child process; its wall time and peak RSS (with its workers)."""
    args = [sys.executable, "-m", "quest", stage, "--params", str(ROOT / "params.yaml"),
            "--preset", "stream-tiny", "--root", str(root), "--set", f"data.location={location}",
            "--set", "student.methods=[quest]", "--set", "runtime.progress=lines"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUEST_")}
    t0 = time.perf_counter()
    log = root / f"{stage}.out"
    root.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(args, env={**env, "PYTHONPATH": str(ROOT)}, stdout=fh,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{log.read_text()[-3000:]}")
    return {"seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def run(sizes: list[int], workdir: Path) -> dict[str, Any]:
    """Every stage at every size; per stage the ratio of the largest size's peak to the
    smallest's."""
    import torch

    from quest.core.checkpoint import save_model_file
    from quest.core.models.zoo import build_model

    out: dict[str, Any] = {"sizes": {}}
    for n in sizes:
        folder = workdir / f"images-{n}"
        if not (folder / "test").is_dir():
            make_image_folder(folder, classes=10, train_per_class=n // 10,
                              test_per_class=max(1, n // 40), seed=n)
        root = workdir / f"project-{n}"
        torch.manual_seed(0)
        save_model_file(root / "models" / "teacher" / "teacher.pt",
                        build_model("resnet20", 10), arch="resnet20", num_classes=10,
                        classes=[f"class{c:03d}" for c in range(10)], mean=[0.5] * 3,
                        std=[0.25] * 3)
        out["sizes"][str(n)] = {s: _stage(s, root, folder) for s in STAGES}
        print(n, out["sizes"][str(n)], flush=True)
    lo, hi = str(min(sizes)), str(max(sizes))
    out["peak_ratio"] = {s: round(out["sizes"][hi][s]["peak_rss_mib"]
                                  / out["sizes"][lo][s]["peak_rss_mib"], 3) for s in STAGES}
    out["max_peak_ratio"] = max(out["peak_ratio"].values())
    return out


def main() -> None:
    """Parse the options, run, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2000,8000", help="training images per folder")
    p.add_argument("--workdir", default=None, help="where folders and projects go (temp)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    sizes = [int(v) for v in a.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        result = run(sizes, Path(a.workdir) if a.workdir else Path(tmp))
    import torch

    result.update({"machine": machine_info(torch.device("cpu")),
                   "command": "python benchmarks/stream_rss.py " + " ".join(sys.argv[1:]),
                   "preset": "stream-tiny (64-px crops, resnet20 -> resnet8, 1 epoch)"})
    path = Path(a.out_dir) / "stream-rss-cpu.json"
    write_json_atomic(path, result)
    print(json.dumps(result["peak_ratio"]), "->", path)


if __name__ == "__main__":
    main()
