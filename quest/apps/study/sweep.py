"""`quest sweep`: a one-setting study over the project's own pipeline outputs.

It retrains the students with several seeds through the study runner (runner.py: `RunJob`,
`train_run`, its locks and links), with two differences from `quest study`: the upstream
outputs are the project's own (data/prepared, models/teacher, models/codebook, ...; not the
study cache), and the records go to the project's results/runs/ without a study or setting
label. Each seed trains in its own scratch root (.quest/sweep/seed-N) whose inputs are links
to the project's, so the project's own students and DVC outputs stay untouched. Pairs already
recorded there with the same params hash are skipped, so an interrupted sweep resumes.
"""

from __future__ import annotations

from typing import Any

from quest.apps.results import load_records, params_hash
from quest.apps.study.runs import RunJob, link_inputs, train_run
from quest.core.methods import needs_codebook
from quest.infra.config import Config
from quest.infra.errors import QuestError
from quest.infra.paths import Paths
from quest.infra.progress import log

SWEEP = "sweep"  # the study name its runs are logged and locked under


def sweep_jobs(cfg: Config, paths: Paths, seeds: list[int], methods: list[str]) -> list[RunJob]:
    """The (seed, method) runs of this configuration not yet recorded in the project's
    results/runs/, each staged in its seed's scratch root."""
    missing = [p for p in (paths.prepared, paths.teacher_model) if not p.exists()]
    if needs_codebook(methods) and not paths.codebook.exists():
        missing.append(paths.codebook)
    if missing:
        raise QuestError(f"{missing[0]} does not exist: run `quest run` (or dvc repro) before "
                         f"sweeping seeds")
    done = set()
    if paths.results.is_dir():
        done = {(r["params_hash"], r["method"], r["seed"]) for r in load_records(paths.results)}
    jobs = []
    for seed in seeds:
        seeded = cfg.model_copy(update={"student": cfg.student.model_copy(update={
            "train": cfg.student.train.model_copy(update={"seed": seed})})})
        run_root = paths.root / ".quest" / SWEEP / f"seed-{seed}"
        for method in methods:
            h = params_hash(seeded, method)
            if (h, method, seed) in done:
                log.info("sweep: %s seed %d already in results/ (params %s), skipped", method,
                         seed, h)
                continue
            link_inputs(seeded, paths.root, run_root)
            lock = paths.root / ".quest" / "locks" / f"{SWEEP}-{h}-{method}-s{seed}.lock"
            # reproduce=True: the run is done when `results` (results/runs/) holds it
            jobs.append(RunJob(SWEEP, f"seed-{seed}", method, seed, seeded, h, paths.root,
                               run_root, paths.results, lock, reproduce=True, labelled=False))
    return jobs


def run_sweep(cfg: Config, paths: Paths, seeds: list[int],
              methods: list[str]) -> list[dict[str, Any]]:
    """Train every (seed, method) not yet in results/runs/ for this configuration, one after
    another; return the new runs' metrics."""
    return [m for m in (train_run(job) for job in sweep_jobs(cfg, paths, seeds, methods))
            if m is not None]
