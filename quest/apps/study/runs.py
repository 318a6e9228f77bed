"""One study run from plan to record: the shared upstream stages (built once in
.quest/study-cache/ for every setting that needs them), the run's scratch root linking them, and
training it under its own lock (`train_run`, in this process or a Dask worker)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from quest.apps.results import has_val, load_records
from quest.apps.stage_table import LEVEL_ITEM, STAGES, Stage, get_param
from quest.apps.study.spec import Setting, Study
from quest.core.methods import get as get_method
from quest.infra.config import Config, config_hash
from quest.infra.errors import QuestError
from quest.infra.paths import RUNS_DIR, Paths
from quest.infra.progress import log
from quest.infra.runlock import LockBusy, file_lock

# folders under results/ that hold no run records: single runs, and the evidence that two code
# versions train the same bits (scripts/code_equivalence.py)
NOT_RECORDS = (RUNS_DIR, "code-equivalence")


def recorded_runs(root: Path, study: str | None = None
                  ) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Committed-evidence records under results/ (every study, not results/runs/ nor the
    code-equivalence evidence), keyed by (params hash, method, seed); a later record of the same
    key replaces an earlier one, except that `study`'s own records win over another study's:
    when a study reruns settings that another shares (main-job-val reruns main-job's defaults
    with a validation split), each table keeps its own evidence."""
    records = load_records(root / "results", recursive=True, exclude=NOT_RECORDS)
    if study is not None:  # stable: the study's own records last, so they win
        records.sort(key=lambda r: r.get("study") == study)
    return {(r["params_hash"], r["method"], r["seed"]): r for r in records}


def link(src: Path, dst: Path) -> None:
    """Make `dst` a symlink to `src` (a stale link is replaced; a real file there is an
    error: the scratch root holding it is the user's to remove)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink():
        if dst.resolve() == src.resolve():
            return
        dst.unlink()
    elif dst.exists():
        raise QuestError(f"{dst} exists and is not a link: remove {dst.parent.parent} and rerun")
    os.symlink(src.resolve(), dst)


# the stages whose outputs settings share (the rest of the pipeline runs per study run)
_SHARED = {"prepare": "data", "teacher": "teacher", "features": "codebook",
           "codebook": "codebook", "features-level": "codebook", "codebook-level": "codebook"}


def _stage_key(spec: Stage, cfg: Config, item: str | None, upstream: list[str]) -> str:
    """A shared stage's cache key: its settings as the stage table lists them (the ones DVC
    and Prefect key it by) and the keys of the stages before it. An input file counts by its
    name, so the same archive in another directory is the same input (as in params_hash)."""
    values: dict[str, Any] = {}
    for dotted in spec.params(item):
        dotted = dotted.replace(LEVEL_ITEM, str(item))
        value = get_param(cfg, dotted)
        if dotted in ("data.location", "teacher.checkpoint") and isinstance(value, str):
            value = Path(value).name
        values[dotted] = value.model_dump() if isinstance(value, BaseModel) else value
    name = spec.name if item is None else f"{spec.name}-{item}"
    return f"{name}-{config_hash({'settings': values, 'upstream': upstream})}"


def prepare_upstream(cfg: Config, root: Path, needs_codebook: bool, needs_teacher: bool) -> Path:
    """Build (once) the shared upstream outputs a setting needs, stage by stage in the stage
    table's order (quest/apps/stage_table.py); return a root linking them."""
    from quest.core.levels import level_names

    cache = root / ".quest" / "study-cache"
    wanted = {"data"} | ({"teacher"} if needs_teacher or needs_codebook else set())
    wanted |= {"codebook"} if needs_codebook else set()
    links: list[tuple[Path, Path]] = []  # (cached output, relative path in a work root)
    keys: list[str] = []
    for spec in STAGES:
        if _SHARED.get(spec.name) not in wanted:
            continue
        for item in level_names(cfg) if spec.per == "level" else [None]:
            key = _stage_key(spec, cfg, item, keys)
            stage_root = cache / key
            for src, rel in links:  # earlier stages' outputs are this stage's inputs
                link(src, stage_root / rel)
            if not (stage_root / ".done").is_file():
                # another runner building the same stage: wait for it, then use its output
                with file_lock(cache / f"{key}.lock", f"shared stage {key}", wait=True):
                    if not (stage_root / ".done").is_file():
                        log.info("study: running shared stage %s (%s)", spec.name, key)
                        spec.run(cfg, Paths(stage_root), item)
                        (stage_root / ".done").write_text("ok\n")
            keys.append(key)
            links += [(out, out.relative_to(stage_root))
                      for out in spec.outs(Paths(stage_root), item) if out.exists()]
    work = cache / ("work-" + config_hash(keys))
    for src, rel in links:
        link(src, work / rel)
    return work


@dataclass(frozen=True)
class RunJob:
    """One study run, staged and ready to train in any process that sees the project root
    (a Dask worker included): everything it needs travels with it, and pickles."""

    study: str
    setting: str
    method: str
    seed: int
    cfg: Config
    params_hash: str
    root: Path  # the project root
    run_root: Path
    results: Path  # where its record goes
    lock: Path  # its lock file: one runner at a time
    reproduce: bool  # a reproduction: done when `results` holds it, not results/
    missing_val: bool = False  # retraining a run whose record lacks val: only a val record counts
    labelled: bool = True  # its record names its study and setting (`quest sweep`'s do not)

    @property
    def label(self) -> str:
        """How logs and Prefect name the run."""
        return f"{self.setting}-{self.method}-s{self.seed}"


def link_inputs(cfg: Config, upstream: Path, run_root: Path) -> None:
    """Link the upstream outputs a student reads (prepared data, teacher, features, codebook,
    extra levels) that exist under `upstream` into the run's scratch root."""
    from quest.core.levels import level_names

    levels = [(top, "levels", name) for name in level_names(cfg) for top in ("data", "models")]
    for parts in (("data", "prepared"), ("models", "teacher"), ("data", "features"),
                  ("models", "codebook"), *levels):
        src = upstream.joinpath(*parts)
        if src.exists():
            link(src, run_root.joinpath(*parts))


def stage_run(study: Study, root: Path, setting: Setting, method: str, seed: int, cfg: Config,
              h: str, results: Path, *, reproduce: bool = False,
              one_thread: bool = False, missing_val: bool = False) -> RunJob:
    """Build (once) the shared upstream outputs a run needs and link them into its scratch
    root; return the run, ready to train. With `one_thread`, a run whose runtime.threads is
    unset trains on one thread: a Dask worker is one slot of a core, so N runs on N cores
    do not oversubscribe them (runtime.threads is not part of the params hash)."""
    from quest.core.checks import check_runnable

    try:
        check_runnable(cfg)
    except QuestError as exc:
        raise QuestError(f"{study.path}: setting '{setting.name}': {exc}") from None
    spec = get_method(method)
    upstream = prepare_upstream(cfg, root, spec.needs_codebook, spec.needs_teacher)
    run_root = root / ".quest" / "studies" / study.name / setting.name / f"seed-{seed}"
    link_inputs(cfg, upstream, run_root)
    if one_thread and not cfg.runtime.threads:
        cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"threads": 1})})
    # the lock names the run itself (settings hash, method, seed), not the study: two studies
    # sharing a run, or a reproduction beside the study, never train it at once
    lock = root / ".quest" / "locks" / f"run-{h}-{method}-s{seed}.lock"
    return RunJob(study.name, setting.name, method, seed, cfg, h, root, run_root, results, lock,
                  reproduce, missing_val)


def _recorded(job: RunJob) -> bool:
    """Whether the run has been recorded (by another runner, since the plan was made)."""
    if job.reproduce:
        return any((r["params_hash"], r["method"], r["seed"]) ==
                   (job.params_hash, job.method, job.seed) for r in load_records(job.results))
    rec = recorded_runs(job.root, job.study).get((job.params_hash, job.method, job.seed))
    return rec is not None and (not job.missing_val or has_val(rec))


def train_run(job: RunJob) -> dict[str, Any] | None:
    """Train one staged run under its lock and record it; return its metrics, or None when
    another runner holds the run or has recorded it meanwhile (it is then not trained here).
    Runs in this process or in a Dask worker (the project root must be the same path there)."""
    try:
        with file_lock(job.lock, f"study {job.study}: {job.label}"):
            return _train_locked(job)
    except LockBusy as exc:  # only the lock raises it: training takes no non-waiting lock
        log.warning("study %s: %s is being trained by another runner (%s): skipped here",
                    job.study, job.label, exc.holder)
        return None


def _train_locked(job: RunJob) -> dict[str, Any] | None:
    from quest.apps.stages.student import run_student

    if _recorded(job):
        log.info("study %s: %s was recorded by another runner: skipped", job.study, job.label)
        return None
    log.info("study %s: %s %s seed %d (params %s)", job.study, job.setting, job.method,
             job.seed, job.params_hash)
    labels = {"setting": job.setting, "study": job.study} if job.labelled else {}
    metrics = run_student(job.cfg, Paths(job.run_root, results_dir=job.results), job.method,
                          **labels)
    return {**metrics, "setting": job.setting, "seed": job.seed}
