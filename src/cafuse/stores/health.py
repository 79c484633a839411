"""What the fetch path knows about each remote store, shared by every thread: a circuit
breaker, a "slow down" pause, latency, and the counters ``cafuse stats`` shows.

Breaker: *closed* (requests flow) -> *open* after ``FAILURES_TO_OPEN`` consecutive failures
with no answer for ``silence`` seconds (requests skip the store) -> after a cool-down,
*half-open*: one trial request; success closes it, failure opens it again with the
cool-down doubled (up to ``MAX_COOLDOWN``). A dead store so costs about one request timeout
per cool-down, not one per chunk, and a store that comes back is used again by itself. A
store that answers "slow down" is alive: that is no breaker failure, the chunk backs off instead.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from ..stats import latency_ms

FAILURES_TO_OPEN = 5  # in a row, and no answer for ``silence`` seconds: a flaky store that
# still answers, or whose requests all hit stalls shorter than a request timeout, is alive
BASE_COOLDOWN = 2.0
MAX_COOLDOWN = 60.0
LATENCY_SAMPLES = 2048
EWMA_WEIGHT = 0.2

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class StoreHealth:
    def __init__(
        self, url: str, clock: Callable[[], float] = time.monotonic, silence: float = 1.0
    ) -> None:
        self.url = url
        self.clock = clock
        self.silence = silence
        self._lock = threading.Lock()
        self.state = CLOSED
        self.consecutive_failures = 0
        self.last_answer = float("-inf")
        self.cooldown = BASE_COOLDOWN
        self.open_until = 0.0
        self._trial_in_flight = False
        self.ewma_latency: float | None = None
        self._latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.requests = 0
        self.chunks = 0
        self.bytes = 0  # as stored (compressed): what crossed the network
        self.not_found = 0
        self.retries = 0
        self.errors: dict[str, int] = {}
        self.times_opened = 0

    # ------------------------------------------------------------------ decisions

    def available_at(self) -> float:
        """When a request may next go to this store (now or earlier: at once)."""
        with self._lock:
            if self.state == CLOSED:
                return 0.0
            if self.state == OPEN:
                return self.open_until
            return float("inf") if self._trial_in_flight else 0.0

    def acquire(self) -> bool:
        """May a request go to the store now? A half-open store admits one trial at a time:
        the caller that gets True for it must report ``success``/``failure``/``release``."""
        now = self.clock()
        with self._lock:
            if self.state == OPEN:
                if now < self.open_until:
                    return False
                self.state = HALF_OPEN
            if self.state == HALF_OPEN:
                if self._trial_in_flight:
                    return False
                self._trial_in_flight = True
            self.requests += 1
            return True

    def score(self) -> float:
        """Lower is better: the store's typical latency (unknown counts as good)."""
        return self.ewma_latency if self.ewma_latency is not None else 0.0

    # ------------------------------------------------------------------ outcomes

    def success(self, seconds: float, stored_bytes: int) -> None:
        with self._lock:
            self._answered()
            self.chunks += 1
            self.bytes += stored_bytes
            self._latencies.append(seconds)
            self.ewma_latency = (
                seconds
                if self.ewma_latency is None
                else (1 - EWMA_WEIGHT) * self.ewma_latency + EWMA_WEIGHT * seconds
            )

    def missing(self) -> None:
        """The store answered that it does not have the chunk: healthy, just not there."""
        with self._lock:
            self._answered()
            self.not_found += 1

    def failure(self, kind: str) -> None:
        """A failed request: counts towards opening the breaker."""
        now = self.clock()
        with self._lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1
            self.consecutive_failures += 1
            if self.state == HALF_OPEN:
                self._trial_in_flight = False
                self._open(now, self.cooldown * 2)
            elif (
                self.state == CLOSED
                and self.consecutive_failures >= FAILURES_TO_OPEN
                and now - self.last_answer >= self.silence
            ):
                self._open(now, BASE_COOLDOWN)

    def throttled(self, counts_as_failure: bool = False) -> None:
        """The store said "slow down" (429/503). The chunk that got it backs off
        (``RetryPolicy.backoff``); every thread doing so lowers the request rate by as much
        as the store refuses. A 429 is no breaker failure (the store is alive and says so);
        a 503 is, since a balancer with no live backend answers nothing else."""
        if counts_as_failure:
            self.failure("throttled")
            return
        with self._lock:
            self.errors["throttled"] = self.errors.get("throttled", 0) + 1
            self._trial_in_flight = False

    def release(self) -> None:
        """A granted request was not made after all (the chunk came from elsewhere)."""
        with self._lock:
            self._trial_in_flight = False

    def retried(self) -> None:
        with self._lock:
            self.retries += 1

    def _answered(self) -> None:
        self.last_answer = self.clock()
        self.consecutive_failures = 0
        self.state = CLOSED
        self.cooldown = BASE_COOLDOWN
        self._trial_in_flight = False

    def _open(self, now: float, cooldown: float) -> None:
        self.state = OPEN
        self.cooldown = min(cooldown, MAX_COOLDOWN)
        self.open_until = now + self.cooldown
        self.times_opened += 1

    # ------------------------------------------------------------------ stats

    def p95(self, min_samples: int = 32) -> float | None:
        with self._lock:
            if len(self._latencies) < min_samples:
                return None
            return float(np.percentile(np.array(self._latencies, dtype=float), 95))

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {
                "state": self.state,
                "requests": self.requests,
                "chunks": self.chunks,
                "bytes": self.bytes,
                "not_found": self.not_found,
                "retries": self.retries,
                "errors": dict(self.errors),
                "times_opened": self.times_opened,
                "latency_ms": latency_ms(self._latencies, (50, 95, 99)),
            }
