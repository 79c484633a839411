"""Which chunk ids a pass over a table has already seen, by the ids' first 8 bytes.

A pass over a huge table (info, verify, cache, gc) goes batch by batch; this set carries
the ids seen so far from one batch to the next. It holds sorted runs of 8-byte keys that
are merged when two reach the same size (as a log-structured merge does), so adding a
batch costs about its own size and a lookup a few binary searches. Memory is 8 bytes per
distinct id, stopping at ``cap`` ids when one is given (the caller is told: past it an id
may be taken for new twice). A key collision between two different ids can only make
one look seen: callers that delete use the set to keep, never to drop.
"""

from __future__ import annotations

import numpy as np

from .chunktable import Batch


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
