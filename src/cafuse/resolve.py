"""From what the user typed to working objects: index locations (paths or URLs), stores
(casync's ``default.castr`` next to the index when none is given), seeds, the cache, and the
``ChunkSource`` every job fetches through. Shared by the CLI and the mount daemon."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from . import defaults
from .chunktable import ChunkTable
from .errors import CafuseError, ChunkUnavailable
from .fetch import ChunkSource
from .index import Index, read_index, write_index
from .seed import open_seeds
from .sizes import parse_size
from .stores import (
    CacheStore,
    ChunkStore,
    RetryPolicy,
    open_store,
    parse_location,
)
from .stores.location import parent_and_name
from .stores.retry import DEFAULT_RETRIES, DEFAULT_TIMEOUT

log = logging.getLogger(__name__)

DEFAULT_STORE_NAME = "default.castr"
PROBE_SCAN = 4096  # chunks looked at for the first one that is not zeros
INDEX_DIR = "indexes"


@dataclass
class RemoteOptions:
    """How to reach stores: retries, deadline, S3 endpoint and region, the local cache."""

    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    s3_endpoint: str | None = None
    s3_region: str | None = None
    cache: str | None = None
    cache_size: str = defaults.CACHE_SIZE

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(retries=self.retries, timeout=self.timeout)

    def open(self, text: str, writable: bool = False) -> ChunkStore:
        return open_store(
            text,
            writable=writable,
            retry=self.retry,
            s3_endpoint=self.s3_endpoint,
            s3_region=self.s3_region,
        )

    def open_cache(self) -> CacheStore | None:
        if not self.cache:
            return None
        return CacheStore(self.cache, parse_size(self.cache_size, "--cache-size"))


def load_index(text: str, remote: RemoteOptions | None = None) -> ChunkTable:
    """An index from a local path or an http(s)/s3/gs/az URL.

    A large index is not read whole: its pages are read (locally) or fetched (by URL,
    ``cafuse.remoteindex``) when first needed.
    """
    location = parse_location(text, "index")
    if location.is_local:
        return read_index(location.path)
    from .remoteindex import open_remote_index
    from .stores.objectstore import ObjectChunkStore

    remote = remote or RemoteOptions()
    directory, name = parent_and_name(location)
    store = remote.open(directory)
    if not isinstance(store, ObjectChunkStore):
        raise CafuseError(f"bad index location {location.display!r}: one URL, not a group")
    copy = _cached_index_path(remote, location.url)
    try:
        index = open_remote_index(
            store, name, location.display, copy.with_suffix(".pages") if copy else None
        )
    except CafuseError as exc:
        if copy is not None and copy.exists():
            log.warning("%s: using the copy in the cache", exc)
            return read_index(copy)
        raise
    if copy is not None and isinstance(index, Index):
        try:
            copy.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CafuseError(f"cache {remote.cache}: cannot create: {exc.strerror}") from None
        write_index(copy, index)
    return index


def _cached_index_path(remote: RemoteOptions, url: str) -> Path | None:
    """Where the cache keeps its copy of an index fetched from ``url``: offline, the copy
    stands in for the URL."""
    if not remote.cache:
        return None
    return Path(remote.cache) / INDEX_DIR / f"{hashlib.sha256(url.encode()).hexdigest()}.caibx"


def default_store(index_text: str) -> str:
    """casync's default: ``default.castr`` beside the index."""
    location = parse_location(index_text, "index")
    directory, _ = parent_and_name(location)
    if location.is_local:
        return os.path.join(os.path.dirname(os.path.abspath(location.path)), DEFAULT_STORE_NAME)
    return f"{directory}/{DEFAULT_STORE_NAME}"


def open_stores(
    index_text: str, stores: list[str] | None, remote: RemoteOptions, *, required: bool = True
) -> list[ChunkStore]:
    """The stores given, or casync's default beside the index; none is acceptable only
    when something else (a seed) can supply chunks."""
    if stores:
        return [remote.open(s) for s in stores]
    fallback = default_store(index_text)
    if parse_location(fallback).is_local and not os.path.isdir(fallback):
        if not required:
            return []
        raise CafuseError(
            f"no chunk store given and the default {fallback} does not exist: add --store STORE"
        )
    return [remote.open(fallback)]


def build_source(
    index: ChunkTable,
    index_text: str,
    stores: list[str] | None,
    seeds: list[str] | None,
    remote: RemoteOptions,
) -> ChunkSource:
    seed_objects = open_seeds(seeds or [], index.digest)
    cache = remote.open_cache()
    # a blob with no chunks needs no store (casync makes none for an empty file)
    store_objects = (
        open_stores(index_text, stores, remote, required=not seed_objects)
        if index.chunk_count
        else []
    )
    return ChunkSource(
        index.digest,
        store_objects,
        seed_objects,
        cache=cache,
        policy=remote.retry,
        chunk_max=index.chunk_max,
    )


def probe_stores(source: ChunkSource, index: ChunkTable, *, offline_ok: bool) -> None:
    """Fail early, with the reason, when the remote stores cannot serve the image at all.

    The check is a GET of the first chunk the index needs (no HEAD: many static hosts and
    CDNs refuse it), sent to every remote store at once; the first good copy is kept for
    the job.
    It passes when any source delivers it. With ``offline_ok`` (a cache is there to serve
    from) a failure is only a warning.
    """
    if not source.has_remote or not index.chunk_count:
        return
    # the first chunk that is not zeros: the first one fetched (looked for near the start
    # only: no pass over a huge table before the mount appears)
    first = next((i for i in range(min(index.chunk_count, PROBE_SCAN)) if not index.is_zero(i)), -1)
    if first < 0:
        return
    chunk_id = index.chunk_id(first)
    start, end = index.span(first)
    if source.get_local(chunk_id, end - start) is not None:
        return
    try:
        source.probe(chunk_id, end - start, source.deadline())
    except ChunkUnavailable as exc:
        message = _probe_failure(exc)
        if offline_ok:
            log.warning("%s: serving from the cache only", message)
            return
        raise CafuseError(message) from None


def _probe_failure(exc: ChunkUnavailable) -> str:
    kinds = exc.kinds - {"circuit open", "deadline"}
    if kinds == {"not found"}:
        stores = ", ".join(f.source for f in exc.failures if f.kind == "not found")
        return (
            f"chunk {exc.chunk_id.hex()} (the first the index needs) is not in {stores}: "
            "check the --store URL, or that the store belongs to this index"
        )
    if kinds <= {"transient", "throttled", "not found"}:
        return (
            f"cannot reach any store: {exc.why()} (check the URL and the network, "
            "or use --cache with chunks fetched before)"
        )
    return f"stores cannot serve this index: {exc.why()}"
