"""Profile replay: fetch the chunks a boot will read, in the order it will read them.

Right after the mount is live, the chunks covering the profile's ranges are requested at
profile priority (below reads that wait, above readahead), many at once, in profile
order. They go to the memory cache as least recently used, so they never push out a chunk
in use, and to the disk cache when there is one. Without a disk cache the replay stops
once it has brought in half the memory cache.
"""

from __future__ import annotations

import logging

import trio

from ..profile import Profile, chunk_plan
from ..scheduler import Flight, Priority, ShuttingDown
from .reader import BlobReader

log = logging.getLogger(__name__)

WINDOW = 64  # chunks requested and not yet done


class Replay:
    def __init__(self, reader: BlobReader, profile: Profile, *, window: int = WINDOW) -> None:
        self.reader = reader
        self.profile = profile
        self.window = window
        self.has_disk_cache = reader.source.cache is not None
        self.budget = reader.cache.capacity // 2
        self.done = trio.Event()
        self.planned = 0
        self.beyond_end = 0
        self.skipped = 0  # in memory or in flight already
        self.fetched = 0
        self.fetched_bytes = 0
        self.failed = 0
        self.read_later = 0
        self.stopped: str | None = None
        self._replayed: dict[bytes, bool] = {}  # chunk id -> read since

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self.done.set()

    async def _run(self) -> None:
        reader = self.reader
        index = reader.index
        plan, self.beyond_end = await trio.to_thread.run_sync(chunk_plan, self.profile, index)
        if self.beyond_end:
            log.warning(
                "profile %s: %d ranges reach past the image's end (%d bytes), ignored there",
                self.profile.source,
                self.beyond_end,
                index.blob_size,
            )
        # in the thread too: for a table read by pages, is_zero may read one
        plan = await trio.to_thread.run_sync(lambda: [i for i in plan if not reader.is_zero(i)])
        self.planned = len(plan)
        log.info("profile %s: replaying %d chunks", self.profile.source, self.planned)
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            limit = trio.Semaphore(self.window)
            for i in plan:
                if self.stopped:
                    break
                if not self.has_disk_cache and self.fetched_bytes >= self.budget:
                    self.stopped = "the memory cache's share for the profile is full"
                    break
                chunk_id = index.chunk_id(i)
                if chunk_id in reader.cache or reader.scheduler.pending(chunk_id):
                    self.skipped += 1
                    continue
                start, end = index.span(i)
                await limit.acquire()
                (flight,) = reader.scheduler.request([(chunk_id, end - start)], Priority.PROFILE)
                while flight is None:  # the background queue is full: wait for room
                    await trio.sleep(0.01)
                    (flight,) = reader.scheduler.request(
                        [(chunk_id, end - start)], Priority.PROFILE
                    )
                self._replayed.setdefault(chunk_id, False)
                nursery.start_soon(self._await, flight, limit)
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
        for i in index.covering(offset, size):
            chunk_id = index.chunk_id(i)
            if replayed.get(chunk_id) is False:
                replayed[chunk_id] = True
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
