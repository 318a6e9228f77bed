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

from quest.apps.results import params_hash
from quest.apps.stages.common import resolve_location
from quest.core.methods import names as method_names
from quest.infra.config import (
    PROJECT_PRESETS_DIR,
    Config,
    build_config,
    read_params,
    resolve_raw,
    set_dotted,
)
from quest.infra.errors import QuestError

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


def planned_runs(study: Study, root: Path) -> list[tuple[Setting, str, int, Config, str]]:
    """Every (setting, method, seed) of the study with its config and params hash."""
    out = []
    for s in study.settings:
        for seed in s.seeds:
            cfg = setting_config(study, s, root, seed)
            for method in s.methods:
                out.append((s, method, seed, cfg, params_hash(cfg, method)))
    return out
