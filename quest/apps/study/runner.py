"""Studies: settings (params overrides) x methods x seeds, run resumably and recorded in results/.

A study file (studies/NAME.yaml) reads::

    name: strength                  # default: the file's stem
    description: what question the study answers
    params: params.yaml             # base params file, relative to the project root
    preset: null                    # optional preset applied to it
    set: {codebook.k: 1024}         # optional: overrides under every setting's own (the
                                    # study's frame, kept when params.yaml's defaults change)
    methods: [ce, kd, quest]        # default methods of every setting
    seeds: [0, 1, 2]                # default seeds of every setting
    findings: what the evidence says (optional; shown with the tables and in the report)
    settings:
      - name: defaults              # params.yaml as it is
      - name: quest-w10
        set: {student.quest.weight: 10}   # dotted overrides
        methods: [quest]            # this setting's own methods / seeds (optional)
        note: why this setting      # optional

Every run is identified by its method, its seed and the hash of the settings that method reads
(quest.apps.results.params_hash). A run already recorded anywhere under results/ (every study's
committed records; not results/runs/) is not trained again, so an interrupted study resumes, and a
setting that changes only QuEST's knobs shares its CE and KD runs with the setting it derives from.
Upstream stages are shared the same way: prepared data, teacher, features and codebook live in
.quest/study-cache/<stage>-<hash>/, keyed by the settings the stage table lists for each stage
(the ones DVC and Prefect key it by) and by the stages before it, built once for all settings.
A shared run is also labelled for every setting it serves (write_aliases), and `reproduce`
retrains selected runs apart to compare them with the committed records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from quest.apps.results import has_val, load_records, params_hash
from quest.apps.stage_table import LEVEL_ITEM, STAGES, Stage, get_param
from quest.apps.stages.common import resolve_location
from quest.apps.stats import mean_std
from quest.core.methods import get as get_method
from quest.core.methods import names as method_names
from quest.infra.config import (
    PROJECT_PRESETS_DIR,
    Config,
    build_config,
    config_hash,
    read_params,
    resolve_raw,
    set_dotted,
)
from quest.infra.errors import QuestError
from quest.infra.paths import RUNS_DIR, Paths
from quest.infra.progress import log
from quest.infra.runlock import LockBusy, file_lock

STUDIES_DIR = "studies"


@dataclass
class Setting:
    """One named configuration of a study: overrides of the base params, methods and seeds."""

    name: str
    overrides: dict[str, Any]
    methods: list[str]
    seeds: list[int]
    note: str = ""


@dataclass
class Study:
    """A study file, parsed and checked."""

    name: str
    path: Path
    description: str
    params: Path
    preset: str | None
    settings: list[Setting] = field(default_factory=list)
    findings: str = ""  # what the evidence says, in words (shown with the tables)
    # overrides under every setting's own: the study's frame (e.g. a pinned K), so its settings
    # keep their meaning, and their records, when params.yaml's defaults change
    base: dict[str, Any] = field(default_factory=dict)


def _str_list(value: Any, key: str, path: Path) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise QuestError(f"{path}: '{key}' must be a non-empty list")
    return value


def load_study(path: str | os.PathLike[str], root: Path) -> Study:
    """Read and check a study file; raise QuestError naming the problem and the fix."""
    p = Path(path)
    if not p.is_file():
        raise QuestError(f"study file {p} does not exist: pass a file under {STUDIES_DIR}/")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise QuestError(f"study file {p} is not valid YAML: fix its syntax") from None
    if not isinstance(raw, dict):
        raise QuestError(f"study file {p} must hold a mapping with a 'settings:' list")
    unknown = set(raw) - {"name", "description", "params", "preset", "set", "methods", "seeds",
                          "settings", "findings"}
    if unknown:
        raise QuestError(f"{p}: unknown key(s) {', '.join(sorted(unknown))}: use name, "
                         "description, params, preset, set, methods, seeds, settings, findings")
    base = raw.get("set") or {}
    if not isinstance(base, dict):
        raise QuestError(f"{p}: 'set' must map dotted keys to values (the overrides every "
                         "setting starts from)")
    methods = raw.get("methods", ["ce", "kd", "quest"])
    seeds = raw.get("seeds", [0])
    settings = []
    for i, entry in enumerate(_str_list(raw.get("settings"), "settings", p)):
        if not isinstance(entry, dict) or "name" not in entry:
            raise QuestError(f"{p}: settings[{i}] needs a 'name'")
        bad = set(entry) - {"name", "set", "methods", "seeds", "note"}
        if bad:
            raise QuestError(f"{p}: settings[{i}] has unknown key(s) {', '.join(sorted(bad))}: "
                             "use name, set, methods, seeds, note")
        overrides = entry.get("set") or {}
        if not isinstance(overrides, dict):
            raise QuestError(f"{p}: settings[{i}].set must map dotted keys to values")
        s_methods = _str_list(entry.get("methods", methods), "methods", p)
        for m in s_methods:
            if m not in method_names():
                raise QuestError(f"{p}: setting '{entry['name']}' has unknown method '{m}': "
                                 f"choose from {', '.join(method_names())}")
        s_seeds = [int(v) for v in _str_list(entry.get("seeds", seeds), "seeds", p)]
        settings.append(Setting(str(entry["name"]), dict(overrides), list(s_methods), s_seeds,
                                str(entry.get("note", ""))))
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise QuestError(f"{p}: setting names must be unique")
    study = Study(name=str(raw.get("name", p.stem)), path=p,
                  description=str(raw.get("description", "")).strip(),
                  params=root / str(raw.get("params", "params.yaml")),
                  preset=raw.get("preset"), settings=settings,
                  findings=str(raw.get("findings", "")).strip(), base=dict(base))
    for s in settings:  # every setting must build a valid config before anything runs
        setting_config(study, s, root)
    return study


def setting_config(study: Study, setting: Setting, root: Path, seed: int | None = None) -> Config:
    """The validated config of one setting (and seed), input locations made absolute."""
    raw = resolve_raw(read_params(study.params), study.preset,
                      preset_dir=Path(study.params).parent / PROJECT_PRESETS_DIR)
    for key, value in [*study.base.items(), *setting.overrides.items()]:
        set_dotted(raw, str(key), value)
    if seed is not None:
        set_dotted(raw, "student.train.seed", seed)
    for dotted in ("data.location", "teacher.checkpoint"):
        section, key = dotted.split(".")
        value = raw.get(section, {}).get(key)
        if isinstance(value, str):
            raw[section][key] = resolve_location(value, root)
    try:
        return build_config(raw)
    except QuestError as exc:
        raise QuestError(f"{study.path}: setting '{setting.name}': {exc}") from None


def study_results_dir(root: Path, study: Study) -> Path:
    """Where a study's records are written (committed with the study file)."""
    return root / "results" / study.name


def recorded_runs(root: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Committed-evidence records under results/ (every study, not results/runs/), keyed by
    (params hash, method, seed); a later record of the same key replaces an earlier one."""
    out = {}
    for r in load_records(root / "results", recursive=True, exclude=(RUNS_DIR,)):
        out[(r["params_hash"], r["method"], r["seed"])] = r
    return out


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


def planned_runs(study: Study, root: Path) -> list[tuple[Setting, str, int, Config, str]]:
    """Every (setting, method, seed) of the study with its config and params hash."""
    out = []
    for s in study.settings:
        for seed in s.seeds:
            cfg = setting_config(study, s, root, seed)
            for method in s.methods:
                out.append((s, method, seed, cfg, params_hash(cfg, method)))
    return out


def run_study(study: Study, root: Path, *, dry_run: bool = False,
              only: list[str] | None = None, seeds: list[int] | None = None,
              reproduce: Path | None = None,
              methods: list[str] | None = None, missing_val: bool = False,
              workers: int | None = None,
              dask_address: str | None = None) -> list[dict[str, Any]]:
    """Train every planned run not yet recorded (of the settings in `only`, the `seeds` and the
    `methods`, when given); return the new metrics (dry_run: list the runs, train nothing).

    With `reproduce` (a directory), train the planned runs again whatever results/ holds and
    record them there instead (runs already there are skipped, so a reproduction resumes too);
    `reproduction_table` then sets them beside the committed records. With `missing_val`,
    recorded runs without a validation accuracy (made before the split) train again; the new
    record joins results/ beside the old one and replaces it in the tables.

    The shared upstream outputs are built first, here; then the runs train one after another
    in this process, or, with `workers` or `dask_address`, at once on Dask through Prefect
    (quest/apps/study/fanout.py). Either way a run trains under its own lock (`train_run`), so
    two runners never train the same run."""
    plan = planned_runs(study, root)
    if only:
        unknown = set(only) - {s.name for s in study.settings}
        if unknown:
            raise QuestError(f"{study.path} has no setting {sorted(unknown)[0]!r}: choose from "
                             + ", ".join(s.name for s in study.settings))
        plan = [p for p in plan if p[0].name in only]
    if seeds:
        plan = [p for p in plan if p[2] in seeds]
    if methods:
        unknown = set(methods) - {p[1] for p in plan}
        if unknown:
            raise QuestError(f"no selected setting of {study.path} runs method "
                             f"{sorted(unknown)[0]!r}: check --method and the study's methods")
        plan = [p for p in plan if p[1] in methods]
    if reproduce is None:
        done = {key: r for key, r in recorded_runs(root).items()
                if not missing_val or has_val(r)}
    else:
        done = {(r["params_hash"], r["method"], r["seed"]): r for r in load_records(reproduce)}
    todo, seen = [], set()
    for setting, method, seed, cfg, h in plan:
        if (h, method, seed) in done or (h, method, seed) in seen:
            continue
        seen.add((h, method, seed))
        todo.append((setting, method, seed, cfg, h))
    log.info("study %s: %d runs planned, %d recorded or shared, %d to train", study.name,
             len(plan),
             len(plan) - len(todo), len(todo))
    if dry_run:
        for setting, method, seed, _, h in todo:
            print(f"{setting.name}\t{method}\tseed {seed}\tparams {h}")
        return []
    results = reproduce or study_results_dir(root, study)
    fan_out = workers is not None or dask_address is not None
    try:
        jobs = [stage_run(study, root, setting, method, seed, cfg, h, results,
                          reproduce=reproduce is not None, one_thread=fan_out,
                          missing_val=missing_val)
                for setting, method, seed, cfg, h in todo]
        if fan_out:
            from quest.apps.study.fanout import fan_out_runs

            out = fan_out_runs(study.name, jobs, workers, dask_address)
        else:
            out = [m for m in (train_run(job) for job in jobs) if m is not None]
    finally:  # an interrupted study still labels what it has
        if reproduce is None:
            write_aliases(study, root, plan)
    return out


def reproduction_table(study: Study, root: Path, reproduce: Path,
                       only: list[str] | None = None, seeds: list[int] | None = None) -> str:
    """Markdown: every reproduced run beside the committed record of the same settings, method
    and seed, with the spread of the committed seeds of that setting and method for scale
    (different CPUs run different float kernels: a reproduction is expected to differ by about
    as much as seeds differ from each other, not to match digit for digit)."""
    committed = recorded_runs(root)
    again = {(r["params_hash"], r["method"], r["seed"]): r for r in load_records(reproduce)}
    lines = ["| setting | method | seed | committed top-1 % | reproduced top-1 % | Δ | "
             "committed seeds' std |", "|---|---|---|---|---|---|---|"]
    seen = set()
    for setting, method, seed, _, h in planned_runs(study, root):
        key = (h, method, seed)
        if (only and setting.name not in only) or (seeds and seed not in seeds) or key in seen:
            continue
        seen.add(key)
        new, old = again.get(key), committed.get(key)
        if new is None:
            continue
        tops = [100 * r["top1"] for (hh, m, _), r in committed.items() if hh == h and m == method]
        sd = mean_std(tops)[1] if tops else 0.0
        old_t = f"{100 * old['top1']:.2f}" if old else "–"
        delta = f"{100 * (new['top1'] - old['top1']):+.2f}" if old else "–"
        sd_t = f"{sd:.2f} (n={len(tops)})" if len(tops) > 1 else "–"
        lines.append(f"| {setting.name} | {method} | {seed} | {old_t} | "
                     f"{100 * new['top1']:.2f} | {delta} | {sd_t} |")
    return "\n".join(lines)


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
    rec = recorded_runs(job.root).get((job.params_hash, job.method, job.seed))
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


def write_aliases(study: Study, root: Path,
                  plan: list[tuple[Setting, str, int, Config, str]]) -> list[Path]:
    """Label shared runs with every setting they serve: for a planned (setting, method, seed)
    whose run was recorded under another setting's name, write a copy of that record into
    results/<study>/ with this setting's name and ``alias_of`` naming the original, so that the
    records of each setting are complete on their own. Aliases are not new runs: they share the
    original's numbers, finish time and params hash."""
    from quest.infra.io_utils import write_json_atomic

    results = study_results_dir(root, study)
    by_key: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in load_records(root / "results", recursive=True, exclude=(RUNS_DIR,)):
        by_key.setdefault((r["params_hash"], r["method"], r["seed"]), []).append(r)
    written = []
    for setting, method, seed, _, h in plan:
        recs = by_key.get((h, method, seed), [])
        if not recs or any(r.get("study") == study.name and r.get("setting") == setting.name
                           for r in recs):
            continue
        original = next((r for r in reversed(recs) if "alias_of" not in r), recs[-1])
        alias = {**original, "study": study.name, "setting": setting.name,
                 "alias_of": original.get("alias_of") or {
                     "study": original.get("study"), "setting": original.get("setting"),
                     "finished_at": original.get("finished_at")}}
        stamp = str(original["finished_at"]).replace(":", "").replace("-", "")
        path = results / f"{stamp}-{method}-s{seed}-{setting.name}-alias.json"
        write_json_atomic(path, alias)
        by_key[(h, method, seed)].append(alias)
        written.append(path)
    return written

