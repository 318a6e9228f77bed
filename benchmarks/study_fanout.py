"""Study fan-out throughput: a fixed 8-run study on the smoke slice, serial against --workers N.

The study (CE, KD, QuEST and QuEST+KD, seeds 0 and 1, the `smoke` preset: 30 training images
per class, 2 epochs, or --epochs N for longer runs) runs twice in one project root, each time as
the user runs it, in a child process: `quest study FILE` (one run at a time, torch on every
core) and then `quest study FILE --workers N` (N runs at once through Prefect on a local Dask
cluster of N single-threaded worker processes; a temporary Prefect server starts, as it does
for a user without PREFECT_API_URL). The shared upstream outputs (prepared data, teacher,
features, codebook) are built once before either is timed, as the study runner does before its
fan-out; between the two, the records and the runs' scratch roots are removed so that the
second trains all 8 runs again. The wall times include the process start, the Prefect server
and the Dask cluster. Writes benchmarks/results/study-fanout-<cpus>cpu[-<N>ep].json with both
times, their ratio (serial / fan-out: the throughput ratio) and the load average before and
after (the machine may be shared).

    .venv/bin/python benchmarks/study_fanout.py [--workers 2] [--epochs 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quest.apps.bench import machine_info  # noqa: E402
from quest.infra.io_utils import write_json_atomic  # noqa: E402

STUDY_NAME = "fanout-bench"


def study_text(epochs: int) -> str:
    """The fixed 8-run study; `epochs` sets the students' length (the smoke preset's is 2)."""
    return f"""
name: {STUDY_NAME}
description: the fixed 8-run study of benchmarks/study_fanout.py
preset: smoke
set: {{student.train.epochs: {epochs}}}
methods: [ce, kd, quest, quest+kd]
seeds: [0, 1]
settings:
  - name: smoke
"""


def _shared() -> Path:
    return Path(os.environ.get("QUEST_SHARED_DIR", ROOT.parent / "shared"))


def _env(work: Path) -> dict[str, str]:
    shared = _shared()
    return {**os.environ, "PYTHONPATH": str(ROOT),
            "QUEST_DATA_LOCATION": str(shared / "data" / "cifar10-jpeg.tar.gz"),
            "QUEST_TEACHER_CHECKPOINT": str(shared / "models" / "resnet56-cifar10-jpeg.pth"),
            "PREFECT_HOME": str(work / "prefect-home"), "DO_NOT_TRACK": "true",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _stage_upstream(work: Path) -> int:
    """Build the shared upstream outputs and stage every run (untimed); the number of runs."""
    os.environ.update({k: v for k, v in _env(work).items() if k.startswith("QUEST_")})
    from quest.apps.study.runs import stage_run
    from quest.apps.study.spec import load_study, planned_runs, study_results_dir

    study = load_study(work / "studies" / f"{STUDY_NAME}.yaml", work)
    plan = planned_runs(study, work)
    for setting, method, seed, cfg, h in plan:
        stage_run(study, work, setting, method, seed, cfg, h, study_results_dir(work, study))
    return len(plan)


def _timed_study(work: Path, extra: list[str], log: Path) -> float:
    """`quest study` in a child process; its wall time in seconds."""
    args = [sys.executable, "-m", "quest", "study", str(work / "studies" / f"{STUDY_NAME}.yaml"),
            "--root", str(work), *extra]
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.run(args, env=_env(work), stdout=fh, stderr=subprocess.STDOUT,
                              check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{log.read_text()[-3000:]}")
    return seconds


def _records(work: Path) -> list[dict[str, Any]]:
    folder = work / "results" / STUDY_NAME
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def run(workers: int, work: Path, epochs: int = 2) -> dict[str, Any]:
    """Serial, then fanned out, on the same staged project; both wall times and their ratio."""
    import torch

    study = study_text(epochs)
    (work / "studies").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")
    (work / "studies" / f"{STUDY_NAME}.yaml").write_text(study)
    (work / "README.md").write_text("# study fan-out benchmark\n")
    runs = _stage_upstream(work)
    load_before = os.getloadavg()
    serial = _timed_study(work, [], work / "serial.log")
    serial_records = _records(work)
    # the second pass trains everything again: no records, no scratch roots (the shared
    # upstream cache in .quest/study-cache stays, as it would for a fresh study)
    shutil.move(work / "results" / STUDY_NAME, work / "results-serial")
    shutil.rmtree(work / ".quest" / "studies")
    _stage_upstream(work)  # relink the runs' inputs (cached: nothing is rebuilt)
    fanned = _timed_study(work, ["--workers", str(workers)], work / "fanout.log")
    fanned_records = _records(work)
    load_after = os.getloadavg()
    if len(serial_records) != runs or len(fanned_records) != runs:
        raise SystemExit(f"expected {runs} records each, got {len(serial_records)} serial "
                         f"and {len(fanned_records)} fanned out")

    def top1(recs: list[dict[str, Any]]) -> dict[str, float]:
        return {f"{r['method']}-s{r['seed']}": r["top1"] for r in recs}

    return {
        "benchmark": "study fan-out: serial `quest study` against `quest study --workers N`",
        "command": f"python benchmarks/study_fanout.py --workers {workers} --epochs {epochs}",
        "study": study.strip(),
        "epochs": epochs,
        "runs": runs,
        "workers": workers,
        "serial_seconds": round(serial, 1),
        "fanout_seconds": round(fanned, 1),
        "throughput_ratio": round(serial / fanned, 3),
        "serial_runs_per_hour": round(3600 * runs / serial, 1),
        "fanout_runs_per_hour": round(3600 * runs / fanned, 1),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "top1_serial": top1(serial_records),
        "top1_fanout": top1(fanned_records),
        "note": "wall times include the child process start, planning and the tables; the "
                "fan-out's include its temporary Prefect server and Dask cluster. The serial "
                "runs use torch's default threads (every core), the fanned-out runs one each.",
        "machine": machine_info(torch.device("cpu")),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="project root to use (default: a temp dir)")
    ap.add_argument("--epochs", type=int, default=2,
                    help="the students' epochs (default 2, the smoke preset's: seconds a run, "
                         "so fixed start-up costs dominate; more epochs, longer runs)")
    args = ap.parse_args()
    if args.workdir:
        out = run(args.workers, Path(args.workdir).resolve(), args.epochs)
    else:
        with tempfile.TemporaryDirectory(prefix="study-fanout-") as tmp:
            out = run(args.workers, Path(tmp), args.epochs)
    suffix = "" if args.epochs == 2 else f"-{args.epochs}ep"
    path = ROOT / "benchmarks" / "results" / f"study-fanout-{os.cpu_count()}cpu{suffix}.json"
    write_json_atomic(path, out)
    print(json.dumps({k: out[k] for k in ("runs", "workers", "serial_seconds", "fanout_seconds",
                                          "throughput_ratio", "load_average_before",
                                          "load_average_after")}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
