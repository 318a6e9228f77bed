"""How long preparing the real CIFAR-10 JPEG archive takes (shared/data/cifar10-jpeg.tar.gz).

Reads the archive into a PreparedDataset the way tests/test_data_sources.py does (image_folder
source, no progress bar), ROUNDS times, and writes the wall time of each round and their median
to benchmarks/results/prepare-cifar10-<device>.json. The test checks what comes out (shapes,
class counts, channel means); the time lives here, where a slow machine can't fail CI. Earlier
the test asserted under 120 s. Run on an otherwise idle machine:

    .venv/bin/python benchmarks/prepare_cifar10.py [--rounds 3] [--archive PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quest.apps.bench import machine_info  # noqa: E402
from quest.core.data import prepare_dataset  # noqa: E402
from quest.infra.io_utils import write_json_atomic  # noqa: E402

SHARED = Path(os.environ.get("QUEST_SHARED_DIR", ROOT.parent / "shared"))
# the budget the test used to assert; recorded so a result can be read against it
BUDGET_S = 120.0


def main() -> None:
    """Parse the options, prepare the archive ROUNDS times, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archive", default=str(SHARED / "data" / "cifar10-jpeg.tar.gz"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    if not Path(a.archive).is_file():
        raise SystemExit(f"missing {a.archive}: pass --archive or set QUEST_SHARED_DIR")
    load_start = os.getloadavg()
    seconds = []
    for r in range(a.rounds):
        t0 = time.perf_counter()
        ds = prepare_dataset("image_folder", a.archive, progress=False)
        seconds.append(round(time.perf_counter() - t0, 2))
        print(f"round {r}: {seconds[-1]:.1f} s", flush=True)
    import torch

    median = round(statistics.median(seconds), 2)
    result = {
        "benchmark": "benchmarks/prepare_cifar10.py",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python benchmarks/prepare_cifar10.py", *sys.argv[1:]]),
        "machine": machine_info(torch.device("cpu")),
        "load_average_start": [round(v, 2) for v in load_start],
        "archive": Path(a.archive).name,
        "images": {"train": int(ds.train.images.shape[0]), "test": int(ds.test.images.shape[0])},
        "seconds": seconds,
        "median_s": median,
        "budget_s": BUDGET_S,
        "within_budget": median < BUDGET_S,
    }
    path = Path(a.out_dir) / "prepare-cifar10-cpu.json"
    write_json_atomic(path, result)
    print(f"median {median:.1f} s over {a.rounds} rounds ->", path)


if __name__ == "__main__":
    main()
