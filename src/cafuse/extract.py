"""``cafuse extract``: rebuild an image from its index, reading each distinct chunk once.

Chunks are grouped by id (one sort of the ids' 8-byte keys, vectorised), groups are handed
in blob order to worker threads, and each worker gets its chunk once (seeds first, then
stores, verified) and writes it at every position it occurs. Zero chunks are never fetched:
a new output is truncated to size, so they stay holes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .atomic import write_error
from .chunktable import Batch, ChunkTable, whole_table_step
from .fetch import ChunkSource
from .output import Output
from .progress import Progress
from .sizes import fetched_text, format_size

log = logging.getLogger(__name__)

BAD_COPY_KINDS = ("corrupt", "seed mismatch", "cache repaired")
GROUPS_PER_TASK = 64  # local sources: few, large tasks (a task costs a future and a hop)
GROUPS_PER_REMOTE_TASK = 2  # remote: a slow or retried chunk must not hold up 63 others


@dataclass
class ExtractResult:
    """Bytes of the image by where they came from."""

    from_seeds: int = 0
    from_output: int = 0
    from_stores: int = 0
    from_cache: int = 0
    zero: int = 0
    fetched_stored_bytes: int = 0
    bad_copies: int = 0  # corrupt chunks or stale seed bytes skipped for a good copy
    seconds: float = 0.0
    by_origin: dict[str, int] = field(default_factory=dict)

    def summary(self, path: str) -> str:
        fetched = self.from_stores + self.from_cache
        total = self.from_seeds + self.from_output + fetched + self.zero
        rate = total / self.seconds / 1e6 if self.seconds else 0.0
        return (
            f"{path}: {format_size(total)} written; from seeds "
            f"{format_size(self.from_seeds)}, already in output "
            f"{format_size(self.from_output)}, "
            + (f"from the cache {format_size(self.from_cache)}, " if self.from_cache else "")
            + f"from stores {format_size(self.from_stores)} (fetched: "
            f"{fetched_text(fetched, self.fetched_stored_bytes)}), zero "
            f"{format_size(self.zero)}; {rate:.0f} MB/s"
            + (f"; {self.bad_copies} bad copies skipped (see -v)" if self.bad_copies else "")
        )


def group_chunks(batch: Batch, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (in the batch) of the selected chunks grouped by id key, groups in blob
    order.

    Returns ``(positions, bounds)``: group g is ``positions[bounds[g]:bounds[g+1]]``.
    Chunks sharing a key but not the full id are told apart by the worker.
    """
    selected = np.flatnonzero(mask)
    if not len(selected):
        return selected, np.zeros(1, dtype=np.int64)
    keys = batch.id_keys()[selected]
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    is_start = np.empty(len(keys), dtype=bool)
    is_start[0] = True
    is_start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group_of = np.cumsum(is_start) - 1
    # the stable sort puts each group's smallest position first: order groups by it
    first_position = selected[order][is_start]
    final = np.lexsort((selected[order], first_position[group_of]))
    positions = selected[order][final]
    lengths = np.bincount(group_of)[np.argsort(first_position, kind="stable")]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return positions, bounds


class _Extractor:
    def __init__(self, output: Output, source: ChunkSource) -> None:
        self.output = output
        self.source = source

    def write_group(self, batch: Batch, positions: np.ndarray) -> dict[str, int]:
        """Fetch one chunk (or a rare key collision's several) and write it everywhere."""
        tally: dict[str, int] = {}
        have: dict[bytes, tuple[bytes, str]] = {}
        pending: list[tuple[int, bytes, int]] = []
        for pos in positions.tolist():
            chunk_id = batch.chunk_id(pos)
            size = int(batch.sizes[pos])
            start = int(batch.starts[pos])
            if self.output.reuses_content:
                existing = self.output.read(size, start)
                if self.source.verify(chunk_id, existing, size):
                    tally["output"] = tally.get("output", 0) + size
                    have.setdefault(chunk_id, (existing, "output"))
                    continue
            pending.append((start, chunk_id, size))
        for start, chunk_id, size in pending:
            if chunk_id not in have:
                have[chunk_id] = self.source.get(chunk_id, size)
            data, origin = have[chunk_id]
            tally[origin] = tally.get(origin, 0) + size
            self.output.write(data, start)
        return tally

    def write_zero(self, batch: Batch, positions: np.ndarray) -> int:
        """Zero chunks on an output that may hold old data: zero only what is not zero."""
        done = 0
        for pos in positions.tolist():
            size, start = int(batch.sizes[pos]), int(batch.starts[pos])
            if self.output.read(size, start).count(0) != size:
                self.output.zero(start, size)
            done += size
        return done


def extract(
    index: ChunkTable,
    output_path: str,
    source: ChunkSource,
    *,
    in_place: bool = False,
    threads: int = 8,
    progress: bool | None = None,
) -> ExtractResult:
    started = time.monotonic()
    result = ExtractResult()
    output = Output(output_path, index.blob_size, in_place)
    worker = _Extractor(output, source)
    bar = Progress(index.blob_size, "extract", progress)
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="extract") as pool:
            pending: deque[Future[dict[str, int]]] = deque()

            def collect(future: Future[dict[str, int]]) -> None:
                for origin, n in future.result().items():
                    result.by_origin[origin] = result.by_origin.get(origin, 0) + n
                    bar.update(n)

            # one batch when the table is in memory (each distinct chunk fetched once);
            # a huge table in bounded batches (a chunk repeated across batches is fetched
            # again, from the cache when there is one)
            for batch in index.batches(whole_table_step(index)):
                zero = batch.zero
                zero_bytes = int(batch.sizes[zero].sum())
                result.zero += zero_bytes
                if output.reuses_content:
                    zero_pos = np.flatnonzero(zero)
                    for lo in range(0, len(zero_pos), 4096):
                        worker.write_zero(batch, zero_pos[lo : lo + 4096])
                bar.update(zero_bytes)
                positions, bounds = group_chunks(batch, ~zero)

                def run(
                    lo: int,
                    hi: int,
                    batch: Batch = batch,
                    positions: np.ndarray = positions,
                    bounds: np.ndarray = bounds,
                ) -> dict[str, int]:
                    total: dict[str, int] = {}
                    for g in range(lo, hi):
                        for origin, n in worker.write_group(
                            batch, positions[bounds[g] : bounds[g + 1]]
                        ).items():
                            total[origin] = total.get(origin, 0) + n
                    return total

                groups = len(bounds) - 1
                step = GROUPS_PER_REMOTE_TASK if source.has_remote else GROUPS_PER_TASK
                for lo in range(0, groups, step):
                    pending.append(pool.submit(run, lo, min(lo + step, groups)))
                    while len(pending) > 4 * threads * (GROUPS_PER_TASK // step):
                        collect(pending.popleft())
            while pending:
                collect(pending.popleft())
    except OSError as exc:  # writing the output failed: a full disk, an I/O error
        output.abort()
        raise write_error(output_path, exc, needed=index.blob_size - result.zero) from None
    except BaseException:
        output.abort()
        raise
    bar.close()
    try:
        output.commit()
    except OSError as exc:
        output.abort()
        raise write_error(output_path, exc, needed=index.blob_size - result.zero) from None
    for origin, n in result.by_origin.items():
        if origin == "output":
            result.from_output += n
        elif origin == "seed":
            result.from_seeds += n
        elif origin.startswith("cache:"):
            result.from_cache += n
        else:
            result.from_stores += n
    result.fetched_stored_bytes = sum(c.stored_bytes for c in source.stats.origins.values())
    # copies passed over for a good one; not "unavailable" or a store's I/O error, which are
    # no copy at all (one corrupt file is one bad copy)
    result.bad_copies = sum(source.stats.errors.get(k, 0) for k in BAD_COPY_KINDS)
    result.seconds = time.monotonic() - started
    return result
