"""A local chunk cache in front of remote stores: a casync-layout store, bounded in size,
least-recently-used chunks evicted first, shared by every process that uses it.

Chunks are stored as fetched (compressed) and written by link-into-place, so concurrent
writers never expose partial files. A hit refreshes the file's mtime, which eviction sorts
by. Eviction runs under an exclusive ``flock`` on ``.cafuse-cache.lock`` and re-measures the
directory, so several processes sharing the cache keep it within its bound: each one adds
at most ``max_bytes / 20`` between measurements.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from pathlib import Path

from .base import StoreError
from .local import LocalStore

log = logging.getLogger(__name__)

LOCK_NAME = ".cafuse-cache.lock"
EVICT_TO = 0.9  # evict down to this fraction of the bound


class CacheStore(LocalStore):
    def __init__(self, root: str | os.PathLike[str], max_bytes: int) -> None:
        super().__init__(root, create=True)
        self.url = f"cache:{self.root}"
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._added_since_scan = 0
        self._usage: int | None = None

    def get(self, chunk_id: bytes) -> bytes | None:
        blob = super().get(chunk_id)
        if blob is not None:
            # most recently used; if another process evicted it meanwhile, the bytes are good
            with contextlib.suppress(OSError):
                os.utime(self._path(chunk_id))
        return blob

    def put(self, chunk_id: bytes, blob: bytes) -> bool:
        if len(blob) > self.max_bytes:
            return False
        written = super().put(chunk_id, blob)
        if written:
            with self._lock:
                self._added_since_scan += len(blob)
                usage = self._usage
                if (
                    usage is None
                    or self._added_since_scan > self.max_bytes // 20
                    or (usage + self._added_since_scan > self.max_bytes)
                ):
                    self._enforce_bound()
        return written

    def usage(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def _entries(self) -> list[tuple[Path, int, float]]:
        out = []
        with os.scandir(self.root) as top:
            for prefix in top:
                if len(prefix.name) != 4 or not prefix.is_dir():
                    continue
                with os.scandir(prefix.path) as files:
                    for entry in files:
                        if entry.name.endswith(".cacnk") and not entry.name.startswith("."):
                            try:
                                st = entry.stat()
                            except FileNotFoundError:
                                continue
                            out.append((Path(entry.path), st.st_size, st.st_mtime))
        return out

    def _enforce_bound(self) -> None:
        """Measure the cache (under the shared lock) and evict least recently used chunks."""
        try:
            fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreError(f"cache {self.root}: cannot lock: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
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
            self._usage = total
            self._added_since_scan = 0
        finally:
            os.close(fd)  # releases the lock
