"""Interop with the real casync binary on an ext4 image built from real files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cafuse, sha256_file

from cafuse.index import read_index


def casync(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["casync", *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def casync_made(tmp_path_factory: pytest.TempPathFactory, ext4_image: Path) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("casync")
    index, store = work / "image.caibx", work / "image.castr"
    proc = casync("make", f"--store={store}", index, ext4_image)
    assert proc.returncode == 0, proc.stderr
    return index, store


def test_casync_index_extract_cat_verify(
    casync_made: tuple[Path, Path], ext4_image: Path, tmp_path: Path
) -> None:
    index, store = casync_made
    parsed = read_index(index)
    assert parsed.flags == 0xB000000000000000 and parsed.digest == "sha512-256"
    out = tmp_path / "out.img"
    run_cafuse("extract", index, out, "--store", store)
    assert sha256_file(out) == sha256_file(ext4_image)
    cat_out = tmp_path / "cat.img"
    with open(cat_out, "wb") as f:
        subprocess.run(
            [sys.executable, "-m", "cafuse", "cat", str(index), "--store", str(store)],
            stdout=f,
            check=True,
        )
    assert sha256_file(cat_out) == sha256_file(ext4_image)
    verified = run_cafuse("verify", index, "--store", store)
    assert " 0 missing, 0 corrupt" in verified.stdout
    info = run_cafuse("info", index, "--store", store, "--json")
    assert '"missing": 0' in info.stdout


@pytest.mark.parametrize("digest", ["sha512-256", "sha256"])
def test_cafuse_index_extracts_with_casync(ext4_image: Path, tmp_path: Path, digest: str) -> None:
    index, store = tmp_path / "image.caibx", tmp_path / "store"
    run_cafuse("make", index, ext4_image, "--store", store, "--digest", digest)
    out = tmp_path / "casync-out.img"
    proc = casync("extract", f"--store={store}", index, out)
    assert proc.returncode == 0, proc.stderr
    assert sha256_file(out) == sha256_file(ext4_image)


def test_casync_refuses_blake3_index(made_image: tuple[Path, Path], tmp_path: Path) -> None:
    index, store = made_image
    assert read_index(index).digest == "blake3"
    proc = casync("extract", f"--store={store}", index, tmp_path / "never.img")
    assert proc.returncode != 0
    assert not (tmp_path / "never.img").exists() or (tmp_path / "never.img").stat().st_size == 0


def test_casync_index_with_seed_only(
    casync_made: tuple[Path, Path], ext4_image: Path, tmp_path: Path
) -> None:
    """A casync index extracts from a seed alone, with no store at all."""
    index, _ = casync_made
    out = tmp_path / "seeded.img"
    proc = run_cafuse("extract", index, out, "--seed", f"{index}:{ext4_image}")
    assert sha256_file(out) == sha256_file(ext4_image)
    assert "from stores 0 B" in proc.stdout


def test_casync_empty_blob_needs_no_store(tmp_path: Path) -> None:
    """casync makes no store directory for an empty file: cafuse needs none either."""
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    index, store = tmp_path / "empty.caibx", tmp_path / "absent.castr"
    assert casync("make", f"--store={store}", index, empty).returncode == 0
    assert not store.exists()
    out = tmp_path / "out.img"
    run_cafuse("extract", index, out)  # default store next to the index: absent
    assert out.exists() and out.stat().st_size == 0
    run_cafuse("extract", index, tmp_path / "out2.img", "--store", store)
    assert (tmp_path / "out2.img").stat().st_size == 0


def test_uncompressed_store_extracts_with_casync(ext4_image: Path, tmp_path: Path) -> None:
    """--compression none writes bare <id> files, which casync reads as uncompressed."""
    index, store = tmp_path / "image.caibx", tmp_path / "store"
    run_cafuse(
        "make",
        index,
        ext4_image,
        "--store",
        store,
        "--digest",
        "sha512-256",
        "--compression",
        "none",
    )
    assert not list(store.rglob("*.cacnk"))
    out = tmp_path / "casync-out.img"
    proc = casync("extract", f"--store={store}", index, out)
    assert proc.returncode == 0, proc.stderr
    assert sha256_file(out) == sha256_file(ext4_image)
