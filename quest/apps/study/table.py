"""A study's tables from its records: means over seeds, paired differences with 95 % intervals,
the best KD beside the best QuEST, and the QuEST diagnostics at the last epoch."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from quest.apps.provenance import (
    UNKNOWN,
    code_fingerprint,
    code_version,
    cpu_key,
    fingerprint_of,
    spans,
)
from quest.apps.results import has_val, params_hash, val_cell
from quest.apps.stats import mean_std, pearson, t975
from quest.apps.study.runs import recorded_runs
from quest.apps.study.spec import Study, planned_runs, setting_config, study_results_dir
from quest.core.methods import get as get_method
from quest.infra.config import Config
from quest.infra.io_utils import write_bytes_atomic, write_text_atomic

SIZE_FIGURE = "top1_vs_images_per_class.png"
WORD_FIGURE = "top1_vs_word_accuracy.png"
LENGTH_FIGURE = "top1_vs_epochs.png"
# the fewest training lengths a method's top-1 is drawn against (two points make no trend)
MIN_LENGTHS = 3
EPOCHS_KEY = "student.train.epochs"
# the fewest settings a word-accuracy correlation is reported over (fewer say little)
MIN_WORD_POINTS = 5


def _order(method: str) -> int:
    """Registry order (the built-ins in registration order, then plug-ins)."""
    from quest.core.methods import names

    order = names()
    return order.index(method) if method in order else len(order)


def paired_diff(a: dict[int, float], b: dict[int, float]) -> tuple[float, float | None, int]:
    """Mean of a - b over the seeds both have, its 95 % t half-width (None below 2 pairs), and
    the number of pairs."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return math.nan, None, 0
    diffs = [a[s] - b[s] for s in seeds]
    m, sd = mean_std(diffs)
    if len(diffs) < 2:
        return m, None, 1
    return m, t975(len(diffs) - 1) * sd / math.sqrt(len(diffs)), len(diffs)


def collect(study: Study, root: Path) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """setting -> method -> seed -> record, for every planned run that is recorded."""
    records = recorded_runs(root, study.name)
    out: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for setting, method, seed, _, h in planned_runs(study, root):
        rec = records.get((h, method, seed))
        if rec is not None:
            out.setdefault(setting.name, {}).setdefault(method, {})[seed] = rec
    return out


def baselines(study: Study, root: Path) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """setting -> {"ce", "kd"} -> seed -> record: the CE and KD runs with this setting's
    settings, wherever recorded. A setting that only runs QuEST is still compared with them:
    their results do not depend on QuEST's knobs, so they are the same runs."""
    records = recorded_runs(root, study.name)
    out: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for setting in study.settings:
        for seed in setting.seeds:
            cfg = setting_config(study, setting, root, seed)
            for base in ("ce", "kd"):
                rec = records.get((params_hash(cfg, base), base, seed))
                if rec is not None:
                    out.setdefault(setting.name, {}).setdefault(base, {})[seed] = rec
    return out


def _top1(runs: dict[int, dict[str, Any]]) -> dict[int, float]:
    return {s: 100.0 * r["top1"] for s, r in runs.items()}


def _fmt_diff(d: tuple[float, float | None, int]) -> str:
    m, half, n = d
    if n == 0:
        return "–"
    if half is None:
        return f"{m:+.2f} (n=1)"
    return f"{m:+.2f} ± {half:.2f} (n={n})"


# The legend of the marks a paired difference gets (provenance.spans says which apply).
SPAN_LEGEND = ("A Δ marked [cpu] pairs runs made on more than one CPU (or GPU) model, [code] "
               "runs of more than one training-code fingerprint, [code?] runs recorded before "
               "fingerprints were (code unknown): such a Δ mixes the methods' difference with "
               "the machines' or the code's.")


def _delta(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> str:
    """The paired difference of two seed -> record maps, marked where its runs span processor
    models or code fingerprints."""
    cell = _fmt_diff(paired_diff(_top1(a), _top1(b)))
    seeds = sorted(set(a) & set(b))
    marks = spans([a[s] for s in seeds] + [b[s] for s in seeds]) if seeds else []
    return cell + (f" [{', '.join(marks)}]" if marks else "")


def _val_top1(runs: dict[int, dict[str, Any]]) -> dict[int, float]:
    return {s: 100.0 * r["val_top1"] for s, r in runs.items()}


def _best(data: dict[str, dict[str, dict[int, dict[str, Any]]]], method: str
          ) -> tuple[str, dict[int, dict[str, Any]]] | None:
    """The setting with the highest mean validation top-1 for `method`, among those with the
    most seeds recorded with a validation accuracy, and those runs; None when no run of the
    method has one (records made before the validation split). Test accuracy never chooses."""
    cands = []
    for name, by_m in data.items():
        runs = {seed: r for seed, r in by_m.get(method, {}).items() if has_val(r)}
        if runs:
            cands.append((name, runs))
    if not cands:
        return None
    most = max(len(runs) for _, runs in cands)
    full = [c for c in cands if len(c[1]) == most]
    return max(full, key=lambda c: mean_std(list(_val_top1(c[1]).values()))[0])


def _diag(runs: dict[int, dict[str, Any]], key: str) -> str:
    vals = [r["history"][-1][key] for r in runs.values()
            if r.get("history") and key in r["history"][-1]]
    if not vals:
        return "–"
    return f"{sum(vals) / len(vals):.3f}"


def run_seconds(record: dict[str, Any]) -> float | None:
    """A run's training time: its epochs' seconds summed (each epoch counts the part done before
    a resume), else the record's wall_seconds. wall_seconds covers only the process that
    finished the run, so a resumed run's would count its last epochs alone."""
    history = record.get("history") or []
    if history and all("seconds" in epoch for epoch in history):
        return float(sum(epoch["seconds"] for epoch in history))
    return float(record["wall_seconds"]) if record.get("wall_seconds") else None


def _wall(runs: dict[int, dict[str, Any]]) -> str:
    """Mean training seconds of a setting's runs (the machine and its load vary: a guide)."""
    walls = [s for s in map(run_seconds, runs.values()) if s is not None]
    return f"{sum(walls) / len(walls):.0f}" if walls else "–"


def render(study: Study, root: Path, points: list[WordPoint] | None = None) -> str:
    """The study's Markdown tables (deterministic: regenerated output equals the committed one).
    `points`: word_points(study, root) when the caller already has them."""
    data = collect(study, root)
    lines = [f"Study `{study.name}` ({study.path.name}); top-1 % on the test split, mean ± sample "
             "std over seeds; val top-1 %: on the validation split, which every choice reads "
             "(\"no val\": runs recorded before the split existed); Δ = paired per-seed "
             "difference in test points, ± the 95 % t interval; "
             "train s/run: mean seconds of one run's training epochs, resumed ones counted "
             "whole (2-core CPU, shared with other work, so a guide only).",
             "",
             "Δ vs CE and Δ vs KD pair each run with the CE and KD runs of the same settings "
             "(recorded in any setting: they do not depend on QuEST's knobs). " + SPAN_LEGEND,
             "",
             "| setting | method | seeds | val top-1 % | top-1 % | Δ vs CE | Δ vs KD "
             "| train s/run |",
             "|---|---|---|---|---|---|---|---|",
             *_setting_rows(study, data, baselines(study, root))]
    rows = _best_rows(study, root, data)
    if rows:
        lines += ["", "Best of each method over the study's settings of one schedule, chosen on "
                  "the validation split (the highest mean val top-1 among the settings with the "
                  "most seeds recorded with val; runs without val are not candidates), beside the "
                  "best KD of that schedule; the test top-1 is reported, never chosen on:", "",
                  "| schedule | method | best setting (on val) | seeds | val top-1 % | top-1 % "
                  "| Δ vs best KD |", "|---|---|---|---|---|---|---|", *rows]
    lines += _diagnostics(study, data)
    points = word_points(study, root) if points is None else points
    if points:
        xs = [p.word_accuracy for p in points]
        ys = [p.top1 for p in points]
        lines += ["", f"Top-1 against the visual-word accuracy the student reached, over the "
                  f"{len(points)} settings of QuEST-based methods that train on the same data "
                  f"for the same steps ({points[0].group}; mean over seeds each): Pearson r = "
                  f"{pearson(xs, ys):.2f} (word accuracy {min(xs):.3f} to {max(xs):.3f}, "
                  f"top-1 {min(ys):.2f} to {max(ys):.2f} %)."]
    return "\n".join(lines)


Runs = dict[str, dict[str, dict[int, dict[str, Any]]]]  # setting -> method -> seed -> record


def _setting_rows(study: Study, data: Runs, base: Runs) -> list[str]:
    """The main table's rows: each setting's methods (or "not run yet")."""
    lines = []
    for s in study.settings:
        by_m = data.get(s.name, {})
        ce, kd = base.get(s.name, {}).get("ce", {}), base.get(s.name, {}).get("kd", {})
        if not by_m:  # declared, not trained yet: say so rather than leave it out
            lines.append(f"| {s.name} | {', '.join(s.methods)} | – | | not run yet | | | |")
            continue
        for method in sorted(by_m, key=lambda m: _order(m)):
            t = _top1(by_m[method])
            m, sd = mean_std(list(t.values()))
            seeds = ",".join(str(x) for x in sorted(t))
            vs_ce = _delta(by_m[method], ce) if method != "ce" else ""
            vs_kd = _delta(by_m[method], kd) if method not in ("ce", "kd") else ""
            val = val_cell([by_m[method][x] for x in sorted(by_m[method])])
            lines.append(f"| {s.name} | {method} | {seeds} | {val} | {m:.2f} ± {sd:.2f} "
                         f"| {vs_ce} | {vs_kd} | {_wall(by_m[method])} |")
    return lines


def _best_rows(study: Study, root: Path, data: Runs) -> list[str]:
    """The best-of table's rows: per schedule that ran KD and a QuEST method, each method's
    best setting on val beside the best KD."""
    # every method the study ran, the feature baselines (FitNets, AT) included; best-of rows
    # compare settings of one schedule (a 12-epoch KD is no baseline for a 6-epoch FitNets)
    ran = sorted({m for by_m in data.values() for m in by_m}, key=_order)
    groups: dict[str, Runs] = {}
    for s in study.settings:
        if s.name in data:
            groups.setdefault(schedule_group(setting_config(study, s, root)),
                              {})[s.name] = data[s.name]
    rows = []
    for group, gdata in groups.items():
        present = {m for by_m in gdata.values() for m in by_m}
        if not ("kd" in present and present & {"quest", "quest+kd"}):
            continue
        best = {m: _best(gdata, m) for m in ran if m in present}
        for method, entry in best.items():
            if entry is None:
                rows.append(f"| {group} | {method} | no run with val | | | | |")
                continue
            t = _top1(entry[1])
            m, sd = mean_std(list(t.values()))
            vm, vsd = mean_std(list(_val_top1(entry[1]).values()))
            vs = _delta(entry[1], best["kd"][1]) if method != "kd" and best.get("kd") else ""
            rows.append(f"| {group} | {method} | {entry[0]} | "
                        f"{','.join(str(x) for x in sorted(t))} | {vm:.2f} ± {vsd:.2f} | "
                        f"{m:.2f} ± {sd:.2f} | {vs} |")
    return rows


def _diagnostics(study: Study, data: Runs) -> list[str]:
    """The QuEST diagnostics table (none when no codebook method ran)."""
    diag = [(s.name, m, runs) for s in study.settings for m, runs in data.get(s.name, {}).items()
            if get_method(m).needs_codebook]
    if not diag:
        return []
    lines = ["", "QuEST diagnostics at the last epoch (mean over seeds): visual-word "
             "accuracy, the teacher's mean max assignment, the student's mean max predicted "
             "probability, the predictor's scale, and the training loss terms.", "",
             "| setting | method | word acc | teacher max | student max | scale | QuEST term "
             "| CE term |", "|---|---|---|---|---|---|---|---|"]
    for name, method, runs in diag:
        cells = [_diag(runs, k) for k in ("word_accuracy", "mean_max_assignment",
                                         "student_mean_max", "predictor_scale", "quest", "ce")]
        lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    return lines


def staleness(study: Study, root: Path, only: list[str] | None = None,
              seeds: list[int] | None = None, methods: list[str] | None = None) -> str:
    """Markdown: which committed records of the selected runs are stale against today's code
    (another code fingerprint), current, or unknown (recorded before fingerprints)."""
    records = recorded_runs(root, study.name)
    today = code_fingerprint()
    rows, counts, seen = [], {"current": 0, "stale": 0, "unknown": 0}, set()
    for setting, method, seed, _, h in planned_runs(study, root):
        if ((only and setting.name not in only) or (seeds and seed not in seeds)
                or (methods and method not in methods) or (h, method, seed) in seen):
            continue
        seen.add((h, method, seed))
        rec = records.get((h, method, seed))
        if rec is None:
            continue
        fp = fingerprint_of(rec)
        state = ("unknown" if fp == UNKNOWN
                 else "current" if code_version(fp) == code_version(today) else "stale")
        counts[state] += 1
        rows.append(f"| {state} | {setting.name} | {method} | {seed} | "
                    f"{str(rec.get('finished_at'))[:10]} | {fp} | {cpu_key(rec)} |")
    head = (f"Committed records against today's code (fingerprint {today}): "
            f"{counts['stale']} stale, {counts['current']} current, {counts['unknown']} unknown "
            "(recorded before fingerprints).")
    return "\n".join([head, "", "| state | setting | method | seed | recorded | code | "
                      "processor |", "|---|---|---|---|---|---|---|", *rows])


def schedule_group(cfg: Config) -> str:
    """The training data and steps a setting's runs share (settings of one group compare)."""
    sub, t = cfg.data.subset, cfg.student.train
    return (f"{sub.train_per_class or 'all'} train images per class"
            + (f" repeated {t.repeat}x" if t.repeat > 1 else "") + f", {t.epochs} epochs")


@dataclass(frozen=True)
class WordPoint:
    """One setting's QuEST-based method: mean word accuracy and top-1 over its seeds."""

    setting: str
    method: str
    word_accuracy: float
    top1: float
    seeds: int
    group: str  # the data and schedule it trained on (points of one group are comparable)


def word_points(study: Study, root: Path) -> list[WordPoint]:
    """The QuEST-based runs' (word accuracy, top-1) per setting, for the largest group of
    settings that train on the same data for the same number of steps: across training
    lengths or data sizes top-1 moves for other reasons. Empty below MIN_WORD_POINTS settings."""
    data = collect(study, root)
    groups: dict[str, list[WordPoint]] = {}
    seen: set[frozenset[tuple[str, str, int]]] = set()  # settings that share runs count once
    # a setting named for its knob labels shared runs better than `default`, whose meaning
    # moves with params.yaml
    for s in sorted(study.settings, key=lambda x: x.name == "default"):
        group = schedule_group(setting_config(study, s, root))
        for method, runs in sorted(data.get(s.name, {}).items(), key=lambda kv: _order(kv[0])):
            words = [r["history"][-1]["word_accuracy"] for r in runs.values()
                     if r.get("history") and "word_accuracy" in r["history"][-1]]
            same = frozenset((r["params_hash"], method, seed) for seed, r in runs.items())
            if not get_method(method).needs_codebook or len(words) != len(runs) or same in seen:
                continue
            seen.add(same)
            top1 = list(_top1(runs).values())
            groups.setdefault(group, []).append(WordPoint(
                s.name, method, sum(words) / len(words), sum(top1) / len(top1), len(runs), group))
    best = max(groups.values(), key=len, default=[])
    return best if len(best) >= MIN_WORD_POINTS else []


def word_figure(study: Study, root: Path,
                points: list[WordPoint] | None = None) -> bytes | None:
    """The PNG of top-1 against word accuracy across the study's comparable settings, or None.
    `points`: word_points(study, root) when the caller already has them."""
    points = word_points(study, root) if points is None else points
    if not points:
        return None
    from quest.apps.study.figures import study_word_figure

    return study_word_figure([(p.setting if p.method == "quest" else f"{p.setting} ({p.method})",
                               p.word_accuracy, p.top1) for p in points],
                             f"study {study.name}: {points[0].group}")


def size_series(study: Study, root: Path) -> dict[str, dict[int, list[float]]]:
    """Top-1 % per seed by training images per class, per method (and setting variant), when
    the study's settings vary the subset size; {} otherwise."""
    data = collect(study, root)
    series: dict[str, dict[int, list[float]]] = {}
    sizes = set()
    for s in study.settings:
        n = setting_config(study, s, root).data.subset.train_per_class
        if n is None:
            continue
        sizes.add(n)
        variant = re.sub(r"^n\d+-?", "", s.name)
        for method, runs in sorted(data.get(s.name, {}).items(),
                                   key=lambda kv: _order(kv[0])):
            label = method if not variant else f"{method} ({variant})"
            series.setdefault(label, {})[n] = list(_top1(runs).values())
    return series if len(sizes) > 1 else {}


def size_figure(study: Study, root: Path,
                series: dict[str, dict[int, list[float]]] | None = None) -> bytes | None:
    """The PNG of top-1 against images per class for every method, or None.
    `series`: size_series(study, root) when the caller already has it."""
    from quest.apps.study.figures import study_size_figure

    series = size_series(study, root) if series is None else series
    return study_size_figure(series, f"study {study.name}")


def length_series(study: Study, root: Path) -> dict[str, dict[int, list[float]]]:
    """Top-1 % per seed by training epochs, per method, when the study trains a method's own
    settings at three or more lengths; {} otherwise.

    A setting's runs at another length are those of its config with only the epochs changed,
    recorded in any setting (the 6-epoch QuEST of `quest-w10` and the `epochs-N` settings form
    one series). Series made of the same runs count once, and one whose runs are all in a
    larger series is left out; a method with two series is labelled with the setting's name.
    """
    records = recorded_runs(root, study.name)
    lengths = sorted({setting_config(study, s, root).student.train.epochs
                      for s in study.settings})
    if len(lengths) < MIN_LENGTHS:
        return {}
    found: list[tuple[str, str, frozenset[tuple[str, str, int]], dict[int, list[float]]]] = []
    for s in study.settings:
        cfgs = {(e, seed): setting_config(
                    study, replace(s, overrides={**s.overrides, EPOCHS_KEY: e}), root, seed)
                for e in lengths for seed in s.seeds}
        for method in s.methods:
            by_len: dict[int, list[float]] = {}
            keys = set()
            for (e, seed), cfg in cfgs.items():
                key = (params_hash(cfg, method), method, seed)
                rec = records.get(key)
                if rec is not None:
                    by_len.setdefault(e, []).append(100.0 * rec["top1"])
                    keys.add(key)
            if len(by_len) >= MIN_LENGTHS:
                found.append((method, s.name, frozenset(keys), by_len))
    kept = [f for f in found
            if not any(f[2] < g[2] for g in found)]  # a proper subset of another series
    first: dict[frozenset[tuple[str, str, int]], tuple[Any, ...]] = {}
    for f in kept:  # the first setting names a shared series
        first.setdefault(f[2], f)
    unique = first.values()
    per_method: dict[str, int] = {}
    for method, *_ in unique:
        per_method[method] = per_method.get(method, 0) + 1
    return {(m if per_method[m] == 1 else f"{m} ({name})"): dict(sorted(by_len.items()))
            for m, name, _, by_len in sorted(unique, key=lambda f: _order(f[0]))}


def length_figure(study: Study, root: Path,
                  series: dict[str, dict[int, list[float]]] | None = None) -> bytes | None:
    """The PNG of top-1 against training epochs for every method trained at three or more
    lengths, or None. `series`: length_series(study, root) when the caller already has it."""
    from quest.apps.study.figures import study_size_figure

    series = length_series(study, root) if series is None else series
    return study_size_figure(series, f"study {study.name}: training length",
                             xlabel="training epochs (same one-cycle schedule, stretched)")


# the docs page that holds every study's generated block (docs/results links to ../results, so
# the block's figure links resolve both in the repository and in the MkDocs site)
EVIDENCE_PAGE = Path("docs") / "evidence.md"


def markers(name: str) -> tuple[str, str]:
    """The evidence page's markers around a study's generated table."""
    return (f"<!-- study:{name}:start (generated by `quest study studies/{name}.yaml "
            "--table-only`; do not edit) -->", f"<!-- study:{name}:end -->")


def _replace(text: str, start: str, end: str, body: str) -> str | None:
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        return None
    return text[: i + len(start)] + "\n" + body + "\n" + text[j:]


def update_tables(study: Study, root: Path, *, check: bool = False) -> list[Path]:
    """Write the study's table into docs/evidence.md (between its markers, appended when
    missing) and results/<study>/TABLE.md; return the files written, or with `check` the files
    that are stale."""
    # records and setting configs are read once for the table and both figures
    points = word_points(study, root)
    body = render(study, root, points)
    series = size_series(study, root)
    lengths = length_series(study, root)
    readme = root / EVIDENCE_PAGE
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    start, end = markers(study.name)
    rel = study_results_dir(root, study).relative_to(root)
    words = bool(points)
    readme_body = body + (f"\n\n![top-1 against training images per class]({rel}/{SIZE_FIGURE})"
                          if series else "") + (
        f"\n\n![top-1 against visual-word accuracy]({rel}/{WORD_FIGURE})" if words else "") + (
        f"\n\n![top-1 against training epochs]({rel}/{LENGTH_FIGURE})" if lengths else "")
    new = _replace(text, start, end, readme_body)
    if new is None:
        new = text.rstrip("\n") + f"\n\n{start}\n{readme_body}\n{end}\n"
    table = study_results_dir(root, study) / "TABLE.md"
    link = f"\n![top-1 against training images per class]({SIZE_FIGURE})\n" if series else ""
    link += f"\n![top-1 against visual-word accuracy]({WORD_FIGURE})\n" if words else ""
    link += f"\n![top-1 against training epochs]({LENGTH_FIGURE})\n" if lengths else ""
    findings = f"{study.findings}\n\n" if study.findings else ""
    table_text = f"# Study {study.name}\n\n{study.description}\n\n{findings}{body}\n{link}"
    changed = []
    if new != text:
        changed.append(readme)
    if not table.is_file() or table.read_text(encoding="utf-8") != table_text:
        changed.append(table)
    if check:
        return changed
    if readme in changed:
        readme.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(readme, new)
    if table in changed:
        table.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(table, table_text)
    figure = size_figure(study, root, series) if series else None
    if figure is not None:  # drawn from the same records; not compared (renderers differ)
        write_bytes_atomic(table.parent / SIZE_FIGURE, figure)
    figure = word_figure(study, root, points) if words else None
    if figure is not None:
        write_bytes_atomic(table.parent / WORD_FIGURE, figure)
    figure = length_figure(study, root, lengths) if lengths else None
    if figure is not None:
        write_bytes_atomic(table.parent / LENGTH_FIGURE, figure)
    return changed
