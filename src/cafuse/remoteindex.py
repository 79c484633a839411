"""An index by URL (HTTP(S), S3, GCS, Azure), read with ranged GETs a page at a time.

Opening costs two requests: the header with the first page of items, and the last item
with the tail (the blob length). A small index is then fetched whole and parsed into
memory; a larger one becomes a ``PagedTable`` whose pages are fetched when a read first
needs them.

The index is pinned: the ETag (else Last-Modified) and length seen at open go with every
later request (``If-Match``, else ``If-Unmodified-Since``) and are compared with every
answer, so an index replaced on the server fails the reads that need a new page with one
clear message, instead of mixing two versions.

With ``--cache`` every page fetched is also kept under
``<cache>/indexes/<hash of URL>.pages/<hash of pin>/`` with the pin, so a mount of the same
URL works offline afterwards for the pages read before. Each version has its own directory:
two processes sharing a cache while pinned to different versions (a mount, and ``cafuse
info`` after the index was replaced) never read each other's pages. The newest
``KEEP_VERSIONS`` versions of a URL are kept; an older one is removed when a newer one is
opened (a process still pinned to it then fetches its pages again, or fails them offline).
A pass over the table (``batches``) takes the pages it finds there and fetches only the
others, in large ranged requests.

A server that ignores Range (answers 200 with the whole file) is tolerated for indexes up
to ``RANGELESS_MAX_BYTES``, fetched whole; a larger one is refused with what to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

from .atomic import AtomicFile
from .chunktable import ChunkTable, PageInvalid, TableError
from .errors import CafuseError
from .index import IN_MEMORY_MAX_BYTES, ITEM_SIZE, TAIL_SIZE, parse_header, parse_index
from .pagedtable import ITEMS_OFFSET, PagedTable, last_end
from .sizes import format_size
from .stores.base import CorruptChunkError, StoreError, TransientStoreError
from .stores.objectstore import INDEX_TIMEOUT, ObjectChunkStore, classify

log = logging.getLogger(__name__)

# pages by URL are smaller than local ones: a read's first page is a guess that misses by
# about a page at 16 million chunks, so every page fetched costs what it holds (16 KiB)
REMOTE_PAGE_ITEMS = 409  # 16,360 bytes of items
PAGE_BYTES = ITEM_SIZE * REMOTE_PAGE_ITEMS
FIRST_BYTES = ITEMS_OFFSET + PAGE_BYTES  # header + page 0: one request
END_BYTES = ITEM_SIZE + TAIL_SIZE  # the last item and the tail
REMOTE_PAGE_CACHE = 1024  # pages kept in memory: 16 MiB
RANGELESS_MAX_BYTES = 64 << 20  # fetched whole from a server that ignores Range
KEEP_VERSIONS = 3  # versions of one index URL whose pages --cache keeps
CURRENT = "current"  # names the version opened last (what an offline open uses)


class RangeIgnored(Exception):
    """The server answered a ranged GET with the whole file."""


@dataclass(frozen=True)
class Pin:
    """What identifies the version of the index that was opened."""

    size: int
    etag: str | None
    last_modified: float | None

    def options(self) -> dict[str, Any]:
        # a weak ETag (W/"...", CDNs that recompress) never passes If-Match, which compares
        # strongly: it is only compared with each answer's
        if self.etag and not self.etag.startswith("W/"):
            return {"if_match": self.etag}
        if self.last_modified is not None:
            from datetime import datetime

            return {"if_unmodified_since": datetime.fromtimestamp(self.last_modified, UTC)}
        return {}

    def differs(self, other: Pin) -> str | None:
        """Why ``other`` (what the server says now) is another version, or None."""
        if self.etag and other.etag and self.etag != other.etag:
            return f"ETag {self.etag} is now {other.etag}"
        if other.size != self.size:
            return f"length {self.size} is now {other.size}"
        if (
            not (self.etag and other.etag)
            and self.last_modified is not None
            and other.last_modified is not None
            and self.last_modified != other.last_modified
        ):
            return "Last-Modified changed"
        return None


def _pin_of(meta: dict[str, Any]) -> Pin:
    modified = meta.get("last_modified")
    return Pin(
        int(meta["size"]),
        meta.get("e_tag") or None,
        modified.timestamp() if modified is not None else None,
    )


class RemoteIndex:
    """Ranged reads of one index object, pinned to the version seen first."""

    def __init__(self, store: ObjectChunkStore, name: str, display: str) -> None:
        self.store = store
        self.path = name
        self.name = display
        self.pin: Pin | None = None
        self.bytes_fetched = 0
        self.requests = 0
        self._changed: PageInvalid | None = None

    def get(self, start: int, end: int) -> tuple[bytes, Pin]:
        """Bytes ``[start, end)`` (clipped at the end of the object), with retries."""
        import obstore
        import obstore.exceptions as obe

        if self._changed is not None:
            raise self._changed  # no more requests: every version but the pinned one is wrong
        options: dict[str, Any] = {"range": (start, end)}
        if self.pin is not None:
            options.update(self.pin.options())

        def attempt(left: float) -> tuple[bytes, Pin]:
            try:
                result = obstore.get(self.store._client(left), self.path, options=options)
                pin = _pin_of(result.meta)
                if self.pin is not None and (why := self.pin.differs(pin)):
                    raise self.changed(why)
                data = bytes(result.bytes())
            except (StoreError, TableError):
                raise
            except obe.PreconditionError:
                raise self.changed("the server refused the pinned version (HTTP 412)") from None
            except obe.NotSupportedError as exc:
                if "Range" in str(exc):
                    raise RangeIgnored() from None
                raise classify(exc, self.name) from None
            except FileNotFoundError:
                raise StoreError(f"{self.name}: not found (HTTP 404)") from None
            except Exception as exc:
                raise classify(exc, self.name) from None
            self.requests += 1
            self.bytes_fetched += len(data)
            if len(data) != min(end, pin.size) - start:
                raise TransientStoreError(
                    f"{self.name}: asked for bytes {start}..{end}, got {len(data)}"
                )
            return data, pin

        return self.store.retry.run(self.name, attempt)

    def changed(self, why: str) -> PageInvalid:
        self._changed = PageInvalid(
            f"index {self.name} changed on the server since it was opened ({why}): reads "
            "that need parts of it not read yet fail; remount to use the new version"
        )
        return self._changed

    def whole(self, limit: int) -> bytes:
        """The whole object, refused past ``limit`` bytes before any body is read."""

        def attempt(left: float) -> bytes:
            try:
                return self.store._read(self.path, left, limit, "an index", self.name)
            except FileNotFoundError:
                raise StoreError(f"{self.name}: not found (HTTP 404)") from None

        # a whole file may take far longer than a chunk: minutes for each try, not seconds
        policy = dataclasses.replace(
            self.store.retry, timeout=max(self.store.retry.timeout, INDEX_TIMEOUT)
        )
        return policy.run(self.name, attempt)


class RemotePages:
    """The ``PageSource`` of a remote table: pages from the cache directory, else fetched
    (and then kept there)."""

    def __init__(
        self,
        remote: RemoteIndex | None,
        cache: Path | None,
        name: str,
        first: bytes | None,
        size: int,
    ) -> None:
        self.size = size  # of the index file
        self.remote = remote
        self.cache = cache
        self.name = name
        self._first = first  # page 0, fetched with the header
        self._keep_failed = False  # warned once that pages cannot be kept

    def read_page(self, page: int, offset: int, length: int) -> bytes:
        if page == 0 and self._first is not None and len(self._first) >= offset + length:
            data = self._first[offset : offset + length]
            self._first = None
            self._keep(page, data)
            return data
        cached = self._cached(page, length)
        if cached is not None:
            return cached
        if self.remote is None:
            raise TableError(f"{self.name}: offline, and this part of the index is not cached")
        data = self._fetch(offset, offset + length)
        self._keep(page, data)
        return data

    def read_range(self, offset: int, length: int) -> bytes:
        """A range of the table (a pass over it): the pages the cache holds, the others
        fetched in as few ranged requests as there are runs of missing pages (and kept)."""
        end = offset + length
        items_end = self.size - TAIL_SIZE
        parts: list[bytes] = []
        missing_from: int | None = None  # the start of a run of pages not cached

        def fetch_run(upto: int) -> None:
            assert missing_from is not None
            data = self._fetch(missing_from, upto)
            self._keep_pages(missing_from, data)
            parts.append(data)

        page = (offset - ITEMS_OFFSET) // PAGE_BYTES
        lo = ITEMS_OFFSET + page * PAGE_BYTES
        while lo < end:
            hi = min(lo + PAGE_BYTES, items_end)
            cached = self._cached(page, hi - lo)
            if cached is None:
                if missing_from is None:
                    missing_from = max(lo, offset)
            else:
                if missing_from is not None:
                    fetch_run(lo)
                    missing_from = None
                parts.append(cached[max(offset, lo) - lo : min(end, hi) - lo])
            page, lo = page + 1, hi
        if missing_from is not None:
            fetch_run(end)
        return b"".join(parts)

    def _fetch(self, start: int, end: int) -> bytes:
        if self.remote is None:
            raise TableError(f"{self.name}: offline, and this part of the index is not cached")
        try:
            data, _ = self.remote.get(start, end)
        except StoreError as exc:
            raise TableError(f"cannot fetch part of index {self.name}: {exc}") from None
        except RangeIgnored:
            raise TableError(f"{self.name}: the server stopped honouring Range") from None
        return data

    def _keep_pages(self, offset: int, data: bytes) -> None:
        """Keep the whole pages inside ``data`` (the table from ``offset``)."""
        if self.cache is None:
            return
        items_end = self.size - TAIL_SIZE
        page = -(-(offset - ITEMS_OFFSET) // PAGE_BYTES)  # the first starting in range
        while True:
            lo = ITEMS_OFFSET + page * PAGE_BYTES
            hi = min(lo + PAGE_BYTES, items_end)
            if lo >= hi or hi > offset + len(data):
                break
            self._keep(page, data[lo - offset : hi - offset])
            page += 1

    def _cached(self, page: int, length: int) -> bytes | None:
        """Page ``page`` from the cache (this version's directory), if it is there whole."""
        if self.cache is None:
            return None
        try:
            data = (self.cache / f"{page}.page").read_bytes()
        except OSError:
            return None
        return data if len(data) == length else None

    def _keep(self, page: int, data: bytes) -> None:
        """Keep a page in the cache; failing to is a warning (once), never a failed read."""
        if self.cache is None:
            return
        try:
            file = AtomicFile(self.cache / f"{page}.page")
            file.write(data)
            file.commit()
        except (OSError, CafuseError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            level = logging.DEBUG if self._keep_failed else logging.WARNING
            self._keep_failed = True
            log.log(level, "cache: cannot keep pages of index %s: %s", self.name, why)

    def done_with(self, offset: int, length: int) -> None:
        pass

    def close(self) -> None:
        pass


def open_remote_index(
    store: ObjectChunkStore, name: str, display: str, pages_dir: Path | None
) -> ChunkTable:
    """Open the index ``name`` next to ``store`` (see the module docstring); with
    ``pages_dir`` its pages are kept there too."""
    remote = RemoteIndex(store, name, display)
    try:
        head, pin = remote.get(0, FIRST_BYTES)
    except RangeIgnored:
        return _rangeless(remote)
    except StoreError as exc:
        if pages_dir is not None and isinstance(exc, TransientStoreError):
            table = _open_cached(pages_dir, display)
            if table is not None:
                log.warning(
                    "cannot fetch index %s (%s): using its pages in the cache", display, exc
                )
                return table
        raise CafuseError(f"cannot fetch index {display}: {exc}") from None
    remote.pin = pin
    size = pin.size
    if size <= len(head):
        return parse_index(head, display)
    try:
        tail, _ = remote.get(max(size - END_BYTES, 0), size)
        if size <= IN_MEMORY_MAX_BYTES:
            whole, _ = remote.get(0, size)
            return parse_index(whole, display)
    except (StoreError, TableError) as exc:
        raise CafuseError(f"cannot fetch index {display}: {exc}") from None
    except RangeIgnored:
        return _rangeless(remote)
    header = parse_header(head, tail, size, display)
    blob = last_end(tail, len(tail), header, display)
    if pages_dir is not None:
        pages_dir = _prepare_cache(pages_dir, pin, head[:ITEMS_OFFSET], tail)
    log.info(
        "index %s: %d chunks, %s of table read by pages as needed",
        display,
        header.count,
        format_size(size),
    )
    return PagedTable(
        header,
        blob,
        RemotePages(remote, pages_dir, display, head, size),
        page_items=REMOTE_PAGE_ITEMS,
        cache_pages=REMOTE_PAGE_CACHE,
    )


def _rangeless(remote: RemoteIndex) -> ChunkTable:
    """A server that ignores Range: the whole index, if it is small enough to hold."""
    try:
        data = remote.whole(RANGELESS_MAX_BYTES)
    except CorruptChunkError as exc:  # over the bound: said before any body was read
        raise CafuseError(
            f"cannot fetch index {remote.name}: {exc}; the server ignores HTTP Range "
            "requests, so the index must come whole, which cafuse does only up to "
            f"{format_size(RANGELESS_MAX_BYTES)}: serve it from a server that honours Range "
            "(nginx, S3, most CDNs), or download it and mount the local file"
        ) from None
    except StoreError as exc:
        raise CafuseError(f"cannot fetch index {remote.name}: {exc}") from None
    if len(data) > FIRST_BYTES:  # (an empty object has no range to answer with)
        log.warning("index %s: the server ignores Range requests: fetched it whole", remote.name)
    return parse_index(data, remote.name)


def _version_name(pin: Pin) -> str:
    return hashlib.sha256(json.dumps(asdict(pin), sort_keys=True).encode()).hexdigest()[:32]


def _prepare_cache(pages_dir: Path, pin: Pin, head: bytes, tail: bytes) -> Path | None:
    """The directory for the pages of this version (header, tail and pin kept beside
    them), made the ``current`` one; versions past the newest ``KEEP_VERSIONS`` are removed.
    None when the pin cannot tell versions apart (no ETag, no Last-Modified): such pages
    are not kept, as they could not be told from another version's of the same length."""
    if pin.etag is None and pin.last_modified is None:
        log.info("index pages not kept in the cache: the server sends no ETag or Last-Modified")
        return None
    version = pages_dir / _version_name(pin)
    try:
        version.mkdir(parents=True, exist_ok=True)
        for directory, file_name, data in (
            (version, "head", head),
            (version, "tail", tail),
            (version, "pin.json", json.dumps(asdict(pin)).encode()),  # last: its mtime ranks
            (pages_dir, CURRENT, version.name.encode()),
        ):
            file = AtomicFile(directory / file_name)
            file.write(data)
            file.commit()
    except OSError as exc:
        raise CafuseError(f"cache {pages_dir.parent}: cannot write: {exc.strerror}") from None
    _drop_old_versions(pages_dir, version)
    return version


def _drop_old_versions(pages_dir: Path, keep: Path) -> None:
    """Remove the versions past the newest ``KEEP_VERSIONS`` (by when each was last
    opened), and pages of the layout before versions (directly in ``pages_dir``). A
    process still pinned to a removed version finds no page there: it fetches them again
    (its pin checked) or fails them offline, never reads another version's."""

    def opened(directory: Path) -> float:
        try:
            return (directory / "pin.json").stat().st_mtime
        except OSError:
            return 0.0

    try:
        entries = list(pages_dir.iterdir())
    except OSError:
        return
    versions = sorted((e for e in entries if e.is_dir() and e != keep), key=opened, reverse=True)
    for old in versions[KEEP_VERSIONS - 1 :]:
        shutil.rmtree(old, ignore_errors=True)
    for entry in entries:  # the layout before versions had one version's files here
        if entry.is_file() and (
            entry.suffix == ".page" or entry.name in ("head", "tail", "pin.json")
        ):
            with contextlib.suppress(OSError):
                entry.unlink()


def _open_cached(pages_dir: Path, display: str) -> ChunkTable | None:
    """The table from the cache alone (offline): the version opened last, with the pages
    read before."""
    try:
        version = pages_dir / (pages_dir / CURRENT).read_text().strip()
        pin = Pin(**json.loads((version / "pin.json").read_text()))
        head = (version / "head").read_bytes()
        tail = (version / "tail").read_bytes()
    except (OSError, ValueError, TypeError):
        return None
    if version.name != _version_name(pin):
        return None
    header = parse_header(head, tail, pin.size, display)
    blob = last_end(tail, len(tail), header, display)
    return PagedTable(
        header,
        blob,
        RemotePages(None, version, display, None, pin.size),
        page_items=REMOTE_PAGE_ITEMS,
        cache_pages=REMOTE_PAGE_CACHE,
    )
