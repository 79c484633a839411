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
    assert "digest: blake3" in out and "    missing: 1" in out and "{'" not in out
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


_MAGIC = {"gzip": b"\x1f\x8b\x08\x00", "xz": b"\xfd7zXZ\x00\x00", "zstd": b"\x28\xb5\x2f\xfd"}


def test_uncompressed_chunks_are_bare_files_never_sniffed(tmp_path: Path) -> None:
    """--compression none writes bare <id> files (casync's layout); a chunk whose data
    begins with gzip, xz or zstd magic is data, not a compressed chunk: extract, verify,
    store-wide verify and --repair all leave it alone."""
    store = tmp_path / "store"
    images = {}
    for name, magic in _MAGIC.items():  # 10 KB: below the 16K minimum, one chunk each
        data = magic + random_bytes(10_000, seed=len(name))
        (tmp_path / f"{name}.img").write_bytes(data)
        index = tmp_path / f"{name}.caibx"
        run_cafuse(
            "make", index, tmp_path / f"{name}.img", "--store", store, "--compression", "none"
        )
        images[name] = (index, data)
    files = sorted(p for p in store.rglob("*") if p.is_file())
    assert len(files) == 3 and not any(p.suffix == ".cacnk" for p in files)
    for name, (index, data) in images.items():
        chunk_id = read_index(index).chunk_id(0)
        assert (store / chunk_path(chunk_id, bare=True)).read_bytes() == data
        out = tmp_path / f"{name}.out"
        run_cafuse("extract", index, out, "--store", store)
        assert out.read_bytes() == data, name
        ok = run_cafuse("verify", index, "--store", store, "--repair")
        assert "1 chunks checked, 0 missing, 0 corrupt, 0 deleted" in ok.stdout, name
    wide = run_cafuse("verify", "--store", store, "--repair")
    assert "3 chunk files checked, 0 corrupt, 0 deleted" in wide.stdout
    assert len([p for p in store.rglob("*") if p.is_file()]) == 3


def test_store_holds_both_layouts(tmp_path: Path) -> None:
    """A chunk kept bare and compressed: read either way, gc counts it once, a store-wide
    verify checks each file on its own and --repair deletes only the bad copy."""
    store = tmp_path / "store"
    data = random_bytes(200_000, seed=8)
    index = _make(tmp_path, "z", data, store)  # zstd
    parsed = read_index(index)
    for i in range(parsed.chunk_count):  # as casync or desync with -n would add them
        start, end = parsed.span(i)
        (store / chunk_path(parsed.chunk_id(i), bare=True)).write_bytes(data[start:end])
    distinct = len(parsed.distinct_positions())
    compressed = sorted(store.rglob("*.cacnk"))
    bare = sorted(p for p in store.rglob("*") if p.is_file() and not p.suffix)
    assert len(compressed) == len(bare) == distinct
    gc = run_cafuse("gc", store, index, "--grace", "0", "--dry-run")
    assert f"kept {distinct} chunks, would delete 0" in gc.stdout
    compressed[0].write_bytes(b"rotten")  # one bad file: one bad copy
    wide = run_cafuse("verify", "--store", store, check=False)
    assert f"{2 * distinct} chunk files checked, 1 corrupt" in wide.stdout
    rel = compressed[0].relative_to(store)
    assert f"  corrupt {rel}" in wide.stdout
    assert_user_error(wide, "1 corrupt", "--repair")
    fixed = run_cafuse("verify", "--store", store, "--repair", check=False)
    assert "1 corrupt, 1 deleted" in fixed.stdout
    assert not compressed[0].exists() and bare[0].exists()  # the good copy stays
    out = tmp_path / "out.img"
    run_cafuse("extract", index, out, "--store", store)
    assert out.read_bytes() == data
    assert "0 corrupt" in run_cafuse("verify", "--store", store).stdout


def test_verify_names_every_bad_chunk(tmp_path: Path) -> None:
    """Every missing and corrupt chunk is counted; the first ten of each are named, then
    how many more (all with -v); the hint fits what is wrong."""
    store = tmp_path / "store"
    index = _make(tmp_path, "a", random_bytes(800_000, seed=9), store)
    chunks = sorted(store.rglob("*.cacnk"))
    assert len(chunks) >= 14
    for path in chunks[:12]:
        path.unlink()
    chunks[12].write_bytes(b"rotten")
    bad = run_cafuse("verify", index, "--store", store, check=False)
    lines = bad.stdout.splitlines()
    assert "12 missing, 1 corrupt" in lines[0]
    assert sum(line.startswith("  missing ") for line in lines) == 10
    assert "  ... and 2 more missing (all of them with -v)" in lines
    assert f"  corrupt {chunks[12].relative_to(store)}" in lines
    assert_user_error(bad, "12 missing, 1 corrupt", "--repair", "re-run make")
    every = run_cafuse("-v", "verify", index, "--store", store, check=False)
    for path in chunks[:12]:
        assert f"  missing {path.name.removesuffix('.cacnk')}" in every.stdout
    # missing only: no --repair hint, which could not help
    chunks[12].unlink()
    missing = run_cafuse("verify", index, "--store", store, check=False)
    err = assert_user_error(missing, "13 missing", "re-run make")
    assert "--repair" not in err


def test_gc_removes_emptied_prefix_directories(tmp_path: Path) -> None:
    store = tmp_path / "store"
    keep = _make(tmp_path, "keep", random_bytes(100_000, seed=10), store)
    _make(tmp_path, "drop", random_bytes(300_000, seed=11), store)
    run_cafuse("gc", store, keep, "--grace", "0")
    prefixes = [p for p in store.iterdir() if p.is_dir()]
    assert prefixes and all(any(p.iterdir()) for p in prefixes)
    assert len(prefixes) == len({c[:2] for c in _ids(keep)})
    # make writes into a removed prefix directory again
    _make(tmp_path, "drop", random_bytes(300_000, seed=11), store)
    assert "0 missing" in run_cafuse("verify", tmp_path / "drop.caibx", "--store", store).stdout


def _ids(index: Path) -> set[bytes]:
    parsed = read_index(index)
    return {parsed.chunk_id(i) for i in range(parsed.chunk_count)}


def test_make_with_missing_input_creates_no_store(tmp_path: Path) -> None:
    store = tmp_path / "new-store"
    proc = run_cafuse(
        "make", tmp_path / "a.caibx", tmp_path / "absent.img", "--store", store, check=False
    )
    assert_user_error(proc, "absent.img", "not found")
    assert not store.exists()
