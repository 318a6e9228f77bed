"""Retrain one run from its record alone (`quest study --rerun-record FILE`), and say how the
rerun compares: same settings hash (checked before training), code, processor, threads, inputs.

A record of schema 3 holds every setting (`config`); an older one holds the settings its method
reads (`settings`), which are rebuilt over today's defaults (a setting the record leaves out is
one its method does not read, or one at the value that reproduces the older code). Inputs are
named by file name in a record and found where params.yaml (or QUEST_DATA_LOCATION /
QUEST_TEACHER_CHECKPOINT) points, under the same name; their content hashes are compared after.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from quest.apps.provenance import UNKNOWN, code_fingerprint, code_version, cpu_key, fingerprint_of
from quest.apps.results import load_records, params_hash
from quest.apps.stages.common import resolve_location
from quest.infra.config import ENV_OVERRIDES, Config, build_config, read_params
from quest.infra.errors import QuestError
from quest.infra.paths import RUNS_DIR

# where reruns record (git-ignored like every everyday run: they never enter a study's tables)
RERUN_DIR = "rerun"


def record_raw_config(record: dict[str, Any]) -> dict[str, Any]:
    """The settings tree a record ran with: its `config`, or (older records) its `settings`
    with the method sections put back under `student` and the seed restored."""
    if isinstance(record.get("config"), dict):
        return copy.deepcopy(record["config"])
    settings = record.get("settings")
    if not isinstance(settings, dict):
        raise QuestError("the record holds neither 'config' nor 'settings': it cannot be rerun "
                         "from itself")
    raw: dict[str, Any] = {"student": copy.deepcopy(settings.get("student", {}))}
    for section, value in settings.items():
        if section == "student":
            continue
        # top-level sections (data, teacher, features, codebook) stay; a method's own section
        # (quest, kd, fitnet, ...) lives under student
        target = raw if section in Config.model_fields else raw["student"]
        target[section] = copy.deepcopy(value)
    raw["student"].setdefault("train", {})["seed"] = record["seed"]
    raw["student"]["methods"] = [record["method"]]
    return raw


def _find_input(name: str, dotted: str, root: Path) -> str:
    """The path of a record's input `name` (a file name): where the environment or the project's
    params.yaml points, when the file there has that name."""
    env = next(k for k, v in ENV_OVERRIDES.items() if v == dotted)
    candidates = [os.environ.get(env)]
    params = root / "params.yaml"
    if params.is_file():
        section, key = dotted.split(".")
        candidates.append((read_params(params).get(section) or {}).get(key))
    candidates.append(name)
    for cand in candidates:
        if not isinstance(cand, str) or not cand:
            continue
        path = resolve_location(cand, root)
        if path is not None and Path(path).name == name and Path(path).exists():
            return path
    raise QuestError(f"the record's {dotted} {name!r} was not found: point params.yaml's "
                     f"{dotted} (or {env}) at a file of that name")


def record_config(record: dict[str, Any], root: Path) -> Config:
    """The validated config of a record's run, its inputs found on this machine; a QuestError
    when today's code gives it another settings hash (it would not be the same run)."""
    raw = record_raw_config(record)
    for dotted in ("data.location", "teacher.checkpoint"):
        section, key = dotted.split(".")
        name = (raw.get(section) or {}).get(key)
        if isinstance(name, str) and "://" not in name:
            raw[section][key] = _find_input(Path(name).name, dotted, root)
    try:
        cfg = build_config(raw)
    except QuestError as exc:
        raise QuestError(f"the record's settings do not load in today's code: {exc}") from None
    h = params_hash(cfg, record["method"])
    if h != record.get("params_hash"):
        raise QuestError(f"today's code gives the record's settings the hash {h}, not its "
                         f"{record.get('params_hash')}: a setting changed meaning since; rerun it "
                         "through its study instead")
    return cfg


def rerun_record(path: str | os.PathLike[str], root: Path) -> tuple[dict[str, Any],
                                                                     dict[str, Any]]:
    """Retrain the run a record describes (in its own scratch root, upstream stages shared with
    studies); return (the record, the rerun's record)."""
    from quest.apps.stages.student import run_student
    from quest.apps.study.runs import stage_run
    from quest.apps.study.spec import Setting, Study
    from quest.infra.paths import Paths

    file = Path(path)
    if not file.is_file():
        raise QuestError(f"record {file} does not exist: pass a results/<study>/*.json file")
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except ValueError:
        raise QuestError(f"record {file} is not valid JSON: pass a run record") from None
    if not isinstance(record, dict) or not {"method", "seed", "params_hash"} <= set(record):
        raise QuestError(f"{file} is not a run record (no method, seed and params_hash)")
    cfg = record_config(record, root)
    method, seed = record["method"], int(record["seed"])
    out = root / "results" / RUNS_DIR / RERUN_DIR
    study = Study(name=RERUN_DIR, path=file, description="", params=root / "params.yaml",
                  preset=None)
    setting = Setting(name=file.stem, overrides={}, methods=[method], seeds=[seed])
    # the upstream stages are shared with the studies; the run itself always trains (an
    # earlier rerun of the same record does not count as done)
    job = stage_run(study, root, setting, method, seed, cfg, record["params_hash"], out,
                    reproduce=True)
    run_student(job.cfg, Paths(job.run_root, results_dir=out), method, setting=setting.name,
                study=study.name)
    # the newest record of this rerun (records sort by finish time; earlier reruns stay)
    mine = [r for r in load_records(out) if r.get("setting") == file.stem]
    if not mine:
        raise QuestError(f"the rerun of {file} wrote no record under {out}")
    return record, mine[-1]


def comparison(record: dict[str, Any], again: dict[str, Any]) -> list[str]:
    """Lines setting a rerun beside its record: numbers, settings, code, processor, inputs."""
    def same(a: Any, b: Any) -> str:
        if a in (None, UNKNOWN) or b in (None, UNKNOWN):
            return "unknown"
        return "same" if a == b else "differs"

    rec_threads = (record.get("machine") or {}).get("torch_threads")
    lines = [f"method {record['method']}, seed {record['seed']}: top-1 recorded "
             f"{100 * record['top1']:.2f} %, rerun {100 * again['top1']:.2f} % "
             f"(Δ {100 * (again['top1'] - record['top1']):+.2f})",
             f"settings hash: {record['params_hash']} recorded, {again['params_hash']} rerun "
             f"({same(record['params_hash'], again['params_hash'])})",
             f"code fingerprint: {fingerprint_of(record)} recorded, {code_fingerprint()} today "
             f"({same(code_version(fingerprint_of(record)), code_version(code_fingerprint()))})",
             f"processor: {cpu_key(record)} recorded, {cpu_key(again)} here "
             f"({same(cpu_key(record), cpu_key(again))})",
             f"threads: {rec_threads if rec_threads is not None else UNKNOWN} recorded, "
             f"{(again.get('machine') or {}).get('torch_threads')} here"]
    for key in ("data_sha256", "teacher_sha256", "codebook_sha256"):
        if record.get(key) or again.get(key):
            lines.append(f"{key}: {same(record.get(key), again.get(key))}")
    return lines
