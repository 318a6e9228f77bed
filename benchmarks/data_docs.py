"""CPU time of the four validation suites with GX's own Data Docs views against quest's.

GX builds a new jinja2 Environment, and so recompiles every template, for each Data Docs page;
quest/apps/validation/docs_views.py keeps one per process. This runs the four suites (data,
features, codebook, predictions) on a project whose pipeline has run (`quest run --preset tiny`
is enough), alternating GX's default site configuration and quest's `--rounds` times after one
warm-up of each, and reads the CPU seconds of each pass. The first pass of each also shows the
cost in a fresh process (the imports are already done by then). Writes
benchmarks/results/data-docs-cpu.json.

    .venv/bin/python benchmarks/data_docs.py --root PROJECT [--preset tiny] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quest.apps.bench import machine_info  # noqa: E402
from quest.infra.io_utils import write_json_atomic  # noqa: E402

SUITES = ("data", "features", "codebook", "predictions")


def one_pass(runner: Any, site: Any, cfg: Any, paths: Any) -> float:
    """CPU seconds of the four suites with the given site configuration."""
    runner.site_config = site
    start = time.process_time()
    for what in SUITES:
        runner.validate(what, cfg, paths)
    return time.process_time() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="a project whose pipeline has run")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path,
                    default=ROOT / "benchmarks" / "results" / "data-docs-cpu.json")
    args = ap.parse_args(argv)

    import torch

    import quest.apps.validation.runner as runner
    from quest.apps.validation.docs_views import gx_site, site_config
    from quest.infra.config import load_config
    from quest.infra.paths import Paths

    logging.getLogger("quest").setLevel(logging.WARNING)
    cfg = load_config(args.root / "params.yaml", args.preset, ["runtime.threads=1"])
    paths = Paths(args.root.resolve())
    sites = {"gx_views": gx_site, "quest_views": site_config}
    first = {name: one_pass(runner, site, cfg, paths) for name, site in sites.items()}
    rounds: dict[str, list[float]] = {name: [] for name in sites}
    for _ in range(args.rounds):
        for name, site in sites.items():
            rounds[name].append(one_pass(runner, site, cfg, paths))
    mean = {name: statistics.mean(v) for name, v in rounds.items()}
    report = {
        "benchmark": "CPU seconds of the four validation suites, GX's Data Docs views against "
                     "quest's (one jinja2 Environment per process)",
        "command": f"python benchmarks/data_docs.py --root PROJECT --preset {args.preset} "
                   f"--rounds {args.rounds}",
        "first_pass_cpu_s": {k: round(v, 3) for k, v in first.items()},
        "rounds_cpu_s": {k: [round(x, 3) for x in v] for k, v in rounds.items()},
        "mean_cpu_s": {k: round(v, 3) for k, v in mean.items()},
        "ratio_quest_over_gx": round(mean["quest_views"] / mean["gx_views"], 3),
        "note": "the gx_views warm-up runs first, so it also pays the suites' first-use costs "
                "(imports inside the builders); the rounds compare like with like",
        "machine": machine_info(torch.device("cpu")),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(args.out, report)
    print(f"four suites: GX views {mean['gx_views']:.2f} CPU-s, quest views "
          f"{mean['quest_views']:.2f} CPU-s (x{report['ratio_quest_over_gx']}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
