"""``cafuse cache``: fetch every chunk an index needs into the local cache, so that mount
and extract work with the network gone. Resumable: chunks already cached are skipped."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .chunktable import ChunkTable
from .errors import CafuseError, ChunkUnavailable
from .fetch import ChunkSource
from .progress import Progress
from .sizes import fetched_text, format_size
from .stores import CacheStore
from .tablepass import distinct_batches


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
    index: ChunkTable, source: ChunkSource, *, threads: int = 16, progress: bool | None = None
) -> CacheReport:
    cache = source.cache
    if cache is None:
        raise CafuseError("no --cache DIR given")
    report = CacheReport()
    bar = Progress(index.blob_size, "cache", progress)
    first_error: list[str] = []

    def one(job: tuple[bytes, int]) -> tuple[str, int]:
        chunk_id, size = job
        if cache.has(chunk_id):
            return "already", size
        try:
            _, origin = source.get(chunk_id, size)
        except ChunkUnavailable as exc:
            if not first_error:
                first_error.append(str(exc))
            return "failed", size
        return ("already" if origin == cache.url else "fetched"), size

    # a pass in batches: the chunks each batch adds, fetched before the next batch is read
    with ThreadPoolExecutor(threads, thread_name_prefix="cache") as pool:
        for covered, batch in distinct_batches(index, skip_zero=True):
            jobs = [(batch.chunk_id(j), int(batch.sizes[j])) for j in range(len(batch))]
            report.chunks += len(jobs)
            for verdict, size in pool.map(one, jobs, chunksize=16):
                if verdict == "already":
                    report.already += 1
                elif verdict == "fetched":
                    report.fetched += 1
                    report.fetched_bytes += size
                else:
                    report.failed += 1
            bar.update(covered)  # bytes of the image gone through
    bar.close()
    report.fetched_stored_bytes = sum(
        c.stored_bytes for name, c in source.stats.origins.items() if name != cache.url
    )
    if report.failed:
        raise CafuseError(
            f"{report.failed} of {report.chunks} chunks could not be cached "
            f"(first: {first_error[0]}); run cafuse cache again to resume"
        )
    _check_all_cached(index, cache, threads)
    return report


def _check_all_cached(index: ChunkTable, cache: CacheStore, threads: int) -> None:
    """Fail when chunks were evicted again (a cache bound smaller than the image), saying
    how much actually stayed: an offline mount or extract would not find the rest."""
    chunks = present = kept = total = 0
    with ThreadPoolExecutor(threads, thread_name_prefix="cache-check") as pool:
        for _, batch in distinct_batches(index, skip_zero=True):
            found = np.array(
                list(
                    pool.map(
                        lambda j, batch=batch: cache.has(batch.chunk_id(j)),
                        range(len(batch)),
                        chunksize=64,
                    )
                ),
                dtype=bool,
            )
            chunks += len(batch)
            present += int(found.sum())
            kept += int(batch.sizes[found].sum())
            total += int(batch.sizes.sum())
    if present == chunks:
        return
    raise CafuseError(
        f"cache {cache.root}: only {present} of {chunks} chunks "
        f"({format_size(kept)} of {format_size(total)}) stayed cached: --cache-size "
        f"{format_size(cache.max_bytes)} is too small for this image (up to "
        f"{format_size(total)} before compression); raise --cache-size and run again"
    )
