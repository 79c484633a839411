"""Profile replay: fetch the chunks a boot will read, in the order it will read them.

Right after the mount is live, the chunks covering the profile's ranges are requested at
profile priority (below reads that wait, above readahead), many at once, in profile
order. They go to the memory cache as least recently used, so they never push out a chunk
in use, and to the disk cache when there is one.

The plan is made lazily in a worker thread, a batch at a time (reading the chunk table may
need a page read); the loop only requests. It stops at a budget: half the memory cache
without a disk cache, else ``DISK_BUDGET`` (or half the disk cache when smaller) — a
profile that covers the whole image (what a recording holds after a ``cat`` of the
device) must not walk and remember every chunk; the background fill brings the rest.
"""

from __future__ import annotations

import logging

import trio

from ..profile import ChunkPlan, Profile
from ..scheduler import Flight, Priority, ShuttingDown
from .reader import BlobReader

log = logging.getLogger(__name__)

WINDOW = 64  # chunks requested and not yet done
DISK_BUDGET = 4 << 30  # bytes (uncompressed) a replay plans at most with a disk cache


class Replay:
    def __init__(self, reader: BlobReader, profile: Profile, *, window: int = WINDOW) -> None:
        self.reader = reader
        self.profile = profile
        self.window = window
        disk = reader.source.cache
        self.has_disk_cache = disk is not None
        if disk is None:
            self.budget = reader.cache.capacity // 2
        else:
            self.budget = min(DISK_BUDGET, max(disk.max_bytes // 2, reader.cache.capacity // 2))
        self.done = trio.Event()
        self.planned = 0
        self.beyond_end = 0
        self.skipped = 0  # in memory or in flight already
        self.fetched = 0
        self.fetched_bytes = 0
        self.failed = 0
        self.read_later = 0
        self.stopped: str | None = None
        # first 8 bytes of a replayed chunk's id -> read since (as many as the budget)
        self._replayed: dict[int, bool] = {}

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self.done.set()

    async def _run(self) -> None:
        reader = self.reader
        index = reader.index
        plan = ChunkPlan(self.profile, index, budget=self.budget, is_zero=reader.is_zero)
        self.beyond_end = plan.beyond
        if self.beyond_end:
            log.warning(
                "profile %s: %d ranges reach past the image's end (%d bytes), ignored there",
                self.profile.source,
                self.beyond_end,
                index.blob_size,
            )
        log.info("profile %s: replaying up to %d bytes", self.profile.source, self.budget)
        started = trio.current_time()
        batches = plan.batches()
        async with trio.open_nursery() as nursery:
            limit = trio.Semaphore(self.window)
            while not self.stopped:
                # the table may need a page read: plan in a worker thread, request here
                batch = await trio.to_thread.run_sync(next, batches, None)
                if batch is None:
                    break
                self.planned = plan.chunks
                for chunk_id, size in batch:
                    if self.stopped:
                        break
                    if chunk_id in reader.cache or reader.scheduler.pending(chunk_id):
                        self.skipped += 1
                        continue
                    await limit.acquire()
                    (flight,) = reader.scheduler.request([(chunk_id, size)], Priority.PROFILE)
                    while flight is None:  # the background queue is full: wait for room
                        await trio.sleep(0.01)
                        (flight,) = reader.scheduler.request([(chunk_id, size)], Priority.PROFILE)
                    self._replayed.setdefault(_key(chunk_id), False)
                    nursery.start_soon(self._await, flight, limit)
            if plan.truncated and not self.stopped:
                self.stopped = (
                    f"the replay's bound of {self.budget} bytes is reached (the rest is "
                    "fetched when read, or by --fill-rate)"
                    if self.has_disk_cache
                    else "the memory cache's share for the profile is full"
                )
        batches.close()
        log.info(
            "profile %s: %d chunks (%d bytes) in %.2f s%s",
            self.profile.source,
            self.fetched,
            self.fetched_bytes,
            trio.current_time() - started,
            f"; stopped: {self.stopped}" if self.stopped else "",
        )

    async def _await(self, flight: Flight, limit: trio.Semaphore) -> None:
        try:
            await flight.wait()
        except ShuttingDown:
            self.stopped = "the mount is shutting down"
        except Exception as exc:  # a failed chunk costs the profile that chunk only
            self.failed += 1
            log.debug("profile chunk %s: %s", flight.chunk_id.hex(), exc)
        else:
            self.fetched += 1
            self.fetched_bytes += flight.size
        finally:
            limit.release()

    def observe(self, offset: int, size: int) -> None:
        """A read: count the replayed chunks it touches as used."""
        replayed = self._replayed
        if not replayed or self.read_later >= len(replayed):
            return
        index = self.reader.index
        for i in index.covering(offset, size):  # in memory: the read loaded its pages
            key = _key(index.chunk_id(i))
            if replayed.get(key) is False:
                replayed[key] = True
                self.read_later += 1

    def snapshot(self) -> dict[str, object]:
        return {
            "source": self.profile.source,
            "ranges": len(self.profile.ranges),
            "ranges_beyond_end": self.beyond_end,
            "chunks_planned": self.planned,
            "chunks_fetched": self.fetched,
            "bytes_fetched": self.fetched_bytes,
            "chunks_already_there": self.skipped,
            "chunks_failed": self.failed,
            "chunks_read_later": self.read_later,
            "chunks_never_read": max(0, len(self._replayed) - self.read_later),
            "done": self.done.is_set(),
            "stopped": self.stopped,
        }


def _key(chunk_id: bytes) -> int:
    return int.from_bytes(chunk_id[:8], "little")
