"""Seeds: an (index, file) pair that answers chunks by id from local bytes.

A seed is an offer, not a requirement: one that cannot be used (its file missing, shorter
than its index, not a regular file; its index unreadable or of another digest) is skipped
with a one-line warning and the job goes on with the others and the stores, as desync does.
Chunks read from a seed are verified like any other, so a seed can never supply wrong bytes.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from .chunktable import ChunkTable, whole_table_step
from .errors import CafuseError
from .fileio import open_for_reading
from .index import read_index

log = logging.getLogger(__name__)


class Seed:
    """Chunks of a local file described by its own index (the image a device already has).

    Lookups go through the ids' first 8 bytes, sorted once, so finding a chunk is a binary
    search; the full id is compared before a hit is used and the bytes are verified by the
    caller like any other source.
    """

    def __init__(self, index: ChunkTable, path: str) -> None:
        self.index = index
        self.path = path
        self.name = f"seed:{path}"
        try:
            self._fd = open_for_reading(path, "seed file", block_device_ok=True)
        except OSError as exc:
            raise CafuseError(f"seed file {path}: cannot open: {exc.strerror}") from None
        size = os.lseek(self._fd, 0, os.SEEK_END)
        if size < index.blob_size:
            os.close(self._fd)
            raise CafuseError(
                f"seed file {path} is {size} bytes but its index describes "
                f"{index.blob_size}: pair each seed index with its own file"
            )
        parts = [batch.id_keys() for batch in index.batches(whole_table_step(index))]
        keys = np.concatenate(parts) if parts else np.empty(0, dtype="<u8")
        self._order = np.argsort(keys, kind="stable")
        self._sorted_keys = keys[self._order]

    @classmethod
    def parse(cls, spec: str) -> Seed:
        """``SEED_INDEX:SEED_FILE`` as given on the command line."""
        index_path, file_path = split_spec(spec)
        return cls(read_index(index_path), file_path)

    def find(self, chunk_id: bytes) -> int | None:
        """Position of ``chunk_id`` in the seed's index, or None."""
        key = int.from_bytes(chunk_id[:8], "little")
        pos = int(self._sorted_keys.searchsorted(np.uint64(key), side="left"))
        while pos < len(self._sorted_keys) and int(self._sorted_keys[pos]) == key:
            i = int(self._order[pos])
            if self.index.chunk_id(i) == chunk_id:
                return i
            pos += 1
        return None

    def close(self) -> None:
        os.close(self._fd)

    def read(self, i: int) -> bytes:
        start, end = self.index.span(i)
        return os.pread(self._fd, end - start, start)


def split_spec(spec: str) -> tuple[str, str]:
    """(index, file) of ``SEED_INDEX:SEED_FILE``; a malformed one is the user's typo."""
    index_path, sep, file_path = spec.partition(":")
    if not sep or not index_path or not file_path:
        raise CafuseError(f"bad --seed {spec!r}: expected SEED_INDEX:SEED_FILE")
    return index_path, file_path


def open_seeds(specs: list[str], digest: str) -> list[Seed]:
    """The seeds that can be used; each one that cannot is skipped with a warning."""
    seeds = []
    for spec in specs:
        index_path, file_path = split_spec(spec)
        try:
            seed = Seed(read_index(index_path), file_path)
        except CafuseError as exc:
            log.warning("warning: seed %s skipped: %s", spec, exc)
            continue
        if seed.index.digest != digest:
            log.warning(
                "warning: seed %s skipped: it uses digest %s but the index uses %s (seeds "
                "must be made with the same --digest)",
                spec,
                seed.index.digest,
                digest,
            )
            seed.close()
            continue
        seeds.append(seed)
    return seeds
