"""Exclusive locks on files: one command at a time per project, one runner per study run."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from quest.infra.errors import QuestError


class LockBusy(QuestError):
    """Another process holds the lock; `holder` is the line it wrote (pid, what, since)."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


def _holder(fd: int) -> str:
    # the holder writes who it is right after taking the lock: a process refused in that
    # instant waits for the line (briefly) instead of naming the holder "unknown"
    for _ in range(100):
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        if holder:
            return holder
        time.sleep(0.01)
    return "unknown"


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str], what: str, *, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` while the block runs.

    If another process (or another open of the file) holds it: wait for it with `wait`, else
    raise LockBusy at once, naming the holder. The lock is an flock on an open file, so the
    kernel releases it when its holder exits, even after a crash or kill -9: a stale lock file
    never blocks anyone.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = _holder(fd)
            raise LockBusy(f"{p} is held by {holder}", holder) from None
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()}, {what}, since {stamp}".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_lock(root: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold `<root>/.quest/run.lock` while the block runs; refuse at once if another run has it."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(Path(root) / ".quest" / "run.lock", what))
        except LockBusy as exc:
            raise QuestError(
                f"another quest run is using {Path(root).resolve()} ({exc.holder}): wait for it "
                "to finish, runs on one project never overlap"
            ) from None
        yield
