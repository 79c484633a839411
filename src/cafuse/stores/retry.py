"""The retry rules, in one place: one deadline per operation, attempts capped at the time
left, exponential backoff with full jitter, a store's own "slow down" honoured.

The chunk fetch path (``router.py``) applies them across stores; ``RetryPolicy.run`` applies
them to single-store operations (index downloads, uploads, listings).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .. import defaults
from .base import ThrottledStoreError, TransientStoreError

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT = defaults.TIMEOUT
DEFAULT_RETRIES = defaults.RETRIES
MIN_ATTEMPT_TIMEOUT = 1.0
# after a 429/503 whose Retry-After obstore does not show us: full jitter on a cap that
# starts above the usual one and doubles to THROTTLE_MAX_BACKOFF
THROTTLE_BACKOFF = 0.25
THROTTLE_MAX_BACKOFF = 4.0


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = DEFAULT_RETRIES  # retries of one chunk or operation, within ``timeout``
    timeout: float = DEFAULT_TIMEOUT  # seconds for one chunk, every store and attempt included
    initial_backoff: float = 0.05
    max_backoff: float = 2.0

    def attempt_timeout(self, left: float) -> float:
        """How long one request may take: a third of the deadline, so that a stalled request
        leaves time for two more tries, never past the time left."""
        return max(0.0, min(left, max(MIN_ATTEMPT_TIMEOUT, self.timeout / 3)))

    def backoff(self, retry: int, throttled: ThrottledStoreError | None = None) -> float:
        """Pause before retry number ``retry`` (0-based): full jitter over an exponentially
        growing cap, a larger one after "slow down", or what the store asked for."""
        if throttled is None:
            return random.uniform(0, min(self.max_backoff, self.initial_backoff * 2**retry))
        if throttled.retry_after is not None:
            return throttled.retry_after
        return random.uniform(0, min(THROTTLE_MAX_BACKOFF, THROTTLE_BACKOFF * 2**retry))

    def run(self, what: str, attempt: Callable[[float], T]) -> T:
        """Call ``attempt(seconds_for_this_try)`` until it succeeds, raises a non-transient
        error, or the retries or the deadline run out (then the last error is raised)."""
        deadline = time.monotonic() + self.timeout
        for n in range(self.retries + 1):
            left = deadline - time.monotonic()
            try:
                return attempt(max(self.attempt_timeout(left), 0.001))
            except TransientStoreError as exc:
                left = deadline - time.monotonic()
                pause = self.backoff(n, exc if isinstance(exc, ThrottledStoreError) else None)
                if n == self.retries or left <= pause:
                    raise
                log.info("%s: %s; retry %d/%d in %.2f s", what, exc, n + 1, self.retries, pause)
                time.sleep(pause)
        raise AssertionError("unreachable")
