"""The adaptive readahead policy (mount/readahead.py) on a fake clock, and the reader that
follows it on a fake chunk source: bounds, growth, fairness. No timing thresholds: time is
simulated."""

from __future__ import annotations

import hashlib
import itertools
import random

import numpy as np
import trio

from cafuse.digest import FLAG_BLAKE3
from cafuse.index import Index
from cafuse.mount.readahead import (
    SEQUENTIAL_THRESHOLD,
    Readahead,
)
from cafuse.mount.reader import BlobReader
from cafuse.scheduler import Priority
from cafuse.stats import FetchStats
from cafuse.stores.retry import RetryPolicy

KiB, MiB = 1 << 10, 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def aligned_to(boundaries: list[int]):
    """``align`` for a blob cut at ``boundaries`` (sorted chunk ends)."""
    ends = np.array(boundaries)

    def align(x: int) -> int:
        i = int(np.searchsorted(ends, x, side="right"))
        return int(ends[i - 1]) if i else 0

    return align


def covered_end(boundaries: list[int], end: int) -> int:
    return next(b for b in boundaries if b >= end)


def uneven_chunks(total: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    ends, at = [], 0
    while at < total:
        at = min(total, at + rng.randrange(16 * KiB, 200 * KiB))
        ends.append(at)
    return ends


def test_readahead_never_goes_past_the_blob_end_and_ends_on_chunk_boundaries() -> None:
    blob = 40 * MiB + 12345
    ends = uneven_chunks(blob)
    clock = Clock()
    ra = Readahead(
        blob, budget=8 * MiB, initial=400 * KiB, quick=2 * MiB, align=aligned_to(ends), clock=clock
    )
    ranges = []
    for offset in range(0, blob, 128 * KiB):
        size = min(128 * KiB, blob - offset)
        clock.now += 0.001
        got = ra.on_read(1, offset, size, covered_end(ends, offset + size))
        if got is not None:
            ranges.append(got)
            lo, hi = got
            assert lo < hi <= blob
            assert lo in ends and hi in ends  # whole chunks only
    assert ranges and ranges[-1][1] == blob  # it did read ahead, up to the very end
    for (_, hi), (lo, _) in itertools.pairwise(ranges):
        assert lo >= hi  # nothing requested twice


def test_a_random_reader_gets_no_readahead_and_a_seek_shrinks_the_window() -> None:
    blob = 1 << 30
    clock = Clock()
    ra = Readahead(blob, budget=64 * MiB, initial=256 * KiB, quick=4 * MiB, clock=clock)
    rng = random.Random(5)
    for _ in range(2000):
        clock.now += 0.0001
        offset = rng.randrange(blob // 4096) * 4096
        size = rng.choice([4 * KiB, 128 * KiB])
        assert ra.on_read(7, offset, size, offset + size) is None
    assert ra.streams[7].window == 0 and ra.total_ahead == 0
    # sequential for a while: the window opens...
    for offset in range(0, 8 * MiB, 128 * KiB):
        clock.now += 0.001
        ra.on_read(7, offset, 128 * KiB, offset + 128 * KiB)
    assert ra.streams[7].window > 0 and ra.total_ahead > 0
    # ...and closes at the first read far away; nothing stays counted ahead
    ra.on_read(7, 900 * MiB, 4 * KiB, 900 * MiB + 4 * KiB)
    assert ra.streams[7].window == 0
    assert ra.total_ahead == ra.streams[7].ahead() == 0
    assert ra.snapshot()["streams"]["7"]["phase"] == "off"


def simulate(
    ra: Readahead, clock: Clock, rtt: float, bandwidth: float, total: int, stream: int = 1
) -> int:
    """A reader of 128 KiB requests over a link of ``rtt`` and ``bandwidth``: it goes as
    fast as the window allows (window / rtt) or the link does, whichever is less. Returns
    the largest window seen in the second half."""
    offset, largest = 0, 0
    while offset < total:
        if offset > total // 2:
            largest = max(largest, ra.streams[stream].window)
        state = ra.streams.get(stream)
        window = min(state.window, ra.budget) if state and state.window else 128 * KiB
        rate = min(bandwidth, window / rtt)
        clock.now += 128 * KiB / rate
        ra.observe_latency(rtt)
        ra.on_read(stream, offset, 128 * KiB, offset + 128 * KiB)
        offset += 128 * KiB
    return largest


def test_the_window_grows_on_a_long_fat_link_until_the_rate_stops_improving() -> None:
    clock = Clock()
    ra = Readahead(1 << 40, budget=256 * MiB, initial=256 * KiB, quick=2 * MiB, clock=clock)
    rtt, bandwidth = 0.1, 50e6  # 100 ms round trip, 400 Mbit/s: 5 MB in flight fill it
    largest = simulate(ra, clock, rtt, bandwidth, 1200 * MiB)
    state = ra.streams[1]
    assert state.window >= bandwidth * rtt  # the pipe is full, but the window stopped
    # growing: its probes for a faster link go no further than one doubling past 2 x BDP
    assert largest <= 4 * bandwidth * rtt < ra.budget
    assert max(state.history) <= bandwidth * 1.01


def test_a_fast_local_source_keeps_the_quick_window() -> None:
    """When the reader, not the source, sets the pace, doubling gains nothing: the window
    stays near where the start phase left it."""
    clock = Clock()
    ra = Readahead(1 << 40, budget=256 * MiB, initial=256 * KiB, quick=2 * MiB, clock=clock)
    simulate(ra, clock, rtt=0.0002, bandwidth=1e9, total=400 * MiB)
    assert ra.streams[1].window <= 8 * MiB


def test_many_streams_share_the_budget_and_never_exceed_it() -> None:
    blob = 1 << 40
    clock = Clock()
    budget = 16 * MiB
    ra = Readahead(
        blob, budget=budget, initial=256 * KiB, quick=4 * MiB, align=lambda x: x // 65536 * 65536
    )
    ra.clock = clock
    streams = {k: k * (1 << 30) for k in range(1, 21)}  # 20 readers, each in its own region
    rng = random.Random(9)
    requested = 0
    for _ in range(20000):
        k = rng.choice(list(streams))
        offset = streams[k]
        clock.now += 0.0005
        got = ra.on_read(k, offset, 128 * KiB, offset + 128 * KiB)
        streams[k] += 128 * KiB
        if got is not None:
            requested += got[1] - got[0]
        assert ra.total_ahead == sum(s.ahead() for s in ra.streams.values())
        assert ra.total_ahead <= budget
    assert requested > 20 * budget  # they did read ahead all along
    # every one of them got a part, none more than its fair share plus a step
    aheads = [s.ahead() for s in ra.streams.values()]
    assert min(aheads) > 0
    assert max(aheads) <= budget // 20 + 4 * 128 * KiB
    ra.forget(3)
    assert ra.total_ahead == sum(s.ahead() for s in ra.streams.values())


def test_an_idle_stream_gives_its_share_back() -> None:
    clock = Clock()
    ra = Readahead(1 << 34, budget=8 * MiB, initial=256 * KiB, quick=8 * MiB, clock=clock)
    for offset in range(0, 4 * MiB, 128 * KiB):
        clock.now += 0.001
        ra.on_read(1, offset, 128 * KiB, offset + 128 * KiB)
    assert ra.streams[1].ahead() > 4 * MiB  # stream 1 holds most of the budget
    clock.now += 5  # stream 1 stops reading (its file stays open)
    base = 1 << 32
    for offset in range(base, base + 4 * MiB, 128 * KiB):
        clock.now += 0.001
        ra.on_read(2, offset, 128 * KiB, offset + 128 * KiB)
    assert ra.streams[1].ahead() == 0
    assert ra.streams[2].ahead() > 4 * MiB
    assert ra.total_ahead <= ra.budget


def test_readahead_off_with_no_budget() -> None:
    ra = Readahead(1 << 30, budget=0, initial=256 * KiB, quick=4 * MiB)
    for offset in range(0, 2 * SEQUENTIAL_THRESHOLD * 4, 128 * KiB):
        assert ra.on_read(1, offset, 128 * KiB, offset + 128 * KiB) is None


# ---------------------------------------------------------------- the reader


class LocalSource:
    """Every chunk is local and its data is derived from its id (no store, no decode)."""

    has_remote = False

    def __init__(self) -> None:
        self.policy = RetryPolicy(timeout=30)
        self.stats = FetchStats()

    def get_local(self, chunk_id: bytes, size: int) -> tuple[bytes, str]:
        return (chunk_id * (size // 32 + 1))[:size], "local"

    def store_stats(self) -> dict:
        return {}


def small_index(sizes: list[int]) -> Index:
    ends = np.cumsum(np.array(sizes, dtype=np.uint64)).astype(np.uint64)
    ids = np.frombuffer(
        b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(len(sizes))),
        dtype=np.uint8,
    ).reshape(-1, 32)
    return Index(FLAG_BLAKE3, 1024, 8192, 16384, ends, ids)


def test_the_reader_never_requests_a_chunk_past_the_end_and_serves_every_byte() -> None:
    rng = random.Random(2)
    sizes = [rng.randrange(1024, 16384) for _ in range(300)]
    index = small_index(sizes)
    source = LocalSource()
    expected = b"".join(source.get_local(index.chunk_id(i), s)[0] for i, s in enumerate(sizes))

    async def main() -> None:
        reader = BlobReader(index, source, memory_cache=1 << 20, readahead=4)  # type: ignore[arg-type]
        requested: list[bytes] = []
        original = reader.scheduler.request

        def spy(items, priority):
            items = list(items)
            if priority == Priority.READAHEAD:
                requested.extend(chunk_id for chunk_id, _ in items)
            return original(items, priority)

        reader.scheduler.request = spy  # type: ignore[method-assignment]
        async with trio.open_nursery() as nursery:
            await nursery.start(reader.run)
            got = bytearray()
            for offset in range(0, index.blob_size + 8192, 8192):
                got += await reader.read(offset, 8192, stream=1)
                policy = reader.readahead_policy
                assert policy.total_ahead <= policy.budget
            assert bytes(got) == expected
            valid = {index.chunk_id(i) for i in range(index.chunk_count)}
            assert requested and set(requested) <= valid
            assert index.chunk_id(index.chunk_count - 1) in requested  # read ahead to the end
            snap = reader.snapshot()["readahead"]
            assert snap["streams"]["1"]["window"] > 0
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_many_reader_streams_keep_their_readahead_within_the_budget() -> None:
    """Twelve streams through the reader at once: the chunks requested ahead and not yet
    fetched never add up to more than the readahead memory."""
    rng = random.Random(4)
    sizes = [rng.randrange(1024, 16384) for _ in range(3000)]
    index = small_index(sizes)
    source = LocalSource()
    budget = 384 << 10

    async def main() -> None:
        reader = BlobReader(
            index,
            source,  # type: ignore[arg-type]
            memory_cache=1 << 20,
            readahead=8,
            readahead_memory=budget,
        )
        policy = reader.readahead_policy
        ahead_requests = 0
        original = reader.scheduler.request

        def spy(items, priority):
            nonlocal ahead_requests
            ahead_requests += priority == Priority.READAHEAD
            return original(items, priority)

        reader.scheduler.request = spy  # type: ignore[method-assignment]

        def pending_ahead() -> int:
            flights = reader.scheduler._flights.values()
            return sum(f.size for f in flights if f.priority == Priority.READAHEAD)

        async def stream(k: int) -> None:
            offset = k * (index.blob_size // 12)
            for _ in range(60):
                data = await reader.read(offset, 16384, stream=k)
                assert len(data) == 16384
                offset += 16384
                assert policy.total_ahead <= budget
                assert pending_ahead() <= budget

        async with trio.open_nursery() as nursery:
            await nursery.start(reader.run)
            async with trio.open_nursery() as readers:
                for k in range(12):
                    readers.start_soon(stream, k)
            assert ahead_requests > 12  # every stream read ahead
            assert sum(s.ahead() for s in policy.streams.values()) == policy.total_ahead
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_remote_workers_follow_the_window_up_to_the_maximum() -> None:
    from test_fetch_core import FakeSource, ids, run_scheduler_sync, until

    source = FakeSource()
    fetched: list[tuple[int, float]] = []

    async def test(scheduler) -> None:
        flights = scheduler.request(ids("r", 10), Priority.READAHEAD)
        await until(lambda: len(source.started) == 3)  # 4 slots, 1 kept for reads
        scheduler.want_remote_slots(8)
        await until(lambda: len(source.started) == 8 - 1)
        scheduler.want_remote_slots(100)  # capped at the maximum
        await until(lambda: len(source.started) == 10)
        assert scheduler.remote_slots == 12
        source.release_all()
        for flight in flights:
            await flight.wait()
        assert len(fetched) == 10 and all(size == 10 for size, _ in fetched)

    run_scheduler_sync(
        source,
        test,
        remote_slots=4,
        max_remote_slots=12,
        on_fetched=lambda size, seconds: fetched.append((size, seconds)),
    )


def test_no_more_remote_workers_while_a_store_asked_is_silent() -> None:
    from test_fetch_core import FakeSource, run_scheduler_sync

    from cafuse.stores.health import StoreHealth

    source = FakeSource()
    clock = Clock()
    silent = StoreHealth("http://dark", clock)
    source.health = {1: silent}  # the router's health of each store

    async def test(scheduler) -> None:
        silent.acquire()  # asked, never answered
        clock.now = 5.0
        scheduler.want_remote_slots(12)
        assert scheduler.remote_slots == 4
        silent.success(0.01, 100)  # it answers after all
        scheduler.want_remote_slots(12)
        assert scheduler.remote_slots == 12

    run_scheduler_sync(source, test, remote_slots=4, max_remote_slots=12)


def test_kernel_requests_answered_out_of_order_keep_the_window() -> None:
    """Two 1 MiB readahead requests of one reader in flight arrive swapped: still one
    sequential stream, its window intact."""
    clock = Clock()
    ra = Readahead(1 << 30, budget=64 * MiB, initial=256 * KiB, quick=4 * MiB, clock=clock)
    offset = 0
    while offset < 64 * MiB:
        for first in (offset + MiB, offset):  # the later request first
            clock.now += 0.001
            ra.on_read(1, first, MiB, first + MiB)
        offset += 2 * MiB
        assert ra.streams[1].window > 0
    assert ra.streams[1].run_bytes == 64 * MiB


def test_a_seek_restarts_the_window_even_for_large_reads() -> None:
    clock = Clock()
    ra = Readahead(1 << 34, budget=64 * MiB, initial=256 * KiB, quick=4 * MiB, clock=clock)
    for offset in range(0, 32 * MiB, MiB):
        clock.now += 0.001
        ra.on_read(1, offset, MiB, offset + MiB)
    assert ra.streams[1].window >= 4 * MiB
    ra.on_read(1, 8 << 30, MiB, (8 << 30) + MiB)  # 1 MiB elsewhere: a new run
    assert ra.streams[1].window == 256 * KiB
    assert ra.streams[1].ahead_until <= (8 << 30) + 256 * KiB + MiB
