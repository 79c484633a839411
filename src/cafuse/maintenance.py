"""``cafuse info``, ``verify`` and ``gc``: look at an index and keep a store healthy."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from .chunktable import ChunkTable, whole_table_step
from .codec import decompress
from .digest import hash_function
from .errors import CafuseError
from .fetch import decode
from .locks import LockEntry, NoLock, StoreLock, blocking_locks, store_lock
from .progress import Progress
from .sizes import format_duration
from .stores import ChunkStore, StoreError, chunk_path
from .stores.base import Uncompressed
from .stores.local import MAX_CHUNK_SIZE, CorruptChunk
from .tablepass import INFO_DISTINCT_CAP, DistinctKeys, SizeHistogram, distinct_batches

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


def index_info(index: ChunkTable) -> dict[str, object]:
    """Header fields and statistics, from one pass over the table in batches."""
    distinct = DistinctKeys(cap=INFO_DISTINCT_CAP)
    sizes = SizeHistogram(index.chunk_max)
    unique_bytes = zero_chunks = zero_bytes = 0
    for batch in index.batches(whole_table_step(index)):
        batch_sizes = batch.sizes
        unique_bytes += int(batch_sizes[distinct.first_seen(batch)].sum())
        zero_chunks += int(batch.zero.sum())
        zero_bytes += int(batch_sizes[batch.zero].sum())
        sizes.add(batch_sizes)
    info: dict[str, object] = {
        "digest": index.digest,
        "flags": f"{index.flags:#018x}",
        "chunk_size_min": index.chunk_min,
        "chunk_size_avg": index.chunk_avg,
        "chunk_size_max": index.chunk_max,
        "chunks": index.chunk_count,
        "blob_size": index.blob_size,
        "unique_chunks": distinct.count,
        "unique_bytes": unique_bytes,
        "zero_chunks": zero_chunks,
        "zero_bytes": zero_bytes,
    }
    if distinct.full:
        info["unique_note"] = (
            f"counted up to {distinct.count} distinct ids (memory bound): "
            "unique_chunks and unique_bytes are at least these"
        )
    if index.chunk_count:
        info["chunk_sizes"] = sizes.summary()
    return info


def store_presence(index: ChunkTable, store: ChunkStore, threads: int = 16) -> dict[str, int]:
    """How many distinct chunks the store has and lacks (existence only, not contents)."""
    present = total = 0
    with ThreadPoolExecutor(threads) as pool:
        for _, batch in distinct_batches(index):
            total += len(batch)
            present += sum(
                pool.map(
                    lambda j, batch=batch: store.has(batch.chunk_id(j)),
                    range(len(batch)),
                    chunksize=256,
                )
            )
    return {"present": int(present), "missing": total - int(present)}


@dataclass
class VerifyReport:
    checked: int = 0
    missing: list[bytes] = field(default_factory=list)
    corrupt: list[bytes] = field(default_factory=list)
    corrupt_copies: list[str] = field(default_factory=list)  # store paths of corrupt files
    unreadable: list[bytes] = field(default_factory=list)  # the store failed to answer
    first_error: str = ""  # why the first unreadable chunk could not be read
    repaired: int = 0


def _tally(
    report: VerifyReport, store: ChunkStore, chunk_id: bytes, bare: bool, verdict: str, repair: bool
) -> None:
    """Count one chunk's verdict ("ok", "missing", "corrupt" or "error: ..."), deleting a
    corrupt copy when repairing."""
    report.checked += 1
    if verdict == "missing":
        report.missing.append(chunk_id)
    elif verdict == "corrupt":
        report.corrupt.append(chunk_id)
        report.corrupt_copies.append(chunk_path(chunk_id, bare))
        log.info("chunk %s corrupt", chunk_id.hex())
        if repair:
            _delete_copy(store, chunk_id, bare)
            report.repaired += 1
    elif verdict != "ok":
        report.unreadable.append(chunk_id)
        report.first_error = report.first_error or verdict.removeprefix("error: ")
        log.info("chunk %s %s", chunk_id.hex(), verdict)


def _delete_copy(store: ChunkStore, chunk_id: bytes, bare: bool) -> None:
    """Delete one bad copy; a store that cannot tell copies apart deletes the chunk."""
    delete_copy = getattr(store, "delete_copy", None)
    if delete_copy is not None:
        delete_copy(chunk_id, bare)
    else:
        store.delete(chunk_id)


def verify_store(
    index: ChunkTable,
    store: ChunkStore,
    *,
    repair: bool = False,
    threads: int = 8,
    progress: bool | None = None,
) -> VerifyReport:
    """Read every distinct chunk the index names, decompress it and check its digest.

    The copy checked is the one readers get (``.cacnk`` before bare). ``repair`` deletes
    that copy only when it is corrupt, never a good copy beside it. One pass over the
    table in batches; progress is in bytes of the image.
    """
    hash_chunk = hash_function(index.digest)
    seen = DistinctKeys(cap=INFO_DISTINCT_CAP)
    report = VerifyReport()
    bar = Progress(index.blob_size, "verify", progress)

    def check(job: tuple[bytes, int]) -> tuple[bytes, str, bool]:
        chunk_id, size = job
        try:
            blob = store.get(chunk_id)
        except CorruptChunk as exc:
            log.info("%s", exc)
            return chunk_id, "corrupt", False
        except StoreError as exc:
            return chunk_id, f"error: {exc}", False
        if blob is None:
            return chunk_id, "missing", False
        bare = isinstance(blob, Uncompressed)
        try:
            decode(blob, chunk_id, size, hash_chunk)
        except ValueError:
            return chunk_id, "corrupt", bare
        return chunk_id, "ok", bare

    with ThreadPoolExecutor(threads) as pool:
        for batch in index.batches(whole_table_step(index)):
            keep = seen.first_seen(batch)
            jobs = [(batch.chunk_id(j), int(batch.sizes[j])) for j in keep.tolist()]
            for chunk_id, verdict, bare in pool.map(check, jobs, chunksize=64):
                _tally(report, store, chunk_id, bare, verdict, repair)
            bar.update(int(batch.sizes.sum()))
    bar.close()
    return report


# what a store-wide verify tries, in this order, to tell which digest names a chunk: a
# store has no index saying it (desync's verify takes it as an option)
DIGESTS = ("blake3", "sha512-256", "sha256")


def verify_all_copies(
    store: ChunkStore,
    *,
    repair: bool = False,
    threads: int = 8,
    progress: bool | None = None,
    digest: str | None = None,
) -> VerifyReport:
    """Check every chunk file of a store (bare and ``.cacnk``), as desync's verify does:
    each copy must hold data whose digest is its name. Each file counts once, so a chunk
    kept both ways is two copies, each good or bad on its own."""
    iter_copies = getattr(store, "iter_copies", None)
    get_copy = getattr(store, "get_copy", None)
    if iter_copies is None or get_copy is None:
        raise CafuseError(
            f"store {store.url} cannot list its chunks (an HTTP store?): verify it with "
            "an index (cafuse verify INDEX --store ...)"
        )
    hashes = [hash_function(d) for d in ((digest,) if digest else DIGESTS)]
    report = VerifyReport()
    bar = Progress(0, "verify", progress, unit="chunks")

    def check(copy: tuple[bytes, bool]) -> tuple[bytes, bool, str]:
        chunk_id, bare = copy
        try:
            blob = get_copy(chunk_id, bare)
        except CorruptChunk:
            return chunk_id, bare, "corrupt"
        except StoreError as exc:
            return chunk_id, bare, f"error: {exc}"
        if blob is None:
            return chunk_id, bare, "ok"  # deleted meanwhile (a gc): nothing to check
        try:
            data = decompress(blob, MAX_CHUNK_SIZE)
        except ValueError:
            data = None
        candidates = [bytes(blob)] if data is None else [data, blob]
        for raw in candidates[: 1 if bare else 2]:
            if any(h(raw) == chunk_id for h in hashes):
                return chunk_id, bare, "ok"
        return chunk_id, bare, "corrupt"

    with ThreadPoolExecutor(threads) as pool:
        for chunk_id, bare, verdict in _bounded_map(pool, check, iter_copies(), 8 * threads):
            _tally(report, store, chunk_id, bare, verdict, repair)
            bar.update(1)
    bar.close()
    return report


def _bounded_map(
    pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], depth: int
) -> Iterator[R]:
    """``pool.map`` that reads ``items`` lazily: at most ``depth`` calls in flight, so a
    listing of millions of chunks is never held in memory at once."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


DEFAULT_GRACE = 3600.0


@dataclass
class GcReport:
    kept: int = 0
    deleted: int = 0
    young: int = 0  # unreferenced, but younger than the grace period: kept
    temps: int = 0  # stale temporary files of killed writers removed
    broken: list[LockEntry] = field(default_factory=list)  # make locks --break-locks removed
    # --dry-run: the make locks that would stop gc now (it takes no lock itself)
    blocking: list[LockEntry] = field(default_factory=list)


def collect_garbage(
    store: ChunkStore,
    indexes: Iterable[ChunkTable],
    *,
    dry_run: bool = False,
    grace: float = DEFAULT_GRACE,
    break_locks: bool = False,
) -> GcReport:
    """Delete every chunk no index references and that is older than ``grace`` seconds.

    Safe beside a running ``make``. On a local store make refreshes the mtime of every
    chunk it reuses and writes new ones with a fresh mtime, so a chunk it needs is never
    older than the grace period (mark and sweep with a grace period, as backup tools do).
    On an object store gc holds a ``gc`` store lock and refuses to start while a fresh
    ``make`` lock is there (``cafuse.locks``; ``break_locks`` removes those first); the
    grace still spares chunks of writers that take no lock (casync, desync). ``dry_run``
    takes no lock and reports the locks that would stop gc. Membership is decided by the
    ids' first 8 bytes: a key collision can only keep an unreferenced chunk, never delete
    a referenced one.
    """
    referenced = DistinctKeys(narrow=True)  # exact: a chunk is deleted only when no index names it
    for index in indexes:
        for batch in index.batches(whole_table_step(index)):
            referenced.first_seen(batch)
    keys = [referenced.sorted_keys()]
    if dry_run:
        report = GcReport(blocking=blocking_locks(store, "gc"))
        return _collect(store, keys, grace, True, report, None)
    with store_lock(store, "gc", break_locks=break_locks) as lock:
        report = GcReport(broken=list(lock.broken))
        return _collect(store, keys, grace, False, report, lock)


def _collect(
    store: ChunkStore,
    keys: list[np.ndarray],
    grace: float,
    dry_run: bool,
    report: GcReport,
    lock: StoreLock | NoLock | None,
) -> GcReport:
    cutoff = time.time() - grace
    referenced = np.unique(np.concatenate(keys)) if keys else np.empty(0, dtype="<u8")
    entries = _chunk_ages(store, grace, dry_run)
    delete_if_older = getattr(store, "delete_if_older", None)
    remove_stale_temps = getattr(store, "remove_stale_temps", None)
    if remove_stale_temps is not None and not dry_run:
        report.temps = remove_stale_temps()
    batch: list[tuple[bytes, float]] = []

    def flush() -> None:
        if not batch:
            return
        batch_keys = np.frombuffer(b"".join(c[:8] for c, _ in batch), dtype="<u8")
        pos = np.minimum(np.searchsorted(referenced, batch_keys), max(len(referenced) - 1, 0))
        used = referenced[pos] == batch_keys if len(referenced) else np.zeros(len(batch), bool)
        for (chunk_id, mtime), keep in zip(batch, used.tolist(), strict=True):
            if keep:
                report.kept += 1
            elif mtime >= cutoff:
                report.young += 1
            elif dry_run:
                report.deleted += 1
            else:
                assert lock is not None
                lock.check()  # never delete once the store lock is lost (no request)
                if delete_if_older is not None:
                    if delete_if_older(chunk_id, cutoff):
                        report.deleted += 1
                    else:
                        report.young += 1  # reused by a make while gc ran
                else:
                    store.delete(chunk_id)
                    report.deleted += 1
        batch.clear()

    for entry in entries:
        batch.append(entry)
        if len(batch) >= 65536:
            flush()
    flush()
    remove_empty_prefixes = getattr(store, "remove_empty_prefixes", None)
    if remove_empty_prefixes is not None and report.deleted and not dry_run:
        remove_empty_prefixes()
    return report


def _chunk_ages(store: ChunkStore, grace: float, dry_run: bool) -> Iterator[tuple[bytes, float]]:
    """(id, mtime) of every chunk; mtime 0 for a store that cannot tell (grace 0 only)."""
    iter_ages = getattr(store, "iter_ages", None)
    if iter_ages is not None:
        return iter_ages()
    if grace > 0 and not dry_run:
        raise CafuseError(
            f"store {store.url} cannot tell the age of its chunks, which gc needs to spare "
            f"chunks a running make reuses: stop every make writing to it, then run gc with "
            f"--grace 0 (the grace was {format_duration(grace)})"
        )
    return ((chunk_id, 0.0) for chunk_id in store.iter_ids())
