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
def atomic_path(path: str | os.PathLike[str], *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    With replace=False an existing `path` is never overwritten: FileExistsError instead (the
    file is published with a hard link, which fails atomically when the name is taken, so two
    processes writing the same new name cannot both win)."""
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
        if replace:
            os.replace(tmp_path, target)
        else:
            os.link(tmp_path, target)
            tmp_path.unlink()
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        # errno None: a short write reported by numpy's tofile ("N requested and M written")
        if isinstance(exc, OSError) and (exc.errno is None or exc.errno in _STORAGE_ERRNOS):
            raise _write_error(target, exc) from exc
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *,
                       replace: bool = True) -> None:
    """Write bytes to `path` atomically (replace=False: FileExistsError if `path` exists)."""
    with atomic_path(path, replace=replace) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str, *, replace: bool = True) -> None:
    """Write text to `path` atomically (replace=False: FileExistsError if `path` exists)."""
    write_bytes_atomic(path, text.encode("utf-8"), replace=replace)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, replace: bool = True) -> None:
    """Write `obj` as indented JSON to `path` atomically (replace=False: FileExistsError if
    `path` exists)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", replace=replace)


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


_NPY_MAGIC = b"\x93NUMPY\x01\x00"


def _npy_header(dtype: np.dtype, rows: int, width: int, size: int | None = None) -> bytes:
    """A .npy version 1.0 header for a C-order rows x width array, padded to `size` bytes (or
    to the format's 64-byte alignment)."""
    body = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                 "shape": (rows, width)}).encode("latin1")
    fixed = len(_NPY_MAGIC) + 2
    total = size if size is not None else -(-(fixed + len(body) + 1) // 64) * 64
    pad = total - fixed - len(body) - 1
    if pad < 0:
        raise ValueError("the .npy header outgrew the space reserved for it")
    return _NPY_MAGIC + (total - fixed).to_bytes(2, "little") + body + b" " * pad + b"\n"


class NpyAppender:
    """A rows x width .npy file that grows as rows are appended, written atomically.

    Rows go straight to the file (no memory map, no preallocation), so memory use does not
    depend on how many arrive; the header, written first with room for any row count, gets the
    final count when the block ends. An exception leaves no file behind."""

    def __init__(self, path: str | os.PathLike[str], dtype: Any, width: int) -> None:
        self.path, self.dtype, self.width = Path(path), np.dtype(dtype), int(width)
        self.rows = 0

    def __enter__(self) -> NpyAppender:
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        self._fh = open(tmp, "wb")
        self._header_size = len(_npy_header(self.dtype, 10**15, self.width))
        self._fh.write(_npy_header(self.dtype, 0, self.width, self._header_size))
        return self

    def append(self, rows: np.ndarray) -> None:
        """Append rows (n x width), converted to the file's dtype."""
        block = np.ascontiguousarray(rows, dtype=self.dtype)
        if block.ndim != 2 or block.shape[1] != self.width:
            raise ValueError(f"rows of shape {block.shape} do not fit a .npy of width "
                             f"{self.width}")
        self._fh.write(block.tobytes())
        self.rows += block.shape[0]

    def __exit__(self, *exc: Any) -> bool | None:
        try:
            if exc[0] is None:
                self._fh.seek(0)
                self._fh.write(_npy_header(self.dtype, self.rows, self.width,
                                           self._header_size))
                self._fh.flush()
                os.fsync(self._fh.fileno())
        finally:
            self._fh.close()
        return self._ctx.__exit__(*exc)
