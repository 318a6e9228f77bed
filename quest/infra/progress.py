"""Progress bars on a terminal, plain log lines elsewhere (CI, Prefect logs)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("quest")


def bars_enabled(mode: str) -> bool:
    """Whether to draw tqdm bars for a runtime.progress mode (auto: only on a terminal)."""
    if mode == "bar":
        return True
    if mode == "auto":
        return sys.stderr.isatty()
    return False


class Progress:
    """Counts steps of a long loop: a tqdm bar when bars are enabled, else about ten log lines.

    In line mode (``lines``, or ``auto`` off a terminal) a line ``desc: step i/total (p%)`` is
    logged whenever another tenth of the total is done, and at the last step; ``off`` is silent.
    """

    def __init__(self, total: int | None, desc: str, mode: str) -> None:
        self.total, self.desc, self.mode = total, desc, mode
        self.done = 0
        self._bar: Any = None
        if bars_enabled(mode):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1, info: str = "") -> None:
        """Advance by n steps; `info` (e.g. the k-means objective) goes on the bar or the line."""
        before, self.done = self.done, self.done + n
        if self._bar is not None:
            if info:
                self._bar.set_postfix_str(info, refresh=False)
            self._bar.update(n)
            return
        if self.mode == "off" or not self.total:
            return
        if self.done >= self.total or 10 * self.done // self.total > 10 * before // self.total:
            pct = 100 * self.done // self.total
            log.info("%s: step %d/%d (%d%%)%s", self.desc, self.done, self.total, pct,
                     f" {info}" if info else "")

    def close(self) -> None:
        """Remove the bar (no-op in line mode)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        """Return self; the bar is closed on exit."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Close the bar."""
        self.close()


def track(iterable: Iterable[T], total: int | None, desc: str, mode: str,
          lines: bool = False) -> Iterator[T]:
    """Wrap `iterable` in a progress bar when bars are enabled; else yield it unchanged.

    With `lines`, a loop without a bar logs progress lines instead (see Progress); training
    loops leave it off, since they log one line per epoch already.
    """
    if not bars_enabled(mode) and not lines:
        yield from iterable
        return
    with Progress(total, desc, mode) as progress:
        for item in iterable:
            yield item
            progress.update()


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A console handler that writes to whatever sys.stderr is when a line is logged: a stream
    bound once would outlive a swapped stderr (test capture, a notebook) and fail on it."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        """The process's stderr now."""
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # always sys.stderr


def setup_logging(logfile: str | None = None, debug: bool = False) -> None:
    """Log plain lines to stderr and, when given, to this run's log file beside its outputs.

    A later call in the same process (tests, notebooks) replaces the previous run's file handler,
    so each log file holds one run only.
    """
    root = logging.getLogger("quest")
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(getattr(h, "_quest_console", False) for h in root.handlers):
        console = _CurrentStderr()
        console.setFormatter(fmt)
        console._quest_console = True  # type: ignore[attr-defined]
        root.addHandler(console)
    if logfile:
        from pathlib import Path

        for old in [h for h in root.handlers if getattr(h, "_quest_file", False)]:
            root.removeHandler(old)
            old.close()
        Path(logfile).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(logfile, encoding="utf-8")
        handler.setFormatter(fmt)
        handler._quest_file = True  # type: ignore[attr-defined]
        root.addHandler(handler)
