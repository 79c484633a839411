"""How far ahead of each sequential reader to fetch: an adaptive window per stream.

Pure logic, no FUSE, no I/O, no trio: the reader reports every read of every stream (an
open file handle) and the latency of remote fetches; the policy answers with the byte range
to request ahead of the stream. Times come from an injected clock, so tests are exact.

A stream is *sequential* once it has read ``SEQUENTIAL_THRESHOLD`` bytes in a row (reads
near its front count as in order: the kernel keeps several of one reader's requests in
flight and they can arrive slightly out of order). Any other read resets it: the window
drops to nothing and growth starts over, so a random reader never fetches ahead.

The window of a sequential stream grows in two phases:

* *start*: it doubles on each read from ``initial`` up to ``quick`` bytes (the old fixed
  readahead; enough for a local store, reached within a few reads);
* *probe*: beyond that it grows only while it pays. The stream's read rate is measured in
  rounds (a round is at least one window of bytes); after each doubling one round settles,
  the next is compared with the best rate so far. A gain of ``GAIN`` keeps the window
  doubling; otherwise it stops (*hold*) at the larger of what it had before the last
  doubling and twice the bandwidth-delay product (best rate x the shortest recent remote
  fetch latency). Every ``REPROBE_ROUNDS`` rounds in hold it tries one doubling again, so
  a link that got faster is noticed.

All streams share one ``budget`` of bytes requested ahead and not yet read: each active
stream (one read within ``IDLE_AFTER`` seconds) gets a max-min fair share of it, and no
request ever takes the sum over the budget. Ranges end on chunk boundaries (``align``)
and never past the blob's end.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

SEQUENTIAL_THRESHOLD = 512 << 10
# in order: up to 1 MiB past the stream's front, or up to 4 MiB behind it (the kernel has
# up to two 1 MiB readahead requests of one reader in flight, answered in any order)
REORDER_AHEAD = 1 << 20
REORDER_BEHIND = 4 << 20
GAIN = 1.2  # a doubling must raise the measured rate by this much to be followed by another
MIN_ROUND_BYTES = 1 << 20
MIN_ROUND_SECONDS = 0.005
REPROBE_ROUNDS = 16
IDLE_AFTER = 1.0  # a stream without a read for this long leaves the fair share
LATENCY_SAMPLES = 64
STEP_FRACTION = 8  # the window is topped up once an eighth of it is free

START, PROBE, HOLD = "start", "probe", "hold"


@dataclass
class StreamState:
    """Readahead state of one stream (one open file handle)."""

    next_offset: int = -1
    run_bytes: int = 0  # read in sequence so far
    window: int = 0  # wanted bytes ahead of next_offset (before the fair share)
    ahead_until: int = 0  # bytes up to here were requested ahead
    phase: str = START
    last_read: float = 0.0
    # the current round of rate measurement
    round_start: float = 0.0
    round_offset: int = 0
    settle: bool = False  # this round follows a change of window: not compared
    best_rate: float = 0.0  # bytes/s
    rate: float = 0.0
    before_probe: int = 0  # the window before the last doubling in the probe phase
    hold_rounds: int = 0
    history: deque[float] = field(default_factory=lambda: deque(maxlen=4))

    def ahead(self) -> int:
        """Bytes requested ahead of the reader and not read yet."""
        return max(0, self.ahead_until - max(self.next_offset, 0))


class Readahead:
    def __init__(
        self,
        blob_size: int,
        *,
        budget: int,
        initial: int,
        quick: int,
        align: Callable[[int], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``align(x)``: the largest chunk boundary <= x (identity when None); ``initial``
        should be at least the largest chunk, or a window may not reach a boundary."""
        self.blob_size = blob_size
        self.budget = max(0, budget)
        self.initial = max(1, min(initial, self.budget or 1))
        self.quick = max(self.initial, min(quick, self.budget))
        self.align = align or (lambda x: x)
        self.clock = clock
        self.streams: dict[int, StreamState] = {}
        self._latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._total_ahead = 0

    # ------------------------------------------------------------------ inputs

    def observe_latency(self, seconds: float) -> None:
        """One remote fetch's service time (request to verified data)."""
        self._latencies.append(seconds)

    def min_latency(self) -> float | None:
        return min(self._latencies) if self._latencies else None

    def forget(self, stream: int) -> None:
        state = self.streams.pop(stream, None)
        if state is not None:
            self._total_ahead -= state.ahead()

    def on_read(
        self, stream: int, offset: int, size: int, covered_end: int
    ) -> tuple[int, int] | None:
        """A read of ``size`` bytes at ``offset`` whose chunks end at ``covered_end``: the
        byte range to request ahead now (chunk-aligned, within the blob), or None."""
        now = self.clock()
        state = self.streams.get(stream)
        if state is None:
            state = self.streams[stream] = StreamState()
        before = state.ahead()
        state.last_read = now
        if -REORDER_BEHIND <= offset - state.next_offset <= REORDER_AHEAD:
            state.next_offset = max(state.next_offset, offset + size)
            state.run_bytes += size
        else:  # a seek: whatever was ahead is not, and growth starts over
            state.next_offset = offset + size
            state.run_bytes = size
            if state.window:
                self._reset(state)
            state.ahead_until = state.next_offset
            if size < SEQUENTIAL_THRESHOLD:  # a random reader's every read: keep it cheap
                self._total_ahead -= before
                return None
        if state.run_bytes < SEQUENTIAL_THRESHOLD or not self.budget:
            # the kernel's own readahead makes a few consecutive requests after any read;
            # only a longer run is a sequential reader worth fetching ahead for
            self._reset(state)
            self._total_ahead += state.ahead() - before
            return None
        self._grow(state, now)
        want = min(state.window, self._share(stream, self._active_wants(stream, now)))
        room = self.budget - (self._total_ahead - before)
        limit = min(state.next_offset + min(want, room), self.blob_size)
        lo = max(state.ahead_until, covered_end)
        if limit - lo < min(want, room) // STEP_FRACTION and limit < self.blob_size:
            # top the window up in steps, not on every read: fewer, larger requests
            self._total_ahead += state.ahead() - before
            return None
        hi = self.align(limit) if limit < self.blob_size else self.blob_size
        if hi > lo:
            state.ahead_until = hi
        self._total_ahead += state.ahead() - before
        return (lo, hi) if hi > lo else None

    # ------------------------------------------------------------------ the window

    def _reset(self, state: StreamState) -> None:
        state.window = 0
        state.phase = START
        state.ahead_until = state.next_offset  # nothing ahead
        state.best_rate = state.rate = 0.0
        state.round_start = 0.0
        state.hold_rounds = 0

    def _grow(self, state: StreamState, now: float) -> None:
        if state.phase == START:
            state.window = min(max(self.initial, state.window * 2), self.quick)
            if state.window >= self.quick:
                state.phase = PROBE if self.quick < self.budget else HOLD
                self._new_round(state, now, settle=True)
            return
        done = state.next_offset - state.round_offset
        elapsed = now - state.round_start
        if done < max(state.window, MIN_ROUND_BYTES) or elapsed < MIN_ROUND_SECONDS:
            return
        state.rate = done / elapsed
        state.history.append(state.rate)
        if state.settle:
            self._new_round(state, now)
            return
        if state.phase == PROBE:
            if state.rate >= state.best_rate * GAIN and state.window < self.budget:
                state.best_rate = state.rate
                state.before_probe = state.window
                state.window = min(state.window * 2, self.budget)
                self._new_round(state, now, settle=True)
                return
            state.best_rate = max(state.best_rate, state.rate)
            state.phase = HOLD
            state.hold_rounds = 0
            state.window = max(self.quick, state.before_probe, min(state.window, self._bdp(state)))
            self._new_round(state, now, settle=True)
            return
        # HOLD
        state.best_rate = max(state.best_rate, state.rate)
        state.hold_rounds += 1
        if state.hold_rounds >= REPROBE_ROUNDS and state.window < self.budget:
            state.phase = PROBE
            state.best_rate = state.rate
            state.before_probe = state.window
            state.window = min(state.window * 2, self.budget)
            self._new_round(state, now, settle=True)
            return
        self._new_round(state, now)

    def _bdp(self, state: StreamState) -> int:
        """Twice the bandwidth-delay product, or no limit while the latency is unknown."""
        latency = self.min_latency()
        if latency is None:
            return self.budget
        return int(2 * state.best_rate * latency)

    def _new_round(self, state: StreamState, now: float, settle: bool = False) -> None:
        state.round_start = now
        state.round_offset = state.next_offset
        state.settle = settle

    def _active_wants(self, stream: int, now: float) -> list[int]:
        """The windows of the active streams; an idle stream's bytes ahead leave the
        budget (they are in the memory cache or on their way there, which is bounded)."""
        wants = []
        for k, s in self.streams.items():
            if k == stream or now - s.last_read < IDLE_AFTER:
                if s.window:
                    wants.append(s.window)
            elif s.ahead():
                self._total_ahead -= s.ahead()
                s.ahead_until = s.next_offset
        return wants

    def _share(self, stream: int, wants: list[int]) -> int:
        """Max-min fair share of the budget for ``stream`` among the active streams."""
        if len(wants) <= 1:
            return self.budget
        left, count = self.budget, len(wants)
        for want in sorted(wants):
            fair = left // count
            if want > fair:
                return fair
            left -= want
            count -= 1
        return self.budget  # every stream gets what it wants

    # ------------------------------------------------------------------ stats

    @property
    def total_ahead(self) -> int:
        return self._total_ahead

    def snapshot(self) -> dict[str, object]:
        latency = self.min_latency()
        now = self.clock()
        wants = [
            s.window for s in self.streams.values() if s.window and now - s.last_read < IDLE_AFTER
        ]
        return {
            "budget": self.budget,
            "ahead_bytes": self._total_ahead,
            "min_latency_ms": None if latency is None else round(latency * 1000, 1),
            "streams": {
                str(k): {
                    "window": min(s.window, self._share(k, wants)) if s.window else 0,
                    "in_flight": s.ahead(),
                    "phase": s.phase if s.window else "off",
                    "rate_mbps": round(s.rate / 1e6, 1),
                }
                for k, s in self.streams.items()
            },
        }
