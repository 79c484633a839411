"""A local chunk cache in front of remote stores: a casync-layout store, bounded in size,
least-recently-used chunks evicted first, shared by every process that uses it.

Chunks are stored as fetched (compressed) and written by link-into-place, so concurrent
writers never expose partial files. A hit refreshes the file's mtime, which eviction sorts
by.

Every process sharing the cache keeps one small ledger up to date, ``.cafuse-cache.usage``
(the bytes the cache holds, and the bytes written since the cache was last measured),
under an exclusive ``flock`` on ``.cafuse-cache.lock``. A write costs a lock and a 16-byte
read and write; only when the ledger goes over the bound is the directory scanned, and
then least recently used chunks are evicted down to ``EVICT_TO`` of the bound, so scans
stay rare (one per fifth of the bound written). A scan also happens after a whole bound's
worth of writes, which corrects any drift: chunks removed or added by other means, or a
chunk linked in by one process while another scans (counted twice until the next scan).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .base import StoreError, Uncompressed
from .local import _CHUNK_NAME, STALE_TEMP_AGE, LocalStore

log = logging.getLogger(__name__)

LOCK_NAME = ".cafuse-cache.lock"
LEDGER_NAME = ".cafuse-cache.usage"
EVICT_TO = 0.8  # evict down to this fraction of the bound
_LEDGER = struct.Struct("<2Q")  # usage, bytes written since the last scan


class CacheStore(LocalStore):
    def __init__(self, root: str | os.PathLike[str], max_bytes: int) -> None:
        super().__init__(root, create=True)
        self.url = f"cache:{self.root}"
        self.max_bytes = max_bytes
        self.scans = 0  # directory scans this process did (for tests and logs)
        self._lock = threading.Lock()  # flock does not exclude threads of one process
        self._lock_fd = self._open(LOCK_NAME)
        self._ledger_fd = self._open(LEDGER_NAME)

    def _open(self, name: str) -> int:
        try:
            return os.open(self.root / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreError(f"cache {self.root}: cannot open {name}: {exc.strerror}") from None

    def get(self, chunk_id: bytes) -> bytes | None:
        try:
            blob = super().get(chunk_id)
        except StoreError as exc:
            # a FIFO, device or oversized file in the cache: drop it, the stores refill it
            log.warning("%s (dropped from the cache)", exc)
            with contextlib.suppress(OSError):
                self.delete(chunk_id)
            return None
        if blob is not None:
            # most recently used; if another process evicted it meanwhile, the bytes are good
            with contextlib.suppress(OSError):
                os.utime(self._candidates(chunk_id)[isinstance(blob, Uncompressed)])
        return blob

    def put(self, chunk_id: bytes, blob: bytes) -> bool:
        if len(blob) > self.max_bytes:
            return False
        written = super().put(chunk_id, blob)
        if written:
            self._account(len(blob))
        return written

    def delete(self, chunk_id: bytes) -> None:
        size = 0
        for candidate in self._candidates(chunk_id):
            with contextlib.suppress(OSError):
                size += os.stat(candidate).st_size
        super().delete(chunk_id)
        if size:
            self._account(-size)

    def usage(self) -> int:
        """Bytes of chunks in the cache, measured."""
        return sum(size for _, size, _ in self._entries())

    def _account(self, delta: int) -> None:
        """Add ``delta`` bytes to the shared ledger; over the bound, scan and evict."""
        with self._lock, self._locked():
            usage, since = self._read_ledger()
            if usage is None:
                usage, since = self.usage(), 0
            usage = max(0, usage + delta)
            since += max(delta, 0)
            if usage > self.max_bytes or since > self.max_bytes:
                usage, since = self._enforce_bound(), 0
            self._write_ledger(usage, since)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _read_ledger(self) -> tuple[int | None, int]:
        raw = os.pread(self._ledger_fd, _LEDGER.size, 0)
        if len(raw) != _LEDGER.size:
            return None, 0
        usage, since = _LEDGER.unpack(raw)
        if usage > 1 << 60:  # garbage: measure again
            return None, 0
        return usage, since

    def _write_ledger(self, usage: int, since: int) -> None:
        try:
            os.pwrite(self._ledger_fd, _LEDGER.pack(usage, since), 0)
        except OSError as exc:
            raise StoreError(
                f"cache {self.root}: cannot update its ledger: {exc.strerror}"
            ) from None

    def _entries(self) -> list[tuple[Path, int, float]]:
        """Every cached chunk (path, size, mtime); removes killed writers' temp files."""
        self.scans += 1
        out = []
        stale = time.time() - STALE_TEMP_AGE
        with os.scandir(self.root) as top:
            for prefix in top:
                if len(prefix.name) != 4 or not prefix.is_dir():
                    continue
                with os.scandir(prefix.path) as files:
                    for entry in files:
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if entry.name.startswith("."):
                            if entry.name.endswith(".tmp") and st.st_mtime < stale:
                                with contextlib.suppress(FileNotFoundError):
                                    os.unlink(entry.path)
                        elif _CHUNK_NAME.match(entry.name):  # compressed or bare
                            out.append((Path(entry.path), st.st_size, st.st_mtime))
        return out

    def _enforce_bound(self) -> int:
        """Measure the cache (under the shared lock), evict least recently used chunks down
        to ``EVICT_TO`` of the bound if it is over, and return what it holds."""
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        if total > self.max_bytes:
            entries.sort(key=lambda e: e[2])
            target = int(self.max_bytes * EVICT_TO)
            evicted = 0
            for path, size, _ in entries:
                if total <= target:
                    break
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                total -= size
                evicted += 1
            log.info("cache %s: evicted %d chunks, %d bytes left", self.root, evicted, total)
        return total
