"""Files that appear under their final name complete or not at all.

The temporary file beside the target is ``flock``-ed for as long as it is written, so a
later writer of the same target tells a live writer's temporary file (locked) from one a
killed writer left (unlocked) and removes only the latter.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import tempfile
from pathlib import Path

from .errors import CafuseError
from .sizes import format_size

log = logging.getLogger(__name__)

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class AtomicFile:
    """A temporary file beside ``path``; ``commit`` fsyncs and renames it into place."""

    def __init__(self, path: Path, mode: int = 0o644) -> None:
        self.path = path
        directory = path.parent if str(path.parent) else Path(".")
        remove_stale_temps(path)
        for _ in range(8):
            fd, tmp = self._create(directory)
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until closed: this writer is alive
            if os.fstat(fd).st_nlink:
                break
            os.close(fd)  # a cleaner took it for a dead writer's before the lock: again
        else:
            raise CafuseError(f"{path}: cannot create a temporary file in {directory}")
        self.tmp_path = Path(tmp)
        self.fd = fd
        os.fchmod(fd, mode & ~_UMASK)
        self._done = False

    def _create(self, directory: Path) -> tuple[int, str]:
        try:
            return tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        except FileNotFoundError:
            raise CafuseError(f"{self.path}: directory {self.path.parent} does not exist") from None
        except PermissionError:
            raise CafuseError(
                f"{self.path}: permission denied writing in {self.path.parent}"
            ) from None
        except OSError as exc:
            raise CafuseError(f"{self.path}: cannot create file: {exc.strerror}") from None

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
        except OSError as exc:
            self.abort()
            raise write_error(self.path, exc) from None

    def commit(self) -> None:
        try:
            os.fsync(self.fd)
            os.rename(self.tmp_path, self.path)  # still locked: no cleaner can take it
        except OSError as exc:
            self.abort()
            raise write_error(self.path, exc) from None
        self._done = True
        os.close(self.fd)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp_path)
        with contextlib.suppress(OSError):
            os.close(self.fd)


def write_error(path: Path | str, exc: OSError, needed: int | None = None) -> CafuseError:
    """One line for a failed write; for a full disk, how much was needed and is free."""
    if exc.errno not in _NO_SPACE:
        return CafuseError(f"{path}: cannot write: {exc.strerror}")
    need = f"the image needs {format_size(needed)}; " if needed is not None else ""
    return CafuseError(
        f"{path}: no space left on device ({need}{free_space(Path(path).parent)}): "
        "free some space or write elsewhere"
    )


def free_space(directory: Path | str) -> str:
    try:
        vfs = os.statvfs(directory or ".")
    except OSError:
        return "free space unknown"
    return f"{format_size(vfs.f_bavail * vfs.f_frsize)} free"


def remove_stale_temps(path: Path) -> int:
    """Remove temporary files of ``path`` that killed writers left (not locked by anyone)."""
    directory = path.parent if str(path.parent) else Path(".")
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp$")
    removed = 0
    try:
        entries = [e for e in os.scandir(directory) if pattern.match(e.name)]
    except OSError:
        return 0
    for entry in entries:
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False) and _remove_if_unlocked(entry.path):
                removed += 1
    if removed:
        log.info("%s: removed %d temporary files left by killed writers", path, removed)
    return removed


def _remove_if_unlocked(name: str) -> bool:
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live writer holds it
        if os.stat(name, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
            return False
        os.unlink(name)
        return True
    finally:
        os.close(fd)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide, not thread-safe
