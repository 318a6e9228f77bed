"""The report's plots as PNG bytes: training curves and codebook usage (matplotlib, Agg)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from quest.apps.report.inputs import RunData, loss_terms

STYLES = ("-", "--", ":", "-.")


def _figure(panels: int, height: float = 3.2) -> tuple[Any, list[Any]]:
    """A figure with `panels` side-by-side axes (no pyplot: no global state, thread-safe)."""
    from matplotlib.figure import Figure

    cols = min(panels, 3)
    rows = -(-panels // cols)
    fig = Figure(figsize=(4.3 * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _png(fig: Any) -> bytes:
    """Render a figure to PNG bytes with the Agg backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


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
    fig, axes = _figure(len(panels))
    for ax, (key, title, scale, ylabel) in zip(axes, panels, strict=True):
        for style, run in zip(STYLES, runs, strict=False):
            for method, hist in run.histories.items():
                if not hist or key not in hist[0]:
                    continue
                x = [r["epoch"] for r in hist]
                y = np.array([r[key] for r in hist], dtype=float) * scale
                label = method if len(runs) == 1 else f"{method} ({run.label})"
                ax.plot(x, y, style, color=colors[method], marker="o", markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


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


def study_size_figure(series: dict[str, dict[int, list[float]]], title: str,
                      xlabel: str = "training images per class") -> bytes | None:
    """Top-1 against training images per class (or another count on a log axis, `xlabel`): a
    line per series (method or variant), the mean over seeds with the sample std as error
    bars."""
    if not series:
        return None
    from matplotlib import colormaps

    fig, (ax,) = _figure(1, height=3.6)
    cmap = colormaps["tab10"]
    for i, (label, by_size) in enumerate(series.items()):
        sizes = sorted(by_size)
        means = [float(np.mean(by_size[n])) for n in sizes]
        stds = [float(np.std(by_size[n], ddof=1)) if len(by_size[n]) > 1 else 0.0
                for n in sizes]
        ax.errorbar(sizes, means, yerr=stds, marker="o", markersize=4, capsize=3,
                    color=cmap(i % 10), label=label)
    ax.set_xscale("log")
    ax.set_xticks(sorted({n for s in series.values() for n in s}))
    ax.get_xaxis().set_major_formatter(_plain_ticks())
    from matplotlib.ticker import NullFormatter

    ax.get_xaxis().set_minor_formatter(NullFormatter())  # only the measured counts are labelled
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test top-1 %")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def study_word_figure(points: list[tuple[str, float, float]], title: str) -> bytes | None:
    """Top-1 against visual-word accuracy: a labelled point per setting (mean over seeds)."""
    if not points:
        return None
    fig, (ax,) = _figure(1, height=4.2)
    xs = [100 * w for _, w, _ in points]
    ys = [t for _, _, t in points]
    ax.scatter(xs, ys, s=18, color="tab:blue", zorder=2)
    notes = [ax.annotate(label, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6,
                         arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"})
             for (label, _, _), x, y in zip(points, xs, ys, strict=True)]
    ax.margins(x=0.2, y=0.08)  # room for the labels of the outermost points
    ax.set_xlabel("visual-word accuracy at the last epoch %")
    ax.set_ylabel("test top-1 %")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    # settings with near-equal results would print their labels on top of each other: lay the
    # figure out once, then lift each label clear of those already placed (a grey leader line
    # ties a lifted label to its point)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    boxes = [n.get_window_extent(renderer) for n in notes]
    lifts = spread_labels([(b.x0, b.y0, b.x1, b.y1) for b in boxes])
    for note, lift in zip(notes, lifts, strict=True):
        x, y = note.xyann
        note.xyann = (x, y + lift * 72 / fig.dpi)
    return _png(fig)


def spread_labels(boxes: list[tuple[float, float, float, float]],
                  gap: float = 1.0) -> list[float]:
    """Upward shifts that keep label boxes (x0, y0, x1, y1, in one unit) from overlapping.

    Labels are placed lowest first; each one moves up just above every placed label it would
    cross horizontally, so a label moves only when it has to and the order of heights is kept.
    """
    order = sorted(range(len(boxes)), key=lambda i: (boxes[i][1], boxes[i][0]))
    placed: list[tuple[float, float, float, float]] = []
    lifts = [0.0] * len(boxes)
    for i in order:
        x0, y0, x1, y1 = boxes[i]
        lift = 0.0
        moved = True
        while moved:
            moved = False
            for px0, py0, px1, py1 in placed:
                if x0 < px1 and px0 < x1 and y0 + lift < py1 + gap and py0 < y1 + lift + gap:
                    lift = py1 + gap - y0
                    moved = True
        lifts[i] = lift
        placed.append((x0, y0 + lift, x1, y1 + lift))
    return lifts


def _plain_ticks() -> Any:
    from matplotlib.ticker import ScalarFormatter

    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    return fmt


def codebook_figure(run: RunData) -> bytes | None:
    """Word usage by rank, the histogram of per-word counts and the k-means objective."""
    if not run.usage:
        return None
    usage = np.asarray(run.usage, dtype=float)
    k = len(usage)
    fig, axes = _figure(3 if run.objective else 2)
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
    return _png(fig)
