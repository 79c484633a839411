"""Worker threads that read chunks from local sources for the event loop.

The fetch scheduler's local stage: seeds, the cache and local stores answer in about the time
a thread hop costs, so chunks go to a few threads (one per core) in batches. The threads take
work from a queue ordered by priority, then age, and post each batch's results back to the
trio loop themselves (``run_sync_soon``), so a thread never waits for the loop between two
batches. With one ``trio.to_thread`` call per batch, every batch needed a round trip through
a busy event loop before the next could start: on a cold sequential read of a local store the
threads sat idle 60% of the time.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import trio

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class LocalPool(Generic[Item, Result]):
    """``work(items)`` runs in a worker thread and returns one result per item;
    ``deliver(items, results)`` then runs on the trio loop (``results`` is the exception
    instead when ``work`` raised: every item must still be answered). ``claim(item, priority)`` is
    called under the pool's lock when a queued entry comes up: False skips it (the item
    was queued again at another priority, or is no longer wanted)."""

    def __init__(
        self,
        work: Callable[[list[Item]], list[Result]],
        deliver: Callable[[list[Item], list[Result] | BaseException], None],
        claim: Callable[[Item, int], bool],
        *,
        threads: int,
        batch: int,
    ) -> None:
        self.work = work
        self.deliver = deliver
        self.claim = claim
        self.threads = max(1, threads)
        self.batch = max(1, batch)
        self._heap: list[tuple[int, int, Item]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition(threading.Lock())
        self._token: trio.lowlevel.TrioToken | None = None
        self._workers: list[threading.Thread] = []
        self._closed = True  # until started
        self._generation = 0  # a thread of an earlier start() stops at its next batch
        self.busy = 0  # threads working on a batch now
        self.batches = 0
        self.items = 0
        self.work_seconds = 0.0  # wall time the threads spent in ``work``
        self.cpu_seconds = 0.0  # of which on a CPU (the rest: waiting for the GIL or I/O)

    def start(self) -> None:
        """Start the threads; call from the trio loop that gets the results."""
        self._token = trio.lowlevel.current_trio_token()
        with self._cond:
            self._closed = False
            self._generation += 1
        for k in range(self.threads):
            # daemon threads: a read stuck on a dead local disk must not hold the exit
            thread = threading.Thread(
                target=self._run,
                args=(self._generation,),
                name=f"cafuse-local-{k}",
                daemon=True,
            )
            thread.start()
            self._workers.append(thread)

    def close(self) -> None:
        """Stop taking work; the threads end after the batch in hand, whose results still
        reach ``deliver`` if the loop runs on (the caller has failed those items by then:
        it must skip them), or are dropped if it has ended. Queued items are the caller's
        to fail; later ``submit`` calls are ignored."""
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify_all()
        self._workers.clear()

    def submit(self, priority: int, items: Sequence[Item]) -> None:
        if not items:
            return
        with self._cond:
            if self._closed:
                return
            for item in items:
                heapq.heappush(self._heap, (priority, next(self._seq), item))
            self._cond.notify(min(len(items), self.threads))

    def snapshot(self) -> dict[str, object]:
        return {
            "threads": self.threads,
            "busy": self.busy,
            "queued": len(self._heap),
            "batches": self.batches,
            "chunks": self.items,
            "work_seconds": round(self.work_seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
        }

    def _take(self, generation: int) -> list[Item] | None:
        """The next batch (None once closed): this thread's share of what is queued among
        the idle threads, so a read of many chunks is split across them; at most ``batch``,
        and all of one priority (a read's chunks never wait for background ones: the
        results of a batch come back together)."""
        with self._cond:
            while True:
                if self._closed or generation != self._generation:
                    return None
                if self._heap:
                    break
                self._cond.wait()
            idle = max(1, self.threads - self.busy)
            want = min(self.batch, -(-len(self._heap) // idle))
            items: list[Item] = []
            taken_priority: int | None = None
            while self._heap and len(items) < want:
                if taken_priority is not None and self._heap[0][0] != taken_priority:
                    break
                priority, _, item = heapq.heappop(self._heap)
                if self.claim(item, priority):
                    items.append(item)
                    taken_priority = priority
            if items:
                self.busy += 1
            return items

    def _run(self, generation: int) -> None:
        while True:
            items = self._take(generation)
            if items is None:
                return
            if not items:  # only stale entries were left
                continue
            results: list[Result] | BaseException
            started, cpu_started = time.perf_counter(), time.thread_time()
            try:
                results = self.work(items)
            except BaseException as exc:  # a bug: the items must still be answered
                log.exception("local chunk reads failed")
                results = exc
            finally:
                with self._cond:
                    self.busy -= 1
                    self.batches += 1
                    self.items += len(items)
                    # the CPU interval nests in the wall one: never more CPU than wall time
                    self.cpu_seconds += time.thread_time() - cpu_started
                    self.work_seconds += time.perf_counter() - started
            try:
                assert self._token is not None
                self._token.run_sync_soon(self.deliver, items, results)
            except trio.RunFinishedError:
                return  # the mount has ended
