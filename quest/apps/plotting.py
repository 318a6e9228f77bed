"""matplotlib basics shared by the report's figures and the study figures: figures without pyplot
(no global state, thread-safe), rendered to PNG bytes with the Agg backend."""

from __future__ import annotations

import io
from typing import Any


def figure(panels: int, height: float = 3.2) -> tuple[Any, list[Any]]:
    """A figure with `panels` side-by-side axes (no pyplot: no global state, thread-safe)."""
    from matplotlib.figure import Figure

    cols = min(panels, 3)
    rows = -(-panels // cols)
    fig = Figure(figsize=(4.3 * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def png(fig: Any) -> bytes:
    """Render a figure to PNG bytes with the Agg backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def plain_ticks() -> Any:
    """Tick labels as plain numbers (no scientific notation)."""
    from matplotlib.ticker import ScalarFormatter

    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    return fmt


def finish_axes(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    """Title, axis labels, a light grid and a small legend: how every line plot here ends."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
