"""A chunk table read a page at a time: from a local file (``pread``, see ``FilePages``), or
by ranged GETs of a URL (``cafuse.remoteindex``). Nothing is read at open but the header and the
tail (with the last item, which gives the blob length).

A page is ``PAGE_ITEMS`` consecutive items (64 KiB of table). It is checked when first
read (offsets strictly increasing, also against its neighbours when they are known;
chunk lengths within the max; the last item where the tail says it is) and kept in a
bounded LRU. A broken page fails only the reads that need it, with a ``TableError`` that
names the rule.

The chunk holding an offset is found by interpolation search over the end offsets: chunk
lengths scatter around their mean, so the first guess (offset / blob length * count) lands
on the right page or next to it, and a random read costs one or two page reads.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .chunktable import (
    BATCH_ITEMS,
    Batch,
    ChunkTable,
    PageInvalid,
    PageMissing,
    TableError,
    ZeroIds,
)
from .index import (
    HEADER_SIZE,
    ITEM_DTYPE,
    ITEM_SIZE,
    TABLE_HEADER_SIZE,
    TAIL_SIZE,
    Header,
    _fail,
    parse_header,
)

log = logging.getLogger(__name__)

ITEMS_OFFSET = HEADER_SIZE + TABLE_HEADER_SIZE  # 64
PAGE_ITEMS = 1638  # 65,520 bytes of items
PAGE_CACHE = 256  # pages kept in memory: 16 MiB


class PageSource(Protocol):
    """Where the table's bytes come from."""

    name: str

    def read_page(self, page: int, offset: int, length: int) -> bytes | memoryview: ...

    def read_range(self, offset: int, length: int) -> bytes | memoryview: ...

    def done_with(self, offset: int, length: int) -> None: ...

    def close(self) -> None: ...


@dataclass
class Page:
    first: int  # item index of the page's first item
    ends: np.ndarray
    ids: np.ndarray
    zero: np.ndarray


class PagedTable(ChunkTable):
    in_memory = False

    def __init__(
        self,
        header: Header,
        blob_size: int,
        source: PageSource,
        *,
        page_items: int = PAGE_ITEMS,
        cache_pages: int = PAGE_CACHE,
    ) -> None:
        self.flags = header.flags
        self.chunk_min = header.chunk_min
        self.chunk_avg = header.chunk_avg
        self.chunk_max = header.chunk_max
        self._count = header.count
        self._blob_size = blob_size
        self.source = source
        self.page_items = page_items
        self.page_count = -(-self._count // page_items)
        self._cache_pages = max(cache_pages, 8)
        self._pages: OrderedDict[int, Page] = OrderedDict()
        self._first_ends: dict[int, int] = {}  # of every page checked so far: 16 B a page
        self._last_ends: dict[int, int] = {}
        # the same, sorted for the search: pages and their last ends (both increasing)
        self._known_pages: list[int] = []
        self._known_ends: list[int] = []
        self._invalid: dict[int, PageInvalid] = {}  # pages that broke a rule
        self._lock = threading.Lock()
        self._zero_ids = ZeroIds(self.digest)
        self.pages_read = 0

    # ------------------------------------------------------------------ interface

    @property
    def chunk_count(self) -> int:
        return self._count

    @property
    def blob_size(self) -> int:
        return self._blob_size

    def chunk_id(self, i: int) -> bytes:
        page = self._resident_page(i)
        return page.ids[i - page.first].tobytes()

    def span(self, i: int) -> tuple[int, int]:
        page = self._resident_page(i)
        j = i - page.first
        end = int(page.ends[j])
        return (int(page.ends[j - 1]) if j else self._end_before(i // self.page_items, True)), end

    def is_zero(self, i: int) -> bool:
        page = self._resident_page(i)
        return bool(page.zero[i - page.first])

    def _resident_page(self, i: int) -> Page:
        """The page of chunk ``i``; the fast path (no lock, no LRU touch: ``covering``
        touched it) for the per-chunk calls of a read."""
        page = self._pages.get(i // self.page_items)
        return page if page is not None else self._page(i // self.page_items, True)

    def resident(self, i: int) -> bool:
        p = i // self.page_items
        return p in self._pages and bool(i % self.page_items or p == 0 or p - 1 in self._last_ends)

    def covering(self, offset: int, size: int, *, wait: bool = True) -> range:
        end = min(offset + size, self._blob_size)
        if size <= 0 or offset >= end:
            return range(0)
        first = self._find(offset, wait)
        page = self._page(first // self.page_items, wait)
        inside = end <= int(page.ends[first - page.first])  # the common case: one search
        last = first if inside else self._find(end - 1, wait)
        for p in range(first // self.page_items, last // self.page_items + 1):
            self._page(p, wait)
        self._end_before(first // self.page_items, wait)
        return range(first, last + 1)

    def load_page(self, page: int) -> None:
        self._page(page, True)

    def batches(self, step: int = BATCH_ITEMS) -> Iterator[Batch]:
        prev = 0
        step = -(-max(step, 1) // self.page_items) * self.page_items  # whole pages
        for lo in range(0, self._count, step):
            hi = min(lo + step, self._count)
            offset, length = ITEMS_OFFSET + ITEM_SIZE * lo, ITEM_SIZE * (hi - lo)
            raw = self.source.read_range(offset, length)
            ends, ids, zero = self._check(lo, raw, prev)
            yield Batch(lo, prev, ends.copy(), ids.copy(), zero)
            prev = int(ends[-1])
            del ends, ids, raw
            self.source.done_with(offset, length)

    def stats(self) -> dict[str, int]:
        stats = {"pages": self.page_count, "pages_read": self.pages_read}
        stats["pages_in_memory"] = len(self._pages)
        fetched = getattr(getattr(self.source, "remote", None), "bytes_fetched", None)
        if fetched is not None:
            stats["bytes_fetched"] = fetched
        return stats

    def close(self) -> None:
        with self._lock:
            self._pages.clear()
        self.source.close()

    # ------------------------------------------------------------------ pages

    def _page(self, p: int, wait: bool) -> Page:
        with self._lock:
            page = self._pages.get(p)
            if page is not None:
                self._pages.move_to_end(p)
                return page
            broken = self._invalid.get(p)
        if broken is not None:
            raise broken  # checked before: fails the same way, read no more
        if not wait:
            raise PageMissing(p)
        first = p * self.page_items
        count = min(self.page_items, self._count - first)
        raw = self.source.read_page(p, ITEMS_OFFSET + ITEM_SIZE * first, ITEM_SIZE * count)
        with self._lock:
            before = self._last_ends.get(p - 1) if p else 0
        try:
            ends, ids, zero = self._check(first, raw, before)
        except PageInvalid as exc:
            with self._lock:
                self._invalid[p] = exc
            raise
        page = Page(first, ends, ids, zero)
        with self._lock:
            self.pages_read += 1
            self._first_ends[p] = int(ends[0])
            if p not in self._last_ends:
                k = bisect.bisect_left(self._known_pages, p)
                self._known_pages.insert(k, p)
                self._known_ends.insert(k, int(ends[-1]))
            self._last_ends[p] = int(ends[-1])
            self._pages[p] = page
            while len(self._pages) > self._cache_pages:
                self._pages.popitem(last=False)
        return page

    def _end_before(self, p: int, wait: bool) -> int:
        """End offset of the item before page ``p`` (the start of its first chunk)."""
        if p == 0:
            return 0
        with self._lock:
            known = self._last_ends.get(p - 1)
        if known is not None:
            return known
        return int(self._page(p - 1, wait).ends[-1])

    def _check(
        self, first: int, raw: bytes | memoryview, before: int | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Parse items ``first ..`` and check them; ``before`` is the previous item's end
        when known. Raises TableError naming the broken rule."""
        count = len(raw) // ITEM_SIZE
        if len(raw) != count * ITEM_SIZE or not count:
            raise TableError(f"{self.source.name}: short read of the table at item {first}")
        items = np.frombuffer(raw, dtype=ITEM_DTYPE, count=count)
        ends, ids = items["end"], items["id"]
        signed = ends.astype(np.int64)
        lengths = np.diff(signed, prepend=np.int64(before if before is not None else 0))
        if before is None:
            lengths[0] = 1  # the first chunk's start is not known yet: checked later
        if (ends > np.uint64(1 << 62)).any() or (lengths <= 0).any():
            bad = first + int(np.argmax((lengths <= 0) | (ends > np.uint64(1 << 62))))
            raise self._broken(f"chunk offsets do not strictly increase (item {bad})")
        if (lengths > self.chunk_max).any():
            bad = int(np.argmax(lengths > self.chunk_max))
            raise self._broken(
                f"chunk {first + bad} is {int(lengths[bad])} bytes, over the max {self.chunk_max}"
            )
        last = first + count - 1
        with self._lock:
            after = (
                self._first_ends.get((last + 1) // self.page_items)
                if (last + 1) % self.page_items == 0
                else None
            )
        if (after is not None and after - int(ends[-1]) > self.chunk_max) or (
            after is not None and after <= int(ends[-1])
        ):
            raise self._broken(f"chunk offsets do not strictly increase (item {last + 1})")
        if last == self._count - 1 and int(ends[-1]) != self._blob_size:
            raise self._broken("the last item changed since the index was opened")
        if last < self._count - 1 and int(ends[-1]) >= self._blob_size:
            raise self._broken(f"chunk offsets do not strictly increase (item {last})")
        sizes = lengths.astype(np.uint64)
        if before is None and count:
            sizes[0] = 0  # unknown: a zero chunk of unknown length is not recognised
        zero = self._zero_ids.mask(sizes, ids, self.chunk_max)
        return ends, ids, zero

    def _broken(self, rule: str) -> PageInvalid:
        return PageInvalid(f"{self.source.name}: not a valid casync blob index: {rule}")

    # ------------------------------------------------------------------ search

    def _find(self, x: int, wait: bool) -> int:
        """The first chunk whose end is past ``x`` (``x`` < blob length)."""
        a, val_a = 0, 0  # every chunk before a ends at or before x; val_a = end(a - 1)
        b, val_b = self._count - 1, self._blob_size  # chunk b ends past x; val_b = end(b)
        with self._lock:  # narrow with what pages already told (16 B kept per page)
            k = bisect.bisect_right(self._known_ends, x)
            if k:
                p = self._known_pages[k - 1]
                a, val_a = min((p + 1) * self.page_items, self._count), self._known_ends[k - 1]
            if k < len(self._known_pages):
                p = self._known_pages[k]
                b = min((p + 1) * self.page_items, self._count) - 1
                val_b = self._known_ends[k]
        while a < b:
            guess = a + int((x - val_a) / max(val_b - val_a, 1) * (b - a))
            guess = min(max(guess, a), b - 1)
            page = self._page(guess // self.page_items, wait)
            lo, hi = page.first, page.first + len(page.ends)
            if int(page.ends[-1]) <= x:
                a, val_a = hi, int(page.ends[-1])
            elif int(page.ends[0]) > x:
                b, val_b = lo, int(page.ends[0])
            else:
                return lo + int(page.ends.searchsorted(np.uint64(x), side="right"))
        return a


# ---------------------------------------------------------------------- local files


class FilePages:
    """Pages of a local index file, read with ``pread`` when first needed.

    Not views on a memory map: the kernel maps the page cache around each fault in large
    folios, so views on a map of a 640 MB table grew the daemon by ~340 KB per page
    touched (390 MB after 200 random reads, measured); a 64 KiB ``pread`` per page costs
    microseconds and keeps memory to the page LRU.
    """

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name

    def read_page(self, page: int, offset: int, length: int) -> bytes:
        return self.read_range(offset, length)

    def read_range(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as exc:
            raise TableError(f"{self.name}: cannot read the index: {exc.strerror}") from None
        if len(data) != length:
            raise TableError(f"{self.name}: the index file shrank while open")
        return data

    def done_with(self, offset: int, length: int) -> None:
        pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_file(fd: int, size: int, source: str) -> PagedTable:
    """A table over a local index file (``fd`` is the table's from now on): header, tail
    and last item checked now, the items when first used."""
    try:
        head = os.pread(fd, ITEMS_OFFSET, 0)
        end = os.pread(fd, ITEM_SIZE + TAIL_SIZE, max(size - ITEM_SIZE - TAIL_SIZE, 0))
        header = parse_header(head, end, size, source)
        table = PagedTable(header, last_end(end, len(end), header, source), FilePages(fd, source))
    except BaseException:
        os.close(fd)
        raise
    return table


def last_end(buf: bytes | memoryview, size: int, header: Header, source: str) -> int:
    """The blob length: the last item's end, read from the bytes before the tail."""
    if not header.count:
        return 0
    item = size - TAIL_SIZE - ITEM_SIZE
    end = int.from_bytes(buf[item : item + 8], "little")
    if end == 0 or end > (1 << 62):
        raise _fail(source, f"chunk offsets do not strictly increase (item {header.count - 1})")
    if end > header.count * header.chunk_max:
        raise _fail(source, f"the blob length {end} is more than {header.count} max-size chunks")
    return end
