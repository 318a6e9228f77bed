"""Seed sweep: retrain the students with several seeds on the project's data, teacher and codebook.

Each seed trains in its own scratch root (.quest/sweep/seed-N) whose data/ and models/ inputs are
links to the project's, so the project's own students and DVC outputs stay untouched. Every
finished run is recorded in the project's results/; pairs already recorded with the same params
hash are skipped, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from quest.apps.results import load_records, params_hash
from quest.apps.stages.student import run_student
from quest.core.methods import needs_codebook
from quest.infra.config import Config
from quest.infra.errors import QuestError
from quest.infra.paths import Paths
from quest.infra.progress import log

_LINKED = (("data", "prepared"), ("models", "teacher"), ("models", "codebook"))


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        if dst.is_symlink() and dst.resolve() == src.resolve():
            return
        raise QuestError(f"{dst} exists and is not a link to {src}: remove .quest/sweep and rerun")
    os.symlink(src.resolve(), dst)


def sweep_root(paths: Paths, seed: int) -> Paths:
    """The scratch root of one seed, its inputs linked to the project's (created on demand)."""
    root = paths.root / ".quest" / "sweep" / f"seed-{seed}"
    for parts in _LINKED:
        src = paths.root.joinpath(*parts)
        if src.exists():
            _link(src, root.joinpath(*parts))
    return Paths(root, results_dir=paths.results)


def run_sweep(
    cfg: Config, paths: Paths, seeds: list[int], methods: list[str]
) -> list[dict[str, Any]]:
    """Train every (seed, method) not yet in results/ for this configuration; return new metrics."""
    missing = [p for p in (paths.prepared, paths.teacher_model) if not p.exists()]
    if needs_codebook(methods) and not paths.codebook.exists():
        missing.append(paths.codebook)
    if missing:
        raise QuestError(f"{missing[0]} does not exist: run `quest run` (or dvc repro) before "
                         f"sweeping seeds")
    done = set()
    if paths.results.is_dir():
        for r in load_records(paths.results):
            done.add((r["params_hash"], r["method"], r["seed"]))
    out = []
    for seed in seeds:
        seeded = cfg.model_copy(update={"student": cfg.student.model_copy(update={
            "train": cfg.student.train.model_copy(update={"seed": seed})})})
        for method in methods:
            h = params_hash(seeded, method)
            if (h, method, seed) in done:
                log.info("sweep: %s seed %d already in results/ (params %s), skipped", method,
                         seed, h)
                continue
            out.append(run_student(seeded, sweep_root(paths, seed), method))
    return out
