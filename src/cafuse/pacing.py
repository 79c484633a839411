"""How many readahead fetches may be on the network at once.

Readahead past the link's bandwidth-delay product does not make a stream faster: the extra
requests only wait in a queue somewhere on the path (a router's buffer, a proxy), and a
read's on-demand fetch, sent later, waits behind all of them. The pacer measures the
product from the fetches themselves (bytes delivered per second times the shortest recent
fetch latency) and allows about twice it in flight. While the link is not full, fetches
answer near the shortest latency and the allowance doubles with each measurement (like TCP's
slow start); once it is full, latency rises until a queue of about one product has formed,
which keeps the link busy and costs an on-demand read at most about one more round trip.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

MIN_IN_FLIGHT = 16  # never fewer (a local network, or nothing measured yet)
SAMPLES = 64  # recent fetches the latency minimum and the average size come from
MIN_WINDOW = 0.25  # seconds of deliveries the rate is measured over, at least
GAIN = 2.0  # allowance in bandwidth-delay products


class LinkPacer:
    def __init__(self, clock: Callable[[], float], ceiling: int) -> None:
        self.clock = clock
        self.ceiling = max(MIN_IN_FLIGHT, ceiling)
        self._fetches: deque[tuple[float, int, float]] = deque(maxlen=SAMPLES)
        self._deliveries: deque[tuple[float, int]] = deque()
        self._limit = self.ceiling
        self._computed_at = -math.inf

    def observe(self, size: int, seconds: float) -> None:
        """One good remote fetch of ``size`` bytes that took ``seconds``."""
        now = self.clock()
        self._fetches.append((now, size, seconds))
        self._deliveries.append((now, size))
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
        latency = min(seconds for _, _, seconds in self._fetches)
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
        self._limit = min(self.ceiling, max(MIN_IN_FLIGHT, math.ceil(GAIN * product)))
        return self._limit
