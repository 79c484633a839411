"""The casync blob index (``.caibx``): strict vectorised parsing, streaming atomic writing,
and the chunk table that maps byte offsets to chunks.

Layout (docs/format.md): a 48-byte header, a 16-byte table header, one 40-byte item per
chunk (little-endian u64 END offset, then the 32-byte chunk id), and a 40-byte tail.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from .atomic import AtomicFile
from .chunktable import BATCH_ITEMS, Batch, ChunkTable
from .digest import (
    FLAG_BLAKE3,
    FLAG_SHA512_256,
    zero_chunk_id,
)
from .errors import CafuseError
from .fileio import open_for_reading

log = logging.getLogger(__name__)

CA_FORMAT_INDEX = 0x96824D9C7B129FF9
CA_FORMAT_TABLE = 0xE75B9E112F17417D
CA_FORMAT_TABLE_TAIL_MARKER = 0x4B4F050E5549ECD1
TABLE_SIZE_UNKNOWN = 0xFFFFFFFFFFFFFFFF
CASYNC_FLAGS_MASK = 0xF0000001FFFFFFFF
KNOWN_FLAGS_MASK = CASYNC_FLAGS_MASK | FLAG_BLAKE3

HEADER_SIZE = 48
TABLE_HEADER_SIZE = 16
ITEM_SIZE = 40
TAIL_SIZE = 40
FIXED_SIZE = HEADER_SIZE + TABLE_HEADER_SIZE + TAIL_SIZE  # 104
CHUNK_SIZE_LIMIT = 128 * 1024 * 1024
# indexes up to this size are parsed into memory whole; larger ones are read a page at a
# time when first used (``cafuse.pagedtable``), locally or by URL
IN_MEMORY_MAX_BYTES = 1 << 20

ITEM_DTYPE = np.dtype([("end", "<u8"), ("id", "u1", (32,))])
_HEADER = struct.Struct("<6Q")
_TABLE_HEADER = struct.Struct("<2Q")
_TAIL = struct.Struct("<5Q")


def _fail(source: str, rule: str) -> CafuseError:
    return CafuseError(f"{source}: not a valid casync blob index: {rule}")


def check_chunk_sizes(chunk_min: int, chunk_avg: int, chunk_max: int) -> str | None:
    """The rule the sizes break, or None when casync would accept them."""
    for name, value in (("min", chunk_min), ("avg", chunk_avg), ("max", chunk_max)):
        if not 1 <= value <= CHUNK_SIZE_LIMIT:
            return f"chunk size {name} {value} outside 1..{CHUNK_SIZE_LIMIT}"
    if not chunk_min <= chunk_avg <= chunk_max:
        return f"chunk sizes not min <= avg <= max ({chunk_min}/{chunk_avg}/{chunk_max})"
    return None


@dataclass
class Index(ChunkTable):
    """A parsed blob index held in memory: header fields plus the table as numpy arrays.

    ``ends`` holds each chunk's cumulative end offset (strictly increasing), ``ids`` the
    32-byte chunk ids as an (N, 32) uint8 array. Both may be views on a memory map.
    """

    flags: int
    chunk_min: int
    chunk_avg: int
    chunk_max: int
    ends: np.ndarray
    ids: np.ndarray
    _keepalive: object = field(default=None, repr=False)

    @cached_property
    def chunk_count(self) -> int:
        return int(self.ends.shape[0])

    @cached_property
    def blob_size(self) -> int:
        return int(self.ends[-1]) if self.chunk_count else 0

    @cached_property
    def _end_list(self) -> memoryview:
        """The ends as a memoryview: indexing it and ``bisect`` over it take Python ints,
        several times cheaper per call than numpy scalars (the read path does a few a read)."""
        return memoryview(np.ascontiguousarray(self.ends, dtype=np.uint64))

    @cached_property
    def starts(self) -> np.ndarray:
        starts = np.empty_like(self.ends)
        if self.chunk_count:
            starts[0] = 0
            starts[1:] = self.ends[:-1]
        return starts

    @cached_property
    def sizes(self) -> np.ndarray:
        return self.ends - self.starts

    def chunk_id(self, i: int) -> bytes:
        return self.ids[i].tobytes()

    def span(self, i: int) -> tuple[int, int]:
        """Byte range ``[start, end)`` of chunk ``i`` in the blob."""
        ends = self._end_list
        return (ends[i - 1] if i else 0), ends[i]

    def covering(self, offset: int, size: int, *, wait: bool = True) -> range:
        """Indices of the chunks that cover ``[offset, offset + size)``, clipped to the blob."""
        end = min(offset + size, self.blob_size)
        if size <= 0 or offset >= end:
            return range(0)
        ends = self._end_list
        first = bisect_right(ends, offset)
        if end <= ends[first]:
            return range(first, first + 1)  # the common case: one chunk, one search
        return range(first, bisect_right(ends, end - 1, first) + 1)

    def is_zero(self, i: int) -> bool:
        return self._zero_bytes[i] != 0

    @cached_property
    def _zero_bytes(self) -> bytes:
        return self.zero_mask.tobytes()  # indexing bytes is a cheap int lookup

    def batches(self, step: int = BATCH_ITEMS) -> Iterator[Batch]:
        zero = self.zero_mask
        for lo in range(0, self.chunk_count, max(step, 1)):
            hi = min(lo + step, self.chunk_count)
            start = int(self.ends[lo - 1]) if lo else 0
            yield Batch(lo, start, self.ends[lo:hi], self.ids[lo:hi], zero[lo:hi])

    def id_keys(self) -> np.ndarray:
        """The first 8 bytes of every id as uint64: a compact key for sorting and lookups."""
        return np.ascontiguousarray(self.ids[:, :8]).view("<u8").reshape(-1)

    def distinct_positions(self) -> np.ndarray:
        """One position (the first) of every distinct chunk id, in blob order."""
        if not self.chunk_count:
            return np.empty(0, dtype=np.int64)
        ids = np.ascontiguousarray(self.ids).view("V32").reshape(-1)
        _, first = np.unique(ids, return_index=True)
        return np.sort(first)

    @cached_property
    def zero_mask(self) -> np.ndarray:
        """True for chunks whose data is all zero bytes.

        A zero run is cut into chunks of a few recurring lengths, so the digest of zeros is
        computed only for the most frequent lengths and the max size, then compared to all
        ids in one vectorised step.
        """
        mask = np.zeros(self.chunk_count, dtype=bool)
        if not self.chunk_count:
            return mask
        lengths, counts = np.unique(self.sizes, return_counts=True)
        candidates = set(lengths[np.argsort(counts)[::-1][:16]].tolist())
        candidates.add(self.chunk_max)
        for length in candidates:
            zid = np.frombuffer(zero_chunk_id(self.digest, int(length)), dtype=np.uint8)
            rows = self.sizes == length
            if rows.any():
                mask[rows] = (self.ids[rows] == zid).all(axis=1)
        return mask


@dataclass(frozen=True)
class Header:
    """The validated header and tail of an index: everything but the items."""

    flags: int
    chunk_min: int
    chunk_avg: int
    chunk_max: int
    count: int


def parse_header(
    head: bytes | memoryview | mmap.mmap, tail: bytes, size: int, source: str
) -> Header:
    """Check the header (first 64 bytes), the tail (last 40) and the file length."""
    if size < FIXED_SIZE:
        raise _fail(source, f"file is {size} bytes, shorter than the minimum {FIXED_SIZE}")
    hsize, htype, flags, cmin, cavg, cmax = _HEADER.unpack_from(head, 0)
    if hsize != HEADER_SIZE or htype != CA_FORMAT_INDEX:
        raise _fail(source, "bad header (wrong size or type; is this a .caidx or another file?)")
    if flags & ~KNOWN_FLAGS_MASK:
        raise _fail(source, f"unknown feature flags {flags & ~KNOWN_FLAGS_MASK:#x}")
    if flags & FLAG_BLAKE3 and flags & FLAG_SHA512_256:
        raise _fail(source, "flags select both BLAKE3 and SHA-512/256")
    if rule := check_chunk_sizes(cmin, cavg, cmax):
        raise _fail(source, rule)
    table_size, table_type = _TABLE_HEADER.unpack_from(head, HEADER_SIZE)
    if table_size != TABLE_SIZE_UNKNOWN or table_type != CA_FORMAT_TABLE:
        raise _fail(source, "bad table header")
    items_bytes = size - FIXED_SIZE
    if items_bytes % ITEM_SIZE:
        raise _fail(source, "length is not 104 + 40*N bytes (truncated or trailing bytes)")
    count = items_bytes // ITEM_SIZE
    expected_tail = (
        0,
        0,
        HEADER_SIZE,
        TABLE_HEADER_SIZE + ITEM_SIZE * count + TAIL_SIZE,
        CA_FORMAT_TABLE_TAIL_MARKER,
    )
    if _TAIL.unpack_from(tail, len(tail) - TAIL_SIZE) != expected_tail:
        raise _fail(source, "bad table tail (truncated file or trailing bytes)")
    return Header(flags, cmin, cavg, cmax, count)


def parse_index(buf: bytes | memoryview | mmap.mmap, source: str = "index") -> Index:
    """Parse and validate a complete ``.caibx`` image, at least as strictly as casync."""
    size = len(buf)
    if size < FIXED_SIZE:
        raise _fail(source, f"file is {size} bytes, shorter than the minimum {FIXED_SIZE}")
    header = parse_header(buf, bytes(buf[size - TAIL_SIZE :]), size, source)
    flags, cmin, cavg, cmax, count = (
        header.flags,
        header.chunk_min,
        header.chunk_avg,
        header.chunk_max,
        header.count,
    )
    items = np.frombuffer(
        buf, dtype=ITEM_DTYPE, count=count, offset=HEADER_SIZE + TABLE_HEADER_SIZE
    )
    ends = np.ascontiguousarray(items["end"])
    ids = items["id"]
    if count:
        lengths = np.diff(ends, prepend=np.uint64(0))
        # ends are unsigned: a decrease wraps around to a huge length, caught by the max check
        if ends[0] == 0 or (count > 1 and not (ends[1:] > ends[:-1]).all()):
            bad = int(np.argmax(np.diff(ends.astype(np.int64), prepend=0) <= 0))
            raise _fail(source, f"chunk offsets do not strictly increase (item {bad})")
        if (lengths > cmax).any():
            bad = int(np.argmax(lengths > cmax))
            raise _fail(source, f"chunk {bad} is {int(lengths[bad])} bytes, over the max {cmax}")
    return Index(flags, cmin, cavg, cmax, ends, ids, _keepalive=buf)


def read_index(path: str | os.PathLike[str]) -> ChunkTable:
    """Open a local index file: a small one is parsed whole into memory, a larger one is
    read a page at a time when first used (``cafuse.pagedtable``), header and tail now."""
    source = str(path)
    try:
        fd = open_for_reading(source, "index", block_device_ok=False)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                raise _fail(source, "file is empty")
            if size > IN_MEMORY_MAX_BYTES:
                from .pagedtable import open_file

                table = open_file(fd, size, source)
                fd = -1  # the table keeps it
                return table
            buf: bytes | mmap.mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            if fd >= 0:
                os.close(fd)
    except FileNotFoundError:
        raise CafuseError(f"{source}: index file not found") from None
    except IsADirectoryError:
        raise CafuseError(f"{source}: is a directory, expected a .caibx index file") from None
    except PermissionError:
        raise CafuseError(f"{source}: permission denied reading the index") from None
    except OSError as exc:
        raise CafuseError(f"{source}: cannot read index: {exc.strerror}") from None
    return parse_index(buf, source)


class IndexWriter:
    """Streams an index to a temporary file and renames it into place on ``commit``.

    Items are appended in batches as they are produced, so making a terabyte image never
    holds its whole table in memory.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        flags: int,
        chunk_min: int,
        chunk_avg: int,
        chunk_max: int,
    ) -> None:
        if rule := check_chunk_sizes(chunk_min, chunk_avg, chunk_max):
            raise CafuseError(f"bad chunk sizes: {rule}")
        self._file = AtomicFile(Path(path))
        self._count = 0
        self._last_end = 0
        self._file.write(
            _HEADER.pack(HEADER_SIZE, CA_FORMAT_INDEX, flags, chunk_min, chunk_avg, chunk_max)
        )
        self._file.write(_TABLE_HEADER.pack(TABLE_SIZE_UNKNOWN, CA_FORMAT_TABLE))

    def append(self, ends: np.ndarray, ids: np.ndarray) -> None:
        """Append items: ``ends`` uint64 (k,), ``ids`` uint8 (k, 32)."""
        if not len(ends):
            return
        items = np.empty(len(ends), dtype=ITEM_DTYPE)
        items["end"] = ends
        items["id"] = ids
        self._file.write(items.tobytes())
        self._count += len(ends)
        self._last_end = int(ends[-1])

    def commit(self) -> None:
        table = TABLE_HEADER_SIZE + ITEM_SIZE * self._count + TAIL_SIZE
        self._file.write(_TAIL.pack(0, 0, HEADER_SIZE, table, CA_FORMAT_TABLE_TAIL_MARKER))
        self._file.commit()

    def abort(self) -> None:
        self._file.abort()

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()


def write_index(path: str | os.PathLike[str], index: Index) -> None:
    """Write a whole in-memory index atomically."""
    with IndexWriter(
        path, index.flags, index.chunk_min, index.chunk_avg, index.chunk_max
    ) as writer:
        writer.append(index.ends, index.ids)
        writer.commit()
