"""Read tar and zip archives member by member in memory, refusing members that could escape.

Nothing is ever extracted to disk, but every member name and link target is still validated
before any member is read: an archive that carries absolute paths, '..' components or links
pointing outside itself is hostile or broken, and we refuse it as a whole.
"""

from __future__ import annotations

import re
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from quest.infra.errors import QuestError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
_DRIVE = re.compile(r"^[A-Za-z]:")
_MAX_LINK_HOPS = 16


def archive_kind(path: str | Path) -> str | None:
    """'tar' or 'zip' for a supported archive file name, else None."""
    name = Path(path).name.lower()
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return "tar"
    if name.endswith(".zip"):
        return "zip"
    return None


def safe_member_name(name: str, archive: str | Path) -> str:
    """Return `name` as a clean relative POSIX path, or raise QuestError if it could escape."""
    raw = name.replace("\\", "/")
    if raw.startswith("/") or _DRIVE.match(raw):
        raise QuestError(
            f"refusing archive {archive}: member '{name}' has an absolute path "
            "(repack it with paths relative to the archive root)"
        )
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise QuestError(
            f"refusing archive {archive}: member '{name}' contains a '..' component "
            "(repack it with paths inside the archive root)"
        )
    return "/".join(parts)


def safe_link_target(name: str, target: str, archive: str | Path, *, hard: bool) -> str:
    """Return the archive path a link member resolves to; raise QuestError if it leaves it."""
    raw = target.replace("\\", "/")
    if raw.startswith("/") or _DRIVE.match(raw):
        raise QuestError(
            f"refusing archive {archive}: link '{name}' points to the absolute path '{target}'"
        )
    # Tar hard links name their target from the archive root; symlinks from their own folder.
    parts: list[str] = [] if hard else name.split("/")[:-1]
    for part in raw.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise QuestError(
                    f"refusing archive {archive}: link '{name}' -> '{target}' points outside "
                    "the archive"
                )
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


@dataclass(frozen=True)
class Entry:
    """One validated archive member: a clean relative path and whether it is a folder."""

    name: str
    is_dir: bool


class ArchiveReader:
    """Validated, in-memory, read-only access to the members of a tar(.gz) or zip archive."""

    def __init__(self, path: str | Path) -> None:
        """Open the archive and validate every member name before anything is read."""
        self.path = Path(path)
        kind = archive_kind(self.path)
        if kind is None:
            raise QuestError(
                f"unsupported archive type for {self.path}: use a folder or a "
                f"{', '.join(ARCHIVE_SUFFIXES)} archive"
            )
        self.kind = kind
        self._tar: tarfile.TarFile | None = None
        self._zip: zipfile.ZipFile | None = None
        self._files: dict[str, tarfile.TarInfo | zipfile.ZipInfo] = {}
        self._links: dict[str, str] = {}
        self._dirs: set[str] = set()
        self.entries: list[Entry] = []
        try:
            if kind == "tar":
                self._tar = tarfile.open(self.path, "r:*")
                self._index_tar(self._tar)
            else:
                self._zip = zipfile.ZipFile(self.path)
                self._index_zip(self._zip)
        except QuestError:
            self.close()
            raise
        except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
            self.close()
            raise QuestError(
                f"cannot read archive {self.path} ({one_line(err)}): check that it is a "
                "complete, uncorrupted .tar.gz/.tgz/.tar/.zip file"
            ) from err

    def _add(self, name: str, is_dir: bool) -> None:
        """Record one validated entry (archives may repeat a name; the last one wins)."""
        if not name:
            return
        if is_dir:
            if name not in self._dirs:
                self._dirs.add(name)
                self.entries.append(Entry(name, True))
        elif name not in self._files and name not in self._links:
            self.entries.append(Entry(name, False))

    def _index_tar(self, tar: tarfile.TarFile) -> None:
        """Validate every tar member and index regular files, folders and links."""
        for info in tar.getmembers():
            name = safe_member_name(info.name, self.path)
            if info.issym() or info.islnk():
                target = safe_link_target(name, info.linkname, self.path, hard=info.islnk())
                self._add(name, False)
                self._links[name] = target
                self._files.pop(name, None)
            elif info.isdir():
                self._add(name, True)
            elif info.isreg():
                self._add(name, False)
                self._files[name] = info
                self._links.pop(name, None)
            else:
                raise QuestError(
                    f"refusing archive {self.path}: member '{info.name}' is a device or fifo "
                    "(an image archive holds only files, folders and links)"
                )

    def _index_zip(self, zf: zipfile.ZipFile) -> None:
        """Validate every zip member and index files, folders and (Unix) symlinks."""
        for info in zf.infolist():
            name = safe_member_name(info.filename, self.path)
            if info.is_dir():
                self._add(name, True)
            elif stat.S_ISLNK(info.external_attr >> 16):
                # A zip symlink stores its target path as the member's content.
                target = zf.read(info).decode("utf-8", "replace")
                resolved = safe_link_target(name, target, self.path, hard=False)
                self._add(name, False)
                self._links[name] = resolved
                self._files.pop(name, None)
            else:
                self._add(name, False)
                self._files[name] = info
                self._links.pop(name, None)

    def read(self, name: str) -> bytes:
        """The bytes of file member `name` (links followed inside the archive)."""
        for _ in range(_MAX_LINK_HOPS):
            if name not in self._links:
                break
            name = self._links[name]
        else:
            raise OSError(f"too many link hops resolving '{name}'")
        info = self._files.get(name)
        if info is None:
            raise FileNotFoundError(f"'{name}' is not a file in the archive")
        if self._tar is not None:
            assert isinstance(info, tarfile.TarInfo)
            fh = self._tar.extractfile(info)
            if fh is None:
                raise OSError(f"'{name}' cannot be read")
            with fh:
                return fh.read()
        assert self._zip is not None and isinstance(info, zipfile.ZipInfo)
        return self._zip.read(info)

    def close(self) -> None:
        """Close the underlying archive file."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self) -> ArchiveReader:
        """Context-manager entry."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close on exit."""
        self.close()


def one_line(err: BaseException) -> str:
    """An exception as a single short line for an error message."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:200]
