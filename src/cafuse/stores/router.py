"""Remote stores for the chunk fetch path: the ``--store`` order, failover groups, one
deadline per chunk, retries across stores, and each store's health.

Stores sit in tiers: each ``--store`` is a tier, tried in the order given; the members of
a failover group ``A|B`` share a tier and the fastest healthy one goes first. A fetch goes
round the tiers:

- a store that answers "not found" (404) is not asked again for that chunk; when every store
  said so, the chunk is unavailable at once, without retries;
- a transient failure (connection, timeout, 5xx, a cut or corrupt body) hands over to the
  next store at once; when a whole round failed, the next round waits a backoff with full
  jitter, a longer one after "slow down" (429/503); at most ``retries`` rounds;
- a permanent failure (401, 403, other 4xx, a bad URL) drops the store for this chunk;
- a store whose circuit breaker is open is skipped (see ``health.py``); when every store
  left is open and each failed this chunk already, the chunk gives up at once;
- every attempt is capped at the time left before the chunk's deadline, and nothing runs
  past it.

Blocking: call from worker threads. ``clock`` and ``sleep`` are injectable for tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from ..errors import ChunkUnavailable, Failure
from .base import ChunkStore, CorruptChunkError, StoreError, ThrottledStoreError
from .health import HALF_OPEN, StoreHealth
from .retry import RetryPolicy

log = logging.getLogger(__name__)

TRIAL_TIMEOUT = 2.0  # a half-open store gets this long (or 4x its usual latency) to answer

Decode = Callable[[bytes], bytes]  # stored bytes -> verified data; ValueError when corrupt


class RemoteRouter:
    def __init__(
        self,
        tiers: Sequence[Sequence[ChunkStore]],
        policy: RetryPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.tiers = [list(tier) for tier in tiers if tier]
        self.policy = policy or RetryPolicy()
        self.clock = clock
        self.sleep = sleep
        self.stores = [store for tier in self.tiers for store in tier]
        # dead means: no answer for half a request timeout (a stall shorter than that, as
        # a congested link makes, is no reason to give up on a store)
        silence = self.policy.attempt_timeout(self.policy.timeout) / 2
        self.health = {id(store): StoreHealth(store.url, clock, silence) for store in self.stores}

    def __bool__(self) -> bool:
        return bool(self.stores)

    def health_of(self, store: ChunkStore) -> StoreHealth:
        return self.health[id(store)]

    def fetch(
        self,
        chunk_id: bytes,
        deadline: float,
        decode: Decode,
        cancel: threading.Event | None = None,
        only: ChunkStore | None = None,
    ) -> tuple[bytes, bytes, ChunkStore]:
        """(data, stored bytes, store) of a verified copy, or ChunkUnavailable. Setting
        ``cancel`` stops the fetch after the request under way (a hedge lost the race);
        ``only`` asks that one store alone."""
        throttled: ThrottledStoreError | None
        failures: list[Failure] = []
        # stores out of the running for this chunk
        done: set[int] = {id(s) for s in self.stores if only is not None and s is not only}
        failed: set[int] = set()  # stores that failed this chunk (transiently) at least once
        out_of_time = Failure(
            "", "deadline", f"gave up after {self.policy.timeout:g} s (--timeout)"
        )
        retry = 0
        while True:
            attempted, throttled = False, None
            for store in self._candidates(done):
                if cancel is not None and cancel.is_set():
                    failures.append(Failure("", "cancelled", "fetched by another request"))
                    raise ChunkUnavailable(chunk_id, failures)
                timeout = self.policy.attempt_timeout(deadline - self.clock())
                if timeout <= 0.001:
                    raise ChunkUnavailable(chunk_id, [*failures, out_of_time])
                health = self.health_of(store)
                if not health.acquire():
                    continue
                if health.state == HALF_OPEN:
                    usual = health.ewma_latency or 0.0
                    timeout = min(timeout, max(TRIAL_TIMEOUT, 4 * usual))
                attempted = True
                outcome = self._attempt(store, health, chunk_id, timeout, decode, failures)
                if isinstance(outcome, tuple):
                    return outcome
                if outcome in ("not found", "permanent"):
                    done.add(id(store))
                else:
                    failed.add(id(store))
                    if isinstance(outcome, ThrottledStoreError):
                        throttled = throttled or outcome
            remaining = self._candidates(done)
            if not remaining:
                raise ChunkUnavailable(chunk_id, failures)
            if retry == self.policy.retries:
                failures.append(
                    Failure("", "deadline", f"gave up after {retry} retries (--retries)")
                )
                raise ChunkUnavailable(chunk_id, failures)
            retry += 1
            now = self.clock()
            if attempted:
                pause = self.policy.backoff(retry - 1, throttled)
                for store in remaining:
                    self.health_of(store).retried()
            else:  # every store left is resting (breaker open, or a trial under way)
                if not failures or failures[-1].kind != "circuit open":
                    failures.append(_resting(remaining))
                if all(id(s) in failed for s in remaining):
                    # each failed this very chunk and is now judged dead: waiting for its
                    # cool-down would only spend the rest of the deadline
                    raise ChunkUnavailable(chunk_id, failures)
                earliest = min(self.health_of(s).available_at() for s in remaining)
                pause = min(max(0.0, earliest - now), self.policy.max_backoff)
            if now + pause >= deadline:
                raise ChunkUnavailable(chunk_id, [*failures, out_of_time])
            if cancel is not None:
                cancel.wait(pause)
            else:
                self.sleep(pause)

    def _candidates(self, done: set[int]) -> list[ChunkStore]:
        out: list[ChunkStore] = []
        for tier in self.tiers:
            members = [s for s in tier if id(s) not in done]
            if len(members) > 1:
                members.sort(key=lambda s: self.health_of(s).score())
            out += members
        return out

    def _attempt(
        self,
        store: ChunkStore,
        health: StoreHealth,
        chunk_id: bytes,
        timeout: float,
        decode: Decode,
        failures: list[Failure],
    ) -> tuple[bytes, bytes, ChunkStore] | ThrottledStoreError | str:
        """One request: the result, the store's "slow down", or the outcome's kind."""
        started = self.clock()
        try:
            blob = store.get(chunk_id, timeout=timeout)  # type: ignore[call-arg]
        except ThrottledStoreError as exc:
            health.throttled(counts_as_failure=exc.status == 503)
            failures.append(Failure(store.url, "throttled", str(exc)))
            return exc
        except CorruptChunkError as exc:
            health.failure("corrupt")
            failures.append(Failure(store.url, "corrupt", str(exc)))
            return "corrupt"
        except StoreError as exc:
            health.failure(exc.kind)
            failures.append(Failure(store.url, exc.kind, str(exc)))
            log.info("chunk %s: %s", chunk_id.hex(), exc)
            return exc.kind
        except BaseException:
            health.release()
            raise
        if blob is None:
            health.missing()
            failures.append(Failure(store.url, "not found", f"not in {store.url}"))
            return "not found"
        try:
            data = decode(blob)
        except ValueError as exc:
            # a network copy that does not match its id is a bad transfer: retried
            health.failure("corrupt")
            failures.append(Failure(store.url, "corrupt", f"corrupt in {store.url} ({exc})"))
            log.info("chunk %s corrupt in %s (%s)", chunk_id.hex(), store.url, exc)
            return "corrupt"
        health.success(self.clock() - started, len(blob))
        return data, blob, store

    def typical_p95(self) -> float | None:
        """The best p95 latency among the stores with enough samples, or None."""
        values = [p for p in (self.health_of(s).p95() for s in self.stores) if p is not None]
        return min(values) if values else None

    def snapshot(self) -> dict[str, object]:
        return {store.url: self.health_of(store).snapshot() for store in self.stores}


def _resting(stores: list[ChunkStore]) -> Failure:
    names = ", ".join(s.url for s in stores)
    return Failure(
        names,
        "circuit open",
        f"{names}: not answering, skipped for now (failed repeatedly; tried again shortly)",
    )
