"""Block-wise chunking cuts exactly where cutting the whole input at once would."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import random_bytes
from pyfastcdc import FastCDC

from cafuse.chunker import ChunkSizes, cut_blocks, open_input
from cafuse.errors import CafuseError


@pytest.mark.parametrize("block_size", [300_000, 1 << 20, 5_000_000])
def test_block_cuts_match_whole_input(tmp_path: Path, block_size: int) -> None:
    data = random_bytes(3_000_000, seed=9) + bytes(700_000) + random_bytes(1_234_567, seed=8)
    (tmp_path / "in").write_bytes(data)
    sizes = ChunkSizes(16 << 10, 64 << 10, 256 << 10)
    whole = [
        (c.offset, c.length)
        for c in FastCDC(sizes.avg, min_size=sizes.min, max_size=sizes.max).cut_buf(data)
    ]
    got = []
    with open_input(str(tmp_path / "in")) as (fd, size):
        for block in cut_blocks(fd, size, sizes, block_size=block_size):
            for offset, length in block.spans:
                assert (
                    block.data[offset : offset + length]
                    == data[block.offset + offset : block.offset + offset + length]
                )
                got.append((block.offset + offset, length))
    assert got == whole


def test_chunk_size_parsing() -> None:
    assert ChunkSizes.parse("64K") == ChunkSizes(16 << 10, 64 << 10, 256 << 10)
    assert ChunkSizes.parse("8K:32K") == ChunkSizes(8 << 10, 32 << 10, 128 << 10)
    assert ChunkSizes.parse("1K:4K:16K") == ChunkSizes(1 << 10, 4 << 10, 16 << 10)
    with pytest.raises(CafuseError, match="MIN <= AVG <= MAX"):
        ChunkSizes.parse("64K:32K:128K")
