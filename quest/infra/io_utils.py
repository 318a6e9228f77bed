"""Atomic file writes and content hashing, so that no half-written output is ever left behind."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from quest.infra.errors import QuestError

# mkstemp creates files readable by the owner only; outputs should get the usual permissions
_UMASK = os.umask(0)
os.umask(_UMASK)


# write failures that the user fixes outside the program: reported in one line, not a traceback
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                   errno.EPERM, errno.EIO}


def _write_error(target: Path, exc: OSError) -> QuestError:
    reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    return QuestError(
        f"cannot write {target} ({reason}): free disk space or fix permissions there, then "
        "rerun (the previous file, if any, is unchanged)"
    )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        if exc.errno in _STORAGE_ERRNOS:
            raise _write_error(target, exc) from exc
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, target)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        # errno None: a short write reported by numpy's tofile ("N requested and M written")
        if isinstance(exc, OSError) and (exc.errno is None or exc.errno in _STORAGE_ERRNOS):
            raise _write_error(target, exc) from exc
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write text to `path` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_npy_atomic(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Save a numpy array to a .npy file atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
