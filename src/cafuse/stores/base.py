"""What every chunk store offers: raw (still compressed) chunk bytes addressed by id."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

from ..errors import CafuseError


class StoreError(CafuseError):
    """A store could not answer (I/O or network trouble), as opposed to a missing chunk.

    ``kind`` says what a fetch should do about it; subclasses set it. A plain StoreError is
    permanent: retrying the same request will not help (bad URL, denied, broken config).
    """

    kind = "permanent"


class TransientStoreError(StoreError):
    """Worth retrying, here or on another store: connection trouble, a timeout, a 5xx
    answer, a body cut short."""

    kind = "transient"


class ThrottledStoreError(TransientStoreError):
    """The store asked us to slow down (429, 503): back off from the whole store."""

    kind = "throttled"

    def __init__(
        self, message: str, retry_after: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status  # 503 also counts towards the breaker: a dead backend says it


class CorruptChunkError(StoreError):
    """A copy that is not the chunk its id names (wrong bytes, cut short, oversized)."""

    kind = "corrupt"


class ReadOnlyStore(CafuseError):
    pass


class Uncompressed(bytes):
    """A chunk's data stored as is, a bare ``<id>`` file (casync's and desync's layout for
    uncompressed chunks): stores return such copies as this type, and ``put`` files it
    under the bare name. Never decoded by its magic bytes (``cafuse.codec``)."""

    __slots__ = ()


def chunk_path(chunk_id: bytes, bare: bool = False) -> str:
    """casync's layout: ``<first 4 hex digits>/<64 hex digits>.cacnk``, no suffix if bare."""
    hexid = chunk_id.hex()
    return f"{hexid[:4]}/{hexid}" if bare else f"{hexid[:4]}/{hexid}.cacnk"


class ChunkStore(ABC):
    """A content-addressed chunk store. Methods block; call them from worker threads."""

    url: str
    writable: bool = False
    is_local: bool = False  # on this machine: no network latency to hide

    @abstractmethod
    def get(self, chunk_id: bytes) -> bytes | None:
        """The stored bytes of a chunk, or None when the store does not have it.

        Remote stores also take ``timeout=`` (seconds for this one request) and raise the
        typed ``StoreError``s above.
        """

    @abstractmethod
    def has(self, chunk_id: bytes) -> bool:
        """Whether the store holds the chunk (without reading it)."""

    def put(self, chunk_id: bytes, blob: bytes) -> bool:
        """Store a chunk atomically; False when it was already there."""
        raise ReadOnlyStore(f"store {self.url} is read-only")

    def delete(self, chunk_id: bytes) -> None:
        raise ReadOnlyStore(f"store {self.url} is read-only")

    def iter_ids(self) -> Iterator[bytes]:
        """Every chunk id the store holds."""
        raise CafuseError(f"store {self.url} cannot list its chunks")

    def sync(self) -> None:
        """Make every chunk put so far durable."""
        return None

    def __str__(self) -> str:
        return self.url
