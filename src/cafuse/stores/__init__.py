"""Chunk stores: open one from a path or URL (``A|B`` for a failover group)."""

from __future__ import annotations

from .base import (
    ChunkStore,
    CorruptChunkError,
    ReadOnlyStore,
    StoreError,
    ThrottledStoreError,
    TransientStoreError,
    chunk_path,
)
from .cache import CacheStore
from .failover import FailoverGroup
from .local import LocalStore
from .location import Location, parse_location, redact
from .retry import RetryPolicy

__all__ = [
    "CacheStore",
    "ChunkStore",
    "CorruptChunkError",
    "FailoverGroup",
    "LocalStore",
    "Location",
    "ReadOnlyStore",
    "RetryPolicy",
    "StoreError",
    "ThrottledStoreError",
    "TransientStoreError",
    "chunk_path",
    "open_store",
    "parse_location",
    "redact",
]


def open_store(
    text: str,
    *,
    writable: bool = False,
    retry: RetryPolicy | None = None,
    s3_endpoint: str | None = None,
    s3_region: str | None = None,
) -> ChunkStore:
    """Open a store from a path, ``file://``, ``http(s)://``, ``s3://``, ``gs://`` or
    ``az://`` URL. ``writable`` creates a missing local directory (make, cache)."""
    if "|" in text:
        return FailoverGroup(
            [
                open_store(
                    part,
                    writable=writable,
                    retry=retry,
                    s3_endpoint=s3_endpoint,
                    s3_region=s3_region,
                )
                for part in text.split("|")
            ]
        )
    location = parse_location(text)
    if location.is_local:
        return LocalStore(location.path, create=writable)
    from .objectstore import ObjectChunkStore

    store = ObjectChunkStore(location, retry=retry, s3_endpoint=s3_endpoint, s3_region=s3_region)
    if writable and not store.writable:
        raise ReadOnlyStore(
            f"store {store.url} is read-only (HTTP): write to a local "
            "directory or an object store (s3://...)"
        )
    return store
