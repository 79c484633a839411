"""A chunk store in a local directory, laid out exactly as casync lays it out."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .base import ChunkStore, StoreError, chunk_path

log = logging.getLogger(__name__)

_CHUNK_NAME = re.compile(r"^([0-9a-f]{64})(\.cacnk)?$")
_HEX4 = re.compile(r"^[0-9a-f]{4}$")
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class LocalStore(ChunkStore):
    writable = True

    def __init__(self, root: str | os.PathLike[str], create: bool = False) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"store {self.root}: cannot create: {exc.strerror}") from None
        if not self.root.is_dir():
            raise StoreError(f"store {self.root}: directory does not exist "
                             "(check the --store path)")

    def _path(self, chunk_id: bytes) -> Path:
        return self.root / chunk_path(chunk_id)

    def get(self, chunk_id: bytes) -> bytes | None:
        path = self._path(chunk_id)
        for candidate in (path, path.with_suffix("")):  # casync also reads bare, uncompressed
            try:
                with open(candidate, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StoreError(f"store {self.root}: cannot read {candidate.name}: "
                                 f"{exc.strerror}") from None
        return None

    def has(self, chunk_id: bytes) -> bool:
        path = self._path(chunk_id)
        return path.exists() or path.with_suffix("").exists()

    def put(self, chunk_id: bytes, blob: bytes) -> bool:
        path = self._path(chunk_id)
        if path.exists():
            return False
        try:
            path.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                os.chmod(tmp, 0o644)
                # link, unlike rename, fails if another writer got there first: the count
                # of new chunks stays exact and the final name only ever holds whole files
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        except OSError as exc:
            raise StoreError(f"store {self.root}: cannot write chunk: {exc.strerror}") from None
        return True

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
