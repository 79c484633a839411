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
REORDER_SLACK = 1 << 20


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
        batch: int = 8,
    ) -> None:
        self.index = index
        self.source = source
        self.stats = source.stats
        self.cache = ChunkCache(memory_cache)
        self.readahead = readahead
        self.timeout = timeout
        self.limiter = trio.CapacityLimiter(concurrency)
        self.batch = max(1, batch)
        self._ends = index.ends
        self._zero = index.zero_mask.tobytes()  # bytes: indexing it is a cheap int lookup
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
        """Bytes ``[offset, offset+size)`` of the blob (fewer at its end).

        The common case, every covering chunk in memory, completes without a checkpoint:
        no cancel scope, no nursery. Otherwise the missing chunks' fetches are all started
        first, then awaited in order under one deadline.
        """
        chunks = self.index.covering(offset, size)
        if not chunks:
            return b""
        self.reads += 1
        end = min(offset + size, self.size)
        first, last = chunks.start, chunks.stop - 1
        ends = self._ends
        if stream is not None and self.readahead:
            self._plan_readahead(stream, offset, end - offset, last + 1)
        parts: list[memoryview] = []
        waiting: list[tuple[int, int, int, _InFlight]] = []  # (slot, lo, hi, fetch)
        to_start: list[tuple[bytes, int, _InFlight]] = []
        chunk_start = int(ends[first - 1]) if first else 0
        for i in range(first, last + 1):
            chunk_end = int(ends[i])
            lo = max(offset, chunk_start) - chunk_start
            hi = min(end, chunk_end) - chunk_start
            if self._zero[i]:
                self.served_from["zero"] += hi - lo
                parts.append(self._zeros[lo:hi])
            else:
                chunk_id = self.index.chunk_id(i)
                data = self.cache.get(chunk_id)
                if data is not None:
                    self.served_from["memory"] += hi - lo
                    parts.append(memoryview(data)[lo:hi])
                else:
                    flight = self._inflight.get(chunk_id)
                    if flight is None:
                        flight = self._new_flight(i, chunk_id, to_start)
                    waiting.append((len(parts), lo, hi, flight))
                    parts.append(self._zeros[:0])
            chunk_start = chunk_end
        if to_start:
            self._start_fetches(to_start)
        if waiting:
            await self._await_fetches(parts, waiting, offset, end - offset)
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        self.served_bytes += len(out)
        return out

    async def _await_fetches(
        self,
        parts: list[memoryview],
        waiting: list[tuple[int, int, int, _InFlight]],
        offset: int,
        size: int,
    ) -> None:
        try:
            with trio.fail_after(self.timeout):
                for slot, lo, hi, flight in waiting:
                    await flight.done.wait()
                    if flight.error is not None:
                        raise flight.error
                    assert flight.data is not None
                    parts[slot] = memoryview(flight.data)[lo:hi]
                    self.served_from["fetch"] += hi - lo
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

    async def chunk(self, i: int) -> bytes:
        """Decompressed, verified data of chunk ``i``."""
        chunk_id = self.index.chunk_id(i)
        data = self.cache.get(chunk_id)
        if data is not None:
            return data
        flight = self._inflight.get(chunk_id)
        if flight is None:
            to_start: list[tuple[bytes, int, _InFlight]] = []
            flight = self._new_flight(i, chunk_id, to_start)
            self._start_fetches(to_start)
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        assert flight.data is not None
        return flight.data

    def _new_flight(
        self, i: int, chunk_id: bytes, to_start: list[tuple[bytes, int, _InFlight]]
    ) -> _InFlight:
        flight = self._inflight[chunk_id] = _InFlight()
        start, end = self.index.span(i)
        to_start.append((chunk_id, end - start, flight))
        return flight

    def _start_fetches(self, items: list[tuple[bytes, int, _InFlight]]) -> None:
        """Fetch in worker threads, ``batch`` chunks per thread hop (a hop costs ~80 us of
        event-loop time; a local chunk takes about as long to decompress and verify).

        The fetches run in the reader's nursery, so a read that gives up (timeout) does not
        cancel a fetch other reads may be waiting for.
        """
        if self._nursery is None:
            raise RuntimeError("BlobReader.run() is not running")
        for k in range(0, len(items), self.batch):
            self._nursery.start_soon(self._fetch_batch, items[k : k + self.batch])

    async def _fetch_batch(self, items: list[tuple[bytes, int, _InFlight]]) -> None:
        results = None
        try:
            results = await trio.to_thread.run_sync(
                self._get_many,
                [(cid, size) for cid, size, _ in items],
                limiter=self.limiter,
                abandon_on_cancel=True,
            )
        finally:
            if results is None:  # cancelled at shutdown: release every waiting read
                results = [(None, ReadFailed("the mount is shutting down"))] * len(items)
            self._finish(items, results)

    def _finish(
        self,
        items: list[tuple[bytes, int, _InFlight]],
        results: list[tuple[bytes | None, Exception | None]],
    ) -> None:
        for (chunk_id, _, flight), (data, error) in zip(items, results, strict=True):
            if data is not None:
                self.cache.put(chunk_id, data)
            flight.data, flight.error = data, error
            self._inflight.pop(chunk_id, None)
            flight.done.set()

    def _get_many(
        self, items: list[tuple[bytes, int]]
    ) -> list[tuple[bytes | None, Exception | None]]:
        """Worker thread: each chunk's data or the error that stopped it."""
        out: list[tuple[bytes | None, Exception | None]] = []
        for chunk_id, size in items:
            try:
                out.append((self.source.get(chunk_id, size)[0], None))
            except Exception as exc:
                out.append((None, exc))
        return out

    # ------------------------------------------------------------------ readahead

    def _plan_readahead(self, stream: int, offset: int, size: int, next_chunk: int) -> None:
        state = self._streams.setdefault(stream, _Stream())
        # the kernel keeps several requests of one sequential reader in flight, and they can
        # arrive slightly out of order: count a read near the stream's front as sequential
        sequential = abs(offset - state.next_offset) <= REORDER_SLACK
        state.next_offset = max(state.next_offset, offset + size) if sequential else offset + size
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
        to_start: list[tuple[bytes, int, _InFlight]] = []
        for i in range(first, last):
            if self._zero[i]:
                continue
            chunk_id = self.index.chunk_id(i)
            if chunk_id not in self.cache and chunk_id not in self._inflight:
                self._new_flight(i, chunk_id, to_start)
        self._start_fetches(to_start)
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
