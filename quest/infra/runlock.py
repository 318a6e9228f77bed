"""One command at a time per project: an exclusive lock, so concurrent runs cannot interleave."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from quest.infra.errors import QuestError


@contextlib.contextmanager
def run_lock(root: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold `<root>/.quest/run.lock` while the block runs; refuse at once if another run has it.

    The lock is an flock on an open file, so the kernel releases it when its holder exits, even
    after a crash or kill -9: a stale lock file never blocks the next run.
    """
    path = Path(root) / ".quest" / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # the holder writes who it is right after taking the lock: a run refused in that
            # instant waits for the line (briefly) instead of naming the holder "unknown"
            holder = ""
            for _ in range(100):
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
                if holder:
                    break
                time.sleep(0.01)
            holder = holder or "unknown"
            raise QuestError(
                f"another quest run is using {Path(root).resolve()} ({holder}): wait for it to "
                "finish, runs on one project never overlap"
            ) from None
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
