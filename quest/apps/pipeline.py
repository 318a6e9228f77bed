"""The whole chain in one process: prepare, teacher, features, codebook, students, evaluate."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from quest.apps.stage_table import STAGES, Stage
from quest.apps.stages.resume import StageRecords
from quest.core import methods
from quest.core.levels import level_names
from quest.infra.config import Config
from quest.infra.io_utils import read_json
from quest.infra.paths import Paths
from quest.infra.progress import log

_SKIPPED = object()  # what a skipped stage "returns"


def run_pipeline(cfg: Config, paths: Paths,
                 checks: dict[str, Callable[[], None]] | None = None,
                 records: StageRecords | None = None) -> dict[str, Any]:
    """Run every stage in order and return the evaluation plus the wall time per stage.

    ``checks`` maps a stage name to a callable run right after that stage (the CLI passes the
    Great Expectations suites); one that raises stops the pipeline before the next stage.
    With ``records`` (quest/apps/stages/resume.py), a stage or suite whose outputs exist and
    whose inputs key is the one recorded with them is skipped with one line; the rest run and
    are recorded.
    """
    timings: dict[str, float] = {}
    checks = checks or {}

    def step(label: str, spec: Stage, key: str | None, fn: Callable[[], Any]) -> Any:
        now = records.key(spec, key) if records is not None else ""
        if records is not None and records.fresh(spec, key, now):
            log.info("stage %s skipped: its outputs exist and its inputs, settings and code "
                     "are unchanged (quest run --force reruns it)", label)
            return _SKIPPED
        t0 = time.perf_counter()
        out = fn()
        timings[label] = round(time.perf_counter() - t0, 1)
        log.info("stage %s done in %.1fs", label, timings[label])
        if records is not None:
            records.done(spec, key, now)
        return out

    quantize = methods.needs_codebook(cfg.student.methods)
    evaluation: dict[str, Any] = {}
    gated: str | None = None  # the stage a suite of the table checks: the one just before it
    for spec in STAGES:  # the stage table's order (quest/apps/stage_table.py)
        if spec.needs_codebook and not quantize:
            continue
        if spec.suite is not None:
            check = checks.get(gated or "")
            if check is not None:
                step(f"validate[{gated}]", spec, None, check)
            continue
        keys: list[str | None] = [None]
        if spec.per == "method":
            keys = list(cfg.student.methods)
        elif spec.per == "level":
            keys = list(level_names(cfg))
        for key in keys:
            label = spec.family if key is None else f"{spec.family}[{key}]"
            out = step(label, spec, key, functools.partial(spec.start, cfg, paths, key))
            if spec.name == "evaluate":
                evaluation = read_json(paths.metrics / "evaluation.json") if out is _SKIPPED \
                    else out
        gated = spec.name
    return {"evaluation": evaluation, "seconds": timings,
            "skipped": list(records.skipped) if records is not None else []}
