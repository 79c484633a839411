"""``cafuse cache``: fetch every chunk an index needs into the local cache, so that mount
and extract work with the network gone. Resumable: chunks already cached are skipped."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .errors import CafuseError, ChunkUnavailable
from .fetch import ChunkSource
from .index import Index
from .progress import Progress
from .sizes import fetched_text, format_size
from .stores import CacheStore


@dataclass
class CacheReport:
    chunks: int = 0
    already: int = 0
    fetched: int = 0
    fetched_bytes: int = 0
    fetched_stored_bytes: int = 0
    failed: int = 0

    def summary(self, cache: str) -> str:
        return (
            f"{cache}: {self.chunks} chunks needed, {self.already} already cached, "
            f"{self.fetched} fetched "
            f"({fetched_text(self.fetched_bytes, self.fetched_stored_bytes)})"
        )


def fill_cache(
    index: Index, source: ChunkSource, *, threads: int = 16, progress: bool | None = None
) -> CacheReport:
    cache = source.cache
    if cache is None:
        raise CafuseError("no --cache DIR given")
    positions = index.distinct_positions()
    positions = positions[~index.zero_mask[positions]]
    report = CacheReport(chunks=len(positions))
    bar = Progress(int(index.sizes[positions].sum()), "cache", progress)
    first_error: list[str] = []

    def one(pos: int) -> tuple[str, int]:
        chunk_id = index.chunk_id(pos)
        start, end = index.span(pos)
        if cache.has(chunk_id):
            return "already", end - start
        try:
            _, origin = source.get(chunk_id, end - start)
        except ChunkUnavailable as exc:
            if not first_error:
                first_error.append(str(exc))
            return "failed", end - start
        return ("already" if origin == cache.url else "fetched"), end - start

    with ThreadPoolExecutor(threads, thread_name_prefix="cache") as pool:
        for verdict, size in pool.map(one, positions.tolist(), chunksize=16):
            bar.update(size)
            if verdict == "already":
                report.already += 1
            elif verdict == "fetched":
                report.fetched += 1
                report.fetched_bytes += size
            else:
                report.failed += 1
    bar.close()
    report.fetched_stored_bytes = sum(
        c.stored_bytes for name, c in source.stats.origins.items() if name != cache.url
    )
    if report.failed:
        raise CafuseError(
            f"{report.failed} of {report.chunks} chunks could not be cached "
            f"(first: {first_error[0]}); run cafuse cache again to resume"
        )
    _check_all_cached(index, positions, cache, threads)
    return report


def _check_all_cached(index: Index, positions: np.ndarray, cache: CacheStore, threads: int) -> None:
    """Fail when chunks were evicted again (a cache bound smaller than the image), saying
    how much actually stayed: an offline mount or extract would not find the rest."""
    with ThreadPoolExecutor(threads, thread_name_prefix="cache-check") as pool:
        present = list(
            pool.map(lambda pos: cache.has(index.chunk_id(pos)), positions.tolist(), chunksize=64)
        )
    mask = np.array(present, dtype=bool)
    if mask.all():
        return
    sizes = index.sizes[positions]
    kept, total = int(sizes[mask].sum()), int(sizes.sum())
    raise CafuseError(
        f"cache {cache.root}: only {int(mask.sum())} of {len(positions)} chunks "
        f"({format_size(kept)} of {format_size(total)}) stayed cached: --cache-size "
        f"{format_size(cache.max_bytes)} is too small for this image (up to "
        f"{format_size(total)} before compression); raise --cache-size and run again"
    )
