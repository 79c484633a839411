"""The .caibx format: byte layout, strict validation, offset lookup."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from cafuse.digest import FLAG_BLAKE3, FLAG_SHA512_256, flags_for_digest, zero_chunk_id
from cafuse.errors import CafuseError
from cafuse.index import (
    CA_FORMAT_INDEX,
    CA_FORMAT_TABLE,
    CA_FORMAT_TABLE_TAIL_MARKER,
    Index,
    parse_index,
    read_index,
    write_index,
)


def build(
    ends: list[int],
    flags: int = FLAG_SHA512_256,
    sizes=(16, 64, 256),
    ids: list[bytes] | None = None,
) -> bytearray:
    """An index laid out by hand from docs/format.md, independent of the writer."""
    ids = ids or [bytes([i % 256]) * 32 for i in range(len(ends))]
    out = bytearray(struct.pack("<6Q", 48, CA_FORMAT_INDEX, flags, *sizes))
    out += struct.pack("<2Q", 2**64 - 1, CA_FORMAT_TABLE)
    for end, cid in zip(ends, ids, strict=True):
        out += struct.pack("<Q", end) + cid
    out += struct.pack("<5Q", 0, 0, 48, 16 + 40 * len(ends) + 40, CA_FORMAT_TABLE_TAIL_MARKER)
    return out


def test_layout_matches_format_spec(tmp_path: Path) -> None:
    raw = build([100, 150, 400])
    index = parse_index(bytes(raw))
    assert index.chunk_count == 3 and index.blob_size == 400
    assert index.digest == "sha512-256"
    assert index.span(0) == (0, 100) and index.span(2) == (150, 400)
    assert index.chunk_id(1) == bytes([1]) * 32
    write_index(tmp_path / "x.caibx", index)
    assert (tmp_path / "x.caibx").read_bytes() == bytes(raw)
    assert len(raw) == 104 + 40 * 3


def test_empty_blob_roundtrip(tmp_path: Path) -> None:
    raw = build([])
    index = parse_index(bytes(raw))
    assert index.chunk_count == 0 and index.blob_size == 0
    assert list(index.covering(0, 10)) == []
    write_index(tmp_path / "e.caibx", index)
    assert (tmp_path / "e.caibx").read_bytes() == bytes(raw)


@pytest.mark.parametrize(
    ("flags", "digest"),
    [
        (0xB000000000000000, "sha512-256"),
        (0xA000000000000000, "sha512-256"),
        (0x9000000000000000, "sha256"),
        (0, "sha256"),
        (FLAG_BLAKE3, "blake3"),
    ],
)
def test_digest_from_flags(flags: int, digest: str) -> None:
    assert parse_index(bytes(build([10], flags=flags))).digest == digest


def test_written_flags() -> None:
    assert flags_for_digest("sha512-256") == 0xB000000000000000  # what casync make writes
    assert flags_for_digest("blake3") == FLAG_BLAKE3


def _corrupt(raw: bytearray, offset: int, value: int) -> bytes:
    struct.pack_into("<Q", raw, offset, value)
    return bytes(raw)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: bytes(r[:50]), "shorter than the minimum"),
        (lambda r: _corrupt(r, 0, 49), "bad header"),
        (lambda r: _corrupt(r, 8, 12345), "bad header"),
        (lambda r: _corrupt(r, 16, 0x0000000200000000), "unknown feature flags"),
        (lambda r: _corrupt(r, 16, FLAG_BLAKE3 | FLAG_SHA512_256), "both BLAKE3 and SHA-512/256"),
        (lambda r: _corrupt(r, 24, 0), "outside 1.."),
        (lambda r: _corrupt(r, 40, 1 << 28), "outside 1.."),
        (lambda r: _corrupt(r, 24, 100), "min <= avg <= max"),
        (lambda r: _corrupt(r, 48, 1234), "bad table header"),
        (lambda r: _corrupt(r, 56, 1234), "bad table header"),
        (lambda r: bytes(r[:-8]), "truncated or trailing"),
        (lambda r: bytes(r) + b"\0" * 40, "bad table tail"),
        (lambda r: bytes(r[:-40]), "bad table tail"),
        (lambda r: _corrupt(r, len(r) - 8, 7), "bad table tail"),
        (lambda r: _corrupt(r, 64 + 40, 50), "do not strictly increase"),
        (lambda r: _corrupt(r, 64 + 40, 100), "do not strictly increase"),
        (lambda r: _corrupt(r, 64, 0), "do not strictly increase"),
        (lambda r: _corrupt(r, 64 + 80, 100 + 50 + 300), "over the max"),
    ],
)
def test_strict_validation_names_the_rule(mutate, message: str) -> None:
    raw = build([100, 150, 400])
    with pytest.raises(CafuseError, match="not a valid casync blob index") as info:
        parse_index(mutate(raw), "x.caibx")
    assert message in str(info.value)


def test_covering_lookup() -> None:
    index = parse_index(bytes(build([100, 150, 400])))
    assert list(index.covering(0, 1)) == [0]
    assert list(index.covering(99, 2)) == [0, 1]
    assert list(index.covering(100, 50)) == [1]
    assert list(index.covering(100, 51)) == [1, 2]
    assert list(index.covering(0, 400)) == [0, 1, 2]
    assert list(index.covering(399, 100)) == [2]  # clipped at the end of the blob
    assert list(index.covering(400, 10)) == []
    assert list(index.covering(10, 0)) == []


def test_zero_chunks_recognised_by_id() -> None:
    zero = zero_chunk_id("sha512-256", 100)
    index = parse_index(bytes(build([100, 200, 300], ids=[zero, b"\1" * 32, zero])))
    assert index.zero_mask.tolist() == [True, False, True]


def test_read_index_errors(tmp_path: Path) -> None:
    with pytest.raises(CafuseError, match="not found"):
        read_index(tmp_path / "missing.caibx")
    (tmp_path / "empty.caibx").write_bytes(b"")
    with pytest.raises(CafuseError, match="empty"):
        read_index(tmp_path / "empty.caibx")
    with pytest.raises(CafuseError, match="is a directory"):
        read_index(tmp_path)


def test_million_chunk_index_roundtrip(tmp_path: Path) -> None:
    n = 1_000_000
    ends = np.arange(1, n + 1, dtype=np.uint64) * 65536
    ids = np.random.default_rng(1).integers(0, 256, (n, 32), dtype=np.uint8)
    write_index(tmp_path / "big.caibx", Index(FLAG_BLAKE3, 16, 65536, 65536, ends, ids))
    assert (tmp_path / "big.caibx").stat().st_size == 104 + 40 * n
    index = read_index(tmp_path / "big.caibx")
    assert index.chunk_count == n and index.blob_size == n * 65536
    assert index.chunk_id(777_777) == ids[777_777].tobytes()
    assert list(index.covering(65536 * 500_000 - 1, 2)) == [499_999, 500_000]
