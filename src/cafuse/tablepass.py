"""One pass over a whole table in batches, in memory that does not grow with the table:
which ids were seen (``DistinctKeys``), the first occurrences per batch
(``distinct_batches``), chunk length percentiles (``SizeHistogram``).

``DistinctKeys`` carries the ids seen so far, by their first 8 bytes, from one batch to
the next. It holds sorted runs of keys that are merged when two reach the same size (as a
log-structured merge does), so adding a batch costs about its own size and a lookup a few
binary searches. Memory is 8 bytes per distinct id, stopping at ``cap`` ids when one is
given (the caller is told: past it an id may be taken for new twice). A key collision
between two different ids can only make one look seen: callers that delete use the set
to keep, never to drop.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .chunktable import Batch, ChunkTable, whole_table_step

INFO_DISTINCT_CAP = 8 << 20  # distinct ids remembered by info/verify/cache: 64 MB of keys


class DistinctKeys:
    def __init__(self, cap: int | None = None) -> None:
        self.cap = cap
        self.count = 0
        self.full = False  # the cap was reached: later ids are not remembered
        self._runs: list[np.ndarray] = []

    def seen(self, keys: np.ndarray) -> np.ndarray:
        """For sorted unique ``keys``: which are in the set."""
        hit = np.zeros(len(keys), dtype=bool)
        for run in self._runs:
            pos = np.minimum(np.searchsorted(run, keys), len(run) - 1)
            hit |= run[pos] == keys
        return hit

    def add(self, keys: np.ndarray) -> None:
        """Add sorted unique keys not in the set yet."""
        if not len(keys):
            return
        if self.cap is not None and self.count + len(keys) > self.cap:
            self.full = True
            keys = keys[: max(self.cap - self.count, 0)]
            if not len(keys):
                return
        self.count += len(keys)
        run = keys
        while self._runs and len(self._runs[-1]) <= len(run):
            run = np.sort(np.concatenate([self._runs.pop(), run]), kind="mergesort")
        self._runs.append(run)

    def first_seen(self, batch: Batch, mask: np.ndarray | None = None) -> np.ndarray:
        """Batch-relative positions (ascending) of the chunks whose id appears for the
        first time in the pass, among those ``mask`` selects; they are added to the set."""
        keys = batch.id_keys()
        selected = np.arange(len(keys)) if mask is None else np.flatnonzero(mask)
        unique, first = np.unique(keys[selected], return_index=True)
        new = ~self.seen(unique)
        self.add(unique[new])
        return np.sort(selected[first[new]])

    def sorted_keys(self) -> np.ndarray:
        """Every key in the set, sorted (one array: for a final lookup table)."""
        if not self._runs:
            return np.empty(0, dtype="<u8")
        while len(self._runs) > 1:
            b, a = self._runs.pop(), self._runs.pop()
            self._runs.append(np.sort(np.concatenate([a, b]), kind="mergesort"))
        return self._runs[0]


class SizeHistogram:
    """Chunk lengths counted per length (or per small bucket when the max is huge): exact
    percentiles in memory that does not grow with the table."""

    def __init__(self, chunk_max: int) -> None:
        self.shift = max(int(chunk_max).bit_length() - 22, 0)
        self.counts = np.zeros((chunk_max >> self.shift) + 1, dtype=np.int64)
        self.total = 0
        self.smallest = chunk_max
        self.largest = 0

    def add(self, sizes: np.ndarray) -> None:
        if not len(sizes):
            return
        self.counts += np.bincount(
            (sizes >> np.uint64(self.shift)).astype(np.int64), minlength=len(self.counts)
        )[: len(self.counts)]
        self.total += int(sizes.sum())
        self.smallest = min(self.smallest, int(sizes.min()))
        self.largest = max(self.largest, int(sizes.max()))

    def percentile(self, q: float) -> int:
        cumulative = np.cumsum(self.counts)
        rank = q / 100 * (int(cumulative[-1]) - 1)
        return int(np.searchsorted(cumulative, rank, side="right")) << self.shift

    def summary(self) -> dict[str, int]:
        n = int(self.counts.sum())
        return {
            "smallest": self.smallest,
            "p10": self.percentile(10),
            "median": self.percentile(50),
            "mean": self.total // max(n, 1),
            "p90": self.percentile(90),
            "largest": self.largest,
        }


def distinct_batches(index: ChunkTable, *, skip_zero: bool = False) -> Iterator[tuple[int, Batch]]:
    """Batches reduced to the first occurrence of each id (and no zero chunks with
    ``skip_zero``): the chunks a pass over the store needs, in bounded memory. Each comes
    with the bytes of the image its whole batch covers (for progress)."""
    seen = DistinctKeys(cap=INFO_DISTINCT_CAP)
    for batch in index.batches(whole_table_step(index)):
        keep = seen.first_seen(batch, ~batch.zero if skip_zero else None)
        yield int(batch.ends[-1]) - batch.start, _select(batch, keep)


def _select(batch: Batch, positions: np.ndarray) -> Batch:
    """A batch-like view of some chunks of a batch (``first`` is then meaningless)."""
    selected = Batch(
        batch.first, batch.start, batch.ends[positions], batch.ids[positions], batch.zero[positions]
    )
    selected.__dict__["starts"] = batch.starts[positions]
    selected.__dict__["sizes"] = batch.sizes[positions]
    return selected
