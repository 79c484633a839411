"""How many readahead fetches may be on the network at once.

Readahead past the link's bandwidth-delay product does not make a stream faster: the extra
requests only wait in a queue somewhere on the path (a router's buffer, a proxy), and a
read's on-demand fetch, sent later, waits behind all of them. The pacer measures the
product from the fetches themselves (bytes delivered per second times the shortest recent
fetch latency) and sets the allowance from it, like TCP's congestion window:

* *start*: until a queue is first seen, twice the product, so the allowance doubles with
  each measurement while the link is not full (slow start);
* *hold*: while a queue is seen (the recent median fetch takes half again the base
  latency), one product: the queue drains;
* *probe*: when no queue is seen now but one was within BASE_WINDOW, a quarter over one
  product: the link stays full and the queue it may build is a fraction of a round trip.
  Doubling again there would refill the queue in a burst every time it drained, and a
  read landing in such a burst waited for all of it (p99 of on-demand reads under a
  stream: 250-290 ms with doubling, 135-200 ms with this, 44-50 ms idle, 20 ms / 100
  Mbit proxy).

The base latency is the shortest fetch of the last BASE_WINDOW seconds, not of the last
few fetches: once the link is queued every recent fetch is slow, and a minimum over them
would sustain the very queue it measures.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

MIN_IN_FLIGHT = 16  # never fewer (a local network, or nothing measured yet)
SAMPLES = 64  # recent fetches the average size comes from (the base latency: BASE_WINDOW)
MIN_WINDOW = 0.25  # seconds of deliveries the rate is measured over, at least
GAIN = 2.0  # allowance in bandwidth-delay products while no queue has been seen
PROBE_GAIN = 1.25  # ... while none is seen now, but one was in the last BASE_WINDOW
HOLD_GAIN = 1.0  # ... while one is seen
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
        self._queued_at = -math.inf  # when a queue was last seen

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
        if queued:
            self._queued_at = now
            gain = HOLD_GAIN
        elif now - self._queued_at < BASE_WINDOW:
            gain = PROBE_GAIN  # the link filled up lately: grow gently, not by doubling
        else:
            gain = GAIN
        self._limit = min(self.ceiling, max(MIN_IN_FLIGHT, math.ceil(gain * product)))
        return self._limit
