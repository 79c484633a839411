"""How many readahead fetches may be on the network at once.

Readahead past the link's bandwidth-delay product does not make a stream faster: the extra
requests only wait in a queue somewhere on the path (a router's buffer, a proxy), and a
read's on-demand fetch, sent later, waits behind all of them. The pacer measures the
product from the fetches themselves (bytes delivered per second times the shortest recent
fetch latency) and allows about twice it in flight. While the link is not full, fetches
answer near the shortest latency and the allowance doubles with each measurement (like TCP's
slow start); once it is full, latency rises until a queue of about one product has formed,
which keeps the link busy and costs an on-demand read at most about one more round trip.

The base latency is the shortest fetch of the last BASE_WINDOW seconds, not of the last
few fetches: once the link is queued every recent fetch is slow, and a minimum over them
would sustain the very queue it measures. When recent fetches take clearly longer than
the base (a queue has formed), the allowance holds at a quarter over one product, so the
queue drains to a fraction of a round trip.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

MIN_IN_FLIGHT = 16  # never fewer (a local network, or nothing measured yet)
SAMPLES = 64  # recent fetches the latency minimum and the average size come from
MIN_WINDOW = 0.25  # seconds of deliveries the rate is measured over, at least
GAIN = 2.0  # allowance in bandwidth-delay products while the link is not queued
HOLD_GAIN = 1.25  # ... and once it is
BASE_WINDOW = 10.0  # seconds the base (shortest) latency is kept
QUEUED = 1.5  # recent median latency over the base that means a queue has formed
RECENT = 16  # fetches the recent median comes from


class LinkPacer:
    def __init__(self, clock: Callable[[], float], ceiling: int) -> None:
        self.clock = clock
        self.ceiling = max(MIN_IN_FLIGHT, ceiling)
        self._fetches: deque[tuple[float, int, float]] = deque(maxlen=SAMPLES)
        self._deliveries: deque[tuple[float, int]] = deque()
        self._base: deque[tuple[float, float]] = deque()  # (time, latency), latency rising
        self._limit = self.ceiling
        self._computed_at = -math.inf

    def observe(self, size: int, seconds: float) -> None:
        """One good remote fetch of ``size`` bytes that took ``seconds``."""
        now = self.clock()
        self._fetches.append((now, size, seconds))
        self._deliveries.append((now, size))
        base = self._base  # a monotonic deque: its head is the window's minimum
        while base and base[-1][1] >= seconds:
            base.pop()
        base.append((now, seconds))
        self._computed_at = -math.inf

    def limit(self) -> int:
        """Readahead fetches allowed on the network now."""
        now = self.clock()
        if now - self._computed_at < 0.02:
            return self._limit
        self._computed_at = now
        if len(self._fetches) < SAMPLES // 4:
            self._limit = self.ceiling  # nothing to go by yet: as before pacing
            return self._limit
        base = self._base
        while len(base) > 1 and base[0][0] < now - BASE_WINDOW:
            base.popleft()
        latency = base[0][1]
        recent = sorted(seconds for _, _, seconds in list(self._fetches)[-RECENT:])
        queued = recent[len(recent) // 2] > QUEUED * latency
        window = max(MIN_WINDOW, 4 * latency)
        deliveries = self._deliveries
        while deliveries and deliveries[0][0] < now - window:
            deliveries.popleft()
        if latency <= 0 or not deliveries:
            self._limit = self.ceiling
            return self._limit
        rate = sum(size for _, size in deliveries) / window
        average = sum(size for _, size, _ in self._fetches) / len(self._fetches)
        product = rate * latency / average  # chunks
        gain = HOLD_GAIN if queued else GAIN
        self._limit = min(self.ceiling, max(MIN_IN_FLIGHT, math.ceil(gain * product)))
        return self._limit
