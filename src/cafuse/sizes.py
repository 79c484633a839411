"""Human sizes: parsing ``64K``/``1.5G`` style arguments and formatting byte counts."""

from __future__ import annotations

import re

from .errors import CafuseError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, what: str = "size") -> int:
    match = _SIZE.match(text)
    if not match:
        raise CafuseError(
            f"bad {what} {text!r}: expected a number with an optional "
            "K, M, G or T suffix (e.g. 64K)"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, what: str = "duration") -> float:
    """``90``, ``90s``, ``30m``, ``2h``, ``1d``: seconds."""
    match = _DURATION.match(text)
    if not match:
        raise CafuseError(
            f"bad {what} {text!r}: expected seconds or a number with s, m, h or d (e.g. 30m)"
        )
    return float(match.group(1)) * _SECONDS[match.group(2).lower()]


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def fetched_text(data: int, stored: int) -> str:
    """How every summary says what a fetch moved: the chunks' data, and the bytes as
    stored (compressed: what crossed the wire or was read from disk)."""
    return f"{format_size(data)} of data, {format_size(stored)} as stored"
