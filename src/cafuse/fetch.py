"""The one path every job takes for a chunk: sources in order, verify, decompress.

Seeds come first (local bytes, no decompression), then stores in the order given. Every
copy is checked against its id before it is used; a corrupt copy is fetched once more,
then the next source is tried. Blocking: call from worker threads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from .codec import decompress
from .digest import HashFn, hash_function
from .errors import ChunkUnavailable
from .seed import Seed
from .stats import FetchStats
from .stores import CacheStore, ChunkStore, StoreError

log = logging.getLogger(__name__)

ATTEMPTS_PER_STORE = 2  # a chunk failing verification is refetched once


def decode(blob: bytes, chunk_id: bytes, size: int, hash_chunk: HashFn) -> bytes:
    """Decompress a stored chunk and check it is the ``size`` bytes its id names.

    Raises ``ValueError`` saying what is wrong with it.
    """
    data = decompress(blob, size)
    if len(data) != size or hash_chunk(data) != chunk_id:
        raise ValueError("digest mismatch")
    return data


class ChunkSource:
    def __init__(
        self,
        digest: str,
        stores: Sequence[ChunkStore],
        seeds: Sequence[Seed] = (),
        stats: FetchStats | None = None,
        cache: CacheStore | None = None,
    ) -> None:
        self.digest = digest
        self.hash = hash_function(digest)
        self.stores = list(stores)
        self.seeds = list(seeds)
        self.stats = stats or FetchStats()
        self.cache = cache

    def get(self, chunk_id: bytes, size: int) -> tuple[bytes, str]:
        """Verified data of a chunk of ``size`` bytes, and the name of the source it came from."""
        started = time.monotonic()
        data = self._from_seeds(chunk_id, size)
        if data is not None:
            return data, "seed"
        if self.cache is not None:
            data = self._from_cache(chunk_id, size)
            if data is not None:
                return data, self.cache.url
        reasons: list[str] = []
        for store in self.stores:
            found = self._from_store(store, chunk_id, size, reasons)
            if found is not None:
                data, blob = found
                self.stats.latency(time.monotonic() - started)
                if self.cache is not None:
                    try:
                        self.cache.put(chunk_id, blob)
                    except StoreError as exc:
                        log.warning("%s", exc)
                        self.stats.error("cache write")
                return data, store.url
        self.stats.error("unavailable")
        raise ChunkUnavailable(chunk_id, reasons)

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

    def _from_store(
        self, store: ChunkStore, chunk_id: bytes, size: int, reasons: list[str]
    ) -> tuple[bytes, bytes] | None:
        """(data, blob as stored) of a verified copy from ``store``."""
        for attempt in range(ATTEMPTS_PER_STORE):
            try:
                blob = store.get(chunk_id)
            except StoreError as exc:
                reasons.append(str(exc))
                self.stats.error("store error")
                return None
            if blob is None:
                reasons.append(f"not in {store.url}")
                return None
            try:
                data = decode(blob, chunk_id, size, self.hash)
            except ValueError as exc:
                problem = f"corrupt in {store.url} ({exc})"
            else:
                self.stats.add(store.url, size, len(blob))
                return data, blob
            log.info("chunk %s %s", chunk_id.hex(), problem)
            self.stats.error("corrupt")
            if attempt == ATTEMPTS_PER_STORE - 1:
                reasons.append(problem)
        return None
