"""Decompression by magic bytes, and corrupt input that must fail cleanly."""

from __future__ import annotations

import gzip
import lzma
import os
import random

import pytest
import zstandard

from cafuse.codec import _zstd_frame_length, compress, decompress
from cafuse.digest import hash_function
from cafuse.fetch import decode


@pytest.mark.parametrize("size", [1, 1000, 300_000])  # chunks are never empty
def test_formats_roundtrip(size: int) -> None:
    data = os.urandom(size // 2) + bytes(size - size // 2)
    assert decompress(compress(data), size) == data
    assert decompress(compress(data, "none"), size) == data
    assert decompress(lzma.compress(data), size) == data
    assert decompress(gzip.compress(data), size) == data
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    assert decompress(no_size, size) == data


def test_garbage_after_a_magic_is_never_accepted() -> None:
    """Random bytes behind a magic may even form a valid frame; decompression plus the
    digest check must still reject every one, and only ever with a ValueError."""
    rng = random.Random(7)
    chunk_id = hash_function("blake3")(b"the real chunk")
    for magic in (b"\x28\xb5\x2f\xfd", b"\xfd\x37\x7a\x58\x5a\x00", b"\x1f\x8b"):
        for _ in range(300):
            with pytest.raises(ValueError):
                decode(magic + rng.randbytes(200), chunk_id, 14, hash_function("blake3"))


def test_output_is_bounded_by_the_chunk_size() -> None:
    bomb = compress(bytes(10 << 20))  # 10 MiB of zeros in a few hundred bytes
    with pytest.raises(ValueError):
        decompress(bomb, 65536)
    with pytest.raises(ValueError):
        decompress(lzma.compress(bytes(10 << 20)), 65536)
    with pytest.raises(ValueError):
        decompress(gzip.compress(bytes(10 << 20)), 65536)


def _skippable(payload: bytes) -> bytes:
    return b"\x5a\x2a\x4d\x18" + len(payload).to_bytes(4, "little") + payload


def test_zstd_chunks_of_several_frames_read_as_libzstd_reads_them() -> None:
    """desync and the zstd tool read every frame of a chunk file and skip skippable frames;
    a chunk written that way must not be taken for corrupt (its digest still decides)."""
    with_size, no_size = (
        zstandard.ZstdCompressor(),
        zstandard.ZstdCompressor(write_content_size=False),
    )
    first, second = os.urandom(3000), bytes(5000)
    frames = with_size.compress(first) + no_size.compress(second)
    assert decompress(frames, 8000) == first + second
    assert decompress(_skippable(b"meta") + frames, 8000) == first + second
    between = with_size.compress(first) + _skippable(b"") + with_size.compress(second)
    assert decompress(between, 8000) == first + second
    assert decompress(with_size.compress(first) + _skippable(b"end"), 3000) == first
    # casync's chunks carry no size in the frame header; an empty frame declares 0
    assert decompress(no_size.compress(first) + no_size.compress(second), 8000) == first + second
    assert decompress(with_size.compress(b"") + with_size.compress(first), 3000) == first


def test_later_zstd_frames_are_bounded_and_garbage_after_a_frame_is_refused() -> None:
    small = zstandard.ZstdCompressor().compress(b"x" * 100)
    with pytest.raises(ValueError, match="larger than"):
        decompress(small + compress(bytes(10 << 20)), 65536)  # a bomb in the second frame
    with pytest.raises(ValueError, match="bad zstd data"):
        decompress(small + b"not a frame", 100)
    whole = zstandard.ZstdCompressor().compress(os.urandom(5000))
    with pytest.raises(ValueError, match="bad zstd data"):  # cut short: said so
        decompress(whole[:-100], 5000)


@pytest.mark.parametrize("level", [-5, 3, 19])
@pytest.mark.parametrize("with_size", [True, False])
@pytest.mark.parametrize("checksum", [True, False])
def test_the_first_zstd_frame_is_measured_from_its_headers(
    level: int, with_size: bool, checksum: bool
) -> None:
    """What tells a lone frame from the first of several without decoding twice: raw, RLE
    and compressed blocks, with and without content size and checksum, as one-shot and as
    streaming compressors (casync) write them."""
    c = zstandard.ZstdCompressor(level=level, write_content_size=with_size, write_checksum=checksum)
    streamed = c.compressobj()
    frames = [c.compress(data) for data in (os.urandom(300_000), bytes(200_000), b"ab" * 9000)]
    frames.append(streamed.compress(os.urandom(5000) + bytes(70_000)) + streamed.flush())
    for frame in frames:
        assert _zstd_frame_length(frame) == len(frame)
        assert _zstd_frame_length(frame + c.compress(b"next")) == len(frame)
        assert _zstd_frame_length(frame[:-1]) is None
