"""`quest report`: the run's accuracy table, curves, codebook and visual-word gallery."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from quest.apps.report import figures
from quest.apps.report.inputs import RunData, load_run
from quest.apps.report.render import Plot, Report, Table, render_html, render_markdown
from quest.infra.config import Config
from quest.infra.errors import QuestError
from quest.infra.io_utils import write_bytes_atomic, write_text_atomic
from quest.infra.paths import Paths
from quest.infra.progress import log


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def _delta(a: float | None, b: float | None) -> str:
    """a − b in percentage points, signed ('−' for negative), or — when either is missing."""
    if a is None or b is None:
        return "—"
    d = round(100 * (a - b), 2)
    return f"+{d:.2f}" if d >= 0 else f"−{abs(d):.2f}"


def accuracy_table(run: RunData) -> Table:
    """Teacher and every student: validation top-1, test top-1 and top-5 (%), parameters and
    multiply-accumulates (— : no validation split)."""
    rows = []
    for name, r in run.evaluation["models"].items():
        hist = run.histories.get(name) or []
        rows.append([name, str(r.get("arch", "?")), _pct(r.get("val_top1")), _pct(r.get("top1")),
                     _pct(r.get("top5")), f"{int(r['params']):,}", f"{r['macs'] / 1e6:.1f}",
                     str(len(hist)) if name != "teacher" else "—"])
    return Table(["model", "arch", "val top-1 %", "top-1 %", "top-5 %", "params", "MMACs",
                  "epochs"], rows, [False, False, True, True, True, True, True, True])


def best_student(run: RunData) -> tuple[str, str]:
    """The report's "best student" fact: the student with the highest validation top-1 (its
    test top-1 reported beside it); test accuracy never chooses."""
    students = {n: r for n, r in run.evaluation["models"].items() if n != "teacher"}
    scored = {n: r["val_top1"] for n, r in students.items()
              if isinstance(r.get("val_top1"), int | float)}
    if not scored:
        return ("best student (on validation)", "no validation split in this run: none chosen")
    name = max(scored, key=lambda n: scored[n])
    return ("best student (on validation)",
            f"{name}: val top-1 {_pct(scored[name])} %, test top-1 "
            f"{_pct(students[name].get('top1'))} %")


def comparison_table(a: RunData, b: RunData) -> Table:
    """Both runs' top-1/top-5 per model and the differences (a − b, percentage points)."""
    names = list(a.evaluation["models"])
    names += [n for n in b.evaluation["models"] if n not in names]
    rows = []
    for n in names:
        ra, rb = a.evaluation["models"].get(n, {}), b.evaluation["models"].get(n, {})
        rows.append([n, _pct(ra.get("top1")), _pct(rb.get("top1")),
                     _delta(ra.get("top1"), rb.get("top1")), _pct(ra.get("top5")),
                     _pct(rb.get("top5")), _delta(ra.get("top5"), rb.get("top5"))])
    return Table(["model", f"top-1 % ({a.label})", f"top-1 % ({b.label})", "Δ top-1",
                  f"top-5 % ({a.label})", f"top-5 % ({b.label})", "Δ top-5"], rows,
                 [False] + [True] * 6)


def _codebook_values(run: RunData) -> dict[str, str]:
    cb, meta = run.codebook or {}, run.codebook_meta or {}
    if not cb:
        return {}
    k = int(cb["k"])
    return {
        "words K": str(k),
        "teacher layer": str(meta.get("layer", "?")),
        "perplexity": f"{cb['perplexity']:.1f}",
        "perplexity / K": f"{cb['perplexity'] / k:.3f}",
        "dead words": str(cb["dead_words"]),
        "re-seeded during k-means": str(cb.get("reseeded", "?")),
        "usage min / max": f"{cb.get('usage_min', '?')} / {cb.get('usage_max', '?')}",
        "mean squared distance to nearest word": f"{cb.get('objective_mean', float('nan')):.4g}",
        "trained on (vectors)": f"{meta['trained_on']:,}" if "trained_on" in meta else "?",
        "backend": str(cb.get("backend", "?")),
    }


def codebook_table(runs: list[RunData]) -> Table | None:
    """Codebook health (perplexity, dead words, usage) of each run, one column per run."""
    values = [_codebook_values(r) for r in runs]
    if not values[0]:
        return None
    keys = list(values[0])
    header = ["statistic"] + [r.label for r in runs] if len(runs) > 1 else ["statistic", "value"]
    rows = [[k] + [v.get(k, "—") for v in values] for k in keys]
    return Table(header, rows, [False] + [True] * len(runs))


def _gallery(cfg: Config, paths: Paths, run: RunData) -> tuple[Any, str]:
    """The visual-word gallery of the main run (None and a note when there is no codebook)."""
    from quest.apps.report.gallery import build_gallery
    from quest.apps.stages.common import load_data, norm_stats, resolve_device
    from quest.core.checkpoint import load_model_file

    if run.codebook_meta is None or not paths.codebook.is_file():
        return None, ("no codebook in this run (no QuEST method, or `quest codebook` not run): "
                      "no gallery")
    device = resolve_device(cfg)
    teacher, _ = load_model_file(paths.teacher_model, "teacher model")
    teacher = teacher.to(device)
    ds = load_data(paths, mmap=True)
    mean, std = norm_stats(ds)
    r = cfg.report
    images, _ = ds.sample_images("test", r.gallery_images, r.seed)
    codebook = np.load(paths.codebook)
    layer = str(run.codebook_meta["layer"])
    g = build_gallery(teacher, layer, codebook, images, mean, std,
                      temperature=cfg.student.quest.temperature, words=r.gallery_words,
                      patches=r.gallery_patches, patch_scale=r.patch_scale, device=device,
                      pool=int(run.codebook_meta.get("pool", 1)))
    sh, sw = g.image_size
    h, w = g.map_shape
    note = (f"The {len(g.grids)} most frequent visual words among {g.positions:,} feature "
            f"positions of {g.images} test images (seed {r.seed}). Teacher layer {g.layer} gives "
            f"a {h}×{w} map on {sh}×{sw} images: position (i, j) is shown as the "
            f"{g.patch_px}×{g.patch_px} px patch centred at ((i+0.5)·{sh}/{h}, (j+0.5)·{sw}/{w}) "
            f"(report.patch_scale = {r.patch_scale} × the {sh / h:g} px stride; gray where it "
            f"leaves the image). Per word, the {r.gallery_patches} positions with the highest "
            f"soft assignment p_T(k|f) = softmax(−T‖f − c_k‖²), T = {g.temperature:g} (ties: "
            f"nearest to the word), left to right, top to bottom.")
    return g, note


def _facts(run: RunData, other: RunData | None) -> list[tuple[str, str]]:
    ev = run.evaluation
    n = ev.get("num_test_images")
    nv = ev.get("num_val_images")
    facts = [("run", str(run.root)),
             ("generated", time.strftime("%Y-%m-%d %H:%M:%S")),
             ("test images", f"{n:,}" if isinstance(n, int) else "?"),
             ("validation images", f"{nv:,}" if isinstance(nv, int) and nv else "none"),
             ("teacher", str(ev["models"].get("teacher", {}).get("arch", "?"))),
             ("students", ", ".join(run.methods) or "none")]
    if run.methods:
        facts.append(best_student(run))
    if run.codebook:
        facts.append(("codebook", f"K = {run.codebook['k']}"))
    corrupt = (run.teacher or {}).get("corrupt_samples") or {}
    if corrupt.get("files"):
        # streamed images that failed to decode in a loader worker (data.on_corrupt: skip)
        facts.append(("corrupt images replaced", f"{corrupt['files']} file(s), "
                      f"{corrupt['replaced']} time(s) while training the teacher; first: "
                      f"{', '.join(corrupt['first'][:3])}"))
    if other is not None:
        facts.append(("compared with", f"{other.root} (label '{other.label}')"))
    return facts


def _labels(root: Path, other: Path | None) -> tuple[str, str]:
    """Short names for the two runs: their directory names, or this/other when equal."""
    if other is None:
        return root.name or "run", ""
    a, b = root.name, other.name
    return (a, b) if a and b and a != b else ("this", "other")


def study_sections(root: Path) -> list[tuple[str, str, str, list[Plot]]]:
    """Every study under studies/: its description, tables and figures (top-1 against images
    per class when its settings vary the training-set size; top-1 against visual-word accuracy
    when enough of its settings train QuEST on the same data and steps; top-1 against epochs
    when a method is trained at three or more lengths)."""
    from quest.apps.study.spec import STUDIES_DIR, load_study
    from quest.apps.study.table import (
        length_figure,
        length_series,
        render,
        size_figure,
        size_series,
        word_figure,
        word_points,
    )

    out = []
    for path in sorted((root / STUDIES_DIR).glob("*.yaml")):
        try:
            study = load_study(path, root)
        except QuestError as exc:  # e.g. a resolved params file without the study's preset
            log.warning("report: study %s left out: %s", path.name, exc)
            continue
        plots = []
        series, points = size_series(study, root), word_points(study, root)
        png = size_figure(study, root, series) if series else None
        if png is not None:
            plots.append(Plot(f"study_{study.name}", f"study {study.name}: top-1 vs images per "
                              "class", png, "test top-1 against training images per class "
                              "(mean ± std over seeds)"))
        png = word_figure(study, root, points)
        if png is not None:
            plots.append(Plot(f"study_{study.name}_words", f"study {study.name}: top-1 vs "
                              "visual-word accuracy", png, "test top-1 against the visual-word "
                              "accuracy at the last epoch, a point per setting (mean over seeds)"))
        lengths = length_series(study, root)
        png = length_figure(study, root, lengths) if lengths else None
        if png is not None:
            plots.append(Plot(f"study_{study.name}_epochs", f"study {study.name}: top-1 vs "
                              "training length", png, "test top-1 against the training epochs "
                              "of one schedule, a line per method (mean ± std over the seeds "
                              "recorded at each length)"))
        text = study.description + (f"\n\n{study.findings}" if study.findings else "")
        out.append((study.name, text, render(study, root, points), plots))
    return out


def build_report_data(cfg: Config, paths: Paths, compare: Path | None = None) -> Report:
    """Read the run (and the compared run) and assemble every table, figure and gallery grid."""
    root = paths.root
    la, lb = _labels(root, compare.resolve() if compare else None)
    run = load_run(root, la)
    other = None
    if compare is not None:
        if not compare.is_dir():
            raise QuestError(f"--compare {compare} is not a directory: pass another run's "
                             "project root")
        other = load_run(compare.resolve(), lb, " (the --compare run)")
    runs = [run] + ([other] if other else [])
    curves = []
    for name, title, png in (
        ("losses", "loss terms per epoch", figures.loss_figure(runs)),
        ("accuracy", "train and test accuracy per epoch", figures.accuracy_figure(runs)),
        ("word_accuracy", "visual-word accuracy per epoch", figures.word_accuracy_figure(runs)),
    ):
        if png is not None:
            caption = title + ("" if other is None else
                               f" — solid: {run.label}, dashed: {other.label}")
            curves.append(Plot(name, title, png, caption))
    cb_png = figures.codebook_figure(run)
    gallery, gallery_note = _gallery(cfg, paths, run)
    gallery_plots = []
    for rank, g in enumerate(gallery.grids if gallery else [], start=1):
        gallery_plots.append(Plot(
            f"word_{rank:02d}_{g.word}", f"word {g.word}", g.png,
            f"word {g.word}: {g.count:,} positions ({100 * g.share:.1f}% of the sample), "
            f"mean p_T = {g.mean_prob:.3f}"))
    cb = run.codebook
    return Report(
        title="QuEST run report" + (f": {run.label} vs {other.label}" if other else ""),
        facts=_facts(run, other),
        accuracy=accuracy_table(run),
        comparison=comparison_table(run, other) if other else None,
        curves=curves,
        codebook=codebook_table(runs),
        codebook_plot=Plot("codebook", "codebook usage", cb_png,
                           "word usage by rank (training vectors), per-word count histogram, "
                           "k-means objective") if cb_png else None,
        codebook_note="" if cb else "no codebook metrics (metrics/codebook.json): run "
                                    "`quest codebook` for codebook statistics",
        gallery=gallery,
        gallery_note=gallery_note,
        gallery_plots=gallery_plots,
        studies=study_sections(root),
    )


def run_report(cfg: Config, paths: Paths, compare: Path | None = None) -> dict[str, Any]:
    """Write reports/report.html (self-contained), reports/report.md and reports/figures/*.png."""
    t0 = time.perf_counter()
    report = build_report_data(cfg, paths, compare)
    out = paths.reports
    fig_dir = out / "figures"
    plots = list(report.curves) + list(report.gallery_plots)
    if report.codebook_plot is not None:
        plots.append(report.codebook_plot)
    plots += [plot for *_, study_plots in report.studies for plot in study_plots]
    written = set()
    for p in plots:
        write_bytes_atomic(fig_dir / f"{p.name}.png", p.png)
        written.add(f"{p.name}.png")
    for stale in fig_dir.glob("*.png"):
        if stale.name not in written:
            stale.unlink()  # a figure of an earlier report (e.g. other gallery words)
    write_text_atomic(out / "report.md", render_markdown(report))
    write_text_atomic(out / "report.html", render_html(report))
    seconds = time.perf_counter() - t0
    log.info("report: %s (%d figures, %d gallery words) in %.1fs", out / "report.html",
             len(plots), len(report.gallery_plots), seconds)
    return {"html": str(out / "report.html"), "markdown": str(out / "report.md"),
            "figures": sorted(written), "gallery_words": len(report.gallery_plots),
            "seconds": round(seconds, 2)}
