"""`quest study`: train a study's planned runs not yet recorded, label shared runs for every
setting they serve, and set reproduced runs beside the committed records (the study file's
format: spec.py; one run from plan to record: runs.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quest.apps.results import has_val, load_records
from quest.apps.stats import mean_std
from quest.apps.study.runs import NOT_RECORDS, recorded_runs, stage_run, train_run
from quest.apps.study.spec import Setting, Study, planned_runs, study_results_dir
from quest.infra.config import Config
from quest.infra.errors import QuestError
from quest.infra.progress import log

Plan = list[tuple[Setting, str, int, Config, str]]  # (setting, method, seed, config, params hash)


def select_runs(study: Study, plan: Plan, only: list[str] | None, seeds: list[int] | None,
                methods: list[str] | None) -> Plan:
    """The planned runs of the settings in `only`, the `seeds` and the `methods` (each when
    given); an unknown setting, or a method no selected setting runs, is a QuestError."""
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
    return plan


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
    plan = select_runs(study, planned_runs(study, root), only, seeds, methods)
    if reproduce is None:
        done = {key: r for key, r in recorded_runs(root, study.name).items()
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
    committed = recorded_runs(root, study.name)
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
    for r in load_records(root / "results", recursive=True, exclude=NOT_RECORDS):
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
