"""Counters of where chunk bytes came from, shared by every job and the mount daemon."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class OriginCounter:
    chunks: int = 0
    bytes: int = 0
    stored_bytes: int = 0  # bytes as read from the store (compressed), what crossed the wire


@dataclass
class FetchStats:
    """Thread-safe tallies per origin (a seed, the output, a store, memory, zero)."""

    origins: dict[str, OriginCounter] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=8192))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, origin: str, nbytes: int, stored_bytes: int = 0, chunks: int = 1) -> None:
        with self._lock:
            counter = self.origins.setdefault(origin, OriginCounter())
            counter.chunks += chunks
            counter.bytes += nbytes
            counter.stored_bytes += stored_bytes

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def latency(self, seconds: float) -> None:
        with self._lock:
            self.latencies.append(seconds)

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {
                "origins": {name: vars(c).copy() for name, c in self.origins.items()},
                "errors": dict(self.errors),
                "fetch_latency_ms": latency_ms(self.latencies, (50, 90, 99)),
            }


def latency_ms(seconds: Iterable[float], percentiles: Iterable[int]) -> dict[str, float]:
    """``{"p50": ms, ..., "samples": n}`` of latencies given in seconds."""
    lat = np.fromiter(seconds, dtype=float)
    out: dict[str, float] = {"samples": len(lat)}
    if len(lat):
        for p in percentiles:
            out[f"p{p}"] = round(float(np.percentile(lat, p)) * 1000, 3)
    return out


def store_lines(stores: dict[str, dict]) -> list[str]:
    """One line per remote store, as ``cafuse stats`` and the job summaries print them."""
    from .sizes import format_size

    lines = []
    for url, s in stores.items():
        if not s["requests"]:
            continue
        errors = ", ".join(f"{kind} {n}" for kind, n in sorted(s["errors"].items()))
        lat = s["latency_ms"]
        latency = (
            f"; latency p50 {lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms"
            if lat.get("samples")
            else ""
        )
        lines.append(
            f"store {url}: {s['requests']} requests, {s['chunks']} chunks "
            f"({format_size(s['bytes'])} transferred), {s['not_found']} not found, "
            f"{s['retries']} retries, errors: {errors or 'none'}; breaker {s['state']}"
            + (f" (opened {s['times_opened']}x)" if s["times_opened"] else "")
            + latency
        )
    return lines
