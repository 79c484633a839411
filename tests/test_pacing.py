"""The readahead pacer (src/cafuse/pacing.py) on a fake clock: readahead on the network
follows about twice the link's bandwidth-delay product."""

from __future__ import annotations

from cafuse.pacing import MIN_IN_FLIGHT, SAMPLES, LinkPacer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def deliver(pacer: LinkPacer, clock: Clock, count: int, size: int, every: float, took: float):
    """``count`` fetches of ``size`` bytes, one every ``every`` seconds, each having taken
    ``took``; the scheduler asks for the limit all along (every 20 ms here)."""
    asked = clock.now
    for _ in range(count):
        clock.now += every
        pacer.observe(size, took)
        if clock.now - asked >= 0.02:
            asked = clock.now
            pacer.limit()


def test_without_measurements_the_ceiling_holds() -> None:
    clock = Clock()
    pacer = LinkPacer(clock, 128)
    assert pacer.limit() == 128
    deliver(pacer, clock, SAMPLES // 4 - 1, 65536, 0.001, 0.04)
    clock.now += 1
    assert pacer.limit() == 128


def test_a_full_link_allows_twice_its_bandwidth_delay_product() -> None:
    # 12.5 MB/s delivered (100 Mbit/s), shortest fetch 40 ms: 500 kB in flight fill it,
    # about 7.6 chunks of 64 KiB; twice that, rounded up, but never below the minimum
    clock = Clock()
    pacer = LinkPacer(clock, 1024)
    size = 65536
    deliver(pacer, clock, 400, size, size / 12.5e6, 0.12)  # queued: 120 ms each
    pacer.observe(size, 0.04)  # one that met an empty queue
    product = 12.5e6 * 0.04 / size
    assert pacer.limit() == max(MIN_IN_FLIGHT, -int(-2 * product // 1))
    # a long fat link (50 MB/s, 100 ms): far more than the minimum
    pacer = LinkPacer(clock, 1024)
    deliver(pacer, clock, 2000, size, size / 50e6, 0.1)
    assert pacer.limit() == -int(-2 * (50e6 * 0.1 / size) // 1)


def test_the_allowance_grows_while_fetches_answer_fast_and_stays_within_the_ceiling() -> None:
    clock = Clock()
    pacer = LinkPacer(clock, 256)
    size, latency = 65536, 0.05
    allowed = MIN_IN_FLIGHT
    seen = [allowed]
    for _ in range(8):  # each round: `allowed` fetches in flight, answering in `latency`
        per_second = allowed / latency
        deliver(pacer, clock, int(per_second * 0.5), size, 1 / per_second, latency)
        allowed = pacer.limit()
        seen.append(allowed)
    assert seen[1] >= 2 * MIN_IN_FLIGHT - 1  # doubled, within the rate window's rounding
    assert seen == sorted(seen) and seen[-1] == 256  # grew to the ceiling, never past it


def test_a_queued_link_holds_at_one_product_then_probes_gently() -> None:
    # 50 MB/s delivered; fetches answered in 100 ms before a queue formed, 200 ms since:
    # the base stays 100 ms (not the recent minimum), and the allowance holds at one
    # product so the queue drains
    clock = Clock()
    pacer = LinkPacer(clock, 1024)
    size = 65536
    product = 50e6 * 0.1 / size
    deliver(pacer, clock, 200, size, size / 50e6, 0.1)
    deliver(pacer, clock, 2000, size, size / 50e6, 0.2)
    assert pacer.limit() == -int(-1.0 * product // 1)
    # the queue drained: a quarter over one product, not a doubling (which would refill
    # the queue in one burst)
    deliver(pacer, clock, 200, size, size / 50e6, 0.1)
    assert pacer.limit() == -int(-1.25 * product // 1)
    # no queue for ten seconds: back to doubling
    deliver(pacer, clock, 20000, size, size / 50e6, 0.1)
    assert pacer.limit() == -int(-2 * product // 1)
    # then 200 ms fetches: for ten seconds they look queued against the 100 ms base; then
    # 200 ms is the base, and for ten more seconds the allowance probes gently
    deliver(pacer, clock, 10000, size, size / 50e6, 0.2)  # 13 s
    assert pacer.limit() == -int(-1.25 * (50e6 * 0.2 / size) // 1)
    deliver(pacer, clock, 10000, size, size / 50e6, 0.2)  # 26 s: no queue for over 10 s
    assert pacer.limit() == -int(-2 * (50e6 * 0.2 / size) // 1)
