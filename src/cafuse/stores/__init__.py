"""Chunk stores: open one from a path or URL."""

from __future__ import annotations

from ..errors import CafuseError
from .base import ChunkStore, ReadOnlyStore, StoreError, chunk_path
from .local import LocalStore

__all__ = ["ChunkStore", "LocalStore", "ReadOnlyStore", "StoreError", "chunk_path", "open_store"]


def open_store(location: str, *, writable: bool = False) -> ChunkStore:
    """Open a store from a local path or ``file://`` URL.

    ``writable`` creates a missing local directory (make, cache) instead of failing.
    """
    if location.startswith("file://"):
        location = location[len("file://") :]
    elif "://" in location:
        scheme = location.split("://", 1)[0]
        raise CafuseError(
            f"unsupported store URL scheme {scheme!r} in {location!r}: "
            "use a local directory or file:// URL"
        )
    if not location:
        raise CafuseError("empty store location: give --store DIR")
    return LocalStore(location, create=writable)
