"""The local pool (cafuse.localpool): worker threads that read local chunks in batches, by
priority, and post results to the trio loop without a round trip per batch. Deterministic:
the work function blocks on events the test sets; no sleeps."""

from __future__ import annotations

import threading

import trio

from cafuse.localpool import LocalPool


class Recorder:
    """The pool's callbacks: records batches in the order the threads take them; a batch
    holding an item in ``hold`` waits for ``release`` first."""

    def __init__(self, hold: set[str] | None = None) -> None:
        self.taken: list[list[str]] = []
        self.delivered: dict[str, object] = {}
        self.hold = hold or set()
        self.release = threading.Event()
        self.claims: dict[str, int] = {}  # the priority each item is wanted at
        self.lock = threading.Lock()
        self.all_delivered = trio.Event()
        self.submitted: set[str] = set()

    def work(self, items: list[str]) -> list[str]:
        with self.lock:
            self.taken.append(list(items))
        if self.hold & set(items):
            assert self.release.wait(5)
        return [item.upper() for item in items]

    def deliver(self, items: list[str], results: list[str] | BaseException) -> None:
        for k, item in enumerate(items):
            self.delivered[item] = results if isinstance(results, BaseException) else results[k]
        if len(self.delivered) >= len(self.submitted):
            self.all_delivered.set()

    def claim(self, item: str, priority: int) -> bool:
        if self.claims.get(item) != priority:
            return False
        del self.claims[item]  # taken once
        return True

    def submit(self, pool: LocalPool, priority: int, items: list[str]) -> None:
        for item in items:
            self.claims[item] = priority
        self.submitted.update(items)
        pool.submit(priority, items)


def run_pool(rec: Recorder, body, *, threads: int = 1, batch: int = 8) -> None:
    async def main() -> None:
        pool = LocalPool(rec.work, rec.deliver, rec.claim, threads=threads, batch=batch)
        pool.start()
        try:
            with trio.fail_after(10):
                await body(pool)
        finally:
            rec.release.set()
            pool.close()

    trio.run(main)


def test_a_read_goes_ahead_of_background_work_queued_earlier() -> None:
    rec = Recorder(hold={"first"})

    async def body(pool: LocalPool) -> None:
        rec.submit(pool, 2, ["first"])  # the only thread is held on this one
        while not rec.taken:
            await trio.sleep(0.001)
        rec.submit(pool, 2, [f"ahead{k}" for k in range(4)])
        rec.submit(pool, 0, ["read"])
        rec.release.set()
        await rec.all_delivered.wait()

    run_pool(rec, body, batch=1)
    assert rec.taken[:2] == [["first"], ["read"]]
    assert rec.delivered["read"] == "READ"
    assert sorted(rec.delivered) == ["ahead0", "ahead1", "ahead2", "ahead3", "first", "read"]


def test_a_batch_holds_one_priority() -> None:
    """Results of a batch come back together: a read's chunk is not batched with
    background ones queued behind it."""
    rec = Recorder(hold={"first"})

    async def body(pool: LocalPool) -> None:
        rec.submit(pool, 2, ["first"])
        while not rec.taken:
            await trio.sleep(0.001)
        rec.submit(pool, 0, ["read"])
        rec.submit(pool, 2, [f"ahead{k}" for k in range(5)])
        rec.release.set()
        await rec.all_delivered.wait()

    run_pool(rec, body, batch=8)
    assert rec.taken == [["first"], ["read"], [f"ahead{k}" for k in range(5)]]


def test_threads_go_on_while_the_event_loop_is_busy() -> None:
    """With one trio.to_thread call per batch the next batch waited for the loop; these
    threads take batch after batch while the loop is blocked in a long synchronous step."""
    rec = Recorder()
    three_batches = threading.Event()
    work = rec.work

    def counting_work(items: list[str]) -> list[str]:
        out = work(items)
        if len(rec.taken) >= 3:
            three_batches.set()
        return out

    rec.work = counting_work  # type: ignore[method-assign]

    async def body(pool: LocalPool) -> None:
        rec.submit(pool, 2, [f"c{k}" for k in range(6)])
        assert three_batches.wait(5)  # blocks the loop: no checkpoint, no delivery
        assert rec.delivered == {}
        await rec.all_delivered.wait()

    run_pool(rec, body, batch=2)
    assert len(rec.taken) == 3 and len(rec.delivered) == 6


def test_an_item_queued_again_at_a_higher_priority_is_read_once() -> None:
    rec = Recorder(hold={"block"})

    async def body(pool: LocalPool) -> None:
        rec.submit(pool, 2, ["block"])
        while not rec.taken:
            await trio.sleep(0.001)
        rec.submit(pool, 2, ["x", "y"])
        rec.submit(pool, 0, ["y"])  # promoted: its first entry is stale now
        rec.release.set()
        await rec.all_delivered.wait()

    run_pool(rec, body, batch=1)
    flat = [item for batch in rec.taken for item in batch]
    assert flat == ["block", "y", "x"]


def test_many_chunks_are_split_across_the_threads() -> None:
    rec = Recorder(hold={"a0", "b0"})

    async def body(pool: LocalPool) -> None:
        rec.submit(pool, 0, [f"a{k}" for k in range(7)] + [f"b{k}" for k in range(6)])
        while len(rec.taken) < 2:
            await trio.sleep(0.001)
        rec.release.set()
        await rec.all_delivered.wait()

    pools: list[LocalPool] = []

    async def recorded(pool: LocalPool) -> None:
        pools.append(pool)
        await body(pool)

    run_pool(rec, recorded, threads=2, batch=8)
    assert sorted(len(batch) for batch in rec.taken) == [6, 7]
    snap = pools[0].snapshot()
    assert snap["batches"] == 2 and snap["chunks"] == 13
    # the held batch waited on an event: off the CPU for most of its time in work
    assert 0 <= snap["cpu_seconds"] <= snap["work_seconds"]  # type: ignore[operator]


def test_a_failing_work_function_still_answers_every_item() -> None:
    rec = Recorder()

    def broken(items: list[str]) -> list[str]:
        raise RuntimeError("a bug")

    rec.work = broken  # type: ignore[method-assign]

    async def body(pool: LocalPool) -> None:
        rec.submit(pool, 0, ["p", "q"])
        await rec.all_delivered.wait()

    run_pool(rec, body)
    assert all(isinstance(result, RuntimeError) for result in rec.delivered.values())
    assert set(rec.delivered) == {"p", "q"}


def test_results_after_the_loop_ended_are_dropped_quietly() -> None:
    rec = Recorder(hold={"late"})
    pool_ref: list[LocalPool] = []

    async def main() -> None:
        pool = LocalPool(rec.work, rec.deliver, rec.claim, threads=1, batch=1)
        pool_ref.append(pool)
        pool.start()
        rec.submit(pool, 0, ["late"])
        while not rec.taken:
            await trio.sleep(0.001)

    trio.run(main)  # returns with the thread still holding "late"
    (pool,) = pool_ref
    thread = pool._workers[0]
    rec.release.set()
    pool.close()
    thread.join(5)
    assert not thread.is_alive() and rec.delivered == {}
