"""``cafuse cat``: write a byte range of an image to a stream, fetching chunks ahead."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

from .chunktable import ChunkTable
from .errors import CafuseError
from .fetch import ChunkSource


def cat(
    index: ChunkTable,
    source: ChunkSource,
    out: BinaryIO,
    offset: int = 0,
    length: int | None = None,
    threads: int = 8,
) -> int:
    """Write ``[offset, offset+length)`` of the blob to ``out``; returns the bytes written."""
    if offset < 0 or (length is not None and length < 0):
        raise CafuseError("--offset and --length must not be negative")
    end = index.blob_size if length is None else min(index.blob_size, offset + length)
    chunks = index.covering(offset, end - offset)
    written = 0

    def load(i: int) -> bytes:
        start, stop = index.span(i)
        if index.is_zero(i):
            return bytes(stop - start)
        return source.get(index.chunk_id(i), stop - start)[0]

    with ThreadPoolExecutor(threads, thread_name_prefix="cat") as pool:
        window: deque[tuple[int, Future[bytes]]] = deque()
        todo = iter(chunks)
        for i in todo:
            window.append((i, pool.submit(load, i)))
            if len(window) >= 2 * threads:
                break
        while window:
            i, future = window.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                window.append((nxt, pool.submit(load, nxt)))
            data = future.result()
            start, _ = index.span(i)
            lo = max(offset - start, 0)
            hi = min(end - start, len(data))
            out.write(memoryview(data)[lo:hi])
            written += hi - lo
    out.flush()
    return written
