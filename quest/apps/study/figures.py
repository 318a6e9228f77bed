"""A study's figures as PNG bytes (matplotlib, Agg): top-1 against a count (images per class,
epochs) and against visual-word accuracy."""

from __future__ import annotations

from quest.apps.plotting import figure, finish_axes, plain_ticks, png
from quest.apps.stats import mean_std


def study_size_figure(series: dict[str, dict[int, list[float]]], title: str,
                      xlabel: str = "training images per class") -> bytes | None:
    """Top-1 against training images per class (or another count on a log axis, `xlabel`): a
    line per series (method or variant), the mean over seeds with the sample std as error
    bars."""
    if not series:
        return None
    from matplotlib import colormaps

    fig, (ax,) = figure(1, height=3.6)
    cmap = colormaps["tab10"]
    for i, (label, by_size) in enumerate(series.items()):
        sizes = sorted(by_size)
        means, stds = zip(*(mean_std(by_size[n]) for n in sizes), strict=True)
        ax.errorbar(sizes, means, yerr=stds, marker="o", markersize=4, capsize=3,
                    color=cmap(i % 10), label=label)
    ax.set_xscale("log")
    ax.set_xticks(sorted({n for s in series.values() for n in s}))
    ax.get_xaxis().set_major_formatter(plain_ticks())
    from matplotlib.ticker import NullFormatter

    ax.get_xaxis().set_minor_formatter(NullFormatter())  # only the measured counts are labelled
    finish_axes(ax, title, xlabel, "test top-1 %")
    return png(fig)


def study_word_figure(points: list[tuple[str, float, float]], title: str) -> bytes | None:
    """Top-1 against visual-word accuracy: a labelled point per setting (mean over seeds)."""
    if not points:
        return None
    fig, (ax,) = figure(1, height=4.2)
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
    return png(fig)


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
