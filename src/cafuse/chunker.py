"""Content-defined chunking with FastCDC over a memory map of a file or block device."""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import CafuseError
from .sizes import parse_size

# pyfastcdc's accepted ranges
MIN_RANGE = (64, 1 << 20)
AVG_RANGE = (256, 4 << 20)
MAX_RANGE = (1024, 16 << 20)


@dataclass(frozen=True)
class ChunkSizes:
    min: int
    avg: int
    max: int

    @classmethod
    def parse(cls, spec: str) -> ChunkSizes:
        """``[MIN:]AVG[:MAX]``; a lone AVG implies MIN = AVG/4 and MAX = AVG*4."""
        parts = [parse_size(p, "--chunk-size") for p in spec.split(":")]
        if len(parts) == 1:
            sizes = cls(parts[0] // 4, parts[0], parts[0] * 4)
        elif len(parts) == 2:
            sizes = cls(parts[0], parts[1], parts[1] * 4)
        elif len(parts) == 3:
            sizes = cls(*parts)
        else:
            raise CafuseError(f"bad --chunk-size {spec!r}: expected [MIN:]AVG[:MAX]")
        sizes.check()
        return sizes

    def check(self) -> None:
        for name, value, (lo, hi) in (("MIN", self.min, MIN_RANGE), ("AVG", self.avg, AVG_RANGE),
                                      ("MAX", self.max, MAX_RANGE)):
            if not lo <= value <= hi:
                raise CafuseError(f"bad --chunk-size: {name} {value} outside {lo}..{hi}")
        if not self.min <= self.avg <= self.max:
            raise CafuseError(f"bad --chunk-size: need MIN <= AVG <= MAX, got "
                              f"{self.min}:{self.avg}:{self.max}")


DEFAULT_SIZES = ChunkSizes(16 << 10, 64 << 10, 256 << 10)


@contextmanager
def mapped_input(path: str) -> Iterator[memoryview]:
    """A read-only view of a regular file or block device (empty for an empty file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CafuseError(f"{path}: input file not found") from None
    except OSError as exc:
        raise CafuseError(f"{path}: cannot open input: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise CafuseError(f"{path}: not a regular file or block device")
        size = os.lseek(fd, 0, os.SEEK_END)
        if size == 0:
            yield memoryview(b"")
            return
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        mm.madvise(mmap.MADV_SEQUENTIAL)
        view = memoryview(mm)
        try:
            yield view
        finally:
            view.release()
            # chunks still referenced keep the map open until they are collected
            with contextlib.suppress(BufferError):
                mm.close()
    finally:
        os.close(fd)


def cut(data: memoryview, sizes: ChunkSizes) -> Iterator[tuple[int, int]]:
    """(offset, length) of each chunk of ``data``."""
    if not len(data):
        return
    from pyfastcdc import FastCDC

    cdc = FastCDC(sizes.avg, min_size=sizes.min, max_size=sizes.max)
    for chunk in cdc.cut_buf(data):
        yield chunk.offset, chunk.length
