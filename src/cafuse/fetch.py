"""The one path every job takes for a chunk: sources in order, verify, decompress.

Local sources first, in this order: seeds (local bytes, no decompression), the local cache,
local stores. They answer at once and never wait behind the network. Then the remote stores,
through the router: one deadline per chunk, retries across stores, store health. Every copy
is checked against its id before it is used. A corrupt local copy is skipped (it will not
get better by asking again); a corrupt network copy is a bad transfer and is retried.

Blocking: call from worker threads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence

from .codec import Uncompressed, decompress
from .digest import HashFn, hash_function
from .errors import ChunkUnavailable, Failure
from .seed import Seed
from .stats import FetchStats
from .stores import CacheStore, ChunkStore, FailoverGroup, RetryPolicy, StoreError
from .stores.router import RemoteRouter

log = logging.getLogger(__name__)


def decode(blob: bytes, chunk_id: bytes, size: int, hash_chunk: HashFn) -> bytes:
    """Decompress a stored chunk and check it is the ``size`` bytes its id names.

    Raises ``ValueError`` saying what is wrong with it.
    """
    try:
        data = decompress(blob, size)
        if len(data) == size and hash_chunk(data) == chunk_id:
            return data
        problem = "digest mismatch"
    except ValueError as exc:
        problem = str(exc)
    # a raw chunk under a .cacnk name whose data begins with compression magic, as cafuse
    # before bare files wrote it: its digest says whether it is one
    if not isinstance(blob, Uncompressed) and len(blob) == size and hash_chunk(blob) == chunk_id:
        return blob
    raise ValueError(problem)


def max_stored_size(chunk_max: int) -> int:
    """The most bytes a stored chunk of at most ``chunk_max`` bytes can take: the data,
    plus the worst-case expansion of zstd, xz or gzip on incompressible input."""
    return chunk_max + chunk_max // 32 + 4096


class ChunkSource:
    def __init__(
        self,
        digest: str,
        stores: Sequence[ChunkStore],
        seeds: Sequence[Seed] = (),
        stats: FetchStats | None = None,
        cache: CacheStore | None = None,
        policy: RetryPolicy | None = None,
        chunk_max: int | None = None,
    ) -> None:
        self.digest = digest
        self.hash = hash_function(digest)
        self.stores = list(stores)
        self.seeds = list(seeds)
        self.stats = stats or FetchStats()
        self.cache = cache
        self.policy = policy or RetryPolicy()
        tiers: list[list[ChunkStore]] = []
        self.local_stores: list[ChunkStore] = []
        for store in self.stores:
            members = store.members if isinstance(store, FailoverGroup) else [store]
            self.local_stores += [m for m in members if m.is_local]
            tiers.append([m for m in members if not m.is_local])
        if chunk_max is not None:  # no chunk file or response is read past this
            bounded = [*self.local_stores, *(m for tier in tiers for m in tier)]
            for member in [*bounded, *([cache] if cache is not None else [])]:
                member.max_blob_size = max_stored_size(chunk_max)  # type: ignore[attr-defined]
        self.router = RemoteRouter(tiers, self.policy)
        self._kept: tuple[bytes, bytes, bytes, str] | None = None  # the start-up probe's

    @property
    def has_remote(self) -> bool:
        return bool(self.router)

    def deadline(self) -> float:
        return time.monotonic() + self.policy.timeout

    def get(self, chunk_id: bytes, size: int, deadline: float | None = None) -> tuple[bytes, str]:
        """Verified data of a chunk of ``size`` bytes, and the name of the source it came
        from; ChunkUnavailable when no source delivers by ``deadline``."""
        failures: list[Failure] = []
        found = self.get_local(chunk_id, size, failures)
        if found is not None:
            return found
        return self.get_remote(
            chunk_id, size, self.deadline() if deadline is None else deadline, failures
        )

    def get_local(
        self, chunk_id: bytes, size: int, failures: list[Failure] | None = None
    ) -> tuple[bytes, str] | None:
        """From seeds, the cache or local stores, or None: never touches the network."""
        kept = self._kept
        if kept is not None and kept[0] == chunk_id:
            self._kept = None
            _, data, blob, origin = kept
            self._to_cache(chunk_id, blob)
            return data, origin
        data = self._from_seeds(chunk_id, size)
        if data is not None:
            return data, "seed"
        if self.cache is not None:
            data = self._from_cache(chunk_id, size)
            if data is not None:
                return data, self.cache.url
        for store in self.local_stores:
            data = self._from_local_store(store, chunk_id, size, failures)
            if data is not None:
                return data, store.url
        return None

    def get_remote(
        self,
        chunk_id: bytes,
        size: int,
        deadline: float,
        failures: list[Failure] | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> tuple[bytes, str]:
        """From the remote stores, by ``deadline``, or ChunkUnavailable."""
        failures = failures if failures is not None else []
        if not self.router:
            self.stats.error("unavailable")
            raise ChunkUnavailable(chunk_id, failures)
        started = time.monotonic()
        try:
            data, blob, store = self.router.fetch(
                chunk_id, deadline, lambda blob: decode(blob, chunk_id, size, self.hash), cancel
            )
        except ChunkUnavailable as exc:
            if "cancelled" not in exc.kinds:
                self.stats.error("unavailable")
            raise ChunkUnavailable(chunk_id, failures + exc.failures) from None
        self.stats.latency(time.monotonic() - started)
        self.stats.add(store.url, size, len(blob))
        self._to_cache(chunk_id, blob)
        return data, store.url

    def probe(self, chunk_id: bytes, size: int, deadline: float) -> None:
        """Fetch one chunk from every remote store at once and hold the first good copy for
        the next ``get`` of it, which files it in the cache (the job counts it as its own);
        ChunkUnavailable with every store's reason when none delivers. A dead first store
        so costs the start-up nothing when another store answers."""
        answers: queue.Queue[tuple[bytes, bytes, ChunkStore] | ChunkUnavailable] = queue.Queue()

        def ask(store: ChunkStore) -> None:
            try:
                answers.put(
                    self.router.fetch(
                        chunk_id,
                        deadline,
                        lambda blob: decode(blob, chunk_id, size, self.hash),
                        only=store,
                    )
                )
            except ChunkUnavailable as exc:
                answers.put(exc)
            except BaseException as exc:  # a bug must not leave the start-up waiting
                answers.put(ChunkUnavailable(chunk_id, [Failure(store.url, "error", str(exc))]))
                raise

        for store in self.router.stores:  # daemon threads: a stalled one must not hold exit
            threading.Thread(target=ask, args=(store,), daemon=True).start()
        failures: list[Failure] = []
        for _ in self.router.stores:
            answer = answers.get()
            if isinstance(answer, ChunkUnavailable):
                failures += answer.failures
                continue
            data, blob, store = answer
            self.stats.add(store.url, size, len(blob))
            self._kept = (chunk_id, data, blob, store.url)
            return
        raise ChunkUnavailable(chunk_id, failures)

    def _to_cache(self, chunk_id: bytes, blob: bytes) -> None:
        if self.cache is not None:
            try:
                self.cache.put(chunk_id, blob)
            except StoreError as exc:
                log.warning("%s", exc)
                self.stats.error("cache write")

    def verify(self, chunk_id: bytes, data: bytes | memoryview, size: int) -> bool:
        return len(data) == size and self.hash(data) == chunk_id

    def _from_seeds(self, chunk_id: bytes, size: int) -> bytes | None:
        for seed in self.seeds:
            i = seed.find(chunk_id)
            if i is None:
                continue
            data = seed.read(i)
            if self.verify(chunk_id, data, size):
                self.stats.add(seed.name, size)
                return data
            log.warning(
                "seed %s: chunk %s no longer matches its index, ignored", seed.path, chunk_id.hex()
            )
            self.stats.error("seed mismatch")
        return None

    def _from_cache(self, chunk_id: bytes, size: int) -> bytes | None:
        """A cached copy, verified; a corrupt one is deleted so the stores refill it."""
        assert self.cache is not None
        try:
            blob = self.cache.get(chunk_id)
        except StoreError as exc:
            log.warning("%s", exc)
            return None
        if blob is None:
            return None
        try:
            data = decode(blob, chunk_id, size, self.hash)
        except ValueError:
            pass
        else:
            self.stats.add(self.cache.url, size, len(blob))
            return data
        log.warning(
            "cache %s: chunk %s was corrupt, refetching it", self.cache.root, chunk_id.hex()
        )
        self.stats.error("cache repaired")
        self.cache.delete(chunk_id)
        return None

    def _from_local_store(
        self, store: ChunkStore, chunk_id: bytes, size: int, failures: list[Failure] | None
    ) -> bytes | None:
        """A verified copy from a local store; a corrupt one stays corrupt: not retried."""
        try:
            blob = store.get(chunk_id)
        except StoreError as exc:
            self.stats.error("store error")
            if failures is not None:
                failures.append(Failure(store.url, exc.kind, str(exc)))
            return None
        if blob is None:
            if failures is not None:
                failures.append(Failure(store.url, "not found", f"not in {store.url}"))
            return None
        try:
            data = decode(blob, chunk_id, size, self.hash)
        except ValueError as exc:
            problem = f"corrupt in {store.url} ({exc})"
            log.info("chunk %s %s", chunk_id.hex(), problem)
            self.stats.error("corrupt")
            if failures is not None:
                failures.append(Failure(store.url, "corrupt", problem))
            return None
        self.stats.add(store.url, size, len(blob))
        self._to_cache(chunk_id, blob)  # a local store may be a network mount or a USB disk
        return data

    def store_stats(self) -> dict[str, object]:
        return self.router.snapshot()
