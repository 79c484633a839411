"""``cafuse make``: chunk an image, store its chunks, write its index.

The chunker runs on the calling thread over a memory map; batches of chunks go to worker
threads that hash them, skip those the store already has, compress and store the rest.
Finished batches are appended to the index in order, and at most a few batches per thread
are in flight, so memory stays bounded whatever the image size.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .chunker import ChunkSizes, cut, mapped_input
from .codec import compress
from .digest import flags_for_digest, hash_function
from .index import IndexWriter
from .progress import Progress
from .sizes import format_size
from .stores import ChunkStore

log = logging.getLogger(__name__)

BATCH_BYTES = 4 << 20


@dataclass
class MakeResult:
    chunks: int = 0
    unique: int = 0
    new_chunks: int = 0
    bytes_in: int = 0
    new_bytes: int = 0  # uncompressed size of chunks this run added to the store
    stored_bytes: int = 0  # their compressed size
    seconds: float = 0.0

    def summary(self, index_path: str) -> str:
        dedup = self.chunks / self.unique if self.unique else 1.0
        ratio = self.new_bytes / self.stored_bytes if self.stored_bytes else 1.0
        rate = self.bytes_in / self.seconds / 1e6 if self.seconds else 0.0
        return (f"{index_path}: {self.chunks} chunks, {self.unique} unique, "
                f"{self.new_chunks} new; {format_size(self.bytes_in)} in, "
                f"{format_size(self.stored_bytes)} stored; dedup {dedup:.2f}x, "
                f"compression {ratio:.2f}x; {rate:.0f} MB/s")


@dataclass
class _BatchResult:
    ends: np.ndarray
    ids: np.ndarray
    new_chunks: int
    new_bytes: int
    stored_bytes: int


def make(index_path: str, input_path: str, store: ChunkStore, *, digest: str = "blake3",
         sizes: ChunkSizes, compression: str = "zstd", level: int = 3,
         threads: int | None = None, progress: bool | None = None) -> MakeResult:
    hash_chunk = hash_function(digest)
    threads = threads or os.cpu_count() or 2
    result = MakeResult()
    started = time.monotonic()

    def process(view: memoryview, spans: list[tuple[int, int]]) -> _BatchResult:
        ids = np.empty((len(spans), 32), dtype=np.uint8)
        ends = np.empty(len(spans), dtype=np.uint64)
        new_chunks = new_bytes = stored_bytes = 0
        for row, (offset, length) in enumerate(spans):
            data = view[offset:offset + length]
            chunk_id = hash_chunk(data)
            ids[row] = np.frombuffer(chunk_id, dtype=np.uint8)
            ends[row] = offset + length
            if store.has(chunk_id):
                continue
            blob = compress(data, compression, level)
            if store.put(chunk_id, blob):
                new_chunks += 1
                new_bytes += length
                stored_bytes += len(blob)
        return _BatchResult(ends, ids, new_chunks, new_bytes, stored_bytes)

    with mapped_input(input_path) as view, \
            IndexWriter(index_path, flags_for_digest(digest), sizes.min, sizes.avg,
                        sizes.max) as writer, \
            ThreadPoolExecutor(threads, thread_name_prefix="make") as pool:
        bar = Progress(len(view), "make", progress)
        pending: deque[Future[_BatchResult]] = deque()
        keys: list[np.ndarray] = []

        def collect(future: Future[_BatchResult]) -> None:
            batch = future.result()
            writer.append(batch.ends, batch.ids)
            keys.append(np.ascontiguousarray(batch.ids[:, :8]).view("<u8").reshape(-1))
            result.chunks += len(batch.ends)
            result.new_chunks += batch.new_chunks
            result.new_bytes += batch.new_bytes
            result.stored_bytes += batch.stored_bytes
            bar.update(int(batch.ends[-1]) - result.bytes_in)
            result.bytes_in = int(batch.ends[-1])

        spans: list[tuple[int, int]] = []
        batch_bytes = 0
        for span in cut(view, sizes):
            spans.append(span)
            batch_bytes += span[1]
            if batch_bytes >= BATCH_BYTES:
                pending.append(pool.submit(process, view, spans))
                spans, batch_bytes = [], 0
                while len(pending) > 2 * threads:
                    collect(pending.popleft())
        if spans:
            pending.append(pool.submit(process, view, spans))
        while pending:
            collect(pending.popleft())
        bar.close()
        store.sync()  # chunks durable before the index that names them appears
        writer.commit()
    result.unique = len(np.unique(np.concatenate(keys))) if keys else 0
    result.seconds = time.monotonic() - started
    log.info(result.summary(index_path))
    return result
