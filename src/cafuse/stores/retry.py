"""Retries for transient store errors: exponential backoff with full jitter, bounded by a
deadline and an attempt count."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .base import StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")


class TransientStoreError(StoreError):
    """Worth retrying: network trouble, a timeout, a 5xx answer."""


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 4
    timeout: float = 30.0  # seconds for one chunk, all attempts included
    initial_backoff: float = 0.05
    max_backoff: float = 2.0

    def run(self, what: str, attempt: Callable[[float], T]) -> T:
        """Call ``attempt(seconds_left)`` until it succeeds, a non-transient error, or the
        retries or the deadline run out (then the last error is raised)."""
        deadline = time.monotonic() + self.timeout
        for n in range(self.retries + 1):
            left = deadline - time.monotonic()
            try:
                return attempt(max(left, 0.001))
            except TransientStoreError as exc:
                left = deadline - time.monotonic()
                if n == self.retries or left <= 0:
                    raise
                pause = min(random.uniform(0, self.initial_backoff * 2**n), self.max_backoff, left)
                log.info("%s: %s; retry %d/%d in %.2f s", what, exc, n + 1, self.retries, pause)
                time.sleep(pause)
        raise AssertionError("unreachable")
