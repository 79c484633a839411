"""Fetch scheduling for the mount: who fetches which chunk when, with what priority.

Every chunk fetch is one ``Flight``, shared by every read that needs the chunk. A new flight
first goes to the *local stage*: seeds, the cache and local stores, read by one thread per
core that takes chunks in batches by priority (``localpool.py``). Those never wait behind
the network. A chunk no local source has goes to the *remote
queue*, ordered by class, then age:

    on-demand (a read is waiting)  >  profile replay  >  readahead  >  background fill

``remote_slots`` worker tasks serve the queue, each one chunk at a time in a thread; a
few of them (``reserved``) take on-demand chunks only, so readahead can never fill every
slot and make a read wait. A request a read waits for that has not been answered within a
few times the stores' p95 latency gets a twin (a hedged request, on another pooled connection);
the first good copy wins and the other stops after its request under way. Hedges are
held to 10% of remote fetches, so a store that is slow because it is loaded is not loaded
more. A queued flight
that a read now needs is promoted to on-demand.
Background classes are admitted only while fewer than ``queue_limit`` of them wait (in the
local stage or the queue), so memory in flight stays bounded. The deadline belongs to the
chunk: it starts when the flight is created (or promoted, if it has not started) and bounds
every store and retry of it.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from enum import IntEnum

import trio

from .errors import CafuseError, ChunkUnavailable
from .fetch import ChunkSource
from .localpool import LocalPool
from .pacing import LinkPacer
from .stores.health import OPEN

log = logging.getLogger(__name__)


HEDGE_FACTOR = 3.0  # a read's request unanswered after 3x the p95 latency gets a twin
HEDGE_MIN = 0.05
HEDGE_SLOTS = 4
HEDGE_BUDGET = 0.1  # hedges per remote fetch, at most: a loaded store must not get more load
SILENT_AFTER = 1.0  # a store asked and silent this long holds back more remote workers


class Priority(IntEnum):
    ON_DEMAND = 0
    PROFILE = 1
    READAHEAD = 2
    FILL = 3


class ShuttingDown(CafuseError):
    pass


QUEUED, LOCAL, REMOTE, DONE = "queued", "local", "remote", "done"


class Flight:
    """One fetch of one chunk id, awaited by every read that needs it."""

    __slots__ = (
        "chunk_id",
        "claimed",
        "counted",
        "data",
        "deadline",
        "done",
        "error",
        "priority",
        "promoted",
        "promoted_at",
        "size",
        "state",
    )

    def __init__(self, chunk_id: bytes, size: int, priority: Priority, deadline: float) -> None:
        self.chunk_id = chunk_id
        self.size = size
        self.priority = priority
        self.deadline = deadline
        self.state = LOCAL
        self.claimed = False  # taken by a local worker thread (set under the pool's lock)
        self.counted = False  # towards the bound of background chunks not yet fetching
        self.done = trio.Event()
        self.promoted = trio.Event()  # set once a read waits for it
        self.promoted_at = 0.0
        if priority == Priority.ON_DEMAND:
            self.promoted.set()
        self.data: bytes | None = None
        self.error: Exception | None = None

    async def wait(self) -> bytes:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.data is not None
        return self.data


class FetchScheduler:
    def __init__(
        self,
        source: ChunkSource,
        deliver: Callable[[bytes, bytes], None],
        *,
        remote_slots: int = 16,
        reserved: int | None = None,
        local_slots: int = 2,
        local_batch: int = 8,
        queue_limit: int = 512,
        timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        hedge: bool = True,
        max_remote_slots: int | None = None,
        on_fetched: Callable[[int, float], None] | None = None,
    ) -> None:
        self.source = source
        self.on_fetched = on_fetched  # (chunk size, seconds) of each good remote fetch
        self.hedge = hedge and source.has_remote
        self._hedge_after: float | None = None
        self._since_hedge_refresh = 0
        # threads, not fetches: a fetch that lost a hedge race is abandoned and its thread
        # ends after its request under way (bounded by the request timeout); the worker
        # tasks bound the fetches, these only bound the threads, stragglers included
        self._hedge_limiter = trio.CapacityLimiter(HEDGE_SLOTS * 4)
        self.hedged = 0
        self.hedge_won = 0
        self.hedges_skipped = 0  # over the budget
        self.deliver = deliver
        # where a class's fetched chunks go instead of ``deliver`` (None: nowhere, as for a
        # background fill that only fills the disk cache)
        self.deliver_for: dict[Priority, Callable[[bytes, bytes], None] | None] = {}
        self.remote_slots = max(1, remote_slots)
        self.max_remote_slots = max(self.remote_slots, max_remote_slots or self.remote_slots)
        self.reserved = min(
            self.remote_slots, reserved if reserved is not None else max(1, remote_slots // 4)
        )
        self._local = LocalPool(
            self._get_local_many,
            self._local_done,
            self._claim_local,
            threads=local_slots,
            batch=local_batch,
        )
        self.queue_limit = queue_limit
        self.timeout = timeout if timeout is not None else source.policy.timeout
        self.clock = clock
        self._remote_limiter = trio.CapacityLimiter(self.remote_slots * 4)
        self._flights: dict[bytes, Flight] = {}
        self._heap: list[tuple[int, int, Flight]] = []
        self._seq = itertools.count()
        self._queued = dict.fromkeys(Priority, 0)
        self._background_waiting = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._nursery: trio.Nursery | None = None
        self._closed: str | None = None
        self.active_remote = dict.fromkeys(Priority, 0)
        # readahead on the network, at most about twice the link's bandwidth-delay product
        self.pacer = LinkPacer(clock, self.max_remote_slots)
        self.paced = 0  # times a readahead fetch waited for the pacer
        self.fetched = dict.fromkeys(Priority, 0)
        self.rejected = 0
        self.failed = 0

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the fetch tasks; returns when cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._local.start()
                if self.source.has_remote:
                    for k in range(self.remote_slots):
                        nursery.start_soon(self._remote_worker, k < self.reserved)
                task_status.started()
                await trio.sleep_forever()
        finally:
            # nothing is left to answer flights: every one fails now, later requests at once
            self._local.close()
            self._nursery = None
            self.close()

    def want_remote_slots(self, slots: int) -> None:
        """Start more remote workers, up to ``max_remote_slots``: the readahead window of
        a long fat link needs more chunks in flight than a local network (never shrinks:
        an idle worker is a parked task, no thread)."""
        slots = min(slots, self.max_remote_slots)
        if slots <= self.remote_slots or self._nursery is None or not self.source.has_remote:
            return
        if not self._stores_answering():
            return
        for _ in range(slots - self.remote_slots):
            self._nursery.start_soon(self._remote_worker, False)
        self.remote_slots = slots
        self._remote_limiter.total_tokens = slots * 4

    def _stores_answering(self) -> bool:
        """No store being asked has gone quiet: one that accepts requests and never
        answers must not get a larger wave of them before its breaker opens."""
        for health in getattr(self.source.router, "health", {}).values():
            if health.state == OPEN or not health.requests:
                continue
            if health.clock() - health.last_answer > SILENT_AFTER:
                return False
        return True

    def close(self, reason: str = "the mount is shutting down") -> None:
        """Fail every pending flight at once (reads get EIO) and refuse new ones."""
        self._closed = reason
        for flight in list(self._flights.values()):
            self._finish(flight, None, ShuttingDown(reason))
        self._heap.clear()

    # ------------------------------------------------------------------ requests

    def pending(self, chunk_id: bytes) -> bool:
        return chunk_id in self._flights

    def request(
        self, items: Iterable[tuple[bytes, int]], priority: Priority
    ) -> list[Flight | None]:
        """A flight for each ``(chunk_id, size)``: the pending one (promoted if this need
        is more urgent) or a new one. None where a background request was not admitted."""
        if self._nursery is None and self._closed is None:
            raise RuntimeError("FetchScheduler.run() is not running")
        out: list[Flight | None] = []
        new: list[Flight] = []
        for chunk_id, size in items:
            flight = self._flights.get(chunk_id)
            if flight is not None:
                if priority < flight.priority:
                    self._promote(flight, priority)
                out.append(flight)
                continue
            if self._closed is not None:
                flight = Flight(chunk_id, size, priority, 0.0)
                flight.error, flight.state = ShuttingDown(self._closed), DONE
                flight.done.set()
                out.append(flight)
                continue
            background = priority != Priority.ON_DEMAND
            if background and self._background_waiting >= self.queue_limit:
                self.rejected += 1
                out.append(None)
                continue
            flight = Flight(chunk_id, size, priority, self.clock() + self.timeout)
            if background:
                flight.counted = True
                self._background_waiting += 1
            self._flights[chunk_id] = flight
            new.append(flight)
            out.append(flight)
        self._local.submit(priority, new)
        return out

    def _uncount(self, flight: Flight) -> None:
        if flight.counted:
            flight.counted = False
            self._background_waiting -= 1

    def _promote(self, flight: Flight, priority: Priority) -> None:
        if priority == Priority.ON_DEMAND:
            self._uncount(flight)
            flight.promoted.set()
            flight.promoted_at = self.clock()
        if flight.state == QUEUED:
            self._queued[flight.priority] -= 1
            self._queued[priority] += 1
            flight.deadline = max(flight.deadline, self.clock() + self.timeout)
            heapq.heappush(self._heap, (priority, next(self._seq), flight))
            self._lot.unpark_all()
        flight.priority = priority
        if flight.state == LOCAL and not flight.claimed:  # ahead of the background reads
            self._local.submit(priority, [flight])

    # ------------------------------------------------------------------ local stage

    @staticmethod
    def _claim_local(flight: Flight, priority: int) -> bool:
        """Local pool thread, under the pool's lock: take this queue entry of ``flight``
        unless it was taken, finished, or queued again at a higher priority."""
        if flight.claimed or flight.state != LOCAL or flight.priority != priority:
            return False
        flight.claimed = True
        return True

    def _local_done(
        self,
        flights: list[Flight],
        results: list[tuple[bytes | None, Exception | None]] | BaseException,
    ) -> None:
        """On the loop, outside any task: the local pool's answers for a batch. Nothing may
        escape from here (trio would end the mount), so a failure fails its flight."""
        if not isinstance(results, BaseException):
            assert len(results) == len(flights)
        for k, flight in enumerate(flights):
            if flight.state == DONE:
                continue
            if isinstance(results, BaseException):
                found, error = None, Exception(f"local read failed: {results!r}")
            else:
                found, error = results[k]
            try:
                if found is not None or error is not None:
                    self._finish(flight, found, error)
                elif not self.source.has_remote:
                    self._finish(flight, None, ChunkUnavailable(flight.chunk_id, []))
                else:
                    self._enqueue(flight)
            except Exception as exc:  # a delivery callback's bug: this chunk fails
                log.exception("delivering chunk %s failed", flight.chunk_id.hex())
                if flight.state != DONE:
                    flight.data, flight.error, flight.state = None, exc, DONE
                    self._flights.pop(flight.chunk_id, None)
                    flight.done.set()

    def _get_local_many(self, flights: list[Flight]) -> list[tuple[bytes | None, Exception | None]]:
        """Local pool thread: each chunk's data from a local source, or (None, None) on a
        miss."""
        out: list[tuple[bytes | None, Exception | None]] = []
        for flight in flights:
            try:
                found = self.source.get_local(flight.chunk_id, flight.size)
                out.append((found[0] if found is not None else None, None))
            except Exception as exc:
                out.append((None, exc))
        return out

    # ------------------------------------------------------------------ remote stage

    def _enqueue(self, flight: Flight) -> None:
        flight.state = QUEUED
        self._queued[flight.priority] += 1
        heapq.heappush(self._heap, (flight.priority, next(self._seq), flight))
        self._lot.unpark_all()

    def _pop(self, demand_only: bool) -> Flight | None:
        heap = self._heap
        while heap:
            priority, _, flight = heap[0]
            if flight.state != QUEUED or priority != flight.priority:
                heapq.heappop(heap)  # stale: promoted (pushed again) or finished
                continue
            if demand_only and priority != Priority.ON_DEMAND:
                return None
            if (
                priority >= Priority.READAHEAD
                and self.active_remote[Priority.READAHEAD] >= self.pacer.limit()
            ):
                self.paced += 1
                return None  # more would only queue in the network, ahead of reads
            heapq.heappop(heap)
            self._queued[priority] -= 1
            self._uncount(flight)
            flight.state = REMOTE
            if priority != Priority.ON_DEMAND:  # its deadline starts when its fetch does
                flight.deadline = self.clock() + self.timeout
            return flight
        return None

    async def _remote_worker(self, demand_only: bool) -> None:
        while True:
            flight = self._pop(demand_only)
            if flight is None:
                await self._lot.park()
                continue
            await self._fetch_remote(flight)

    async def _fetch_remote(self, flight: Flight) -> None:
        """Fetch in a worker thread; if a read waits and no answer came within the hedge
        delay, a second request races the first, and the first good copy wins."""
        priority = flight.priority
        self.active_remote[priority] += 1
        send, receive = trio.open_memory_channel[tuple[int, bytes | None, Exception | None]](2)
        cancels: list[threading.Event] = []
        data: bytes | None = None
        error: Exception | None = None
        started = self.clock()

        async def attempt(which: int, limiter: trio.CapacityLimiter) -> None:
            cancel = threading.Event()
            cancels.append(cancel)
            try:
                found, _ = await trio.to_thread.run_sync(
                    functools.partial(
                        self.source.get_remote,
                        flight.chunk_id,
                        flight.size,
                        flight.deadline,
                        cancel=cancel,
                    ),
                    limiter=limiter,
                    abandon_on_cancel=True,
                )
                send.send_nowait((which, found, None))
            except Exception as exc:
                send.send_nowait((which, None, exc))

        async def hedge() -> None:
            delay = self._hedge_delay()
            if delay is None:
                return
            await trio.sleep(delay)
            await flight.promoted.wait()
            if self.hedged >= HEDGE_BUDGET * sum(self.fetched.values()) + 4:
                self.hedges_skipped += 1
                return
            self.hedged += 1
            await attempt(1, self._hedge_limiter)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(attempt, 0, self._remote_limiter)
                nursery.start_soon(hedge)
                answers = 0
                while True:
                    which, found, failed = await receive.receive()
                    answers += 1
                    if found is not None:
                        data = found
                        self.hedge_won += which
                        break
                    error = error or failed
                    if answers >= len(cancels):  # every request made has failed
                        break
                nursery.cancel_scope.cancel()
            self.fetched[priority] += int(data is not None)
            if data is not None:
                self.pacer.observe(flight.size, self.clock() - started)
                if self.on_fetched is not None:
                    self.on_fetched(flight.size, self.clock() - started)
        finally:
            for cancel in cancels:
                cancel.set()
            self.active_remote[priority] -= 1
            room = self.pacer.limit() - self.active_remote[Priority.READAHEAD]
            if self._queued[Priority.READAHEAD] and room > 1:
                self._lot.unpark(count=room - 1)  # this worker takes one itself
            if data is None and error is None:  # cancelled at shutdown
                error = ShuttingDown("the mount is shutting down")
            if self._read_deserves_another_try(flight, priority, error):
                flight.deadline = flight.promoted_at + self.timeout
                self._enqueue(flight)
            else:
                self._finish(flight, data, error)

    def _read_deserves_another_try(
        self, flight: Flight, started_as: Priority, error: Exception | None
    ) -> bool:
        """A read joined a background fetch under way, which then ran out of its own
        deadline: the read still has its full ``timeout``, so the chunk goes again."""
        return (
            isinstance(error, ChunkUnavailable)
            and "deadline" in error.kinds
            and started_as != Priority.ON_DEMAND
            and flight.priority == Priority.ON_DEMAND
            and self._closed is None
            and flight.promoted_at + self.timeout > self.clock() + 1.0
        )

    def _hedge_delay(self) -> float | None:
        """A few times the stores' p95 latency, refreshed every 64 fetches; None (no
        hedging) until there are enough samples or when hedging is off."""
        if not self.hedge:
            return None
        self._since_hedge_refresh += 1
        if self._since_hedge_refresh >= 64 or self._hedge_after is None:
            self._since_hedge_refresh = 0
            p95 = self.source.router.typical_p95()
            self._hedge_after = None if p95 is None else max(HEDGE_MIN, HEDGE_FACTOR * p95)
        return self._hedge_after

    # ------------------------------------------------------------------ results

    def _finish(self, flight: Flight, data: bytes | None, error: Exception | None) -> None:
        if flight.state == DONE:
            return
        if flight.state == QUEUED:
            self._queued[flight.priority] -= 1
        self._uncount(flight)
        if data is not None:
            deliver = self.deliver_for.get(flight.priority, self.deliver)
            if deliver is not None:
                deliver(flight.chunk_id, data)
        else:
            self.failed += 1
            if flight.priority != Priority.ON_DEMAND and isinstance(error, ChunkUnavailable):
                log.info("background fetch failed: %s", error)
        flight.data, flight.error, flight.state = data, error, DONE
        if self._flights.get(flight.chunk_id) is flight:
            del self._flights[flight.chunk_id]
        flight.done.set()

    def snapshot(self) -> dict[str, object]:
        names = {p: p.name.lower().replace("_", "-") for p in Priority}
        return {
            "queued": {names[p]: n for p, n in self._queued.items()},
            "fetching": {names[p]: n for p, n in self.active_remote.items()},
            "fetched": {names[p]: n for p, n in self.fetched.items()},
            "pending": len(self._flights),
            "background_waiting": self._background_waiting,
            "rejected": self.rejected,
            "hedged": self.hedged,
            "hedge_won": self.hedge_won,
            "hedges_over_budget": self.hedges_skipped,
            "hedge_delay_ms": None
            if self._hedge_after is None
            else round(self._hedge_after * 1000, 1),
            "failed": self.failed,
            "remote_slots": self.remote_slots,
            "readahead_fetch_limit": self.pacer.limit(),
            "readahead_paced": self.paced,
            "reserved_for_reads": self.reserved,
            "local": self._local.snapshot(),
        }
