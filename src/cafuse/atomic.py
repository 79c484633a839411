"""Files that appear under their final name complete or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import CafuseError


class AtomicFile:
    """A temporary file beside ``path``; ``commit`` fsyncs and renames it into place."""

    def __init__(self, path: Path, mode: int = 0o644) -> None:
        self.path = path
        try:
            fd, tmp = tempfile.mkstemp(
                prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else "."
            )
        except FileNotFoundError:
            raise CafuseError(f"{path}: directory {path.parent} does not exist") from None
        except PermissionError:
            raise CafuseError(f"{path}: permission denied writing in {path.parent}") from None
        except OSError as exc:
            raise CafuseError(f"{path}: cannot create file: {exc.strerror}") from None
        self.tmp_path = Path(tmp)
        self.fd = fd
        os.fchmod(fd, mode & ~_UMASK)
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]

    def commit(self) -> None:
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            os.rename(self.tmp_path, self.path)
        except OSError as exc:
            self.abort()
            raise CafuseError(f"{self.path}: cannot write: {exc.strerror}") from None
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp_path)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide, not thread-safe
