"""Schedule the pipeline and the promotion: a work pool and a worker, or `serve` with neither.

With a local Prefect server, a process work pool and a worker (prefect.yaml), from the repository
root, each long-running command in its own shell::

    # 1. a local server bound to 127.0.0.1 (UI and API on http://127.0.0.1:4200)
    prefect server start --host 127.0.0.1 --port 4200

    # 2. point every other shell at it (or once: prefect config set PREFECT_API_URL=...)
    export PREFECT_API_URL=http://127.0.0.1:4200/api

    # 3. the process work pool named in prefect.yaml
    prefect work-pool create quest-process --type process

    # 4. register both deployments of prefect.yaml (run in the repository root: the worker runs
    #    the flows from the directory `prefect deploy` ran in)
    prefect --no-prompt deploy --all

    # 5. a worker that runs the scheduled (and manually triggered) runs
    prefect worker start --pool quest-process

    # run one now instead of waiting for 02:00 UTC (list parameters are JSON)
    prefect deployment run quest-pipeline/nightly --param preset=tiny \
        --param overrides='["codebook.k=64"]'
    prefect deployment run quest-promotion/nightly-promotion --param min_top1=0.5

Without a work pool or a worker (steps 3-5), this module serves both deployments from one
long-running process against the server of steps 1-2 (same names and schedules; Ctrl-C stops it
and pauses their schedules)::

    python -m flows.deployments                # --preset tiny --root DIR --min-top1 0.5
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from prefect import serve
from prefect.schedules import Cron

from flows.pipeline import quest_pipeline
from flows.promotion import quest_promotion

PIPELINE_DEPLOYMENT = "nightly"
PIPELINE_CRON = "0 2 * * *"
PROMOTION_DEPLOYMENT = "nightly-promotion"
# two hours after the pipeline, so that a run registered overnight can be promoted
PROMOTION_CRON = "0 4 * * *"
TIMEZONE = "UTC"


def build_deployments(
    root: str = ".", preset: str | None = None, min_top1: float = 0.0
) -> list[Any]:
    """The runner deployments of the pipeline (nightly) and of the promotion, with their crons."""
    pipeline = quest_pipeline.to_deployment(
        name=PIPELINE_DEPLOYMENT,
        schedules=[Cron(PIPELINE_CRON, timezone=TIMEZONE)],
        parameters={"root": root, "params": "params.yaml", "preset": preset, "track": True},
        concurrency_limit=1,  # two runs must not write the same root at once
        description="The QuEST pipeline, nightly; unchanged stages are cache hits.",
        tags=["quest"],
    )
    promotion = quest_promotion.to_deployment(
        name=PROMOTION_DEPLOYMENT,
        schedules=[Cron(PROMOTION_CRON, timezone=TIMEZONE)],
        parameters={"min_top1": min_top1},
        description="Move the champion alias to the challenger if it is strictly better.",
        tags=["quest"],
    )
    return [pipeline, promotion]


def main(argv: list[str] | None = None) -> int:
    """Serve both deployments until interrupted."""
    ap = argparse.ArgumentParser(prog="python -m flows.deployments", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".", help="project root the pipeline runs in")
    ap.add_argument("--preset", default=None, help="params.yaml preset for scheduled runs")
    ap.add_argument("--min-top1", type=float, default=0.0, help="promotion gate")
    args = ap.parse_args(argv)
    serve(*build_deployments(args.root, args.preset, args.min_top1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
