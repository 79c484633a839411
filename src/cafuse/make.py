"""``cafuse make``: chunk an image, store its chunks, write its index.

The chunker runs on the calling thread over blocks read from the input; batches of
chunks go to worker threads that hash them, skip those the store already has, compress
and store the rest. Finished batches are appended to the index in order, and at most a
few batches per thread are in flight, so memory stays bounded whatever the image size.

On an object store make holds a store lock while it runs (``cafuse.locks``): a gc cannot
start meanwhile, and make refuses to start while a gc runs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .chunker import Block, ChunkSizes, cut_blocks, open_input
from .codec import compress
from .digest import flags_for_digest, hash_function
from .index import IndexWriter
from .locks import NoLock, StoreLock, store_lock
from .progress import Progress
from .sizes import format_size
from .stores import ChunkStore
from .stores.local import StoreFull

log = logging.getLogger(__name__)

BATCH_CHUNKS = 48


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
        return (
            f"{index_path}: {self.chunks} chunks, {self.unique} unique, "
            f"{self.new_chunks} new; {format_size(self.bytes_in)} in, "
            f"{format_size(self.stored_bytes)} stored; dedup {dedup:.2f}x, "
            f"compression {ratio:.2f}x; {rate:.0f} MB/s"
        )


@dataclass
class _BatchResult:
    ends: np.ndarray
    ids: np.ndarray
    new_chunks: int
    new_bytes: int
    stored_bytes: int


def make(
    index_path: str,
    input_path: str,
    store: ChunkStore,
    *,
    digest: str = "blake3",
    sizes: ChunkSizes,
    compression: str = "zstd",
    level: int = 3,
    threads: int | None = None,
    progress: bool | None = None,
    sync: bool = False,
) -> MakeResult:
    """Chunk ``input_path`` into ``store`` and write its index atomically.

    With ``sync`` the store's filesystem is flushed before the index is committed, so a
    power cut can never leave an index naming chunks that were lost (casync and desync
    do not do this; it costs the write-back time of every new chunk).
    """
    with store_lock(store, "make") as lock:
        return _make(
            index_path,
            input_path,
            store,
            lock,
            digest=digest,
            sizes=sizes,
            compression=compression,
            level=level,
            threads=threads,
            progress=progress,
            sync=sync,
        )


def _make(
    index_path: str,
    input_path: str,
    store: ChunkStore,
    lock: StoreLock | NoLock,
    *,
    digest: str,
    sizes: ChunkSizes,
    compression: str,
    level: int,
    threads: int | None,
    progress: bool | None,
    sync: bool,
) -> MakeResult:
    hash_chunk = hash_function(digest)
    threads = threads or os.cpu_count() or 2
    # a local store refreshes a reused chunk's mtime (touch), which keeps a concurrent gc
    # off it; an object store's touch only asks, and the store lock keeps gc away
    touch = getattr(store, "touch", None)
    bare = compression == "none"

    def reuse(chunk_id: bytes) -> bool:
        return touch(chunk_id, bare=bare) if touch is not None else store.has(chunk_id)

    remove_stale_temps = getattr(store, "remove_stale_temps", None)
    if remove_stale_temps is not None:
        remove_stale_temps()
    result = MakeResult()
    started = time.monotonic()
    storing: set[bytes] = set()  # ids being stored right now, by any thread
    storing_lock = threading.Lock()

    def process(block: Block, spans: list[tuple[int, int]]) -> _BatchResult:
        ids: list[bytes] = []
        new_chunks = new_bytes = stored_bytes = 0
        view = memoryview(block.data)
        for offset, length in spans:
            data = view[offset : offset + length]
            chunk_id = hash_chunk(data)
            ids.append(chunk_id)
            # A chunk repeated in the image may be in two threads at once: only one stores
            # it (an object store's has-then-put is not atomic, so both would upload it).
            with storing_lock:
                if chunk_id in storing:
                    continue
                storing.add(chunk_id)
            try:
                if reuse(chunk_id):
                    continue
                blob = compress(data, compression, level)
                if store.put(chunk_id, blob):
                    new_chunks += 1
                    new_bytes += length
                    stored_bytes += len(blob)
            finally:
                with storing_lock:
                    storing.discard(chunk_id)
        ends = np.array([offset + length for offset, length in spans], dtype=np.uint64)
        ends += np.uint64(block.offset)
        id_array = np.frombuffer(b"".join(ids), dtype=np.uint8).reshape(-1, 32)
        return _BatchResult(ends, id_array, new_chunks, new_bytes, stored_bytes)

    image_size = 0
    try:
        with (
            open_input(input_path) as (fd, size),
            IndexWriter(
                index_path, flags_for_digest(digest), sizes.min, sizes.avg, sizes.max
            ) as writer,
            ThreadPoolExecutor(threads, thread_name_prefix="make") as pool,
        ):
            image_size = size
            bar = Progress(size, "make", progress)
            pending: deque[Future[_BatchResult]] = deque()
            keys: list[np.ndarray] = []

            def collect(future: Future[_BatchResult]) -> None:
                batch = future.result()
                lock.check()  # the store lock still held (no request)
                writer.append(batch.ends, batch.ids)
                keys.append(np.ascontiguousarray(batch.ids[:, :8]).view("<u8").reshape(-1))
                result.chunks += len(batch.ends)
                result.new_chunks += batch.new_chunks
                result.new_bytes += batch.new_bytes
                result.stored_bytes += batch.stored_bytes
                bar.update(int(batch.ends[-1]) - result.bytes_in)
                result.bytes_in = int(batch.ends[-1])

            for block in cut_blocks(fd, size, sizes):
                for lo in range(0, len(block.spans), BATCH_CHUNKS):
                    pending.append(pool.submit(process, block, block.spans[lo : lo + BATCH_CHUNKS]))
                    while len(pending) > 4 * threads:
                        collect(pending.popleft())
            while pending:
                collect(pending.popleft())
            bar.close()
            if sync:
                store.sync()
            lock.verify()  # no index naming chunks a gc may have deleted
            writer.commit()
    except StoreFull as exc:
        free = exc.free if exc.free is not None else "free space unknown"
        raise StoreFull(
            f"store {store.url}: no space left on device (the image is "
            f"{format_size(image_size)} before compression, this run stored "
            f"{format_size(result.stored_bytes)}; {free}): free some space or use "
            "another --store",
            exc.free,
        ) from None
    result.unique = len(np.unique(np.concatenate(keys))) if keys else 0
    result.seconds = time.monotonic() - started
    log.info(result.summary(index_path))
    return result
