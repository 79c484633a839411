"""Reads of the blob at any offset, served from chunks: the mount's core, with no FUSE in it.

A read is resolved through the index's end offsets to the chunks covering it. Each chunk
comes from a bounded in-memory LRU of decompressed chunks, or is fetched once (however many
reads wait for it) in a worker thread through the shared ``ChunkSource``: seeds, then
stores, verified. Zero chunks are served without a fetch. When a stream of reads is
sequential, the chunks ahead of it are fetched in parallel, in a window that doubles while
the pattern holds.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import trio

from ..errors import CafuseError, ChunkUnavailable
from ..fetch import ChunkSource
from ..index import Index

log = logging.getLogger(__name__)


SEQUENTIAL_THRESHOLD = 512 << 10


class ReadFailed(CafuseError):
    """A read could not be satisfied; the FUSE layer turns this into EIO."""


class _InFlight:
    """One fetch of one chunk id, awaited by every read that needs it."""

    __slots__ = ("data", "done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: Exception | None = None


@dataclass
class _Stream:
    """Readahead state of one open file handle."""

    next_offset: int = -1
    run_bytes: int = 0  # read in sequence so far
    window: int = 0
    ahead_until: int = 0  # chunk index up to which readahead was already started


class ChunkCache:
    """An LRU of decompressed chunks by id, bounded by total bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self._items: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, chunk_id: bytes) -> bytes | None:
        data = self._items.get(chunk_id)
        if data is not None:
            self._items.move_to_end(chunk_id)
        return data

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, chunk_id: bytes) -> bool:
        return chunk_id in self._items

    def put(self, chunk_id: bytes, data: bytes) -> None:
        if chunk_id in self._items or len(data) > self.capacity:
            return
        self._items[chunk_id] = data
        self.size += len(data)
        while self.size > self.capacity:
            _, old = self._items.popitem(last=False)
            self.size -= len(old)


class BlobReader:
    def __init__(
        self,
        index: Index,
        source: ChunkSource,
        *,
        memory_cache: int = 256 << 20,
        readahead: int = 32,
        concurrency: int = 16,
        timeout: float = 60.0,
    ) -> None:
        self.index = index
        self.source = source
        self.stats = source.stats
        self.cache = ChunkCache(memory_cache)
        self.readahead = readahead
        self.timeout = timeout
        self.limiter = trio.CapacityLimiter(concurrency)
        self._zero_mask = index.zero_mask
        self._zeros = memoryview(bytes(index.chunk_max))
        self._inflight: dict[bytes, _InFlight] = {}
        self._streams: dict[int, _Stream] = {}
        self._nursery: trio.Nursery | None = None
        self.served_bytes = 0
        self.served_from = {"memory": 0, "fetch": 0, "zero": 0}
        self.reads = 0
        self.failed_reads = 0

    @property
    def size(self) -> int:
        return self.index.blob_size

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery that readahead fetches run in; returns when cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # ------------------------------------------------------------------ reads

    async def read(self, offset: int, size: int, stream: int | None = None) -> bytes | memoryview:
        """Bytes ``[offset, offset+size)`` of the blob (fewer at its end)."""
        chunks = self.index.covering(offset, size)
        if not chunks:
            return b""
        self.reads += 1
        if stream is not None and self.readahead:
            self._plan_readahead(stream, offset, size, chunks.stop)
        try:
            with trio.fail_after(self.timeout):
                if len(chunks) == 1:
                    out = await self._slice(chunks.start, offset, size)
                else:
                    out = await self._read_span(chunks, offset, size)
        except trio.TooSlowError:
            self.failed_reads += 1
            self.stats.error("timeout")
            msg = f"read of {size} bytes at {offset} timed out after {self.timeout:g} s"
            log.error(msg)
            raise ReadFailed(msg) from None
        except ChunkUnavailable as exc:
            self.failed_reads += 1
            log.error("read of %d bytes at %d failed: %s", size, offset, exc)
            raise ReadFailed(str(exc)) from None
        self.served_bytes += len(out)
        return out

    async def _read_span(self, chunks: range, offset: int, size: int) -> bytes:
        """Several chunks at once; the first failure is raised as itself, not as a group."""
        parts: list[bytes | memoryview] = [b""] * len(chunks)
        errors: list[Exception] = []

        async def load(slot: int, i: int) -> None:
            try:
                parts[slot] = await self._slice(i, offset, size)
            except Exception as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for slot, i in enumerate(chunks):
                nursery.start_soon(load, slot, i)
        if errors:
            raise errors[0]
        return b"".join(parts)

    async def _slice(self, i: int, offset: int, size: int) -> memoryview:
        """The part of chunk ``i`` that falls in ``[offset, offset+size)``."""
        start, end = self.index.span(i)
        lo = max(offset, start) - start
        hi = min(offset + size, end) - start
        if self._zero_mask[i]:
            self.served_from["zero"] += hi - lo
            return self._zeros[lo:hi]
        chunk_id = self.index.chunk_id(i)
        data = self.cache.get(chunk_id)
        if data is not None:
            self.served_from["memory"] += hi - lo
        else:
            data = await self.chunk(i)
            self.served_from["fetch"] += hi - lo
        return memoryview(data)[lo:hi]

    async def chunk(self, i: int) -> bytes:
        """Decompressed, verified data of chunk ``i``."""
        chunk_id = self.index.chunk_id(i)
        data = self.cache.get(chunk_id)
        if data is not None:
            return data
        flight = self._inflight.get(chunk_id)
        if flight is None:
            flight = self._start_fetch(i, chunk_id)
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        assert flight.data is not None
        return flight.data

    def _start_fetch(self, i: int, chunk_id: bytes) -> _InFlight:
        flight = self._inflight[chunk_id] = _InFlight()
        start, end = self.index.span(i)
        if self._nursery is None:
            raise RuntimeError("BlobReader.run() is not running")
        self._nursery.start_soon(self._fetch, chunk_id, end - start, flight)
        return flight

    async def _fetch(self, chunk_id: bytes, size: int, flight: _InFlight) -> None:
        """Fetch in a worker thread; runs in the reader's nursery so that a read giving up
        (timeout) does not cancel a fetch other reads may still be waiting for."""
        try:
            data, _origin = await trio.to_thread.run_sync(
                self.source.get, chunk_id, size, limiter=self.limiter, abandon_on_cancel=True
            )
            self.cache.put(chunk_id, data)
            flight.data = data
        except Exception as exc:  # handed to every waiting read
            flight.error = exc
        finally:
            del self._inflight[chunk_id]
            flight.done.set()

    # ------------------------------------------------------------------ readahead

    def _plan_readahead(self, stream: int, offset: int, size: int, next_chunk: int) -> None:
        state = self._streams.setdefault(stream, _Stream())
        sequential = offset == state.next_offset
        state.next_offset = offset + size
        state.run_bytes = state.run_bytes + size if sequential else size
        if state.run_bytes < SEQUENTIAL_THRESHOLD:
            # the kernel's own readahead makes a few consecutive requests after any read;
            # only a longer run is a sequential reader worth fetching ahead for
            state.window = 0
            state.ahead_until = next_chunk
            return
        state.window = min(max(2, state.window * 2), self.readahead)
        first = max(next_chunk, state.ahead_until)
        last = min(next_chunk + state.window, self.index.chunk_count)
        for i in range(first, last):
            if self._zero_mask[i]:
                continue
            chunk_id = self.index.chunk_id(i)
            if chunk_id not in self.cache and chunk_id not in self._inflight:
                self._start_fetch(i, chunk_id)
        state.ahead_until = max(state.ahead_until, last)

    def forget_stream(self, stream: int) -> None:
        self._streams.pop(stream, None)

    # ------------------------------------------------------------------ stats

    def snapshot(self) -> dict[str, object]:
        snap = self.stats.snapshot()
        snap["reads"] = {
            "served": self.reads,
            "failed": self.failed_reads,
            "bytes": self.served_bytes,
            "bytes_from": dict(self.served_from),
        }
        snap["memory_cache"] = {
            "bytes": self.cache.size,
            "capacity": self.cache.capacity,
            "chunks": len(self.cache),
        }
        snap["blob_size"] = self.size
        snap["chunks"] = self.index.chunk_count
        snap["in_flight"] = len(self._inflight)
        return snap
