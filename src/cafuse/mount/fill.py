"""Background fill: every chunk of the image into the disk cache, at a bounded rate.

After the profile replay, the fill walks the image from its start, takes the chunks the
disk cache does not hold yet, and fetches them at the scheduler's lowest priority, as many
at a time as there are fetch slots not kept for reads, at most ``rate`` bytes per second on
average (counted as stored, the bytes that cross the network), pausing while any read
waits for a fetch. Fetched chunks go to the
disk cache only, not to the memory cache. What the cache holds is not fetched again, so
after a remount the fill resumes where it stopped; once it is complete every read is served
locally and the mount no longer needs the network.

The walk goes over the table once, in batches (``batches()``: zero chunks and sizes are
vectorised steps; what remains per chunk is the cache lookup), holding one batch at a time:
memory stays bounded for any image size. Chunks that failed (missing from every store, a
server down) are kept and retried alone, with backoff; the table is walked again only if
more failed than can be kept.

Whether the image fits the cache is known only once the chunks' stored (compressed) sizes
are: the fill refuses at the start only when even well-compressed distinct chunks could not
fit, and stops once the compression seen so far says they will not.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Iterator

import numpy as np
import trio

from ..chunktable import whole_table_step
from ..scheduler import Flight, Priority, ShuttingDown
from ..stores import CacheStore
from ..tablepass import INFO_DISTINCT_CAP, DistinctKeys
from .reader import BlobReader

log = logging.getLogger(__name__)

BATCH = 4096  # chunk positions checked against the cache per thread hop
WINDOW = 32  # fill fetches in flight, at most: over a WAN a few cannot reach the rate
PAUSE = 0.02  # poll interval while reads wait
RETRY_AFTER = 30.0  # failed chunks are tried again after this, then after twice as long...
RETRY_MAX = 1800.0  # ...up to this
FAILED_KEEP = 100_000  # failed chunks remembered for a retry; past it the table is walked again
BEST_RATIO = 4.0  # no image's chunks compress better than this on average (the start check)
FIT = 0.8  # the share of the cache's bound the image's stored chunks may take
SAMPLE = 64  # chunks fetched before their compression is trusted to predict the rest


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
        self.bytes_distinct = 0
        self.failed = 0
        # chunks that failed this pass: id -> (size, weight, start), retried alone
        self._failed: dict[bytes, tuple[int, int, int]] = {}
        self._overflow = False  # more failed than FAILED_KEEP: walk the table again
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
            if not self.complete and not self.state.startswith("off"):
                self.state = "stopped"

    async def _run(self) -> None:
        index = self.reader.index
        # a fifth of a second's worth (at least one chunk) may go at once
        self.limiter = RateLimiter(
            self.rate, max(self.rate / 5, index.chunk_max), trio.current_time
        )
        self.state = "measuring"
        self.bytes_total, self.bytes_distinct = await trio.to_thread.run_sync(self._measure)
        if self.bytes_distinct > self.cache.max_bytes * FIT * BEST_RATIO:
            self._refuse(f"{self.bytes_distinct} bytes of distinct chunks")
            return
        self.started_at = trio.current_time()
        delay = RETRY_AFTER
        walk: Iterator[tuple[list[tuple[bytes, int, int, int]], int]] | None = self._walk()
        while True:
            self.passes += 1
            self.state = "filling"
            if walk is not None:
                self.bytes_done = 0
                self._failed = {}  # the walk finds them again
                batches = walk
            else:
                retry, self._failed = self._failed, {}
                batches = iter([([(c, s, w, p) for c, (s, w, p) in retry.items()], 0)])
            self._overflow = False
            if not await self._fetch_all(batches):
                return
            if not self._failed and not self._overflow:
                break
            self.state = "retrying"
            log.warning(
                "fill: %d chunks failed, trying %s again in %.0f s",
                len(self._failed),
                "the whole table" if self._overflow else "them",
                delay,
            )
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
            walk = self._walk() if self._overflow else None
        self.complete = True
        self.position = index.blob_size
        self.state = "complete"
        log.info("fill: complete, every chunk of the image is in the cache")

    async def _fetch_all(
        self, batches: Iterator[tuple[list[tuple[bytes, int, int, int]], int]]
    ) -> bool:
        """Fetch what ``batches`` (run in a worker thread) say is missing; False when the
        fill turned itself off (the cache is too small)."""
        assert self.limiter is not None
        limiter = self.limiter
        async with trio.open_nursery() as nursery:
            limit = trio.Semaphore(self.window)
            while True:
                item = await trio.to_thread.run_sync(next, batches, None)
                if item is None:
                    break
                missing, present = item
                self.bytes_done += present
                for chunk_id, size, weight, start in missing:
                    if self._cannot_fit():
                        nursery.cancel_scope.cancel()
                        return False
                    self.position = start
                    await self._wait_for_reads()
                    await limiter.ready()
                    await limit.acquire()
                    guess = self._stored_guess(size)
                    limiter.charge(guess)  # corrected once the stored size is known
                    nursery.start_soon(self._fetch, chunk_id, size, guess, weight, start, limit)
        return True

    def _cannot_fit(self) -> bool:
        """Whether the compression seen so far says the distinct chunks will not fit."""
        if self.chunks_fetched < SAMPLE or not self._raw_fetched:
            return False
        stored = self.bytes_distinct * self.bytes_fetched / self._raw_fetched
        if stored <= self.cache.max_bytes * FIT:
            return False
        self._refuse(f"about {round(stored)} bytes of stored chunks")
        return True

    def _refuse(self, what: str) -> None:
        self.state = "off: the cache is too small"
        log.warning(
            "fill: the image's %s do not fit the cache's bound of %d bytes: no fill "
            "(raise --cache-size)",
            what,
            self.cache.max_bytes,
        )

    def _measure(self) -> tuple[int, int]:
        """Worker thread: bytes of the image that are not zero chunks, and the bytes of its
        distinct non-zero chunks (one pass over the table in batches: vectorised, bounded
        memory for a huge one; past the key cap a repeated id may count twice)."""
        index = self.reader.index
        seen = DistinctKeys(cap=INFO_DISTINCT_CAP)
        total = distinct = 0
        for b in index.batches(whole_table_step(index)):
            nonzero = ~b.zero
            total += int(b.sizes[nonzero].sum())
            distinct += int(b.sizes[seen.first_seen(b, nonzero)].sum())
        return total, distinct

    def _walk(self) -> Iterator[tuple[list[tuple[bytes, int, int, int]], int]]:
        """Worker thread, one batch per step: the chunks the cache lacks, each once per
        batch, as (id, size, weight, start) with weight the bytes of the image they stand
        for in the batch; and the bytes the batch's other non-zero chunks stand for."""
        for batch in self.reader.index.batches(self.batch):
            keep = ~batch.zero
            ids = np.ascontiguousarray(batch.ids[keep])
            sizes, starts = batch.sizes[keep], batch.starts[keep]
            if not len(ids):
                yield [], 0
                continue
            rows = ids.view(np.dtype((np.void, ids.shape[1]))).reshape(-1)
            _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
            weights = np.bincount(inverse.reshape(-1), weights=sizes.astype(np.float64))
            missing = []
            present = 0
            for k in np.argsort(first).tolist():  # in image order
                j = int(first[k])
                chunk_id = ids[j].tobytes()
                if self.cache.has(chunk_id):
                    present += int(weights[k])
                else:
                    missing.append((chunk_id, int(sizes[j]), int(weights[k]), int(starts[j])))
            yield missing, present

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
        self,
        chunk_id: bytes,
        size: int,
        guess: int,
        weight: int,
        start: int,
        limit: trio.Semaphore,
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
                earlier = self._failed.get(chunk_id)
                if earlier is not None:  # a repeat in another batch failed too
                    self._failed[chunk_id] = (size, earlier[1] + weight, earlier[2])
                elif len(self._failed) < FAILED_KEEP:
                    self._failed[chunk_id] = (size, weight, start)
                else:
                    self._overflow = True
                self.limiter.charge(-guess)
                log.info("fill: chunk %s: %s", chunk_id.hex(), exc)
                return
            stored = await trio.to_thread.run_sync(self._stored_size, chunk_id)
            stored = stored if stored is not None else size
            self.limiter.charge(stored - guess)
            self.chunks_fetched += 1
            self.bytes_fetched += stored
            self._raw_fetched += size
            # failed earlier in the walk (a repeat in another batch): it is here now
            earlier = self._failed.pop(chunk_id, None)
            self.bytes_done += weight + (earlier[1] if earlier is not None else 0)
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
            "chunks_to_retry": len(self._failed),
            "rate_limit": self.rate,
            "rate": None if rate is None else round(rate),
            "eta_s": round(left / self.rate, 1) if not self.complete and self.rate else None,
            "paused_s": round(self.paused, 2),
        }
