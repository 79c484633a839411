"""The chunk table interface: what every command needs from an index, whatever holds it.

An index's table maps byte offsets to chunks. Three implementations sit behind this one
interface: ``cafuse.index.Index`` (small indexes, parsed into memory), and
``cafuse.pagedtable.PagedTable`` over a local file or over ranged GETs of a URL
(``cafuse.remoteindex``), which read the table a page at a time when first used.

Consumers use only these methods: ``chunk_count``, ``blob_size``, ``chunk_id(i)``,
``span(i)``, ``covering(offset, size)``, ``is_zero(i)`` and ``batches()`` for a pass over
the whole table in bounded memory. On the mount's event loop, ``covering(..., wait=False)``
raises ``PageMissing`` instead of doing I/O; the caller loads the page in a thread
(``load_page``) and asks again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .digest import digest_from_flags, zero_chunk_id
from .errors import CafuseError

BATCH_ITEMS = 1 << 16  # items per batch of a streaming pass: 2.6 MB of table


class TableError(CafuseError):
    """A part of the table broke a rule of the format (found when that part was first read),
    or could not be fetched: the read that needed it fails."""


class PageInvalid(TableError):
    """A page broke a rule of the format: every read that needs it fails the same way,
    logged once (``logged`` is set by whoever logged it)."""

    logged = False


class PageMissing(Exception):
    """A page the lookup needs is not in memory and the caller asked not to wait."""

    def __init__(self, page: int) -> None:
        super().__init__(page)
        self.page = page


@dataclass
class Batch:
    """Consecutive items ``first .. first+len-1`` of a table, validated."""

    first: int
    start: int  # byte offset where chunk ``first`` starts
    ends: np.ndarray  # uint64, strictly increasing
    ids: np.ndarray  # (k, 32) uint8
    zero: np.ndarray  # bool: the chunk is all zero bytes

    def __len__(self) -> int:
        return int(self.ends.shape[0])

    @cached_property
    def starts(self) -> np.ndarray:
        starts = np.empty_like(self.ends)
        if len(self):
            starts[0] = self.start
            starts[1:] = self.ends[:-1]
        return starts

    @cached_property
    def sizes(self) -> np.ndarray:
        return self.ends - self.starts

    def chunk_id(self, j: int) -> bytes:
        return self.ids[j].tobytes()

    def id_keys(self) -> np.ndarray:
        """The first 8 bytes of every id as uint64."""
        return np.ascontiguousarray(self.ids[:, :8]).view("<u8").reshape(-1)


class ZeroIds:
    """The id of an all-zero chunk of each length (a digest of zeros), computed on demand and
    kept for the lengths asked most recently."""

    def __init__(self, digest: str, capacity: int = 256) -> None:
        self.digest = digest
        self.capacity = capacity
        self._ids: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, length: int) -> np.ndarray:
        with self._lock:
            zid = self._ids.get(length)
            if zid is not None:
                self._ids.move_to_end(length)
                return zid
        zid = np.frombuffer(zero_chunk_id(self.digest, length), dtype=np.uint8)
        with self._lock:
            self._ids[length] = zid
            while len(self._ids) > self.capacity:
                self._ids.popitem(last=False)
        return zid

    def mask(self, sizes: np.ndarray, ids: np.ndarray, chunk_max: int) -> np.ndarray:
        """Which of these chunks are all zero bytes, in a few vectorised steps.

        A content-defined chunker never cuts inside a run of zeros (its rolling hash is
        constant there), so zero chunks have the max length, or one length that repeats, or
        end the image. Only those lengths are hashed; every id is compared to them at once.
        """
        mask = np.zeros(len(sizes), dtype=bool)
        if not len(sizes):
            return mask
        lengths, counts = np.unique(sizes, return_counts=True)
        repeated = lengths[counts > 1]
        if len(repeated) > 16:
            repeated = lengths[np.argsort(counts)[::-1][:16]]
        candidates = {int(x) for x in repeated.tolist()}
        candidates.update((chunk_max, int(sizes[-1])))
        candidates.discard(0)
        unknown = sizes == 0  # a length not known yet: compare with every candidate's id
        for length in candidates:
            zid = self.get(length)
            rows = (sizes == length) | unknown
            if rows.any():
                mask[rows] |= (ids[rows] == zid).all(axis=1)
        return mask


class ChunkTable:
    """The interface; see the module docstring. Subclasses set the header fields."""

    flags: int
    chunk_min: int
    chunk_avg: int
    chunk_max: int
    in_memory = True  # the whole table is in memory: a pass may hold per-chunk arrays

    @property
    def digest(self) -> str:
        return digest_from_flags(self.flags)

    @property
    def chunk_count(self) -> int:
        raise NotImplementedError

    @property
    def blob_size(self) -> int:
        raise NotImplementedError

    def chunk_id(self, i: int) -> bytes:
        raise NotImplementedError

    def span(self, i: int) -> tuple[int, int]:
        """Byte range ``[start, end)`` of chunk ``i`` in the blob."""
        raise NotImplementedError

    def covering(self, offset: int, size: int, *, wait: bool = True) -> range:
        """Indices of the chunks that cover ``[offset, offset + size)``, clipped to the blob.

        With ``wait=False`` no I/O is done: ``PageMissing`` says which page to load first.
        Once it returns, ``span``, ``chunk_id`` and ``is_zero`` of those chunks do no I/O.
        """
        raise NotImplementedError

    def is_zero(self, i: int) -> bool:
        """Whether chunk ``i`` is all zero bytes (served without a fetch)."""
        raise NotImplementedError

    def resident(self, i: int) -> bool:
        """Whether ``span``/``chunk_id``/``is_zero`` of chunk ``i`` can answer without I/O."""
        return True

    def load_page(self, page: int) -> None:
        """Bring a page into memory (blocking I/O: call it from a thread)."""

    def batches(self, step: int = BATCH_ITEMS) -> Iterator[Batch]:
        """The whole table in order, ``step`` items at a time."""
        raise NotImplementedError

    def stats(self) -> dict[str, int]:
        """Counters of a table read by pages (empty for one in memory)."""
        return {}

    def close(self) -> None:
        """Release the file or connections behind the table."""


def whole_table_step(table: ChunkTable) -> int:
    """The batch size for a pass that groups chunks: the whole table when it is in memory
    (exact results at no extra cost), else a bounded batch."""
    return max(table.chunk_count, 1) if table.in_memory else BATCH_ITEMS
