"""Background fill: every chunk of the image into the disk cache, at a bounded rate.

After the profile replay, the fill walks the image from its start, takes the chunks the
disk cache does not hold yet, and fetches them at the scheduler's lowest priority, as many
at a time as there are fetch slots not kept for reads, at most ``rate`` bytes per second on
average (counted as stored, the bytes that cross the network), pausing while any read
waits for a fetch. Fetched chunks go to the
disk cache only, not to the memory cache. What the cache holds is not fetched again, so
after a remount the fill resumes where it stopped; once it is complete every read is served
locally and the mount no longer needs the network.

The walk holds one batch of chunk ids at a time: memory stays bounded for any image size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable

import trio

from ..scheduler import Flight, Priority, ShuttingDown
from ..stores import CacheStore
from .reader import BlobReader

log = logging.getLogger(__name__)

BATCH = 1024  # chunk positions checked against the cache per thread hop
WINDOW = 32  # fill fetches in flight, at most: over a WAN a few cannot reach the rate
PAUSE = 0.02  # poll interval while reads wait
RETRY_AFTER = 30.0  # a walk that left chunks behind (store errors) starts again after this


class RateLimiter:
    """A token bucket with debt: callers wait until the balance is positive, then charge
    what they used; the average stays at ``rate`` bytes per second, bursts at ``burst``."""

    def __init__(
        self,
        rate: float,
        burst: float,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]] = trio.sleep,
    ) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.clock = clock
        self.sleep = sleep
        self._tokens = 0.0
        self._last = clock()

    def _refill(self) -> None:
        now = self.clock()
        if self._tokens < self.burst:  # a refund above the burst is kept, not capped away
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def charge(self, nbytes: float) -> None:
        """Spend ``nbytes`` (negative: give back an overestimate)."""
        self._refill()
        self._tokens -= nbytes

    async def ready(self) -> None:
        """Return once the balance is positive."""
        while True:
            self._refill()
            if self._tokens > 0:
                return
            await self.sleep(-self._tokens / self.rate + 1e-3)


class Fill:
    def __init__(
        self,
        reader: BlobReader,
        cache: CacheStore,
        rate: int,
        *,
        window: int = WINDOW,
        batch: int = BATCH,
    ) -> None:
        self.reader = reader
        self.cache = cache
        self.rate = rate
        # the slots not kept for reads: the fill never takes more, and it waits while any
        # read waits, so a read finds a slot
        sched = reader.scheduler
        self.window = max(1, min(window, sched.remote_slots - sched.reserved))
        self.batch = batch
        self.limiter: RateLimiter | None = None
        self.bytes_total = 0
        self.bytes_done = 0  # bytes of the image (by position) known to be in the cache
        self.bytes_fetched = 0  # stored bytes this mount fetched for the fill
        self.chunks_fetched = 0
        self._raw_fetched = 0  # the same chunks' decompressed bytes
        self.failed = 0
        self.paused = 0.0  # seconds spent waiting for reads to finish
        self.complete = False
        self.state = "waiting"
        self.started_at: float | None = None
        self.passes = 0
        self.position = 0  # offset in the blob of the chunk the walk is at

    async def run(self, after: trio.Event | None = None) -> None:
        try:
            if after is not None:
                await after.wait()
            await self._run()
        finally:
            if not self.complete:
                self.state = "stopped"

    async def _run(self) -> None:
        index = self.reader.index
        # a fifth of a second's worth (at least one chunk) may go at once
        limiter = self.limiter = RateLimiter(
            self.rate, max(self.rate / 5, index.chunk_max), trio.current_time
        )
        self.state = "measuring"
        self.bytes_total = await trio.to_thread.run_sync(self._total)
        if self.bytes_total > self.cache.max_bytes * 0.8:
            self.state = "off: the cache is too small"
            log.warning(
                "fill: the image's %d bytes do not fit the cache's bound of %d bytes: "
                "no fill (raise --cache-size)",
                self.bytes_total,
                self.cache.max_bytes,
            )
            return
        self.started_at = trio.current_time()
        while True:
            self.passes += 1
            self.state = "filling"
            self.bytes_done = 0
            failed_before = self.failed
            async with trio.open_nursery() as nursery:
                limit = trio.Semaphore(self.window)
                for first in range(0, index.chunk_count, self.batch):
                    missing, present = await trio.to_thread.run_sync(self._missing, first)
                    self.bytes_done += present
                    for chunk_id, size, weight, start in missing:
                        self.position = start
                        await self._wait_for_reads()
                        await limiter.ready()
                        await limit.acquire()
                        guess = self._stored_guess(size)
                        limiter.charge(guess)  # corrected once the stored size is known
                        nursery.start_soon(self._fetch, chunk_id, size, guess, weight, limit)
            if self.failed == failed_before:
                break
            self.state = "retrying"
            log.warning("fill: %d chunks failed, trying again", self.failed - failed_before)
            await trio.sleep(RETRY_AFTER)
        self.complete = True
        self.position = index.blob_size
        self.state = "complete"
        log.info("fill: complete, every chunk of the image is in the cache")

    def _total(self) -> int:
        """Worker thread: bytes of the image that are not zero chunks (one pass over the
        table in batches: vectorised, bounded memory for a huge one)."""
        index = self.reader.index
        return sum(int(b.sizes[~b.zero].sum()) for b in index.batches())

    def _missing(self, first: int) -> tuple[list[tuple[bytes, int, int, int]], int]:
        """Worker thread: the chunks from position ``first`` on (one batch) that the cache
        lacks, each once, with the bytes of the image they stand for in this batch; and
        the bytes the batch's other chunks (in the cache) stand for."""
        index = self.reader.index
        wanted: dict[bytes, list[int]] = {}  # id -> size, weight, first start
        for i in range(first, min(first + self.batch, index.chunk_count)):
            if self.reader.is_zero(i):
                continue
            chunk_id = index.chunk_id(i)
            start, end = index.span(i)
            entry = wanted.get(chunk_id)
            if entry is not None:
                entry[1] += end - start
            else:
                wanted[chunk_id] = [end - start, end - start, start]
        out = []
        present = 0
        for chunk_id, (size, weight, start) in wanted.items():
            if self.cache.has(chunk_id):
                present += weight
            else:
                out.append((chunk_id, size, weight, start))
        return out, present

    async def _wait_for_reads(self) -> None:
        while self.reader.waiting_reads:
            self.state = "paused for reads"
            await trio.sleep(PAUSE)
            self.paused += PAUSE
        self.state = "filling"

    def _stored_guess(self, size: int) -> int:
        """The bytes a chunk of ``size`` will take on the wire, by the compression seen
        so far: charging the right amount up front keeps bursts small."""
        if not self._raw_fetched:
            return size
        return max(1, round(size * self.bytes_fetched / self._raw_fetched))

    async def _fetch(
        self, chunk_id: bytes, size: int, guess: int, weight: int, limit: trio.Semaphore
    ) -> None:
        try:
            flight: Flight | None = None
            while flight is None:
                (flight,) = self.reader.scheduler.request([(chunk_id, size)], Priority.FILL)
                if flight is None:  # the background queue is full
                    await trio.sleep(PAUSE)
            assert self.limiter is not None
            try:
                await flight.wait()
            except ShuttingDown:  # unmounting: not a failure; no refund, so the walk waits
                return
            except Exception as exc:
                self.failed += 1
                self.limiter.charge(-guess)
                log.info("fill: chunk %s: %s", chunk_id.hex(), exc)
                return
            stored = await trio.to_thread.run_sync(self._stored_size, chunk_id)
            stored = stored if stored is not None else size
            self.limiter.charge(stored - guess)
            self.chunks_fetched += 1
            self.bytes_fetched += stored
            self._raw_fetched += size
            self.bytes_done += weight
        finally:
            limit.release()

    def _stored_size(self, chunk_id: bytes) -> int | None:
        try:
            return os.stat(self.cache._name(chunk_id)).st_size  # what crossed the network
        except OSError:
            return None

    def snapshot(self) -> dict[str, object]:
        elapsed = (
            trio.current_time() - self.started_at
            if self.started_at is not None and not self.complete
            else None
        )
        rate = self.bytes_fetched / elapsed if elapsed else None
        left = self.bytes_total - self.bytes_done
        return {
            "complete": self.complete,
            "state": self.state,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "bytes_fetched": self.bytes_fetched,
            "position": self.position,
            "chunks_fetched": self.chunks_fetched,
            "chunks_failed": self.failed,
            "rate_limit": self.rate,
            "rate": None if rate is None else round(rate),
            "eta_s": round(left / self.rate, 1) if not self.complete and self.rate else None,
            "paused_s": round(self.paused, 2),
        }
