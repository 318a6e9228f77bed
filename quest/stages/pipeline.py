"""The whole chain in one process: prepare, teacher, features, codebook, students, evaluate."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from quest import methods
from quest.config import Config
from quest.levels import level_config, level_names, level_paths
from quest.paths import Paths
from quest.progress import log
from quest.stages.codebook import run_codebook
from quest.stages.evaluate import run_evaluate
from quest.stages.features import run_features
from quest.stages.prepare import run_prepare
from quest.stages.student import run_student
from quest.stages.teacher import run_teacher


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

    timed("prepare", run_prepare, cfg, paths)
    timed("teacher", run_teacher, cfg, paths)
    if methods.needs_codebook(cfg.student.methods):
        timed("features", run_features, cfg, paths)
        timed("codebook", run_codebook, cfg, paths)
        for name in level_names(cfg):  # every extra quantized level: the same two stages
            lcfg, lpaths = level_config(cfg, name), level_paths(paths, name)
            timed(f"features[{name}]", run_features, lcfg, lpaths)
            timed(f"codebook[{name}]", run_codebook, lcfg, lpaths)
    for method in cfg.student.methods:
        timed(f"student[{method}]", run_student, cfg, paths, method)
    evaluation = timed("evaluate", run_evaluate, cfg, paths)
    return {"evaluation": evaluation, "seconds": timings}
