"""Reads of the blob at any offset, served from chunks: the mount's core, with no FUSE in it.

A read is resolved through the index's end offsets to the chunks covering it. Each chunk
comes from a bounded in-memory LRU of decompressed chunks, or through the fetch scheduler
(one fetch per chunk id, however many reads wait for it; local sources first, then the
remote stores by priority). Zero chunks are served without a fetch. When a stream of reads
is sequential, the chunks ahead of it are requested at readahead priority, in a window the
readahead policy (readahead.py) sizes to the link; the remote workers follow the window.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .. import defaults
from ..chunktable import ChunkTable, PageMissing
from ..errors import CafuseError, ChunkUnavailable
from ..fetch import ChunkSource
from ..scheduler import FetchScheduler, Flight, Priority, ShuttingDown
from .readahead import Readahead

log = logging.getLogger(__name__)


READ_GRACE = 5.0  # a read waits this much past its chunks' deadline before it gives up


class ReadFailed(CafuseError):
    """A read could not be satisfied; the FUSE layer turns this into EIO."""


@dataclass
class _PageLoad:
    """A table page being read: the reads that need it wait for ``done``."""

    done: trio.Event
    error: CafuseError | None = None  # why it failed: every waiter fails with it


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

    def put_cold(self, chunk_id: bytes, data: bytes) -> None:
        """Add as the least recently used: a prefetched chunk never pushes out one in use
        (when the cache is full, it is the one dropped)."""
        if chunk_id in self._items or self.size + len(data) > self.capacity:
            return
        self._items[chunk_id] = data
        self._items.move_to_end(chunk_id, last=False)
        self.size += len(data)


class BlobReader:
    def __init__(
        self,
        index: ChunkTable,
        source: ChunkSource,
        *,
        memory_cache: int = defaults.MEMORY_CACHE,
        readahead: int = defaults.READAHEAD,
        concurrency: int = 16,
        local_threads: int = 2,
        batch: int = 8,
        hedge: bool = True,
        readahead_memory: int | None = None,
        max_concurrency: int | None = None,
    ) -> None:
        """``readahead``: chunks the window of a sequential stream doubles to at once (0:
        no readahead); beyond that it grows while the read rate does, all streams sharing
        ``readahead_memory`` bytes ahead (default a quarter of ``memory_cache``). Remote
        fetches in flight grow from ``concurrency`` with the window, up to
        ``max_concurrency`` (default 8 x ``concurrency``)."""
        self.index = index
        self._blob_size = index.blob_size
        self.source = source
        self.stats = source.stats
        self.cache = ChunkCache(memory_cache)
        self.readahead = readahead
        self.timeout = source.policy.timeout
        self.scheduler = FetchScheduler(
            source,
            self.cache.put,
            remote_slots=concurrency,
            local_slots=local_threads,
            local_batch=batch,
            hedge=hedge,
            max_remote_slots=max_concurrency or 8 * concurrency,
            on_fetched=self._fetched,
        )
        self._avg_chunk = max(1, index.blob_size // max(1, index.chunk_count))
        self.readahead_policy = Readahead(
            index.blob_size,
            budget=(memory_cache // 4 if readahead_memory is None else readahead_memory)
            if readahead
            else 0,
            initial=2 * index.chunk_max,
            quick=readahead * self._avg_chunk,
            align=self._chunk_start,
        )
        self._page_loads: dict[int, _PageLoad] = {}  # table pages being read, by page
        self._page_limiter = trio.CapacityLimiter(4)
        self._zeros = memoryview(bytes(index.chunk_max))
        self._waiting_reads = 0
        self._no_waiting_reads = trio.Event()
        self.served_bytes = 0
        self.served_from = {"memory": 0, "fetch": 0, "zero": 0}
        self.reads = 0
        self.failed_reads = 0
        # boot profiles (mount/boot.py): told of every read; more sections in snapshot()
        self.observers: list[Callable[[int, int], None]] = []
        self.extra_stats: dict[str, Callable[[], object]] = {}

    @property
    def size(self) -> int:
        return self._blob_size

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the fetch scheduler; returns when cancelled."""
        await self.scheduler.run(task_status=task_status)

    async def close(self, patience: float = 1.0) -> None:
        """Fail every waiting read now (shutdown must not wait for stalled fetches), and
        give them a moment to send their EIO before the caller unmounts."""
        self.scheduler.close()
        if self._waiting_reads:
            self._no_waiting_reads = trio.Event()
            with trio.move_on_after(patience):
                await self._no_waiting_reads.wait()

    # ------------------------------------------------------------------ reads

    async def read(self, offset: int, size: int, stream: int | None = None) -> bytes | memoryview:
        """Bytes ``[offset, offset+size)`` of the blob (fewer at its end).

        The common case, every covering chunk in memory, completes without a checkpoint:
        no cancel scope, no nursery. Otherwise the missing chunks' fetches are all started
        first, then awaited in order under one deadline.
        """
        try:  # the table pages in memory (always, for a small index): no checkpoint
            chunks = self.index.covering(offset, size, wait=False)
        except PageMissing:
            self._waiting_reads += 1  # a wait for a table page holds the fill back too
            try:
                chunks = await self._covering(offset, size)
            finally:
                self._waiting_reads -= 1
                if not self._waiting_reads:
                    self._no_waiting_reads.set()
        except CafuseError as exc:
            raise self._table_failure(exc, offset, size) from None
        if not chunks:
            return b""
        self.reads += 1
        if self.observers:
            for observe in self.observers:
                observe(offset, size)
        index = self.index
        end = min(offset + size, self._blob_size)
        if stream is not None and self.readahead:
            self._plan_readahead(stream, offset, end - offset, index.span(chunks.stop - 1)[1])
        served = self.served_from
        parts: list[memoryview] = []
        waiting: list[tuple[int, int, int]] = []  # (slot, lo, hi)
        wanted: list[tuple[bytes, int]] = []
        for i in chunks:
            chunk_start, chunk_end = index.span(i)
            lo = offset - chunk_start if offset > chunk_start else 0
            hi = (end if end < chunk_end else chunk_end) - chunk_start
            if index.is_zero(i):
                served["zero"] += hi - lo
                parts.append(self._zeros[lo:hi])
                continue
            chunk_id = index.chunk_id(i)
            data = self.cache.get(chunk_id)
            if data is not None:
                served["memory"] += hi - lo
                parts.append(memoryview(data)[lo:hi])
            else:
                waiting.append((len(parts), lo, hi))
                wanted.append((chunk_id, chunk_end - chunk_start))
                parts.append(self._zeros[:0])
        if waiting:
            flights = self.scheduler.request(wanted, Priority.ON_DEMAND)
            self._waiting_reads += 1
            try:
                await self._await_fetches(parts, waiting, flights, offset, end - offset)
            finally:
                self._waiting_reads -= 1
                if not self._waiting_reads:
                    self._no_waiting_reads.set()
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        self.served_bytes += len(out)
        return out

    async def _covering(self, offset: int, size: int) -> range:
        """The chunks covering a read; table pages not in memory yet are read in a thread
        first (one read per page, however many reads wait for it), within the read's
        deadline."""
        try:
            with trio.fail_after(self.timeout + READ_GRACE):
                while True:
                    try:
                        return self.index.covering(offset, size, wait=False)
                    except PageMissing as miss:
                        await self._load_page(miss.page)
        except trio.TooSlowError:
            self.failed_reads += 1
            self.stats.error("timeout")
            msg = f"read of {size} bytes at {offset} timed out after {self.timeout:g} s"
            log.error("%s (reading a page of the index)", msg)
            raise ReadFailed(msg) from None
        except CafuseError as exc:
            raise self._table_failure(exc, offset, size) from None

    def _table_failure(self, exc: CafuseError, offset: int, size: int) -> ReadFailed:
        """A broken or changed table, or a page not fetched: the read fails."""
        self.failed_reads += 1
        # a broken page is named once; the reads that hit it again fail quietly
        level = logging.DEBUG if getattr(exc, "logged", False) else logging.ERROR
        log.log(level, "read of %d bytes at %d failed: %s", size, offset, exc)
        with contextlib.suppress(AttributeError):
            exc.logged = True  # type: ignore[attr-defined]
        return ReadFailed(str(exc))

    async def _load_page(self, page: int) -> None:
        """Read table page ``page`` in a thread; the reads that ask meanwhile wait for
        that one read and share its outcome: its error fails them all at once."""
        loading = self._page_loads.get(page)
        if loading is not None:
            await loading.done.wait()
            if loading.error is not None:
                raise loading.error
            return  # loaded (or its loader was cancelled): the caller asks again
        loading = self._page_loads[page] = _PageLoad(trio.Event())
        try:
            await trio.to_thread.run_sync(
                self.index.load_page, page, limiter=self._page_limiter, abandon_on_cancel=True
            )
        except CafuseError as exc:
            loading.error = exc
            raise
        finally:
            del self._page_loads[page]
            loading.done.set()

    async def _await_fetches(
        self,
        parts: list[memoryview],
        waiting: list[tuple[int, int, int]],
        flights: list[Flight | None],
        offset: int,
        size: int,
    ) -> None:
        """Fill the waiting slots; each chunk has its own deadline, the read a backstop."""
        try:
            with trio.fail_after(self.timeout + READ_GRACE):
                for (slot, lo, hi), flight in zip(waiting, flights, strict=True):
                    assert flight is not None  # on-demand requests are always admitted
                    data = await flight.wait()
                    parts[slot] = memoryview(data)[lo:hi]
                    self.served_from["fetch"] += hi - lo
        except trio.TooSlowError:
            self.failed_reads += 1
            self.stats.error("timeout")
            msg = f"read of {size} bytes at {offset} timed out after {self.timeout:g} s"
            log.error(msg)
            raise ReadFailed(msg) from None
        except (ChunkUnavailable, ShuttingDown) as exc:
            self.failed_reads += 1
            log.error("read of %d bytes at %d failed: %s", size, offset, exc)
            raise ReadFailed(str(exc)) from None
        except Exception as exc:  # a source's bug: this read fails, the mount goes on
            self.failed_reads += 1
            log.exception("read of %d bytes at %d failed", size, offset)
            raise ReadFailed(str(exc)) from None

    async def chunk(self, i: int) -> bytes:
        """Decompressed, verified data of chunk ``i``."""
        chunk_id = self.index.chunk_id(i)
        data = self.cache.get(chunk_id)
        if data is not None:
            return data
        start, end = self.index.span(i)
        (flight,) = self.scheduler.request([(chunk_id, end - start)], Priority.ON_DEMAND)
        assert flight is not None
        return await flight.wait()

    # ------------------------------------------------------------------ readahead

    def _chunk_start(self, offset: int) -> int:
        """The start of the chunk holding byte ``offset``: readahead ends on a boundary
        (0, so no readahead now, when that part of the table is not read yet)."""
        try:
            return self.index.span(self.index.covering(offset, 1, wait=False).start)[0]
        except PageMissing:
            return 0

    def _fetched(self, size: int, seconds: float) -> None:
        self.readahead_policy.observe_latency(seconds)

    def _plan_readahead(self, stream: int, offset: int, size: int, covered_end: int) -> None:
        ahead = self.readahead_policy.on_read(stream, offset, size, covered_end)
        if ahead is None:
            return
        start, end = ahead
        wanted: list[tuple[bytes, int]] = []
        try:
            chunks = self.index.covering(start, end - start, wait=False)
        except PageMissing:  # not read yet: those chunks are fetched when a read needs them
            return
        for i in chunks:
            if self.index.is_zero(i):
                continue
            chunk_id = self.index.chunk_id(i)
            if chunk_id not in self.cache and not self.scheduler.pending(chunk_id):
                lo, hi = self.index.span(i)
                wanted.append((chunk_id, hi - lo))
        if wanted:
            self.scheduler.request(wanted, Priority.READAHEAD)
            if self.source.has_remote:
                chunks = -(-self.readahead_policy.total_ahead // self._avg_chunk)
                self.scheduler.want_remote_slots(chunks + self.scheduler.reserved)

    @property
    def waiting_reads(self) -> int:
        """Reads waiting for a fetch or a table page right now."""
        return self._waiting_reads

    def is_zero(self, i: int) -> bool:
        """Chunk ``i`` is all zeros (served without a fetch). For a table read by pages
        this may read one: call it from a thread unless the chunk is ``resident``."""
        return self.index.is_zero(i)

    def forget_stream(self, stream: int) -> None:
        self.readahead_policy.forget(stream)

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
        snap["index"] = self.index.stats()
        snap["scheduler"] = self.scheduler.snapshot()
        snap["stores"] = self.source.store_stats()
        snap["in_flight"] = snap["scheduler"]["pending"]
        snap["readahead"] = self.readahead_policy.snapshot()
        for name, section in self.extra_stats.items():
            snap[name] = section()
        return snap
