"""Huge indexes: the table read a page at a time (pread locally, ranged GETs by URL),
checked page by page, pinned to one version on the server, kept in --cache."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_user_error, run_cafuse
from mounting import mounted, pread_command
from servers import Faults, faulty_server, nginx_bytes_sent, nginx_serving, serve_http
from synthetic import Chunks, expected_bytes, make_chunks, write_cycling_index

from cafuse.chunktable import TableError
from cafuse.index import IN_MEMORY_MAX_BYTES, parse_index, read_index
from cafuse.pagedtable import ITEMS_OFFSET, PagedTable

ITEMS = 40_000  # 1.6 MB of table: over the in-memory limit, so it is paged
MIN, AVG, MAX = 1024, 2048, 4096


@pytest.fixture(scope="module")
def huge(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Chunks, np.ndarray]:
    """A web root: big.caibx (40,000 items cycling through 64 chunks) and default.castr."""
    root = tmp_path_factory.mktemp("huge")
    chunks = make_chunks(root / "default.castr", 64, MIN, MAX, zero=True)
    choice = write_cycling_index(root / "big.caibx", chunks, ITEMS, MIN, AVG, MAX)
    assert (root / "big.caibx").stat().st_size > IN_MEMORY_MAX_BYTES
    return root, chunks, choice


@pytest.fixture(scope="module")
def nginx(huge, tmp_path_factory: pytest.TempPathFactory):
    with nginx_serving(huge[0], tmp_path_factory.mktemp("nginx")) as server:
        yield server


def index_bytes_sent(server, name: str) -> int:
    """Body bytes nginx sent for ``name`` (whole or ranged answers)."""
    return nginx_bytes_sent(server.workdir / "access.log", name)


def random_reads(
    path: Path, table, chunks: Chunks, choice: np.ndarray, count: int, seed: int, most: int
) -> None:
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(count):
            offset = rng.randrange(table.blob_size)
            size = rng.randrange(1, most)
            got = os.pread(fd, size, offset)
            assert got == expected_bytes(table, chunks, choice, offset, size), (offset, size)
    finally:
        os.close(fd)


def test_paged_table_matches_the_parsed_one(huge) -> None:
    root, _, _ = huge
    table = read_index(root / "big.caibx")
    parsed = parse_index((root / "big.caibx").read_bytes())
    assert isinstance(table, PagedTable)
    assert (table.chunk_count, table.blob_size) == (parsed.chunk_count, parsed.blob_size)
    assert table.pages_read == 0  # nothing but header and tail at open
    rng = random.Random(3)
    for _ in range(500):
        offset, size = rng.randrange(table.blob_size), rng.randrange(1, 1 << 20)
        found = table.covering(offset, size)
        assert found == parsed.covering(offset, size)
        for i in (found.start, found.stop - 1):
            assert table.span(i) == parsed.span(i)
            assert table.chunk_id(i) == parsed.chunk_id(i)
            assert table.is_zero(i) == parsed.is_zero(i)
    covered = sum(int(b.sizes.sum()) for b in table.batches(7000))
    assert covered == table.blob_size
    assert np.array_equal(np.concatenate([b.ends for b in table.batches(7000)]), parsed.ends)


def corrupt_item(src: Path, dest: Path, item: int, end: int) -> None:
    shutil.copy(src, dest)
    with open(dest, "r+b") as f:
        f.seek(ITEMS_OFFSET + 40 * item)
        f.write(end.to_bytes(8, "little"))


@pytest.mark.parametrize(
    ("delta", "rule"),
    [(-5000, "chunk offsets do not strictly increase"), (MAX + 1, "bytes, over the max 4096")],
)
def test_a_broken_page_fails_only_its_reads(huge, tmp_path: Path, delta: int, rule: str) -> None:
    root, chunks, choice = huge
    parsed = parse_index((root / "big.caibx").read_bytes())
    # an item whose chunk and the next one together are over the max: moving its end
    # breaks only the rule under test
    pairs = parsed.ends[30_001:31_000] - parsed.ends[29_999:30_998]
    victim = 30_000 + int(np.argmax(pairs > MAX + 1))
    bad = tmp_path / "bad.caibx"
    corrupt_item(root / "big.caibx", bad, victim, int(parsed.ends[victim - 1]) + delta)
    table = read_index(bad)  # header and tail are fine: opens at once
    assert table.covering(0, 4096) == parsed.covering(0, 4096)
    with pytest.raises(TableError, match=rule):
        table.covering(int(parsed.ends[victim - 1]), 1)
    assert_user_error(run_cafuse("info", bad, check=False), "bad.caibx", rule)
    # the mount: the same read fails with EIO, the log names the rule once
    log = tmp_path / "mount.log"
    with mounted(bad, tmp_path / "mnt", "--store", root / "default.castr", "--log", log) as blob:
        with open(blob, "rb") as f:
            assert f.read(4096) == expected_bytes(parsed, chunks, choice, 0, 4096)
        out = subprocess.run(
            pread_command(blob, int(parsed.ends[victim - 1]), 1), capture_output=True, text=True
        )
        assert out.stdout.strip() == "5"  # EIO
    lines = [line for line in log.read_text().splitlines() if rule in line]
    assert len(lines) == 1, log.read_text()


def test_commands_stream_through_a_paged_table(huge, tmp_path: Path) -> None:
    root, chunks, choice = huge
    table = read_index(root / "big.caibx")
    info = json.loads(run_cafuse("info", root / "big.caibx", "--json").stdout)
    assert info["chunks"] == ITEMS
    assert info["blob_size"] == table.blob_size
    assert info["unique_chunks"] == len(np.unique(choice))
    assert info["chunk_sizes"]["largest"] <= MAX
    out = tmp_path / "out.img"
    run_cafuse("extract", root / "big.caibx", out)
    expected = b"".join(chunks.data[int(c)] for c in choice)
    assert out.read_bytes() == expected
    tail = subprocess.run(
        [
            *run_cafuse_cmd(),
            "cat",
            str(root / "big.caibx"),
            "--offset",
            str(table.blob_size - 10000),
        ],
        capture_output=True,
        check=True,
    ).stdout
    assert tail == expected[-10000:]
    verified = run_cafuse("verify", root / "big.caibx", "--store", root / "default.castr")
    assert f"{len(np.unique(choice))} chunks checked, 0 missing" in verified.stdout
    store = tmp_path / "store"
    shutil.copytree(root / "default.castr", store)
    make_chunks(store, 3, 100, 200, seed=9)  # chunks no index names
    run_cafuse("gc", store, root / "big.caibx", "--grace", "0")
    assert len(list(store.rglob("*.cacnk"))) == len(np.unique(choice))


def run_cafuse_cmd() -> list[str]:
    import sys

    return [sys.executable, "-m", "cafuse"]


def test_mount_by_url_reads_pages_and_works_offline_after_cache(huge, tmp_path: Path) -> None:
    root, chunks, choice = huge
    table = read_index(root / "big.caibx")
    cache = tmp_path / "cache"
    size = (root / "big.caibx").stat().st_size
    with nginx_serving(root, tmp_path / "nginx") as server:
        url = f"{server.url}/big.caibx"
        args = ("--store", f"{server.url}/default.castr", "--cache", cache)
        with mounted(url, tmp_path / "mnt", *args) as blob:  # type: ignore[arg-type]
            at_start = index_bytes_sent(server, "big.caibx")
            random_reads(blob, table, chunks, choice, 10, seed=5, most=4096)
            after = index_bytes_sent(server, "big.caibx")
            stats = json.loads(run_cafuse("stats", tmp_path / "mnt", "--json").stdout)
            assert stats["index"]["bytes_fetched"] == after  # what the daemon says it read
            assert "table pages read" in run_cafuse("stats", tmp_path / "mnt").stdout
        assert at_start < 20_000  # header with the first page, and the tail
        assert after < size // 4  # 10 small reads fetch a few pages, not the table
        # cafuse cache keeps every chunk and every page of the table
        run_cafuse("cache", url, *args)
    # the server is gone: reads come from the cache (pages and chunks), anywhere
    with mounted(url, tmp_path / "mnt", *args) as blob:  # type: ignore[arg-type]
        random_reads(blob, table, chunks, choice, 10, seed=5, most=4096)
        random_reads(blob, table, chunks, choice, 20, seed=6, most=256 << 10)


def test_index_replaced_on_the_server_while_mounted(huge, tmp_path: Path) -> None:
    root, chunks, choice = huge
    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(root / "big.caibx", www / "big.caibx")
    table = read_index(root / "big.caibx")
    log = tmp_path / "mount.log"
    with nginx_serving(www, tmp_path / "nginx") as server:
        url = f"{server.url}/big.caibx"
        store = ("--store", str(root / "default.castr"))
        with mounted(url, tmp_path / "mnt", *store, "--log", log) as blob:  # type: ignore[arg-type]
            with open(blob, "rb") as f:
                assert f.read(4096) == expected_bytes(table, chunks, choice, 0, 4096)
            write_cycling_index(www / "new.caibx", chunks, ITEMS, MIN, AVG, MAX, seed=7)
            later = (www / "big.caibx").stat().st_mtime + 10  # nginx's ETag: mtime and length
            os.utime(www / "new.caibx", (later, later))
            os.replace(www / "new.caibx", www / "big.caibx")
            far = table.blob_size - 5000
            out = subprocess.run(pread_command(blob, far, 100), capture_output=True, text=True)
            assert out.stdout.strip() == "5"  # EIO, not bytes of another version
            with open(blob, "rb") as f:  # what was read before is still served
                assert f.read(4096) == expected_bytes(table, chunks, choice, 0, 4096)
    changed = [line for line in log.read_text().splitlines() if "changed on the server" in line]
    assert len(changed) == 1, log.read_text()


def test_a_server_that_ignores_range(huge, tmp_path: Path, monkeypatch) -> None:
    root, chunks, _ = huge
    small = tmp_path / "small.caibx"
    write_cycling_index(small, chunks, 2000, MIN, AVG, MAX)
    with faulty_server(tmp_path, Faults()) as url:  # answers every GET 200, whole
        info = json.loads(run_cafuse("info", f"{url}/small.caibx", "--json").stdout)
        assert info["chunks"] == 2000
        shutil.copy(root / "big.caibx", tmp_path / "big.caibx")
        from cafuse import remoteindex
        from cafuse.errors import CafuseError
        from cafuse.resolve import load_index

        # over the whole-fetch limit: refused, saying why and what to do
        monkeypatch.setattr(remoteindex, "RANGELESS_MAX_BYTES", 1 << 20)
        with pytest.raises(CafuseError, match="ignores HTTP Range requests") as err:
            load_index(f"{url}/big.caibx")
        assert "honours Range" in str(err.value)
        # under it: fetched whole (one bounded GET) and parsed in memory
        monkeypatch.setattr(remoteindex, "RANGELESS_MAX_BYTES", 4 << 20)
        assert load_index(f"{url}/big.caibx").chunk_count == ITEMS


@contextlib.contextmanager
def redirecting(target: str) -> Iterator[str]:
    """A server answering every GET with a 302 to the same path under ``target``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", target + self.path.replace("/moved", "", 1))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with serve_http(Handler) as url:
        yield f"{url}/moved"


def test_an_index_url_that_redirects(huge, nginx, tmp_path: Path) -> None:
    root, chunks, choice = huge
    table = read_index(root / "big.caibx")
    with redirecting(nginx.url) as moved:
        store = ("--store", f"{nginx.url}/default.castr")
        with mounted(f"{moved}/big.caibx", tmp_path / "mnt", *store) as blob:  # type: ignore[arg-type]
            random_reads(blob, table, chunks, choice, 10, seed=8, most=256 << 10)
        proc = run_cafuse("info", f"{moved}/big.caibx", "--json")
        assert json.loads(proc.stdout)["chunks"] == ITEMS


def test_a_missing_index_url_is_one_line(nginx) -> None:
    proc = run_cafuse("info", f"{nginx.url}/nothing.caibx", check=False)
    assert_user_error(proc, "nothing.caibx", "not found")


def test_reads_wait_for_a_page_in_a_thread_and_share_it(huge) -> None:
    """A page not in memory is read in a thread, once however many reads need it, and
    the event loop serves other reads meanwhile."""
    import trio

    from cafuse.fetch import ChunkSource
    from cafuse.mount.reader import BlobReader
    from cafuse.stores.local import LocalStore

    root, chunks, choice = huge
    table = read_index(root / "big.caibx")
    assert isinstance(table, PagedTable)
    last_page = table.page_count - 1
    gate = threading.Event()
    reads: list[int] = []
    read_page = table.source.read_page

    def gated(page: int, offset: int, length: int) -> bytes:
        reads.append(page)
        if page == last_page:
            assert gate.wait(10)
        return read_page(page, offset, length)

    table.source.read_page = gated  # type: ignore[method-assign]
    reader = BlobReader(table, ChunkSource(table.digest, [LocalStore(str(root / "default.castr"))]))
    far = table.blob_size - 3000
    results: dict[str, bytes] = {}

    async def until(condition) -> None:
        with trio.fail_after(10):
            while not condition():
                await trio.sleep(0.001)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(reader.run)

            async def read(name: str, offset: int) -> None:
                results[name] = bytes(await reader.read(offset, 100))

            nursery.start_soon(read, "far", far)
            nursery.start_soon(read, "far too", far + 50)
            await until(lambda: last_page in reads)
            near = bytes(await reader.read(0, 100))  # served while that page is read
            assert near == expected_bytes(table, chunks, choice, 0, 100)
            assert not results
            gate.set()
            await until(lambda: len(results) == 2)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert reads.count(last_page) == 1
    assert results["far"] == expected_bytes(table, chunks, choice, far, 100)
    assert results["far too"] == expected_bytes(table, chunks, choice, far + 50, 100)


def test_an_index_by_s3_url_is_read_by_pages_and_pinned(huge, tmp_path: Path) -> None:
    """The same by S3 (SeaweedFS): ranged GETs with If-Match against a real S3 server."""
    import obstore
    from obstore.store import S3Store
    from servers import S3_KEY, S3_SECRET, SeaweedFS

    root, chunks, choice = huge
    table = read_index(root / "big.caibx")
    server = SeaweedFS(tmp_path / "seaweed")
    server.start()
    try:
        bucket = S3Store(
            "cafuse-test",
            endpoint=server.endpoint,
            access_key_id=S3_KEY,
            secret_access_key=S3_SECRET,
            region="us-east-1",
            client_options={"allow_http": True},
        )
        obstore.put(bucket, "huge/big.caibx", (root / "big.caibx").read_bytes())
        log = tmp_path / "mount.log"
        args = ("--store", root / "default.castr", "--log", log)
        env_mount = server.env()
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        url = "s3://cafuse-test/huge/big.caibx"
        run_cafuse("mount", url, mnt, *args, env=env_mount)
        try:
            (name,) = os.listdir(mnt)
            random_reads(mnt / name, table, chunks, choice, 10, seed=11, most=256 << 10)
            write_cycling_index(tmp_path / "new.caibx", chunks, ITEMS, MIN, AVG, MAX, seed=7)
            obstore.put(bucket, "huge/big.caibx", (tmp_path / "new.caibx").read_bytes())
            far = table.blob_size - 5000
            out = subprocess.run(
                pread_command(mnt / name, far, 100), capture_output=True, text=True
            )
            assert out.stdout.strip() == "5"  # EIO, not bytes of another version
        finally:
            run_cafuse("umount", mnt)
    finally:
        server.stop()
    assert "changed on the server" in log.read_text()


def test_distinct_keys_across_batches_and_the_cap() -> None:
    from cafuse.chunktable import Batch
    from cafuse.tablepass import DistinctKeys, SizeHistogram

    rng = np.random.default_rng(4)
    pool = rng.integers(0, 256, (500, 32), dtype=np.uint8)
    pick = rng.integers(0, 500, 20_000)
    seen = DistinctKeys()
    firsts: list[int] = []
    for lo in range(0, len(pick), 3000):
        ids = pool[pick[lo : lo + 3000]]
        ends = np.arange(1, len(ids) + 1, dtype=np.uint64)
        batch = Batch(lo, 0, ends, ids, np.zeros(len(ids), dtype=bool))
        firsts += (lo + seen.first_seen(batch)).tolist()
    _, expected = np.unique(pick, return_index=True)
    assert sorted(firsts) == sorted(expected.tolist())
    assert seen.count == len(np.unique(pick))
    capped = DistinctKeys(cap=100)
    capped.add(np.sort(np.unique(pool[:, :8].copy().view("<u8").reshape(-1))))
    assert capped.full and capped.count == 100
    sizes = rng.integers(1, 4097, 10_000).astype(np.uint64)
    histogram = SizeHistogram(4096)
    histogram.add(sizes[:4000])
    histogram.add(sizes[4000:])
    summary = histogram.summary()
    assert summary["smallest"] == int(sizes.min()) and summary["largest"] == int(sizes.max())
    assert summary["median"] == int(np.percentile(sizes, 50, method="lower"))
    assert summary["p90"] == int(np.percentile(sizes, 90, method="lower"))


def test_the_pin_of_an_index_by_url() -> None:
    from cafuse.remoteindex import Pin

    strong = Pin(1000, '"abc"', 1.0)
    assert strong.options() == {"if_match": '"abc"'}
    assert strong.differs(Pin(1000, '"abc"', 2.0)) is None  # the ETag decides
    assert "ETag" in (strong.differs(Pin(1000, '"abd"', 1.0)) or "")
    assert "length" in (strong.differs(Pin(1001, '"abc"', 1.0)) or "")
    weak = Pin(1000, 'W/"abc"', 1.0)
    assert "if_match" not in weak.options()  # compared with each answer instead
    assert "if_unmodified_since" in weak.options()
    dated = Pin(1000, None, 1.0)
    assert "Last-Modified" in (dated.differs(Pin(1000, None, 5.0)) or "")


def test_passes_in_many_batches(huge, tmp_path: Path, monkeypatch) -> None:
    """extract, info, verify, cache and gc over a table in several batches: the same
    results as one pass (zero chunks included)."""
    from cafuse import chunktable
    from cafuse.extract import extract
    from cafuse.fetch import ChunkSource
    from cafuse.maintenance import collect_garbage, index_info, verify_store
    from cafuse.prefetch import fill_cache
    from cafuse.stores import CacheStore
    from cafuse.stores.local import LocalStore

    root, chunks, choice = huge
    monkeypatch.setattr(chunktable, "BATCH_ITEMS", 5000)  # rounded up to whole pages
    table = read_index(root / "big.caibx")
    assert len(list(table.batches(chunktable.whole_table_step(table)))) > 3
    zero = len(chunks.data) - 1
    assert table.is_zero(int(np.flatnonzero(choice == zero)[0]))
    store = LocalStore(str(root / "default.castr"))
    out = tmp_path / "out.img"
    result = extract(table, str(out), ChunkSource(table.digest, [store]), progress=False)
    assert out.read_bytes() == b"".join(chunks.data[int(c)] for c in choice)
    assert result.zero == int((choice == zero).sum()) * MAX
    info = index_info(table)
    assert info["zero_chunks"] == int((choice == zero).sum())
    assert info["unique_chunks"] == len(np.unique(choice))
    report = verify_store(table, store, progress=False)
    assert report.checked == len(np.unique(choice)) and not report.missing
    cache = CacheStore(str(tmp_path / "cache"), 1 << 30)
    source = ChunkSource(table.digest, [store], cache=cache)
    cached = fill_cache(table, source, progress=False)
    assert cached.chunks == len(np.unique(choice[choice != zero]))
    assert collect_garbage(store, [table], dry_run=True, grace=0).deleted == 0


def write_changed_ids(src: Path, dest: Path, lo: int, hi: int) -> None:
    """``src`` with the ids of items ``lo..hi`` changed (same length, same offsets), a
    newer mtime: another version nginx tells apart only by its ETag."""
    raw = bytearray(src.read_bytes())
    items = np.frombuffer(raw, dtype=np.uint8, count=ITEMS * 40, offset=ITEMS_OFFSET)
    items = items.reshape(ITEMS, 40)
    items[lo:hi, 8] ^= 0xFF
    dest.write_bytes(bytes(raw))
    later = src.stat().st_mtime + 10
    os.utime(dest, (later, later))


def test_versions_of_one_url_share_a_cache_without_mixing(huge, tmp_path: Path) -> None:
    """Two tables of one URL pinned to two versions, one --cache: each reads only its own
    version's pages (the one pinned to the old version never gets the new one's ids)."""
    from cafuse.resolve import RemoteOptions, load_index

    root, _, _ = huge
    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(root / "big.caibx", www / "big.caibx")
    v1 = read_index(root / "big.caibx")
    options = RemoteOptions(cache=str(tmp_path / "cache"))
    with nginx_serving(www, tmp_path / "nginx") as server:
        url = f"{server.url}/big.caibx"
        a = load_index(url, options)
        assert isinstance(a, PagedTable)
        early, late = 5000, 30_000
        assert list(a.covering(v1.span(early)[0], 1)) == [early]
        assert a.chunk_id(early) == v1.chunk_id(early)
        write_changed_ids(root / "big.caibx", www / "new.caibx", 20_000, ITEMS)
        os.replace(www / "new.caibx", www / "big.caibx")
        b = load_index(url, options)  # the new version, its pages kept in the same cache
        assert isinstance(b, PagedTable)
        assert list(b.covering(v1.span(late)[0], 1)) == [late]
        assert b.chunk_id(late) != v1.chunk_id(late)
        # a's page of the late item is not cached for its version: fetched, and refused
        with pytest.raises(TableError, match="changed on the server"):
            a.covering(v1.span(late)[0], 1)
        a._pages.clear()  # what a read before is then read from a's own version, offline
        assert list(a.covering(v1.span(early)[0], 1)) == [early]
        assert a.chunk_id(early) == v1.chunk_id(early)
        versions = [p for p in (tmp_path / "cache" / "indexes").glob("*.pages/*") if p.is_dir()]
        assert len(versions) == 2
    # offline, the version opened last is the one used
    offline = load_index(url, options)
    assert list(offline.covering(v1.span(late)[0], 1)) == [late]
    assert offline.chunk_id(late) == b.chunk_id(late)


def test_old_versions_of_an_index_leave_the_cache(tmp_path: Path) -> None:
    from cafuse.remoteindex import KEEP_VERSIONS, Pin, _prepare_cache

    pages = tmp_path / "x.pages"
    dirs = []
    for n in range(KEEP_VERSIONS + 2):
        version = _prepare_cache(pages, Pin(100, f'"{n}"', None), b"h", b"t")
        assert version is not None
        (version / "0.page").write_bytes(b"p")
        os.utime(version / "pin.json", (n, n))  # opened in this order
        dirs.append(version)
    assert all(d.is_dir() for d in dirs[-KEEP_VERSIONS:])
    assert not any(d.exists() for d in dirs[:-KEEP_VERSIONS])
    assert (pages / "current").read_text() == dirs[-1].name
    # no ETag and no Last-Modified: versions cannot be told apart, nothing is kept
    assert _prepare_cache(pages, Pin(100, None, None), b"h", b"t") is None


def test_a_page_fetched_is_served_when_the_cache_cannot_keep_it(huge, nginx, tmp_path, caplog):
    from cafuse.resolve import RemoteOptions, load_index

    root, _, _ = huge
    table = read_index(root / "big.caibx")
    cache = tmp_path / "cache"
    paged = load_index(f"{nginx.url}/big.caibx", RemoteOptions(cache=str(cache)))
    shutil.rmtree(cache / "indexes")  # (a full disk, a cache removed under the mount)
    with caplog.at_level("WARNING", logger="cafuse.remoteindex"):
        for item in (10_000, 20_000, 30_000):
            assert list(paged.covering(table.span(item)[0], 1)) == [item]
            assert paged.chunk_id(item) == table.chunk_id(item)
    warned = [r for r in caplog.records if "cannot keep pages" in r.getMessage()]
    assert len(warned) == 1


def test_a_second_pass_takes_the_pages_from_the_cache(huge, nginx, tmp_path: Path) -> None:
    """info twice with one --cache: the second fetches the header and tail, no pages."""
    from cafuse.maintenance import index_info
    from cafuse.remoteindex import END_BYTES, FIRST_BYTES
    from cafuse.resolve import RemoteOptions, load_index

    root, _, _ = huge
    size = (root / "big.caibx").stat().st_size
    options = RemoteOptions(cache=str(tmp_path / "cache"))
    infos, fetched = [], []
    for _ in range(2):
        table = load_index(f"{nginx.url}/big.caibx", options)
        infos.append(index_info(table))
        fetched.append(table.stats()["bytes_fetched"])
    assert infos[0] == infos[1] == index_info(read_index(root / "big.caibx"))
    assert fetched[0] > size // 2
    assert fetched[1] == FIRST_BYTES + END_BYTES


def blocked_page_reader(huge, gate: threading.Event, pages: list[int]):
    """A reader over the big table whose page reads wait for ``gate``, then fail."""
    from cafuse.fetch import ChunkSource
    from cafuse.mount.reader import BlobReader
    from cafuse.stores.local import LocalStore

    root = huge[0]
    table = read_index(root / "big.caibx")
    assert isinstance(table, PagedTable)

    def unreachable(page: int, offset: int, length: int) -> bytes:
        pages.append(page)
        gate.wait(30)
        raise TableError(f"cannot fetch part of index {page}: unreachable")

    table.source.read_page = unreachable  # type: ignore[method-assign]
    source = ChunkSource(table.digest, [LocalStore(str(root / "default.castr"))])
    return table, BlobReader(table, source)


def test_reads_waiting_for_a_failing_page_fail_together(huge) -> None:
    """Six reads need one page; its one read fails: all six fail with that error at once,
    none reads the page again."""
    import trio
    import trio.testing

    from cafuse.mount.reader import ReadFailed

    gate = threading.Event()
    pages: list[int] = []
    table, reader = blocked_page_reader(huge, gate, pages)
    far = table.blob_size - 3000
    failures: list[str] = []

    async def main() -> None:
        async def read() -> None:
            with pytest.raises(ReadFailed) as caught:
                await reader.read(far, 100)
            failures.append(str(caught.value))

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            while not pages:  # the loader's thread has started
                await trio.sleep(0.001)
            gate.set()

    trio.run(main)
    assert len(pages) == 1
    assert len(failures) == 6 and all("unreachable" in f for f in failures)
    assert reader.failed_reads == 6


def test_a_read_waiting_for_a_page_fails_in_bounded_time(huge) -> None:
    import trio
    import trio.testing

    from cafuse.mount.reader import READ_GRACE, ReadFailed

    gate = threading.Event()
    table, reader = blocked_page_reader(huge, gate, [])
    bound = reader.timeout + READ_GRACE
    took: list[float] = []

    async def main() -> None:
        with trio.fail_after(10 * bound):  # the old code waited forever
            start = trio.current_time()
            with pytest.raises(ReadFailed, match="timed out"):
                await reader.read(table.blob_size - 3000, 100)
            took.append(trio.current_time() - start)

    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        gate.set()
    assert took == [bound]
    assert reader.failed_reads == 1


def test_ids_sharing_their_first_8_bytes_are_distinct(tmp_path: Path) -> None:
    """An id whose first 8 bytes are another's (a crafted collision costs ~2^32 digests)
    is still its own chunk for verify and cache: checked, and here reported missing."""
    from cafuse.chunktable import Batch
    from cafuse.digest import FLAG_BLAKE3
    from cafuse.index import IndexWriter
    from cafuse.maintenance import verify_store
    from cafuse.stores.local import LocalStore
    from cafuse.tablepass import DistinctKeys

    chunks = make_chunks(tmp_path / "store", 2, MIN, MAX)
    twin = chunks.ids[0].copy()
    twin[8:] ^= 0x5A  # same first 8 bytes as chunk 0, not in the store
    ids = np.stack([chunks.ids[0], chunks.ids[1], twin, chunks.ids[0], twin])
    sizes = chunks.sizes[[0, 1, 0, 0, 0]]
    ends = np.cumsum(sizes, dtype=np.uint64)
    seen = DistinctKeys()
    one = seen.first_seen(Batch(0, 0, ends[:2], ids[:2], np.zeros(2, dtype=bool)))
    rest = seen.first_seen(Batch(2, int(ends[1]), ends[2:], ids[2:], np.zeros(3, dtype=bool)))
    assert one.tolist() == [0, 1] and rest.tolist() == [0]  # the twin, once
    together = DistinctKeys().first_seen(Batch(0, 0, ends, ids, np.zeros(5, dtype=bool)))
    assert together.tolist() == [0, 1, 2]
    with IndexWriter(tmp_path / "twins.caibx", FLAG_BLAKE3, MIN, AVG, MAX) as writer:
        writer.append(ends, ids)
        writer.commit()
    index = read_index(tmp_path / "twins.caibx")
    report = verify_store(index, LocalStore(str(tmp_path / "store")), progress=False)
    assert report.checked == 3
    assert report.missing == [twin.tobytes()]
