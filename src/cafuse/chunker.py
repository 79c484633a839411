"""Content-defined chunking with FastCDC over large blocks read from a file or block device."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import CafuseError
from .fileio import open_for_reading
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
        sizes.check(spec)
        return sizes

    def check(self, spec: str | None = None) -> None:
        """Refuse sizes casync cannot use; the error names ``spec``, what the user typed."""
        typed = f" {spec!r}" if spec is not None else ""
        for name, value, (lo, hi) in (
            ("MIN", self.min, MIN_RANGE),
            ("AVG", self.avg, AVG_RANGE),
            ("MAX", self.max, MAX_RANGE),
        ):
            if not lo <= value <= hi:
                raise CafuseError(
                    f"bad --chunk-size{typed}: {name} {value} outside {lo}..{hi}"
                    + (" (a lone AVG sets MIN = AVG/4 and MAX = AVG*4)" if spec else "")
                )
        if not self.min <= self.avg <= self.max:
            raise CafuseError(
                f"bad --chunk-size{typed}: need MIN <= AVG <= MAX, "
                f"got {self.min}:{self.avg}:{self.max}"
            )


DEFAULT_SIZES = ChunkSizes(16 << 10, 64 << 10, 256 << 10)


BLOCK_SIZE = 16 << 20


@dataclass
class Block:
    """A run of input bytes and the chunks cut in it (offsets relative to ``data``)."""

    offset: int  # of data[0] in the input
    data: bytes
    spans: list[tuple[int, int]]


@contextmanager
def open_input(path: str) -> Iterator[tuple[int, int]]:
    """(fd, size) of a regular file or block device opened for reading."""
    try:
        fd = open_for_reading(path, "input", block_device_ok=True)
    except FileNotFoundError:
        raise CafuseError(f"{path}: input file not found") from None
    except OSError as exc:
        raise CafuseError(f"{path}: cannot open input: {exc.strerror}") from None
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        yield fd, os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def cut_blocks(
    fd: int, size: int, sizes: ChunkSizes, block_size: int = BLOCK_SIZE
) -> Iterator[Block]:
    """Read the input in large blocks and cut each into chunks.

    The last chunk of a block may be cut short by the block's end, so its bytes are carried
    into the next block and cut again. FastCDC decides a cut only from the bytes after the
    chunk's start, so the chunks are exactly those of cutting the whole input at once.
    Reading (instead of a memory map) lets worker threads use the bytes without contending
    on page faults.
    """
    if size == 0:
        return
    from pyfastcdc import FastCDC

    cdc = FastCDC(sizes.avg, min_size=sizes.min, max_size=sizes.max)
    carry = b""
    pos = 0  # input offset of the next byte to read
    while pos < size or carry:
        want = min(block_size, size - pos)
        fresh = os.pread(fd, want, pos) if want else b""
        if want and not fresh:
            raise CafuseError(f"input shrank while reading (at byte {pos})")
        data = carry + fresh if carry else fresh
        start = pos - len(carry)
        pos += len(fresh)
        at_end = pos >= size
        spans = [(c.offset, c.length) for c in cdc.cut_buf(data)]
        if not at_end and len(spans) > 1:
            last_offset, _ = spans.pop()
            carry = data[last_offset:]
        else:
            carry = b""
        yield Block(start, data, spans)
