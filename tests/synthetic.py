"""Synthetic huge indexes for tests and the bench: a few hundred real chunks in a store,
and an index of any number of items whose ids cycle through them (vectorised, in batches,
so 16 million items take seconds and bounded memory)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cafuse.codec import compress
from cafuse.digest import FLAG_BLAKE3, hash_function
from cafuse.index import IndexWriter
from cafuse.stores.local import LocalStore


@dataclass
class Chunks:
    data: list[bytes]
    ids: np.ndarray  # (k, 32) uint8
    sizes: np.ndarray  # (k,) uint64


def make_chunks(
    store: Path, count: int, low: int, high: int, seed: int = 0, zero: bool = False
) -> Chunks:
    """``count`` chunks of random bytes, lengths in ``[low, high]``, stored compressed;
    with ``zero`` the last is all zeros, ``high`` long (as a run of zeros is cut)."""
    rng = np.random.default_rng(seed)
    local = LocalStore(str(store), create=True)
    hash_chunk = hash_function("blake3")
    data, ids = [], []
    lengths = rng.integers(low, high + 1, count).tolist()
    for n, length in enumerate(lengths):
        # half random, half repeated bytes: compressible like real data
        raw = rng.integers(0, 256, length // 2, dtype=np.uint8).tobytes()
        raw += bytes([raw[0]]) * (length - len(raw))
        if zero and n == count - 1:
            raw = bytes(high)
        chunk_id = hash_chunk(raw)
        local.put(chunk_id, compress(raw))
        data.append(raw)
        ids.append(np.frombuffer(chunk_id, dtype=np.uint8))
    return Chunks(data, np.stack(ids), np.array([len(d) for d in data], dtype=np.uint64))


def write_cycling_index(
    path: Path,
    chunks: Chunks,
    items: int,
    chunk_min: int,
    chunk_avg: int,
    chunk_max: int,
    seed: int = 1,
    batch: int = 1 << 20,
) -> np.ndarray:
    """An index of ``items`` chunks picked at random from ``chunks``; returns which chunk
    each item is (int16, ``items`` long: 32 MB at 16 million)."""
    rng = np.random.default_rng(seed)
    choice = rng.integers(0, len(chunks.data), items, dtype=np.int16)
    with IndexWriter(path, FLAG_BLAKE3, chunk_min, chunk_avg, chunk_max) as writer:
        offset = np.uint64(0)
        for lo in range(0, items, batch):
            pick = choice[lo : lo + batch]
            ends = np.cumsum(chunks.sizes[pick], dtype=np.uint64) + offset
            writer.append(ends, chunks.ids[pick])
            offset = ends[-1]
        writer.commit()
    return choice


def expected_bytes(table, chunks: Chunks, choice: np.ndarray, offset: int, size: int) -> bytes:
    """What the image holds at ``[offset, offset + size)``, from the chunks' own bytes."""
    out = []
    end = min(offset + size, table.blob_size)
    for i in table.covering(offset, size):
        start, stop = table.span(i)
        data = chunks.data[int(choice[i])]
        out.append(data[max(offset, start) - start : min(end, stop) - start])
    return b"".join(out)
