"""make then extract/cat give back the same bytes, for every digest, compression and size."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import random_bytes, run_cafuse, sha256_file

from cafuse.index import read_index

INPUTS = {
    "empty": b"",
    "one-byte": b"x",
    "exactly-min": random_bytes(16 << 10, seed=1),
    "multi-chunk": random_bytes(1 << 20, seed=2) + bytes(600 << 10) + b"text " * 50_000,
}


@pytest.mark.parametrize("digest", ["blake3", "sha512-256", "sha256"])
@pytest.mark.parametrize("compression", ["zstd", "none"])
@pytest.mark.parametrize("name", list(INPUTS))
def test_make_extract_cat_roundtrip(
    tmp_path: Path, digest: str, compression: str, name: str
) -> None:
    data = INPUTS[name]
    src = tmp_path / "in.img"
    src.write_bytes(data)
    index, store = tmp_path / "in.caibx", tmp_path / "store"
    made = run_cafuse(
        "make", index, src, "--store", store, "--digest", digest, "--compression", compression
    )
    assert "chunks" in made.stdout
    parsed = read_index(index)
    assert parsed.digest == digest and parsed.blob_size == len(data)
    assert index.stat().st_size == 104 + 40 * parsed.chunk_count
    run_cafuse("extract", index, tmp_path / "out.img", "--store", store)
    assert (tmp_path / "out.img").read_bytes() == data
    catted = subprocess.run(
        [os.sys.executable, "-m", "cafuse", "cat", str(index), "--store", str(store)],
        capture_output=True,
        check=True,
    )
    assert catted.stdout == data
    for chunk in store.rglob("*.cacnk"):
        magic = chunk.read_bytes()[:4]
        assert (magic == b"\x28\xb5\x2f\xfd") == (compression == "zstd")


def test_cat_ranges(tmp_path: Path) -> None:
    data = INPUTS["multi-chunk"]
    (tmp_path / "in.img").write_bytes(data)
    index, store = tmp_path / "in.caibx", tmp_path / "store"
    run_cafuse("make", index, tmp_path / "in.img", "--store", store, "--chunk-size", "4K")
    ends = read_index(index).ends
    boundary = int(ends[3])
    for offset, length in [
        (0, 1),
        (boundary - 1, 2),
        (boundary, 4096),
        (len(data) - 1, 10),
        (len(data), 5),
        (12345, 300_000),
    ]:
        out = subprocess.run(
            [
                os.sys.executable,
                "-m",
                "cafuse",
                "cat",
                str(index),
                "--store",
                str(store),
                "--offset",
                str(offset),
                "--length",
                str(length),
            ],
            capture_output=True,
            check=True,
        ).stdout
        assert out == data[offset : offset + length], (offset, length)


def test_zero_chunk_stored_once_and_extracted_sparse(tmp_path: Path) -> None:
    src = tmp_path / "zeros.img"
    src.write_bytes(b"head" + bytes(8 << 20) + b"tail")
    index, store = tmp_path / "z.caibx", tmp_path / "store"
    run_cafuse("make", index, src, "--store", store)
    parsed = read_index(index)
    assert parsed.zero_mask.sum() >= 16  # 8 MiB of zeros in max-size chunks
    stored = list(store.rglob("*.cacnk"))
    assert len(stored) <= parsed.chunk_count - int(parsed.zero_mask.sum()) + 1
    out = tmp_path / "out.img"
    run_cafuse("extract", index, out, "--store", store)
    assert sha256_file(out) == sha256_file(src)
    assert out.stat().st_blocks * 512 < 2 << 20  # the zero run is a hole


@pytest.mark.slow
def test_multi_gigabyte_sparse_image(tmp_path: Path) -> None:
    """A 3 GiB image that is mostly holes, with data at scattered offsets."""
    src = tmp_path / "big.img"
    size = 3 << 30
    with open(src, "wb") as f:
        f.truncate(size)
        for i, offset in enumerate([0, 700 << 20, (2 << 30) + 12345, size - 100_000]):
            f.seek(offset)
            f.write(random_bytes(100_000, seed=i))
    index, store = tmp_path / "big.caibx", tmp_path / "store"
    run_cafuse("make", index, src, "--store", store)
    parsed = read_index(index)
    assert parsed.blob_size == size
    out = tmp_path / "out.img"
    result = run_cafuse("extract", index, out, "--store", store)
    assert "zero" in result.stdout
    assert out.stat().st_size == size
    assert out.stat().st_blocks * 512 < 64 << 20
    assert subprocess.run(["cmp", str(src), str(out)]).returncode == 0
