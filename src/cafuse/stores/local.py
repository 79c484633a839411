"""A chunk store in a local directory, laid out exactly as casync lays it out."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

from .base import ChunkStore, StoreError, chunk_path

log = logging.getLogger(__name__)

_CHUNK_NAME = re.compile(r"^([0-9a-f]{64})(\.cacnk)?$")
_HEX4 = re.compile(r"^[0-9a-f]{4}$")
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class LocalStore(ChunkStore):
    writable = True
    is_local = True

    def __init__(self, root: str | os.PathLike[str], create: bool = False) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        self._root = str(self.root)
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"store {self.root}: cannot create: {exc.strerror}") from None
        if not self.root.is_dir():
            raise StoreError(
                f"store {self.root}: directory does not exist (check the --store path)"
            )

    def _path(self, chunk_id: bytes) -> Path:
        return self.root / chunk_path(chunk_id)

    def _name(self, chunk_id: bytes) -> str:
        """The chunk's path as a string: this runs for every chunk, pathlib costs here."""
        hexid = chunk_id.hex()
        return f"{self._root}/{hexid[:4]}/{hexid}.cacnk"

    def get(self, chunk_id: bytes) -> bytes | None:
        name = self._name(chunk_id)
        for candidate in (name, name[: -len(".cacnk")]):  # casync also reads bare chunks
            try:
                fd = os.open(candidate, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StoreError(
                    f"store {self.root}: cannot read {candidate}: {exc.strerror}"
                ) from None
            try:
                return _read_whole(fd)
            except OSError as exc:
                raise StoreError(
                    f"store {self.root}: cannot read {candidate}: {exc.strerror}"
                ) from None
            finally:
                os.close(fd)
        return None

    def has(self, chunk_id: bytes) -> bool:
        name = self._name(chunk_id)
        return os.path.exists(name) or os.path.exists(name[: -len(".cacnk")])

    def put(self, chunk_id: bytes, blob: bytes) -> bool:
        """Write to a temporary name, then link it to the final name.

        Unlike rename, link fails when another writer got there first, so the final name only
        ever holds a whole file and the count of new chunks stays exact. A crash leaves at
        most a dot-file, which ``iter_ids`` ignores.
        """
        path = self._path(chunk_id)
        if path.exists():
            return False
        tmp = path.parent / f".{path.name}.{threading.get_native_id()}.tmp"
        try:
            fd = self._create(tmp)
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        except OSError as exc:
            raise StoreError(f"store {self.root}: cannot write chunk: {exc.strerror}") from None
        return True

    @staticmethod
    def _create(tmp: Path) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for _ in range(3):
            try:
                return os.open(tmp, flags, 0o644)
            except FileNotFoundError:
                tmp.parent.mkdir(exist_ok=True)
            except FileExistsError:
                tmp.unlink(missing_ok=True)  # left by a crashed writer of this thread id
        return os.open(tmp, flags, 0o644)

    def delete(self, chunk_id: bytes) -> None:
        path = self._path(chunk_id)
        for candidate in (path, path.with_suffix("")):
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()

    def iter_ids(self) -> Iterator[bytes]:
        with os.scandir(self.root) as top:
            for prefix in top:
                if not (_HEX4.match(prefix.name) and prefix.is_dir()):
                    continue
                with os.scandir(prefix.path) as entries:
                    for entry in entries:
                        match = _CHUNK_NAME.match(entry.name)
                        if match and match.group(1).startswith(prefix.name):
                            yield bytes.fromhex(match.group(1))

    def sync(self) -> None:
        """syncfs(2) on the store's filesystem: one flush instead of an fsync per chunk."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise StoreError(f"store {self.root}: sync failed: {os.strerror(err)}")
        finally:
            os.close(fd)


def _read_whole(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    data = os.read(fd, size + 1)  # one read for the whole file; +1 notices a file that grew
    if len(data) <= size:
        return data
    parts = [data]
    while block := os.read(fd, 1 << 20):
        parts.append(block)
    return b"".join(parts)
