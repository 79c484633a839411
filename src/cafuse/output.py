"""Where extract writes: a new regular file (temp + rename), in place, or a block device."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from pathlib import Path

from .atomic import AtomicFile
from .errors import CafuseError

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


class Output:
    """An open output of a known size.

    ``reuses_content`` is true when the target may already hold the right bytes (in-place
    or a block device): extract then checks them before writing and counts what it kept.
    ``sparse`` is true when unwritten ranges read as zeros (a freshly truncated file).
    """

    def __init__(self, path: str, size: int, in_place: bool) -> None:
        self.path = path
        self._atomic: AtomicFile | None = None
        self._closed = False
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise CafuseError(f"{path}: cannot use as output: {exc.strerror}") from None
        self.is_block = st is not None and stat.S_ISBLK(st.st_mode)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise CafuseError(f"{path}: is a directory; give the output file's path")
        try:
            if self.is_block:
                self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                device_size = os.lseek(self.fd, 0, os.SEEK_END)
                if device_size < size:
                    os.close(self.fd)
                    raise CafuseError(
                        f"{path}: block device is {device_size} bytes, the image needs {size}"
                    )
            elif in_place:
                self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                os.ftruncate(self.fd, size)
            else:
                self._atomic = AtomicFile(Path(path))
                self.fd = self._atomic.fd
                os.ftruncate(self.fd, size)
        except PermissionError:
            raise CafuseError(f"{path}: permission denied writing the output") from None
        except OSError as exc:
            if self._atomic:
                self._atomic.abort()
            raise CafuseError(f"{path}: cannot write output: {exc.strerror}") from None
        self.reuses_content = self.is_block or in_place
        self.sparse = not self.reuses_content

    def write(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def read(self, size: int, offset: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def zero(self, offset: int, size: int) -> None:
        """Make ``[offset, offset+size)`` read as zeros, as a hole where the filesystem can."""
        if not self.is_block:
            flags = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            if _libc.fallocate(self.fd, flags, offset, size) == 0:
                return
            if ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        self.write(bytes(size), offset)

    def commit(self) -> None:
        if self._atomic:
            self._atomic.commit()
            return
        os.fsync(self.fd)
        self._closed = True
        os.close(self.fd)

    def abort(self) -> None:
        """Give up: a new file's temporary file is removed (in place, the file stays)."""
        if self._atomic:
            self._atomic.abort()
        elif not self._closed:
            self._closed = True
            os.close(self.fd)
