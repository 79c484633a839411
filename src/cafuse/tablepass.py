"""One pass over a whole table in batches, in memory that does not grow with the table:
which ids were seen (``DistinctKeys``), the first occurrences per batch
(``distinct_batches``), chunk length percentiles (``SizeHistogram``).

``DistinctKeys`` carries the ids seen so far from one batch to the next, by their first 16
bytes (two uint64 keys: a lookup by the first, the second compared on a hit). It holds
sorted runs of keys that are merged when two reach the same size (as a log-structured
merge does), so adding a batch costs about its own size and a lookup a few binary searches.
Memory is 16 bytes per distinct id, stopping at ``cap`` ids when one is given (the caller
is told: past it an id may be taken for new twice). Two ids are taken for one only when
their first 16 bytes are equal: finding such a pair takes about 2^64 digests, so a crafted
chunk cannot hide behind another one from ``verify`` or ``cache``. ``narrow`` keeps the
first 8 bytes only (8 bytes per id: gc, whose collisions can only keep a chunk).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .chunktable import Batch, ChunkTable, whole_table_step

INFO_DISTINCT_CAP = 8 << 20  # distinct ids remembered by info/verify/cache: 128 MB of keys


def _empty() -> np.ndarray:
    return np.empty(0, dtype="<u8")


class DistinctKeys:
    def __init__(self, cap: int | None = None, *, narrow: bool = False) -> None:
        self.cap = cap
        self.narrow = narrow
        self.count = 0
        self.full = False  # the cap was reached: later ids are not remembered
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (first keys, second keys)

    def keys(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """The two keys of every id of ``batch`` (the second empty when ``narrow``)."""
        first = batch.id_keys()
        if self.narrow:
            return first, _empty()
        second = np.ascontiguousarray(batch.ids[:, 8:16]).view("<u8").reshape(-1)
        return first, second

    def seen(self, keys: np.ndarray, second: np.ndarray | None = None) -> np.ndarray:
        """For ``keys`` sorted (and unique with ``second``): which are in the set."""
        hit = np.zeros(len(keys), dtype=bool)
        for run, run_second in self._runs:
            pos = np.minimum(np.searchsorted(run, keys), len(run) - 1)
            same = run[pos] == keys
            if second is None or self.narrow:
                hit |= same
                continue
            exact = same & (run_second[pos] == second)
            hit |= exact
            # first keys equal, second not: a collision of 8 bytes (rare), or the run has
            # several ids with that first key; all of them decide
            for j in np.flatnonzero(same & ~exact):
                lo, hi = (
                    np.searchsorted(run, keys[j], "left"),
                    np.searchsorted(run, keys[j], "right"),
                )
                hit[j] |= bool((run_second[lo:hi] == second[j]).any())
        return hit

    def add(self, keys: np.ndarray, second: np.ndarray | None = None) -> None:
        """Add keys not in the set yet (sorted; unique with ``second``)."""
        if not len(keys):
            return
        if self.narrow:
            second = _empty()
        elif second is None:
            second = np.zeros(len(keys), dtype="<u8")
        if self.cap is not None and self.count + len(keys) > self.cap:
            self.full = True
            room = max(self.cap - self.count, 0)
            keys, second = keys[:room], second[:room]
            if not len(keys):
                return
        self.count += len(keys)
        run = (keys, second)
        while self._runs and len(self._runs[-1][0]) <= len(run[0]):
            run = _merge(self._runs.pop(), run)
        self._runs.append(run)

    def first_seen(self, batch: Batch, mask: np.ndarray | None = None) -> np.ndarray:
        """Batch-relative positions (ascending) of the chunks whose id appears for the
        first time in the pass, among those ``mask`` selects; they are added to the set."""
        first, second = self.keys(batch)
        selected = np.arange(len(first)) if mask is None else np.flatnonzero(mask)
        first = first[selected]
        if self.narrow:
            unique, at = np.unique(first, return_index=True)
            unique_second = _empty()
        else:
            second = second[selected]
            order = np.argsort(first, kind="stable")  # the first of equal ids first
            a, b = first[order], second[order]
            starts = np.ones(len(a), dtype=bool)
            starts[1:] = a[1:] != a[:-1]
            group_second = b[starts][np.cumsum(starts) - 1]
            for k in np.flatnonzero(b != group_second):  # 8-byte collisions: rare
                lo = int(np.searchsorted(a, a[k]))
                starts[k] = not (b[lo:k] == b[k]).any()
            unique, unique_second, at = a[starts], b[starts], order[starts]
        new = ~self.seen(unique, None if self.narrow else unique_second)
        self.add(unique[new], None if self.narrow else unique_second[new])
        return np.sort(selected[at[new]])

    def sorted_keys(self) -> np.ndarray:
        """Every first key in the set, sorted and unique (for a final lookup table)."""
        if not self._runs:
            return _empty()
        while len(self._runs) > 1:
            b, a = self._runs.pop(), self._runs.pop()
            self._runs.append(_merge(a, b))
        keys = self._runs[0][0]
        return keys if self.narrow else np.unique(keys)


def _merge(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Two runs as one, sorted by first key (ids equal in it in no particular order)."""
    first = np.concatenate([a[0], b[0]])
    if not len(a[1]) and not len(b[1]):  # narrow
        return np.sort(first, kind="mergesort"), _empty()
    order = np.argsort(first, kind="mergesort")
    return first[order], np.concatenate([a[1], b[1]])[order]


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
