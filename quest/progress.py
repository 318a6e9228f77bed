"""Progress bars on a terminal, plain log lines elsewhere (CI, Prefect logs)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger("quest")


def bars_enabled(mode: str) -> bool:
    """Whether to draw tqdm bars for a runtime.progress mode (auto: only on a terminal)."""
    if mode == "bar":
        return True
    if mode == "auto":
        return sys.stderr.isatty()
    return False


def track(iterable: Iterable[T], total: int | None, desc: str, mode: str) -> Iterator[T]:
    """Wrap `iterable` in a progress bar when bars are enabled; otherwise yield it unchanged."""
    if not bars_enabled(mode):
        yield from iterable
        return
    from tqdm import tqdm

    yield from tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def setup_logging(logfile: str | None = None, debug: bool = False) -> None:
    """Log plain lines to stderr and, when given, to a log file beside the run's outputs."""
    root = logging.getLogger("quest")
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(getattr(h, "_quest_console", False) for h in root.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(fmt)
        console._quest_console = True  # type: ignore[attr-defined]
        root.addHandler(console)
    if logfile:
        from pathlib import Path

        Path(logfile).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(logfile, encoding="utf-8")
        handler.setFormatter(fmt)
        root.addHandler(handler)
