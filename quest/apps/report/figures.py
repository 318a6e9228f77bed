"""The report's plots as PNG bytes: training curves and codebook usage (matplotlib, Agg)."""

from __future__ import annotations

from typing import Any

import numpy as np

from quest.apps.plotting import figure, finish_axes, png
from quest.apps.report.inputs import RunData, loss_terms

STYLES = ("-", "--", ":", "-.")


def _colors(runs: list[RunData]) -> dict[str, Any]:
    """One colour per method, the same in every run and figure."""
    from matplotlib import colormaps

    methods: list[str] = []
    for run in runs:
        methods += [m for m in run.methods if m not in methods]
    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


Panel = tuple[str, str, float, str]  # history key, title, scale, y label


def _has(runs: list[RunData], key: str) -> bool:
    """Whether any method of any run recorded `key` per epoch."""
    return any(h and key in h[0] for r in runs for h in r.histories.values())


def _curves(runs: list[RunData], panels: list[Panel]) -> bytes | None:
    """One panel per history key; a line per method (colour) and run (line style)."""
    panels = [p for p in panels if _has(runs, p[0])]
    if not panels:
        return None
    colors = _colors(runs)
    fig, axes = figure(len(panels))
    for ax, (key, title, scale, ylabel) in zip(axes, panels, strict=True):
        for style, run in zip(STYLES, runs, strict=False):
            for method, hist in run.histories.items():
                if not hist or key not in hist[0]:
                    continue
                x = [r["epoch"] for r in hist]
                y = np.array([r[key] for r in hist], dtype=float) * scale
                label = method if len(runs) == 1 else f"{method} ({run.label})"
                ax.plot(x, y, style, color=colors[method], marker="o", markersize=3, label=label)
        finish_axes(ax, title, "epoch", ylabel)
    return png(fig)


def loss_figure(runs: list[RunData]) -> bytes | None:
    """Every named loss term and the total training loss per epoch."""
    terms: list[str] = []
    for run in runs:
        for hist in run.histories.values():
            terms += [t for t in loss_terms(hist) if t not in terms]
    return _curves(runs, [(t, f"loss term '{t}' (train)", 1.0, "loss") for t in terms]
                   + [("loss", "total loss (train)", 1.0, "loss")])


def accuracy_figure(runs: list[RunData]) -> bytes | None:
    """Train accuracy, test top-1 and test top-5 per epoch."""
    return _curves(runs, [("train_accuracy", "train accuracy", 100.0, "%"),
                          ("test_accuracy", "test top-1", 100.0, "%"),
                          ("test_top5", "test top-5", 100.0, "%")])


def word_accuracy_figure(runs: list[RunData]) -> bytes | None:
    """The QuEST diagnostics per epoch: is the word task learned? Visual-word accuracy (student's
    top word = teacher's), how peaked the teacher's targets and the student's predictions are,
    the predictor's scale (which bounds the latter) and the teacher's word perplexity."""
    if not _has(runs, "word_accuracy"):
        return None
    return _curves(runs, [("word_accuracy", "visual-word accuracy (train)", 100.0, "%"),
                          ("mean_max_assignment", "teacher mean max assignment", 1.0, "p"),
                          ("student_mean_max", "student mean max probability", 1.0, "p"),
                          ("predictor_scale", "predictor scale", 1.0, "scale"),
                          ("teacher_perplexity", "teacher word perplexity (train batches)",
                           1.0, "perplexity")])


def codebook_figure(run: RunData) -> bytes | None:
    """Word usage by rank, the histogram of per-word counts and the k-means objective."""
    if not run.usage:
        return None
    usage = np.asarray(run.usage, dtype=float)
    k = len(usage)
    fig, axes = figure(3 if run.objective else 2)
    ax = axes[0]
    ax.bar(np.arange(1, k + 1), usage, width=1.0, color="#4c72b0")
    ax.axhline(usage.sum() / k, color="#c44e52", ls="--", lw=1, label="uniform")
    ax.set_title(f"word usage by rank (K={k})")
    ax.set_xlabel("word rank (most used first)")
    ax.set_ylabel("assigned training vectors")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    ax.hist(usage, bins=min(50, max(5, k // 8)), color="#55a868")
    ax.set_title("histogram of per-word counts")
    ax.set_xlabel("vectors assigned to a word")
    ax.set_ylabel("words")
    ax.grid(alpha=0.3)
    if run.objective:
        ax = axes[2]
        ax.plot(np.arange(1, len(run.objective) + 1), run.objective, marker="o", markersize=3)
        ax.set_title("k-means objective")
        ax.set_xlabel("iteration")
        ax.set_ylabel("total squared distance")
        ax.grid(alpha=0.3)
    return png(fig)
