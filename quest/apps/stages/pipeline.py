"""The whole chain in one process: prepare, teacher, features, codebook, students, evaluate."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from quest.apps.stages.table import STAGES
from quest.core import methods
from quest.core.levels import level_names
from quest.infra.config import Config
from quest.infra.paths import Paths
from quest.infra.progress import log


def run_pipeline(cfg: Config, paths: Paths,
                 checks: dict[str, Callable[[], None]] | None = None) -> dict[str, Any]:
    """Run every stage in order and return the evaluation plus the wall time per stage.

    ``checks`` maps a stage name to a callable run right after that stage (the CLI passes the
    Great Expectations suites); one that raises stops the pipeline before the next stage.
    """
    timings: dict[str, float] = {}
    checks = checks or {}

    def timed(name: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        timings[name] = round(time.perf_counter() - t0, 1)
        log.info("stage %s done in %.1fs", name, timings[name])
        if name in checks:
            timed(f"validate[{name}]", checks[name])
        return out

    quantize = methods.needs_codebook(cfg.student.methods)
    evaluation: dict[str, Any] = {}
    for spec in STAGES:  # the stage table's order (quest/apps/stages/table.py)
        if spec.suite is not None or (spec.needs_codebook and not quantize):
            continue  # the suites run as `checks`, right after the stage they gate
        keys: list[str | None] = [None]
        if spec.per == "method":
            keys = list(cfg.student.methods)
        elif spec.per == "level":
            keys = list(level_names(cfg))
        for key in keys:
            label = spec.family if key is None else f"{spec.family}[{key}]"
            out = timed(label, spec.start, cfg, paths, key)
            if spec.name == "evaluate":
                evaluation = out
    return {"evaluation": evaluation, "seconds": timings}
