"""verify, --repair, gc and info against a local store; chunk formats casync may write."""

from __future__ import annotations

import gzip
import lzma
from pathlib import Path

from helpers import assert_user_error, random_bytes, run_cafuse

from cafuse.digest import hash_function
from cafuse.index import read_index
from cafuse.stores import LocalStore, chunk_path


def _make(tmp_path: Path, name: str, data: bytes, store: Path) -> Path:
    (tmp_path / f"{name}.img").write_bytes(data)
    index = tmp_path / f"{name}.caibx"
    run_cafuse("make", index, tmp_path / f"{name}.img", "--store", store, "--chunk-size", "16K")
    return index


def test_verify_and_repair(tmp_path: Path) -> None:
    store = tmp_path / "store"
    index = _make(tmp_path, "a", random_bytes(500_000, seed=1), store)
    ok = run_cafuse("verify", index, "--store", store)
    assert "0 missing, 0 corrupt" in ok.stdout
    chunks = sorted(store.rglob("*.cacnk"))
    chunks[0].write_bytes(b"rotten")
    chunks[1].unlink()
    bad = run_cafuse("verify", index, "--store", store, check=False)
    assert "1 missing, 1 corrupt" in bad.stdout
    assert_user_error(bad, "incomplete", "--repair")
    repaired = run_cafuse("verify", index, "--store", store, "--repair", check=False)
    assert "1 deleted" in repaired.stdout and not chunks[0].exists()
    # re-making puts the deleted chunks back
    run_cafuse("make", index, tmp_path / "a.img", "--store", store, "--chunk-size", "16K")
    assert "0 missing, 0 corrupt" in run_cafuse("verify", index, "--store", store).stdout


def test_gc_keeps_only_referenced_chunks(tmp_path: Path) -> None:
    store = tmp_path / "store"
    keep = _make(tmp_path, "keep", random_bytes(400_000, seed=2), store)
    drop = _make(tmp_path, "drop", random_bytes(400_000, seed=3), store)
    before = len(list(store.rglob("*.cacnk")))
    dry = run_cafuse("gc", store, keep, "--dry-run", "--grace", "0")
    assert before == len(list(store.rglob("*.cacnk")))
    kept_ids = {read_index(keep).chunk_id(i) for i in range(read_index(keep).chunk_count)}
    assert f"kept {len(kept_ids)} chunks, would delete {before - len(kept_ids)}" in dry.stdout
    run_cafuse("gc", store, keep, "--grace", "0")
    assert len(list(store.rglob("*.cacnk"))) == len(kept_ids)
    assert "0 missing" in run_cafuse("verify", keep, "--store", store).stdout
    assert run_cafuse("verify", drop, "--store", store, check=False).returncode == 1


def test_info_reports_presence(tmp_path: Path) -> None:
    store = tmp_path / "store"
    index = _make(tmp_path, "a", random_bytes(300_000, seed=4) + bytes(1 << 20), store)
    sorted(store.rglob("*.cacnk"))[0].unlink()
    out = run_cafuse("info", index, "--store", store).stdout
    assert "digest: blake3" in out and "missing': 1" in out
    assert "zero_chunks:" in out


def test_reads_xz_gzip_and_uncompressed_chunks(tmp_path: Path) -> None:
    """casync stores may hold chunks in any of its formats, or bare and uncompressed."""
    store = tmp_path / "store"
    data = random_bytes(300_000, seed=6)
    index = _make(tmp_path, "a", data, store)
    parsed = read_index(index)
    hash_chunk = hash_function(parsed.digest)
    local = LocalStore(store)
    for i in range(parsed.chunk_count):
        start, end = parsed.span(i)
        raw = data[start:end]
        chunk_id = parsed.chunk_id(i)
        assert hash_chunk(raw) == chunk_id
        local.delete(chunk_id)
        path = store / chunk_path(chunk_id)
        if i % 4 == 0:
            path.write_bytes(lzma.compress(raw))
        elif i % 4 == 1:
            path.write_bytes(gzip.compress(raw))
        elif i % 4 == 2:
            path.write_bytes(raw)
        else:
            path.with_suffix("").write_bytes(raw)  # casync's bare uncompressed name
    out = tmp_path / "out.img"
    run_cafuse("extract", index, out, "--store", store)
    assert out.read_bytes() == data
