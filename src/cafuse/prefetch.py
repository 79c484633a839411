"""``cafuse cache``: fetch every chunk an index needs into the local cache, so that mount
and extract work with the network gone. Resumable: chunks already cached are skipped."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .errors import CafuseError, ChunkUnavailable
from .fetch import ChunkSource
from .index import Index
from .progress import Progress
from .sizes import format_size


@dataclass
class CacheReport:
    chunks: int = 0
    already: int = 0
    fetched: int = 0
    fetched_bytes: int = 0
    failed: int = 0

    def summary(self, cache: str) -> str:
        return (
            f"{cache}: {self.chunks} chunks needed, {self.already} already cached, "
            f"{self.fetched} fetched ({format_size(self.fetched_bytes)})"
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
    if report.failed:
        raise CafuseError(
            f"{report.failed} of {report.chunks} chunks could not be cached "
            f"(first: {first_error[0]}); run cafuse cache again to resume"
        )
    return report
