"""A chunk store in a local directory, laid out exactly as casync lays it out.

A store directory may be shared with other writers (make, gc, a cache) and with whatever
else is on the machine, so nothing in it is trusted: chunk files are opened without
blocking, anything but a regular file is refused, and no file is read past
``max_blob_size``. Writers use random temporary names, so writers in other PID namespaces
or on other hosts (NFS) never collide.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from ..atomic import free_space
from ..fileio import describe_file_type
from ..sizes import format_size
from .base import ChunkStore, CorruptChunkError, StoreError, Uncompressed

log = logging.getLogger(__name__)

_CHUNK_NAME = re.compile(r"^([0-9a-f]{64})(\.cacnk)?$")
_TEMP_NAME = re.compile(r"^\.([0-9a-f]{64})(\.cacnk)?\.[0-9a-zA-Z_]+\.tmp$")
_HEX4 = re.compile(r"^[0-9a-f]{4}$")
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

MAX_CHUNK_SIZE = 128 << 20  # casync's limit
# a stored chunk is compressed: zstd's worst case for 128 MiB is 512 KiB more, xz and gzip
# add less than that
DEFAULT_MAX_BLOB_SIZE = MAX_CHUNK_SIZE + (1 << 20)
STALE_TEMP_AGE = 3600.0  # seconds: an older temporary file was left by a killed writer
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


CorruptChunk = CorruptChunkError  # a chunk file that cannot hold a chunk (too large)


class StoreFull(StoreError):
    """The store's filesystem ran out of space (or quota)."""

    def __init__(self, message: str, free: str | None = None) -> None:
        super().__init__(message)
        self.free = free  # e.g. "12.0 MiB free"


class LocalStore(ChunkStore):
    writable = True
    is_local = True

    def __init__(
        self,
        root: str | os.PathLike[str],
        create: bool = False,
        max_blob_size: int = DEFAULT_MAX_BLOB_SIZE,
    ) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        self._root = str(self.root)
        self.max_blob_size = max_blob_size  # no chunk file is read past this many bytes
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"store {self.root}: cannot create: {exc.strerror}") from None
        if not self.root.is_dir():
            raise StoreError(
                f"store {self.root}: directory does not exist (check the --store path)"
            )

    def _name(self, chunk_id: bytes) -> str:
        """The chunk's path as a string: this runs for every chunk, pathlib costs here."""
        hexid = chunk_id.hex()
        return f"{self._root}/{hexid[:4]}/{hexid}.cacnk"

    def _candidates(self, chunk_id: bytes) -> tuple[str, str]:
        name = self._name(chunk_id)
        return name, name[: -len(".cacnk")]  # casync also reads bare (uncompressed) chunks

    def get(self, chunk_id: bytes) -> bytes | None:
        """The compressed ``.cacnk`` copy if there is one, else the bare one
        (``Uncompressed``), else None."""
        name, bare = self._candidates(chunk_id)
        blob = self._read_copy(name)
        if blob is None:
            blob = self._read_copy(bare)
            return None if blob is None else Uncompressed(blob)
        return blob

    def get_copy(self, chunk_id: bytes, bare: bool) -> bytes | None:
        """One stored copy: the bare file (``Uncompressed``) or the ``.cacnk``, or None."""
        name, bare_name = self._candidates(chunk_id)
        blob = self._read_copy(bare_name if bare else name)
        return Uncompressed(blob) if bare and blob is not None else blob

    def _read_copy(self, candidate: str) -> bytes | None:
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer
            fd = os.open(candidate, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(
                f"store {self.root}: cannot read {candidate}: {exc.strerror}"
            ) from None
        try:
            return self._read_chunk_file(fd, candidate)
        except OSError as exc:
            raise StoreError(
                f"store {self.root}: cannot read {candidate}: {exc.strerror}"
            ) from None
        finally:
            os.close(fd)

    def _read_chunk_file(self, fd: int, name: str) -> bytes:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(
                f"store {self.root}: {name} is a {describe_file_type(st.st_mode)}, not a "
                "chunk file: remove it"
            )
        if st.st_size > self.max_blob_size:
            raise CorruptChunk(self._too_large(name, st.st_size))
        data = os.read(fd, st.st_size + 1)  # one read; +1 notices a file that grew
        if len(data) <= st.st_size:
            return data
        parts, total = [data], len(data)
        while total <= self.max_blob_size and (block := os.read(fd, 1 << 20)):
            parts.append(block)
            total += len(block)
        if total > self.max_blob_size:
            raise CorruptChunk(self._too_large(name, total))
        return b"".join(parts)

    def _too_large(self, name: str, size: int) -> str:
        return (
            f"store {self.root}: {name} is over {format_size(self.max_blob_size)} "
            f"({format_size(size)} or more), larger than any chunk: corrupt, remove it"
        )

    def has(self, chunk_id: bytes) -> bool:
        name, bare = self._candidates(chunk_id)
        return os.path.exists(name) or os.path.exists(bare)

    def touch(self, chunk_id: bytes, bare: bool = False) -> bool:
        """Whether the store holds the chunk (either way: ``bare`` is only a remote store's
        hint), refreshing its mtime if it does.

        ``make`` calls this for every chunk it reuses, so that a ``gc`` running beside it
        (which spares chunks younger than its grace period) cannot delete it. False when
        the chunk is missing, or was just taken away by a ``gc``: then it must be written.
        """
        for candidate in self._candidates(chunk_id):
            try:
                os.utime(candidate)
                return True
            except FileNotFoundError:
                continue
            except PermissionError:  # not ours to touch: it is there all the same
                if os.path.exists(candidate):
                    return True
            except OSError as exc:
                raise StoreError(
                    f"store {self.root}: cannot touch {candidate}: {exc.strerror}"
                ) from None
        return False

    def put(self, chunk_id: bytes, blob: bytes) -> bool:
        """Write to a temporary name, then link it to the final name.

        Unlike rename, link fails when another writer got there first, so the final name only
        ever holds a whole file and the count of new chunks stays exact. The temporary name
        is random, so writers in other PID namespaces or on other hosts never share it. A
        crash leaves at most a dot-file, which ``iter_ids`` ignores and
        ``remove_stale_temps`` removes. A chunk already there gets its mtime refreshed.
        """
        if self.touch(chunk_id):
            return False
        path = self._name(chunk_id)
        if isinstance(blob, Uncompressed):
            path = path[: -len(".cacnk")]  # casync's and desync's uncompressed layout
        directory, base = path.rsplit("/", 1)
        try:
            fd, tmp = self._create(directory, base)
            try:
                try:
                    view = memoryview(blob)
                    while view:
                        view = view[os.write(fd, view) :]
                finally:
                    os.close(fd)
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    self.touch(chunk_id)
                    return False
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        except OSError as exc:
            raise self._write_error(exc) from None
        return True

    def _create(self, directory: str, base: str) -> tuple[int, str]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for attempt in range(8):
            tmp = f"{directory}/.{base}.{secrets.token_hex(8)}.tmp"
            try:
                return os.open(tmp, flags, 0o644), tmp
            except FileNotFoundError:
                if attempt == 7:
                    raise
                # a gc may remove the emptied directory between our mkdir and open: again
                with contextlib.suppress(FileExistsError):
                    os.mkdir(directory)
            except FileExistsError:
                continue  # never someone else's file: pick another name
        raise StoreError(f"store {self.root}: cannot find a free temporary name in {directory}")

    def _write_error(self, exc: OSError) -> StoreError:
        if exc.errno in _NO_SPACE:
            free = self.free_text()
            return StoreFull(
                f"store {self.root}: no space left on device ({free}): "
                "free some space or use another --store",
                free,
            )
        return StoreError(f"store {self.root}: cannot write chunk: {exc.strerror}")

    def free_text(self) -> str:
        return free_space(self.root)

    def delete(self, chunk_id: bytes) -> None:
        for candidate in self._candidates(chunk_id):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(candidate)

    def delete_copy(self, chunk_id: bytes, bare: bool) -> None:
        """Delete one stored copy (the bare file or the ``.cacnk``), keeping the other."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._candidates(chunk_id)[bare])

    def delete_if_older(self, chunk_id: bytes, cutoff: float) -> bool:
        """Delete the chunk unless its mtime is ``cutoff`` or later; True if deleted.

        The file is first renamed away and its mtime read after that: a ``make`` that
        touched it before the rename is seen (the file is put back), one that comes after
        finds no file and writes the chunk again. So gc and make never lose a chunk
        between them, whatever the timing.
        """
        deleted = False
        for candidate in self._candidates(chunk_id):
            directory, base = candidate.rsplit("/", 1)
            trash = f"{directory}/.{base}.{secrets.token_hex(8)}.tmp"
            try:
                os.rename(candidate, trash)
            except FileNotFoundError:
                continue
            try:
                if _mtime(trash) >= cutoff:
                    os.rename(trash, candidate)  # reused meanwhile: a copy is as good
                    continue
                os.unlink(trash)
                deleted = True
            except FileNotFoundError:
                pass
        return deleted

    def _prefix_dirs(self) -> Iterator[os.DirEntry[str]]:
        with os.scandir(self.root) as top:
            for prefix in top:
                if _HEX4.match(prefix.name) and prefix.is_dir():
                    yield prefix

    def iter_ids(self) -> Iterator[bytes]:
        for chunk_id, _ in self.iter_ages():
            yield chunk_id

    def iter_ages(self) -> Iterator[tuple[bytes, float]]:
        """Every chunk id once with its file's mtime (refreshed by make when it reuses a
        chunk); a chunk stored both bare and compressed counts once, at its newer copy."""
        for prefix in self._prefix_dirs():
            ages: dict[bytes, float] = {}
            for chunk_id, _, path in self._copies_in(prefix):
                try:
                    mtime = _mtime(path)
                except FileNotFoundError:
                    continue
                ages[chunk_id] = max(mtime, ages.get(chunk_id, mtime))
            yield from ages.items()

    def iter_copies(self) -> Iterator[tuple[bytes, bool]]:
        """Every stored copy: (id, bare), so a chunk kept both ways comes twice."""
        for prefix in self._prefix_dirs():
            for chunk_id, bare, _ in self._copies_in(prefix):
                yield chunk_id, bare

    def _copies_in(self, prefix: os.DirEntry[str]) -> list[tuple[bytes, bool, str]]:
        out = []
        with os.scandir(prefix.path) as entries:
            for entry in entries:
                match = _CHUNK_NAME.match(entry.name)
                if match and match.group(1).startswith(prefix.name):
                    out.append((bytes.fromhex(match.group(1)), not match.group(2), entry.path))
        return out

    def remove_empty_prefixes(self) -> int:
        """Remove prefix directories left empty (by gc), as casync does; a writer that
        needs one again makes it (``_create`` retries)."""
        removed = 0
        for prefix in self._prefix_dirs():
            with contextlib.suppress(OSError):  # not empty (ENOTEMPTY), or gone
                os.rmdir(prefix.path)
                removed += 1
        return removed

    def remove_stale_temps(self, max_age: float = STALE_TEMP_AGE) -> int:
        """Delete temporary files of killed writers (older than ``max_age`` seconds)."""
        cutoff = time.time() - max_age
        removed = 0
        for prefix in self._prefix_dirs():
            with os.scandir(prefix.path) as entries:
                for entry in entries:
                    if not (entry.name.startswith(".") and _TEMP_NAME.match(entry.name)):
                        continue
                    try:
                        if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                            os.unlink(entry.path)
                            removed += 1
                    except FileNotFoundError:
                        continue
        if removed:
            log.info("store %s: removed %d stale temporary files", self.root, removed)
        return removed

    def sync(self) -> None:
        """syncfs(2) on the store's filesystem: one flush instead of an fsync per chunk."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise StoreError(f"store {self.root}: sync failed: {os.strerror(err)}")
        finally:
            os.close(fd)


def _mtime(path: str) -> float:
    """mtime of the file a chunk name leads to (of the link itself when it dangles)."""
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return os.lstat(path).st_mtime
