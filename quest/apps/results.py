"""Finished runs as provenance records (results/*.json) and the table built from them."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from quest.apps.provenance import code_fingerprint, machine
from quest.apps.stats import mean_std
from quest.core.methods import get as get_method
from quest.core.methods import logged_keys, settings_dict
from quest.core.methods import names as method_names
from quest.core.methods import sections as method_sections
from quest.infra.config import Config, config_hash
from quest.infra.io_utils import write_json_atomic

RESULTS_DIR = "results"
# 3: the full resolved config, the code fingerprint and the machine (CPU/GPU model, threads)
SCHEMA = 3


def git_commit(root: Path | None = None) -> str | None:
    """The commit of the code that runs: HEAD of the checkout holding the quest package (or
    `root`), with -dirty when its quest/ or params.yaml differ from HEAD."""
    root = root or Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                ":(top)quest", ":(top)params.yaml"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    """A readable name of the device a run used (the GPU's model, or the CPU's)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"


# Settings added after records were first written, with the value that reproduces the older
# code: at that value they stay out of the hash, so the older records keep matching.
_NEUTRAL = {("student", "train", "repeat"): 1, ("teacher", "train", "repeat"): 1,
            ("student", "train", "drop_last"): True, ("teacher", "train", "drop_last"): True,
            ("data", "padding_mode"): "constant", ("features", "pool"): 1,
            ("quest", "extra_levels"): {}, ("data", "format"): "prepared",
            ("data", "crop_scale_min"): 0.08, ("data", "eval_crop_ratio"): 0.875,
            ("data", "shuffle_buffer"): 1000}
# The validation split's settings: they change what a run trains on only when the split is
# carved out of a whole training pool; drawn outside a training subset, they leave the run as
# it was, so its hash (and the older records without validation accuracy) match.
_VALIDATION_KEYS = ("validation_per_class", "validation_seed")
# Keys that change how fast a run goes, never what it computes (streams seed every sample).
_SPEED_KEYS = {"data": ("workers",)}
# Keys that name where inputs live or how progress shows, not what is computed.
_LOCATION_KEYS = {"data": ("location", "download"), "teacher": ("checkpoint",)}


def method_settings(cfg: Config, method: str) -> dict[str, Any]:
    """The settings that determine a `method` run's result apart from its seed.

    A CE run does not depend on the QuEST or KD settings, so every study setting that changes
    only those shares its CE runs. Input locations enter by file name only: the same archive
    or checkpoint in another directory (another machine's mirror) is the same setting; the
    records carry the content hashes besides.
    """
    d = {**cfg.to_dict(), "student": settings_dict(cfg.student)}
    out: dict[str, Any] = {"data": d["data"]}
    # every method's own settings section is left out here and added back for the method
    # that reads it: a CE run is the same run whatever QuEST's, KD's or FitNets' knobs say
    sections = {*method_sections(),
                *(sec for name in method_names() for sec in get_method(name).settings)}
    student = {k: v for k, v in d["student"].items() if k not in {"methods", *sections}}
    student["train"] = {k: v for k, v in student["train"].items() if k != "seed"}
    out["student"] = student
    spec = get_method(method)
    if not spec.needs_codebook:
        # student.layer is the QuEST tap: a method without feature taps runs the same whatever
        # it names. Reset to its default (not dropped) so records written before keep their hash
        student["layer"] = None
    # what the method reads (the registry says): upstream sections, then its student settings
    for section in spec.config_sections():
        out[section] = d[section]
    for section in spec.settings:
        out[section] = d["student"][section]
    for section, keys in _LOCATION_KEYS.items():
        if section in out:
            out[section] = {**out[section]}
            for key in keys:
                value = out[section].get(key)
                out[section][key] = Path(str(value)).name if isinstance(value, str) else value
    for section, keys in _SPEED_KEYS.items():
        for key in keys:
            out.get(section, {}).pop(key, None)
    data = out["data"] = {**out["data"]}
    if not data.get("validation_per_class") or data["subset"]["train_per_class"] is not None:
        for key in _VALIDATION_KEYS:
            data.pop(key, None)
    for keys, neutral in _NEUTRAL.items():
        node = out
        for key in keys[:-1]:
            node = node.get(key, {})
        if node.get(keys[-1], neutral) == neutral:
            node.pop(keys[-1], None)
    return out


def portable_config(cfg: Config) -> dict[str, Any]:
    """Every setting of every section, as resolved for the run; input locations by file name
    (a record names its inputs as the settings hash does, and holds their content hashes), so a
    record can be rerun from another checkout or machine (`quest study --rerun-record`)."""
    d = cfg.to_dict()
    for section, keys in _LOCATION_KEYS.items():
        for key in keys:
            value = d[section].get(key)
            if isinstance(value, str):
                d[section][key] = Path(value).name
    return d


def run_provenance(cfg: Config, device: torch.device) -> dict[str, Any]:
    """What a run's metrics and record hold besides its numbers: the full config (and its hash),
    the training code's fingerprint, and the machine with its thread counts."""
    full = portable_config(cfg)
    return {"config": full, "config_hash": config_hash(full),
            "code_fingerprint": code_fingerprint(), "machine": machine(device)}


def params_hash(cfg: Config, method: str) -> str:
    """Hash of what determines a `method` run's result apart from its seed (runs that differ
    only in the seed share it, so tables average them)."""
    return config_hash(method_settings(cfg, method))


def schedule_key(cfg: Config) -> str:
    """The comparison group of a run: data slice, teacher, student and training schedule."""
    sub = cfg.data.subset
    train = "all" if sub.train_per_class is None else f"{sub.train_per_class}/class"
    t = cfg.student.train
    return (f"{Path(str(cfg.data.location)).name} train {train}, {t.epochs} ep {t.schedule} "
            f"lr {t.lr} bs {t.batch_size}, K={cfg.codebook.k}")


# Per-epoch values a record keeps beside every registered method's loss terms and diagnostics
# (the registry's loss_terms and monitors: `history_keys`).
_RUN_KEYS = ("epoch", "loss", "train_accuracy", "test_accuracy", "test_top5", "lr", "seconds")


def history_keys() -> tuple[str, ...]:
    """Per-epoch values a record keeps: the run's own and every registered method's loss terms
    and diagnostics (so a plug-in's terms are kept without an edit here)."""
    return (*_RUN_KEYS[:2], *logged_keys(), *_RUN_KEYS[2:])


HISTORY_KEYS = history_keys()  # the built-ins' and installed plug-ins' (at import)


def _history_key(key: str) -> bool:
    """Whether a record keeps this per-epoch value: the listed ones, and their per-level forms
    (quest_<level>, word_accuracy_<level>, ... of student.quest.extra_levels)."""
    return key in history_keys() or any(key.startswith(f"{k}_") for k in _LEVEL_KEYS)


# The per-level terms and diagnostics the QuEST method logs for each extra level.
_LEVEL_KEYS = ("quest", "word_accuracy", "mean_max_assignment", "student_mean_max",
               "predictor_scale", "teacher_perplexity")


def build_record(cfg: Config, metrics: dict[str, Any], *, device: torch.device,
                 teacher_arch: str | None, wall_seconds: float,
                 setting: str | None = None, study: str | None = None) -> dict[str, Any]:
    """The provenance record of one finished student run (with its per-epoch diagnostics)."""
    method = metrics["method"]
    history = [{k: v for k, v in row.items() if _history_key(k)}
               for row in metrics.get("history", [])]
    return {
        "schema": SCHEMA,
        "study": study,
        "setting": setting,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "method": metrics["method"],
        "teacher": teacher_arch,
        "student": cfg.student.arch,
        "seed": cfg.student.train.seed,
        "group": schedule_key(cfg),
        "params_hash": params_hash(cfg, method),
        "settings": method_settings(cfg, method),
        "data_sha256": metrics.get("data_sha256"),
        "teacher_sha256": metrics.get("teacher_sha256"),
        "codebook_sha256": metrics.get("codebook_sha256"),
        "git_commit": git_commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        **run_provenance(cfg, device),
        "wall_seconds": round(wall_seconds, 1),
        "epochs": cfg.student.train.epochs,
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        # what choices read (None: the run had no validation split; records written before
        # the split existed have no such keys)
        "val_top1": metrics.get("val_top1"),
        "val_top5": metrics.get("val_top5"),
        "val_images": metrics.get("val_images"),
        "history": history,
    }


def write_record(results_dir: Path, record: dict[str, Any]) -> Path:
    """Write one record atomically under a unique, sortable name; return its path."""
    stamp = record["finished_at"].replace(":", "").replace("-", "")
    base = f"{stamp}-{record['method']}-{record['student']}-s{record['seed']}"
    n = 0
    while True:  # runs finishing in the same second (parallel workers) each get their own name
        path = results_dir / (f"{base}.json" if n == 0 else f"{base}-{n}.json")
        try:
            write_json_atomic(path, record, replace=False)
            return path
        except FileExistsError:
            n += 1


def load_records(results_dir: Path, *, recursive: bool = False,
                 exclude: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Every record in `results_dir` (with `recursive`, in its subfolders too, except those
    named in `exclude`), oldest first."""
    if not results_dir.is_dir():
        return []
    files = results_dir.rglob("*.json") if recursive else results_dir.glob("*.json")
    keep = [p for p in files if not set(p.relative_to(results_dir).parts[:-1]) & set(exclude)]
    records = [json.loads(p.read_text()) for p in keep]
    return sorted(records, key=lambda r: str(r.get("finished_at", "")))


def has_val(record: dict[str, Any]) -> bool:
    """Whether a record holds a validation accuracy (older records and runs without a
    validation split do not)."""
    return isinstance(record.get("val_top1"), int | float)


def val_cell(runs: list[dict[str, Any]]) -> str:
    """Mean ± std of validation top-1 (%) over the runs that have it; "no val" when none does,
    and the count when only some do."""
    vals = [100 * r["val_top1"] for r in runs if has_val(r)]
    if not vals:
        return "no val"
    m, sd = mean_std(vals)
    return f"{m:.2f} ± {sd:.2f}" + ("" if len(vals) == len(runs) else f" ({len(vals)} with val)")


def results_table(records: Iterable[dict[str, Any]]) -> str:
    """Markdown table: mean ± sample std of validation top-1 and test top-1/top-5 (%) per group
    and method over seeds ("no val": runs recorded without a validation split)."""
    groups: dict[tuple[str, str, str, str], dict[int, dict[str, Any]]] = {}
    for r in records:
        key = (r["group"], f"{r['teacher'] or '-'} → {r['student']}", r["method"], r["params_hash"])
        groups.setdefault(key, {})[r["seed"]] = r  # a rerun of a seed replaces the older one
    # wall time stays in the records only: on a shared machine it measures the load, not the run
    lines = ["| setting | teacher → student | method | seeds | val top-1 % | top-1 % | top-5 % |",
             "|---|---|---|---|---|---|---|"]
    order = {"ce": 0, "kd": 1, "quest": 2, "quest+kd": 3}
    for (group, pair, method, _), by_seed in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][1], order.get(kv[0][2], 9))):
        runs = [by_seed[s] for s in sorted(by_seed)]
        t1 = mean_std([100 * r["top1"] for r in runs])
        t5 = mean_std([100 * r["top5"] for r in runs])
        seeds = ",".join(str(r["seed"]) for r in runs)
        lines.append(f"| {group} | {pair} | {method} | {seeds} | {val_cell(runs)} "
                     f"| {t1[0]:.2f} ± {t1[1]:.2f} | {t5[0]:.2f} ± {t5[1]:.2f} |")
    return "\n".join(lines)
