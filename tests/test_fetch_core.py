"""The concurrency core against in-process fake stores: retries, deadlines, the breaker,
store order, and the mount's priority scheduler. Deterministic: the router runs on a fake
clock; the scheduler's fake remote blocks on events the test releases."""

from __future__ import annotations

import functools
import threading
from collections import defaultdict
from collections.abc import Callable

import pytest
import trio

from cafuse.errors import ChunkUnavailable, Failure
from cafuse.scheduler import FetchScheduler, Priority, ShuttingDown
from cafuse.stores.base import (
    ChunkStore,
    StoreError,
    ThrottledStoreError,
    TransientStoreError,
)
from cafuse.stores.health import BASE_COOLDOWN, CLOSED, FAILURES_TO_OPEN, OPEN
from cafuse.stores.retry import RetryPolicy
from cafuse.stores.router import TRIAL_TIMEOUT, RemoteRouter

GOOD = b"the chunk's stored bytes"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


class ScriptedStore(ChunkStore):
    """Answers from a script: "ok", "missing", "500", "403", "429", "wrong", "stall" (uses
    the whole request timeout, then fails); ``then`` once the script runs out."""

    is_local = False

    def __init__(self, url: str, clock: FakeClock, script: list[str], then: str = "ok") -> None:
        self.url = url
        self.clock = clock
        self.script = list(script)
        self.then = then
        self.calls: list[tuple[float, float]] = []  # (time, request timeout)
        self.latency = 0.01

    def get(self, chunk_id: bytes, timeout: float | None = None) -> bytes | None:
        assert timeout is not None and timeout > 0
        self.calls.append((self.clock.now, timeout))
        action = self.script.pop(0) if self.script else self.then
        if action == "stall":
            self.clock.now += timeout
            raise TransientStoreError(f"store {self.url}: timed out")
        self.clock.now += self.latency
        if action == "ok":
            return GOOD
        if action == "missing":
            return None
        if action == "wrong":
            return b"not the chunk"
        if action == "500":
            raise TransientStoreError(f"store {self.url}: HTTP 500")
        if action == "429":
            raise ThrottledStoreError(f"store {self.url}: HTTP 429")
        if action == "403":
            raise StoreError(f"store {self.url}: HTTP 403")
        raise AssertionError(action)

    def has(self, chunk_id: bytes) -> bool:
        raise AssertionError("the fetch path never sends HEAD")


def check(blob: bytes) -> bytes:
    if blob != GOOD:
        raise ValueError("digest mismatch")
    return blob


def router(
    clock: FakeClock, *tiers: list[ScriptedStore], timeout: float = 30, retries: int = 10
) -> RemoteRouter:
    return RemoteRouter(
        tiers,
        RetryPolicy(retries=retries, timeout=timeout),
        clock=clock,
        sleep=clock.sleep,
    )


def fetch(r: RemoteRouter, clock: FakeClock, n: int = 0) -> tuple[bytes, bytes, ChunkStore]:
    return r.fetch(n.to_bytes(32, "big"), clock.now + r.policy.timeout, check)


# ---------------------------------------------------------------- router: retries


def test_transient_failures_are_retried_with_backoff() -> None:
    clock = FakeClock()
    a = ScriptedStore("A", clock, ["500", "500", "ok"])
    data, _, store = fetch(router(clock, [a]), clock)
    assert data == GOOD and store is a and len(a.calls) == 3
    policy = RetryPolicy()
    assert len(clock.pauses) == 2
    for n, pause in enumerate(clock.pauses):  # full jitter under a doubling cap
        assert 0 <= pause <= min(policy.max_backoff, policy.initial_backoff * 2**n)


def test_a_failure_hands_over_to_the_next_store_at_once() -> None:
    clock = FakeClock()
    a = ScriptedStore("A", clock, ["500"])
    b = ScriptedStore("B", clock, [])
    _, _, store = fetch(router(clock, [a], [b]), clock)
    assert store is b and clock.pauses == []


def test_not_found_everywhere_fails_at_once_without_retries() -> None:
    clock = FakeClock()
    a = ScriptedStore("A", clock, [], then="missing")
    b = ScriptedStore("B", clock, [], then="missing")
    with pytest.raises(ChunkUnavailable) as err:
        fetch(router(clock, [a], [b]), clock)
    assert err.value.kinds == {"not found"}
    assert len(a.calls) == len(b.calls) == 1 and clock.pauses == []


def test_permanent_error_drops_the_store_for_the_chunk() -> None:
    clock = FakeClock()
    a = ScriptedStore("A", clock, [], then="403")
    b = ScriptedStore("B", clock, ["500", "ok"])
    _, _, store = fetch(router(clock, [a], [b]), clock)
    assert store is b and len(a.calls) == 1
    clock2 = FakeClock()
    alone = ScriptedStore("A", clock2, [], then="403")
    with pytest.raises(ChunkUnavailable) as err:
        fetch(router(clock2, [alone]), clock2)
    assert err.value.kinds == {"permanent"} and len(alone.calls) == 1


def test_a_corrupt_network_copy_is_fetched_again() -> None:
    clock = FakeClock()
    a = ScriptedStore("A", clock, ["wrong", "wrong", "ok"])
    data, _, _ = fetch(router(clock, [a]), clock)
    assert data == GOOD and len(a.calls) == 3


def test_every_attempt_fits_in_the_time_left_and_the_deadline_holds() -> None:
    clock = FakeClock()
    a = ScriptedStore("A", clock, [], then="stall")
    r = router(clock, [a], timeout=10)
    deadline = clock.now + 10
    with pytest.raises(ChunkUnavailable) as err:
        r.fetch(bytes(32), deadline, check)
    assert "deadline" in err.value.kinds or "circuit open" in err.value.kinds
    assert clock.now <= deadline
    for started, timeout in a.calls:
        assert started + timeout <= deadline + 1e-9
        assert timeout <= max(1.0, 10 / 3) + 1e-9  # a stalled request leaves time to retry


def test_throttled_chunk_waits_what_the_store_asked() -> None:
    clock = FakeClock()

    class AskingStore(ScriptedStore):
        def get(self, chunk_id: bytes, timeout: float | None = None) -> bytes | None:
            if not self.calls:
                self.calls.append((clock.now, timeout or 0))
                raise ThrottledStoreError("store A: HTTP 429", retry_after=2.5)
            return super().get(chunk_id, timeout)

    a = AskingStore("A", clock, [])
    data, _, _ = fetch(router(clock, [a]), clock)
    assert data == GOOD and clock.pauses == [2.5]
    # without Retry-After: a pause under the throttle cap, and the store stays closed
    clock2 = FakeClock()
    b = ScriptedStore("B", clock2, ["429", "429", "ok"])
    r = router(clock2, [b])
    fetch(r, clock2)
    assert len(clock2.pauses) == 2 and r.health_of(b).state == CLOSED


def test_retry_count_is_a_ceiling() -> None:
    clock = FakeClock()
    a = ScriptedStore("A", clock, [], then="500")
    with pytest.raises(ChunkUnavailable):
        fetch(router(clock, [a], retries=2, timeout=1000), clock)
    # the breaker may open and close in between, but never more than 1 + retries rounds
    assert len(a.calls) <= 3


# ---------------------------------------------------------------- router: store health


def test_a_store_failing_fast_fails_the_chunk_fast() -> None:
    """Refused connections: once its breaker opens, a chunk that saw the store fail does not
    sit out the rest of its deadline waiting for the cool-down."""
    clock = FakeClock()
    a = ScriptedStore("A", clock, [], then="500")
    with pytest.raises(ChunkUnavailable) as err:
        fetch(router(clock, [a], timeout=1000, retries=100), clock)
    assert "circuit open" in err.value.kinds
    assert len(a.calls) == FAILURES_TO_OPEN and clock.now < 10


class BusyStore(ScriptedStore):
    """Answers every request with a "slow down" status."""

    status = 503

    def get(self, chunk_id: bytes, timeout: float | None = None) -> bytes | None:
        self.calls.append((self.clock.now, timeout or 0))
        self.clock.now += 0.01
        raise ThrottledStoreError(f"store B: HTTP {self.status}", status=self.status)


@pytest.mark.parametrize(("status", "opens"), [(503, True), (429, False)])
def test_503_counts_towards_the_breaker_429_does_not(status: int, opens: bool) -> None:
    clock = FakeClock()
    b = BusyStore("B", clock, [])
    b.status = status
    r = router(clock, [b], timeout=60, retries=20)
    with pytest.raises(ChunkUnavailable):
        fetch(r, clock)
    assert (r.health_of(b).state == OPEN) is opens


def test_a_dark_store_costs_a_few_timeouts_then_is_skipped_and_recovers() -> None:
    clock = FakeClock()
    dark = ScriptedStore("DARK", clock, [], then="stall")
    good = ScriptedStore("GOOD", clock, [])
    r = router(clock, [dark], [good])
    for n in range(200):
        _, _, store = fetch(r, clock, n)
        assert store is good
    # consecutive failures open the breaker: then DARK is not asked again...
    health = r.health_of(dark)
    assert len(dark.calls) == FAILURES_TO_OPEN and health.state == OPEN
    spent_on_dark = sum(timeout for _, timeout in dark.calls)
    assert spent_on_dark <= FAILURES_TO_OPEN * 10.0
    # ...until the cool-down has passed: one trial, with a short timeout
    clock.now += BASE_COOLDOWN
    fetch(r, clock, 1000)
    assert len(dark.calls) == FAILURES_TO_OPEN + 1
    assert dark.calls[-1][1] <= TRIAL_TIMEOUT
    assert health.state == OPEN and health.cooldown == 2 * BASE_COOLDOWN  # backs off more
    # the store comes back: the next trial closes the breaker, and it is first again
    dark.then = "ok"
    clock.now += 2 * BASE_COOLDOWN
    _, _, store = fetch(r, clock, 1001)
    assert store is dark and health.state == CLOSED


def test_failover_group_prefers_the_faster_member() -> None:
    clock = FakeClock()
    slow = ScriptedStore("SLOW", clock, [])
    fast = ScriptedStore("FAST", clock, [])
    slow.latency, fast.latency = 0.5, 0.01
    r = router(clock, [slow, fast])
    r.health_of(slow).success(0.5, 1)
    r.health_of(fast).success(0.01, 1)
    _, _, store = fetch(r, clock)
    assert store is fast
    # but the --store order is never reordered by speed
    clock2 = FakeClock()
    first, second = ScriptedStore("1", clock2, []), ScriptedStore("2", clock2, [])
    r2 = router(clock2, [first], [second])
    r2.health_of(first).success(5.0, 1)
    _, _, store = fetch(r2, clock2)
    assert store is first


# ---------------------------------------------------------------- scheduler


class FakeSource:
    """Local chunks answer at once; remote ones block until the test releases them."""

    has_remote = True

    def __init__(self, local: set[bytes] = frozenset()) -> None:  # type: ignore[assignment]
        self.policy = RetryPolicy(timeout=30)
        self.local = set(local)
        self.gates: defaultdict[bytes, threading.Event] = defaultdict(threading.Event)
        self.started: list[bytes] = []
        self.deadlines: dict[bytes, float] = {}
        self.lock = threading.Lock()
        self.stall_first = False
        self.stall_ids: set[bytes] = set()
        self.deadline_first: set[bytes] = set()
        self.linger: threading.Event | None = None
        self.hold = threading.Event()
        self.cancelled: list[bytes] = []
        self.p95: float | None = None
        self.router = self  # the scheduler asks the router for the stores' latency
        self.local_order: list[bytes] = []
        self.local_gate = threading.Event()

    def typical_p95(self) -> float | None:
        return self.p95

    def get_local(self, chunk_id: bytes, size: int) -> tuple[bytes, str] | None:
        with self.lock:
            self.local_order.append(chunk_id)
        if chunk_id == b"held":  # a local read that takes until the test says
            assert self.local_gate.wait(10)
        return (b"L" * size, "local") if chunk_id in self.local else None

    def get_remote(
        self, chunk_id: bytes, size: int, deadline: float, cancel: threading.Event | None = None
    ) -> tuple[bytes, str]:
        with self.lock:
            self.started.append(chunk_id)
            self.deadlines[chunk_id] = deadline
            gate = self.gates[chunk_id]
            first = self.started.count(chunk_id) == 1
            stall = first and (self.stall_first or chunk_id in self.stall_ids)
            out_of_time = first and chunk_id in self.deadline_first
        if stall:  # a request that never answers, until the fetch is called off
            assert cancel is not None and cancel.wait(10)
            self.cancelled.append(chunk_id)
            if self.linger is not None:  # ...and its request under way takes a while
                assert self.linger.wait(10)
            raise ChunkUnavailable(chunk_id, [])
        if out_of_time:  # a fetch that retries until its deadline, which then passes
            assert self.hold.wait(10)
            raise ChunkUnavailable(chunk_id, [Failure("", "deadline", "gave up")])
        if not gate.wait(10):
            raise AssertionError("test never released " + chunk_id.decode())
        return b"R" * size, "remote"

    def release(self, *chunk_ids: bytes) -> None:
        with self.lock:
            for chunk_id in chunk_ids:
                self.gates[chunk_id].set()

    def release_all(self) -> None:
        self.hold.set()
        self.local_gate.set()
        if self.linger is not None:
            self.linger.set()
        with self.lock:
            for gate in self.gates.values():
                gate.set()
            self.gates.default_factory = lambda: _set_event()


def _set_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


async def until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not condition():
            await trio.sleep(0.001)


def ids(prefix: str, n: int) -> list[tuple[bytes, int]]:
    return [(f"{prefix}{i}".encode(), 10) for i in range(n)]


async def run_scheduler(source: FakeSource, test, **kwargs) -> dict[bytes, bytes]:
    delivered: dict[bytes, bytes] = {}
    scheduler = FetchScheduler(source, delivered.__setitem__, **kwargs)  # type: ignore[arg-type]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(scheduler.run)
            await test(scheduler)
            nursery.cancel_scope.cancel()
    finally:
        source.release_all()
    return delivered


def test_readahead_never_takes_the_slots_kept_for_reads() -> None:
    source = FakeSource()

    async def test(s: FetchScheduler) -> None:
        ahead = s.request(ids("r", 10), Priority.READAHEAD)
        await until(lambda: len(source.started) == 3)  # 4 slots, 1 kept for reads
        await trio.sleep(0.02)
        assert len(source.started) == 3
        (read,) = s.request([(b"d0", 10)], Priority.ON_DEMAND)
        await until(lambda: b"d0" in source.started)  # at once, past 7 queued readaheads
        source.release(b"d0")
        assert read is not None
        assert await read.wait() == b"R" * 10
        assert not any(f.done.is_set() for f in ahead if f is not None)

    run_scheduler_sync(source, test, remote_slots=4, reserved=1)


def test_a_read_promotes_a_queued_readahead_fetch() -> None:
    source = FakeSource()

    async def test(s: FetchScheduler) -> None:
        s.request(ids("r", 8), Priority.READAHEAD)
        await until(lambda: len(source.started) == 2)
        (promoted,) = s.request([(b"r6", 10)], Priority.ON_DEMAND)
        await until(lambda: b"r6" in source.started)
        assert source.started.index(b"r6") == 2  # before r2..r5, queued earlier
        source.release(b"r6")
        assert promoted is not None and await promoted.wait() == b"R" * 10

    run_scheduler_sync(source, test, remote_slots=3, reserved=1)


def test_local_chunks_never_wait_behind_the_network() -> None:
    source = FakeSource(local={b"local"})

    async def test(s: FetchScheduler) -> None:
        s.request(ids("d", 20), Priority.ON_DEMAND)  # every remote slot busy, more queued
        await until(lambda: len(source.started) == 4)
        (flight,) = s.request([(b"local", 10)], Priority.ON_DEMAND)
        assert flight is not None
        with trio.fail_after(2):
            assert await flight.wait() == b"L" * 10

    run_scheduler_sync(source, test, remote_slots=4)


def test_a_read_of_a_local_chunk_goes_ahead_of_queued_readahead_alone() -> None:
    """A read's chunk queued in the local stage behind readahead is moved to the front, and
    read in a batch of its own: a batch's results come back together."""
    chunks = [b"held", *(f"a{i}".encode() for i in range(6))]
    source = FakeSource(local=set(chunks))

    async def test(s: FetchScheduler) -> None:
        s.request([(b"held", 10)], Priority.READAHEAD)  # the only thread is held on it
        await until(lambda: source.local_order == [b"held"])
        ahead = s.request(ids("a", 6), Priority.READAHEAD)
        (read,) = s.request([(b"a4", 10)], Priority.ON_DEMAND)
        assert read is ahead[4]  # one flight, promoted
        source.local_gate.set()
        assert read is not None and await read.wait() == b"L" * 10
        assert source.local_order[:2] == [b"held", b"a4"]
        for flight in ahead:
            assert flight is not None and await flight.wait() == b"L" * 10
        assert sorted(source.local_order) == sorted(chunks)  # each read once

    run_scheduler_sync(source, test, local_slots=1, local_batch=8)


def test_requests_after_the_scheduler_stopped_fail_at_once() -> None:
    source = FakeSource(local={b"l"})
    stopped: list[FetchScheduler] = []

    async def test(s: FetchScheduler) -> None:
        stopped.append(s)

    run_scheduler_sync(source, test)
    (scheduler,) = stopped
    flights = scheduler.request([(b"l", 10), (b"r", 10)], Priority.ON_DEMAND)
    for flight in flights:
        assert flight is not None and flight.done.is_set()
        assert isinstance(flight.error, ShuttingDown)


def test_one_fetch_per_chunk_however_many_wait() -> None:
    source = FakeSource()

    async def test(s: FetchScheduler) -> None:
        first = s.request([(b"x", 10)], Priority.READAHEAD)[0]
        second = s.request([(b"x", 10)], Priority.ON_DEMAND)[0]
        assert first is second and first is not None
        source.release(b"x")
        await first.wait()
        assert source.started == [b"x"]

    delivered = run_scheduler_sync(source, test)
    assert delivered == {b"x": b"R" * 10}


def test_background_requests_are_bounded() -> None:
    source = FakeSource()

    async def test(s: FetchScheduler) -> None:
        flights = s.request(ids("r", 30), Priority.READAHEAD)
        later = s.request(ids("f", 10), Priority.FILL)
        admitted = [f for f in flights + later if f is not None]
        assert len(admitted) == 5 and s.rejected == 35  # 5 waiting at most, then no more
        # the local stage answers in batches on its own threads: wait until all 5 left it
        await until(lambda: sum(s.snapshot()["queued"].values()) == 2)
        await until(lambda: len(source.started) == 3)
        more = s.request(ids("m", 5), Priority.READAHEAD)  # 3 started: room for 3 more
        assert sum(f is not None for f in more) == 3
        (read,) = s.request([(b"d", 10)], Priority.ON_DEMAND)
        assert read is not None  # a read is always admitted

    run_scheduler_sync(source, test, remote_slots=4, reserved=1, queue_limit=5)


def test_shutdown_fails_waiting_reads_at_once() -> None:
    source = FakeSource()

    async def test(s: FetchScheduler) -> None:
        flights = s.request(ids("d", 6), Priority.ON_DEMAND)
        await until(lambda: len(source.started) == 2)
        s.close()
        for flight in flights:
            assert flight is not None and flight.done.is_set()
            with pytest.raises(ShuttingDown):
                await flight.wait()
        (late,) = s.request([(b"late", 10)], Priority.ON_DEMAND)
        assert late is not None
        with pytest.raises(ShuttingDown):
            await late.wait()

    run_scheduler_sync(source, test, remote_slots=2)


def test_the_deadline_belongs_to_the_chunk() -> None:
    source = FakeSource()
    now = [100.0]

    async def test(s: FetchScheduler) -> None:
        s.request([(b"a", 10)], Priority.READAHEAD)
        await until(lambda: b"a" in source.started)
        assert source.deadlines[b"a"] == 100.0 + 7
        now[0] = 150.0
        s.request(ids("q", 3), Priority.READAHEAD)  # q0 runs, q1 and q2 queue
        await until(lambda: b"q0" in source.started)
        now[0] = 160.0
        s.request([(b"q2", 10)], Priority.ON_DEMAND)  # promoted: a fresh deadline
        await until(lambda: b"q2" in source.started)
        assert source.deadlines[b"q0"] == 150.0 + 7
        assert source.deadlines[b"q2"] == 160.0 + 7

    run_scheduler_sync(source, test, remote_slots=3, reserved=1, timeout=7, clock=lambda: now[0])


def run_scheduler_sync(source: FakeSource, test, **kwargs) -> dict[bytes, bytes]:
    return trio.run(functools.partial(run_scheduler, source, test, **kwargs))


def test_a_read_stuck_on_a_stalled_request_is_rescued_by_a_hedge() -> None:
    source = FakeSource()
    source.stall_first, source.p95 = True, 0.005
    source.release(b"d")

    async def test(s: FetchScheduler) -> None:
        (read,) = s.request([(b"d", 10)], Priority.ON_DEMAND)
        assert read is not None
        with trio.fail_after(5):
            assert await read.wait() == b"R" * 10
        assert source.started == [b"d", b"d"]
        await until(lambda: source.cancelled == [b"d"])  # the stalled one was called off
        snap = s.snapshot()
        assert snap["hedged"] == 1 and snap["hedge_won"] == 1

    run_scheduler_sync(source, test)


def test_readahead_is_not_hedged_until_a_read_waits() -> None:
    source = FakeSource()
    source.stall_first, source.p95 = True, 0.005
    source.release(b"r")

    async def test(s: FetchScheduler) -> None:
        (ahead,) = s.request([(b"r", 10)], Priority.READAHEAD)
        await trio.sleep(0.2)
        assert source.started == [b"r"]  # nobody waits: no second request
        s.request([(b"r", 10)], Priority.ON_DEMAND)
        assert ahead is not None
        with trio.fail_after(5):
            await ahead.wait()
        assert source.started == [b"r", b"r"]

    run_scheduler_sync(source, test)


def test_threads_left_by_lost_hedge_races_do_not_block_reads() -> None:
    source = FakeSource()
    source.p95 = 0.005
    source.linger = threading.Event()  # a stalled request's thread ends only at test end
    source.stall_ids = {b"s0", b"s1", b"s2", b"s3"}
    source.release(b"s0", b"s1", b"s2", b"s3", b"next")

    async def test(s: FetchScheduler) -> None:
        reads = s.request(ids("s", 4), Priority.ON_DEMAND)
        with trio.fail_after(5):
            for read in reads:
                assert read is not None and await read.wait() == b"R" * 10
        await until(lambda: len(source.cancelled) == 4)  # 4 threads still busy
        (read,) = s.request([(b"next", 10)], Priority.ON_DEMAND)
        assert read is not None
        with trio.fail_after(2):  # not behind the 4 stragglers
            assert await read.wait() == b"R" * 10

    run_scheduler_sync(source, test, remote_slots=4, reserved=1)


def test_a_read_joining_a_background_fetch_gets_its_own_deadline() -> None:
    source = FakeSource()
    source.deadline_first = {b"r"}
    source.release(b"r")

    async def test(s: FetchScheduler) -> None:
        (ahead,) = s.request([(b"r", 10)], Priority.READAHEAD)
        assert ahead is not None
        await until(lambda: b"r" in source.started)
        s.request([(b"r", 10)], Priority.ON_DEMAND)  # a read arrives during the fetch
        source.hold.set()  # ...which then runs out of its deadline
        with trio.fail_after(5):
            assert await ahead.wait() == b"R" * 10  # tried again, not EIO
        assert source.started == [b"r", b"r"]

    run_scheduler_sync(source, test, hedge=False)
