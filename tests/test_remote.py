"""Remote stores against real servers on 127.0.0.1: nginx (HTTP), SeaweedFS (S3)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import assert_user_error, random_bytes, run_cafuse, sha256_file
from mounting import mounted
from servers import S3_SECRET, Nginx, SeaweedFS, free_port, nginx_serving

from cafuse.index import read_index


@pytest.fixture(scope="module")
def www(tmp_path_factory: pytest.TempPathFactory, ext4_image: Path) -> Path:
    """A web root as casync publishes: image.caibx next to default.castr/."""
    root = tmp_path_factory.mktemp("www")
    run_cafuse("make", root / "image.caibx", ext4_image, "--store", root / "default.castr")
    return root


@pytest.fixture(scope="module")
def nginx(www: Path, tmp_path_factory: pytest.TempPathFactory):
    with nginx_serving(www, tmp_path_factory.mktemp("nginx")) as server:
        yield server


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory):
    server = SeaweedFS(tmp_path_factory.mktemp("seaweed"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def assert_cache_holds(cache: Path, index_path: Path, complete: bool = True) -> int:
    """Every file in the cache is a valid chunk; with ``complete``, every non-zero chunk of
    the index is there (zero chunks are never fetched, so never cached)."""
    from cafuse.codec import decompress
    from cafuse.digest import hash_function

    index = read_index(index_path)
    hash_chunk = hash_function(index.digest)
    sizes = {index.chunk_id(i): int(index.sizes[i]) for i in range(index.chunk_count)}
    files = list(cache.rglob("*.cacnk"))
    for path in files:
        chunk_id = bytes.fromhex(path.name.removesuffix(".cacnk"))
        assert hash_chunk(decompress(path.read_bytes(), sizes[chunk_id])) == chunk_id
    if complete:
        wanted = {index.chunk_id(i) for i in range(index.chunk_count) if not index.zero_mask[i]}
        assert {bytes.fromhex(p.name.removesuffix(".cacnk")) for p in files} == wanted
    return len(files)


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/store"


def test_http_store_extract_cat_info_verify(
    www: Path, nginx: Nginx, ext4_image: Path, tmp_path: Path
) -> None:
    index, store = www / "image.caibx", f"{nginx.url}/default.castr"
    out = tmp_path / "out.img"
    run_cafuse("extract", index, out, "--store", store)
    assert sha256_file(out) == sha256_file(ext4_image)
    with open(tmp_path / "cat.img", "wb") as f:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "cafuse",
                "cat",
                str(index),
                "--store",
                store,
                "--offset",
                "4096",
                "--length",
                "1000000",
            ],
            stdout=f,
            check=True,
        )
    assert (tmp_path / "cat.img").read_bytes() == ext4_image.read_bytes()[4096:1004096]
    info = json.loads(
        run_cafuse("info", f"{nginx.url}/image.caibx", "--store", store, "--json").stdout
    )
    assert info["stores"][store]["missing"] == 0
    assert "0 missing, 0 corrupt" in run_cafuse("verify", index, "--store", store).stdout


def test_index_url_and_default_store(
    www: Path, nginx: Nginx, ext4_image: Path, tmp_path: Path
) -> None:
    url = f"{nginx.url}/image.caibx?token=abc;x"  # casync's URL rules: cut at ? and ;
    out = tmp_path / "out.img"
    run_cafuse("extract", url, out)  # store: default.castr next to the index
    assert sha256_file(out) == sha256_file(ext4_image)
    with mounted(f"{nginx.url}/image.caibx", tmp_path / "mnt") as blob:
        assert blob.name == "image"
        assert sha256_file(blob) == sha256_file(ext4_image)
    assert_user_error(
        run_cafuse("extract", f"{nginx.url}/nope.caibx", out, check=False),
        "cannot fetch index",
        "not found",
    )


def test_mount_http_store_loop_ext4(
    www: Path, nginx: Nginx, sample_tree: Path, tmp_path: Path
) -> None:
    from helpers import compare_trees
    from mounting import loop_mounted

    with mounted(
        www / "image.caibx", tmp_path / "mnt", "--store", f"{nginx.url}/default.castr"
    ) as blob:
        with loop_mounted(blob, tmp_path / "rootfs") as root:
            assert compare_trees(sample_tree, root) > 100
        stats = json.loads(run_cafuse("stats", tmp_path / "mnt", "--json").stdout)
        assert stats["origins"][f"{nginx.url}/default.castr"]["stored_bytes"] > 0


def test_failover_group_and_store_order(
    www: Path, nginx: Nginx, ext4_image: Path, tmp_path: Path
) -> None:
    good = f"{nginx.url}/default.castr"
    out = tmp_path / "out.img"
    run_cafuse(
        "extract",
        www / "image.caibx",
        out,
        "--store",
        f"{dead_url()}|{good}",
        "--retries",
        "0",
        "--timeout",
        "5",
    )
    assert sha256_file(out) == sha256_file(ext4_image)
    out.unlink()
    run_cafuse(
        "extract",
        www / "image.caibx",
        out,
        "--store",
        dead_url(),
        "--store",
        good,
        "--retries",
        "1",
        "--timeout",
        "5",
    )
    assert sha256_file(out) == sha256_file(ext4_image)


def test_unreachable_store_fails_extract_and_mount(www: Path, tmp_path: Path) -> None:
    index = www / "image.caibx"
    out = tmp_path / "o.img"
    assert_user_error(
        run_cafuse(
            "extract",
            index,
            out,
            "--store",
            dead_url(),
            "--retries",
            "1",
            "--timeout",
            "3",
            check=False,
        ),
        "cannot reach any store",
    )
    assert not out.exists()
    (tmp_path / "mnt").mkdir()
    assert_user_error(
        run_cafuse(
            "mount",
            index,
            tmp_path / "mnt",
            "--store",
            dead_url(),
            "--retries",
            "0",
            "--timeout",
            "3",
            check=False,
        ),
        "cannot reach any store",
    )
    assert not os.path.ismount(tmp_path / "mnt")


def test_bad_store_urls_are_refused(www: Path, tmp_path: Path) -> None:
    index = www / "image.caibx"
    out = tmp_path / "o.img"
    assert_user_error(
        run_cafuse("extract", index, out, "--store", "http://", check=False), "no host"
    )
    assert_user_error(
        run_cafuse("extract", index, out, "--store", "ftp://x/y", check=False),
        "unsupported store URL scheme",
    )
    assert not out.exists()


def test_credentials_in_a_store_url_never_leak(www: Path, tmp_path: Path) -> None:
    index = www / "image.caibx"
    out = tmp_path / "o.img"
    err = assert_user_error(
        run_cafuse(
            "extract",
            index,
            out,
            "--store",
            f"http://user:hunter2@127.0.0.1:{free_port()}/s",
            "--retries",
            "0",
            "--timeout",
            "3",
            check=False,
        )
    )
    assert "hunter2" not in err and "***@" in err


def test_make_into_an_http_store_is_refused(www: Path, tmp_path: Path) -> None:
    index = www / "image.caibx"  # any regular file will do as the input
    assert_user_error(
        run_cafuse(
            "make", tmp_path / "x.caibx", index, "--store", "http://127.0.0.1:1/store", check=False
        ),
        "read-only",
    )


def test_verify_tells_an_unreachable_store_from_corrupt_chunks(www: Path) -> None:
    index = www / "image.caibx"
    proc = run_cafuse(
        "verify", index, "--store", dead_url(), "--retries", "0", "--timeout", "3", check=False
    )
    assert_user_error(proc, "did not answer", "check the store")
    assert " 0 corrupt" in proc.stdout and "unreadable" in proc.stdout


def test_cache_stays_within_its_bound(
    www: Path, nginx: Nginx, ext4_image: Path, tmp_path: Path
) -> None:
    """A cache smaller than the image's chunks: eviction keeps it within its bound."""
    index, store = www / "image.caibx", f"{nginx.url}/default.castr"
    stored = sum(p.stat().st_size for p in (www / "default.castr").rglob("*.cacnk"))
    small = tmp_path / "small-cache"
    bound = stored // 3
    out = tmp_path / "out.img"
    run_cafuse(
        "extract", index, out, "--store", store, "--cache", small, "--cache-size", str(bound)
    )
    assert sha256_file(out) == sha256_file(ext4_image)
    used = sum(p.stat().st_size for p in small.rglob("*.cacnk"))
    assert 0 < used <= bound
    assert_cache_holds(small, index, complete=False)


def test_two_processes_fill_one_cache(
    www: Path, nginx: Nginx, ext4_image: Path, tmp_path: Path
) -> None:
    """Two processes filling one cache at once, both right, every cached chunk valid."""
    index, store = www / "image.caibx", f"{nginx.url}/default.castr"
    shared = tmp_path / "shared-cache"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cafuse",
                "extract",
                str(index),
                str(tmp_path / f"p{i}.img"),
                "--store",
                store,
                "--cache",
                str(shared),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    for i in range(2):
        assert sha256_file(tmp_path / f"p{i}.img") == sha256_file(ext4_image)
    assert_cache_holds(shared, index)


def test_filled_cache_serves_offline(
    www: Path, nginx: Nginx, ext4_image: Path, tmp_path: Path
) -> None:
    """Fill a cache with `cafuse cache`, resumable, then work with the server gone: the
    extract says its bytes came from the cache."""
    index, store = www / "image.caibx", f"{nginx.url}/default.castr"
    offline = tmp_path / "offline-cache"
    first = run_cafuse("cache", index, "--store", store, "--cache", offline)
    again = run_cafuse("cache", index, "--store", store, "--cache", offline)
    assert " 0 already cached" in first.stdout and "0 fetched" in again.stdout
    gone = dead_url()
    out2 = tmp_path / "offline.img"
    proc = run_cafuse(
        "extract",
        index,
        out2,
        "--store",
        gone,
        "--cache",
        offline,
        "--retries",
        "0",
        "--timeout",
        "3",
    )
    assert sha256_file(out2) == sha256_file(ext4_image)
    assert "from stores 0 B" in proc.stdout and "from the cache 0 B" not in proc.stdout
    with mounted(
        index,
        tmp_path / "mnt",
        "--store",
        gone,
        "--cache",
        offline,
        "--retries",
        "0",
        "--timeout",
        "5",
    ) as blob:
        assert sha256_file(blob) == sha256_file(ext4_image)


def test_cached_index_url_stands_in_offline(nginx: Nginx, ext4_image: Path, tmp_path: Path) -> None:
    """An index given by URL: the cache keeps a copy that stands in for it offline."""
    out2 = tmp_path / "offline.img"
    url_cache = tmp_path / "url-cache"
    run_cafuse("cache", f"{nginx.url}/image.caibx", "--cache", url_cache)
    nginx.stop()
    try:
        with mounted(
            f"{nginx.url}/image.caibx",
            tmp_path / "mnt2",
            "--cache",
            url_cache,
            "--retries",
            "0",
            "--timeout",
            "5",
        ) as blob:
            assert sha256_file(blob) == sha256_file(ext4_image)
        proc = run_cafuse(
            "extract",
            f"{nginx.url}/image.caibx",
            out2,
            "--retries",
            "0",
            "--timeout",
            "3",
            check=False,
        )
        assert_user_error(proc, "cannot fetch index")
    finally:
        nginx.start()


def test_cache_repairs_a_corrupt_chunk(
    www: Path, nginx: Nginx, ext4_image: Path, tmp_path: Path
) -> None:
    index, store = www / "image.caibx", f"{nginx.url}/default.castr"
    cache = tmp_path / "cache"
    run_cafuse("cache", index, "--store", store, "--cache", cache)
    victim = sorted(cache.rglob("*.cacnk"))[5]
    victim.write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(100))
    out = tmp_path / "out.img"
    run_cafuse("extract", index, out, "--store", store, "--cache", cache)
    assert sha256_file(out) == sha256_file(ext4_image)
    assert_cache_holds(cache, index)  # the corrupt copy was replaced by a good one


def test_two_mounts_share_one_cache(
    www: Path, nginx: Nginx, ext4_image: Path, tmp_path: Path
) -> None:
    """Two daemons (v1 and a second index of the same image) on one cache: what the first
    fetched, the second reads from the cache."""
    index, store = www / "image.caibx", f"{nginx.url}/default.castr"
    second = tmp_path / "again.caibx"
    shutil.copyfile(index, second)
    cache = tmp_path / "cache"
    with (
        mounted(index, tmp_path / "m1", "--store", store, "--cache", cache) as one,
        mounted(second, tmp_path / "m2", "--store", store, "--cache", cache) as two,
    ):
        assert sha256_file(one) == sha256_file(ext4_image)
        before = nginx.bytes_sent()
        assert sha256_file(two) == sha256_file(ext4_image)
        assert nginx.bytes_sent() == before  # nothing more came over the network
        stats = json.loads(run_cafuse("stats", tmp_path / "m2", "--json").stdout)
        assert stats["origins"][f"cache:{cache}"]["chunks"] > 0


def test_s3_make_extract_mount(seaweed: SeaweedFS, ext4_image: Path, tmp_path: Path) -> None:
    env = seaweed.env()
    store = "s3://cafuse-test/images/store"
    index = tmp_path / "image.caibx"
    made = run_cafuse("make", index, ext4_image, "--store", store, env=env)
    parsed = read_index(index)
    assert f"{len(parsed.distinct_positions())} new" in made.stdout
    remade = run_cafuse("make", index, ext4_image, "--store", store, env=env)
    assert " 0 new" in remade.stdout  # chunks already in the bucket are not uploaded again
    out = tmp_path / "out.img"
    run_cafuse("extract", index, out, "--store", store, env=env)
    assert sha256_file(out) == sha256_file(ext4_image)
    assert "0 missing, 0 corrupt" in run_cafuse("verify", index, "--store", store, env=env).stdout
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_cafuse("mount", index, mnt, "--store", store, env=env)
    try:
        assert sha256_file(mnt / "image") == sha256_file(ext4_image)
    finally:
        run_cafuse("umount", mnt)
    dry = run_cafuse("gc", store, index, "--dry-run", env=env)
    assert "would delete 0" in dry.stdout
    # the endpoint may also come from the option instead of the environment
    plain = {k: v for k, v in env.items() if k != "AWS_ENDPOINT_URL"}
    run_cafuse(
        "extract",
        index,
        tmp_path / "o2.img",
        "--store",
        store,
        "--s3-endpoint",
        seaweed.endpoint,
        env=plain,
    )
    assert sha256_file(tmp_path / "o2.img") == sha256_file(ext4_image)


def test_s3_index_url_with_default_store(
    seaweed: SeaweedFS, ext4_image: Path, tmp_path: Path
) -> None:
    """Published as casync does, in a bucket: s3://b/os/v1.caibx next to default.castr."""
    import obstore
    from obstore.store import S3Store

    env = seaweed.env()
    index = tmp_path / "v1.caibx"
    run_cafuse("make", index, ext4_image, "--store", "s3://cafuse-pub/os/default.castr", env=env)
    bucket = S3Store(
        "cafuse-pub",
        endpoint=seaweed.endpoint,
        region="us-east-1",
        access_key_id=env["AWS_ACCESS_KEY_ID"],
        secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        client_options={"allow_http": True},
    )
    obstore.put(bucket, "os/v1.caibx", index.read_bytes())
    out = tmp_path / "out.img"
    run_cafuse("extract", "s3://cafuse-pub/os/v1.caibx", out, env=env)
    assert sha256_file(out) == sha256_file(ext4_image)


def test_s3_wrong_credentials_never_leak(seaweed: SeaweedFS, made_image, tmp_path: Path) -> None:
    index, _ = made_image
    env = {**seaweed.env(), "AWS_SECRET_ACCESS_KEY": S3_SECRET + "-wrong"}
    err = assert_user_error(
        run_cafuse(
            "extract",
            index,
            tmp_path / "o",
            "--store",
            "s3://cafuse-test/images/store",
            env=env,
            check=False,
        ),
        "403",
    )
    assert S3_SECRET not in err


def test_many_chunks_in_flight(www: Path, nginx: Nginx, ext4_image: Path, tmp_path: Path) -> None:
    """Concurrency 16 on a real server: right bytes, and each chunk requested once."""
    index = read_index(www / "image.caibx")
    before = len((nginx.workdir / "access.log").read_text().splitlines())
    out = tmp_path / "out.img"
    run_cafuse(
        "extract",
        www / "image.caibx",
        out,
        "--store",
        f"{nginx.url}/default.castr",
        "--concurrency",
        "16",
    )
    assert sha256_file(out) == sha256_file(ext4_image)
    lines = (nginx.workdir / "access.log").read_text().splitlines()[before:]
    gets = [line for line in lines if '"GET ' in line and ".cacnk" in line]
    wanted = len(index.distinct_positions()) - (1 if index.zero_mask.any() else 0)
    assert len(gets) == wanted


# ---------------------------------------------------------------- gc on an object store


def _s3_env(seaweed: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials and endpoint for stores opened in this process."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.setenv(key, seaweed.env()[key])


def _make_in_process(index: Path, data: bytes, store, threads: int = 2, compression="zstd"):
    from cafuse.chunker import ChunkSizes
    from cafuse.make import make

    image = index.with_suffix(".img")
    image.write_bytes(data)
    sizes = ChunkSizes.parse("16K")
    return make(
        str(index),
        str(image),
        store,
        sizes=sizes,
        threads=threads,
        progress=False,
        compression=compression,
    )


def _ages(store) -> dict[bytes, float]:
    return dict(store.iter_ages())


def _calls(store) -> list[str]:
    """Record what every request of ``store`` (with retries) was for: "head", "put", ..."""
    seen: list[str] = []
    call = store._call

    def counting(what, fn, *args):
        seen.append(what)
        return call(what, fn, *args)

    store._call = counting
    return seen


def _lock_names(store) -> list[str]:
    return sorted(name for name, _ in store.list_locks())


def test_s3_gc_spares_young_chunks(seaweed: SeaweedFS, tmp_path: Path) -> None:
    env = seaweed.env()
    store = "s3://cafuse-gc/grace/store"
    keep, drop = tmp_path / "keep.caibx", tmp_path / "drop.caibx"
    for index, seed in ((keep, 31), (drop, 32)):
        image = index.with_suffix(".img")
        image.write_bytes(random_bytes(300_000, seed=seed))
        run_cafuse("make", index, image, "--store", store, "--chunk-size", "16K", env=env)
    dropped = len(read_index(drop).distinct_positions())
    # chunks just written may belong to an index not yet given to gc (or to a casync
    # upload, which takes no lock): the default grace spares them
    out = run_cafuse("gc", store, keep, env=env).stdout
    assert f"deleted 0; spared {dropped} unreferenced chunks younger than 1h" in out
    assert "0 missing" in run_cafuse("verify", drop, "--store", store, env=env).stdout
    # the store locks keep makes away, so a short grace is no longer refused
    out = run_cafuse("gc", store, keep, "--grace", "15m", env=env).stdout
    assert f"deleted 0; spared {dropped}" in out
    assert "would delete 0" in run_cafuse("gc", store, keep, "-n", "--grace", "1m", env=env).stdout
    time.sleep(1.1)  # whole-second Last-Modified: let the newest chunks turn 1 s old
    out = run_cafuse("gc", store, keep, "--grace", "0", env=env).stdout
    assert f"deleted {dropped}" in out
    assert "0 missing, 0 corrupt" in run_cafuse("verify", keep, "--store", store, env=env).stdout
    gone = run_cafuse("verify", drop, "--store", store, env=env, check=False)
    assert f"{dropped} missing" in gone.stdout + gone.stderr


def test_s3_touch_put_and_delete_if_older(
    seaweed: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """touch only asks (one HEAD) and put never overwrites: a new chunk costs one HEAD and
    one PUT, a chunk already there one HEAD, however old it is."""
    from cafuse.stores import ChunkStore, FailoverGroup, LocalStore, open_store

    _s3_env(seaweed, monkeypatch)
    store = open_store("s3://cafuse-gc/unit/store", writable=True)
    calls = _calls(store)
    chunk_id, other = b"\x01" * 32, b"\x02" * 32
    assert not store.touch(chunk_id)  # missing: make must write it
    assert store.put(chunk_id, b"blob")  # new
    assert calls == ["head", "put"]  # no second HEAD after touch
    written = _ages(store)[chunk_id]
    assert abs(written - time.time()) < 60
    time.sleep(1.1)  # Last-Modified has whole seconds
    calls.clear()
    assert store.touch(chunk_id) and calls == ["head"]
    assert not store.put(chunk_id, b"blob") and calls == ["head", "head"]  # not overwritten
    assert _ages(store)[chunk_id] == written
    assert store.put(other, b"other")  # put alone: a HEAD, then the upload
    # delete_if_older: only what was last modified before the cutoff goes
    assert not store.delete_if_older(chunk_id, time.time() - 3600)
    assert store.has(chunk_id)
    assert store.delete_if_older(chunk_id, time.time() + 5)
    assert not store.has(chunk_id)
    assert not store.delete_if_older(chunk_id, time.time() + 5)  # already gone
    # a failover group offers its first member's ages, touch, delete_if_older and locks
    group = open_store(f"s3://cafuse-gc/unit/store|{tmp_path / 'local'}", writable=True)
    assert isinstance(group, FailoverGroup)
    assert group.touch(other) and other in dict(group.iter_ages())
    assert group.supports_locks and group.list_locks() == []
    assert group.delete_if_older(other, time.time() + 5) and not store.has(other)
    local_group = FailoverGroup([LocalStore(tmp_path / "l", create=True), store])
    assert not hasattr(local_group, "supports_locks")  # local stores take no lock

    class Bare(ChunkStore):  # no ages, no touch: a group of it offers none either
        url = "bare"

        def get(self, chunk_id: bytes) -> bytes | None:
            return None

        def has(self, chunk_id: bytes) -> bool:
            return False

    bare_first = FailoverGroup([Bare(), store])
    for name in ("iter_ages", "touch", "delete_if_older", "supports_locks", "list_locks"):
        assert getattr(bare_first, name, None) is None, name


def test_s3_second_make_uploads_nothing(
    seaweed: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A make of an unchanged image uploads no chunk, however old its chunks are: one HEAD
    per distinct chunk, no PUT but its lock's. The first make: one HEAD and one PUT per
    chunk. Both leave no lock behind."""
    from cafuse.stores import open_store

    _s3_env(seaweed, monkeypatch)
    store = open_store("s3://cafuse-gc/remake/store", writable=True)
    calls = _calls(store)
    data = random_bytes(400_000, seed=33)
    first = _make_in_process(tmp_path / "a.caibx", data, store)
    distinct = len(read_index(tmp_path / "a.caibx").distinct_positions())
    assert first.new_chunks == distinct
    assert calls.count("put") == distinct and calls.count("head") == distinct
    assert calls.count("lock put") == 1 and calls.count("lock delete") == 1
    before = _ages(store)
    assert _lock_names(store) == []
    time.sleep(1.1)  # Last-Modified has whole seconds
    calls.clear()
    again = _make_in_process(tmp_path / "b.caibx", data, store)
    assert again.new_chunks == 0 and again.stored_bytes == 0
    assert "put" not in calls and calls.count("head") == distinct
    assert _ages(store) == before  # every chunk's last-modified unchanged
    assert _lock_names(store) == []
    assert (tmp_path / "b.caibx").read_bytes() == (tmp_path / "a.caibx").read_bytes()


def test_s3_uncompressed_chunks_are_bare_objects(
    seaweed: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--compression none uploads bare <id> objects with one HEAD and one conditional PUT
    per new chunk; readers find them; a chunk kept both ways counts once in gc and twice in
    a store-wide verify; a conditional PUT never overwrites."""
    from cafuse.codec import compress
    from cafuse.stores import open_store

    _s3_env(seaweed, monkeypatch)
    url = "s3://cafuse-gc/bare/store"
    store = open_store(url, writable=True)
    calls = _calls(store)
    data = random_bytes(300_000, seed=34)
    index = tmp_path / "a.caibx"
    made = _make_in_process(index, data, store, compression="none")
    parsed = read_index(index)
    distinct = len(parsed.distinct_positions())
    assert made.new_chunks == distinct
    assert calls.count("head") == distinct and calls.count("put") == distinct
    copies = list(store.iter_copies())
    assert len(copies) == distinct and all(bare for _, bare in copies)
    env = seaweed.env()
    out = tmp_path / "out.img"
    run_cafuse("extract", index, out, "--store", url, env=env)
    assert out.read_bytes() == data
    # the same chunks compressed beside them: both copies there, gc counts each chunk once
    chunk_id = parsed.chunk_id(0)
    start, end = parsed.span(0)
    assert store.put(chunk_id, compress(data[start:end]))
    assert not store.put(chunk_id, compress(data[start:end]))  # there: not overwritten
    assert len(dict(store.iter_ages())) == distinct
    assert len(list(store.iter_copies())) == distinct + 1
    gc = run_cafuse("gc", url, index, "--grace", "0", "-n", env=env).stdout
    assert f"kept {distinct} chunks, would delete 0" in gc
    wide = run_cafuse("verify", "--store", url, env=env).stdout
    assert f"{distinct + 1} chunk files checked, 0 corrupt" in wide


def _fake_lock(store, kind: str, host: str = "elsewhere", pid: int = 4242) -> str:
    """A lock as another process on another host writes it."""
    name = f"{kind}-{host}-{pid}-{'0123456789abcdef'}.json"
    body = json.dumps({"kind": kind, "host": host, "pid": pid, "started": "then"})
    store.put_lock(name, body.encode())
    return name


def test_s3_make_and_gc_exclude_each_other(
    seaweed: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh make lock makes gc fail in one line and delete nothing; a fresh gc lock makes
    make fail in one line and write nothing. The refused run leaves no lock of its own."""
    from cafuse import locks
    from cafuse.maintenance import collect_garbage
    from cafuse.stores import open_store

    _s3_env(seaweed, monkeypatch)
    env = seaweed.env()
    url = "s3://cafuse-gc/locks/store"
    store = open_store(url, writable=True)
    keep, drop = tmp_path / "keep.caibx", tmp_path / "drop.caibx"
    _make_in_process(keep, random_bytes(200_000, seed=41), store)
    _make_in_process(drop, random_bytes(200_000, seed=42), store)
    before = _ages(store)

    # a make is running (its lock held by this process, refreshed in the background)
    with locks.store_lock(store, "make") as running:
        assert _lock_names(store) == [running.name]
        assert running.name.startswith(f"make-{locks._host()[:4]}")
        body = json.loads(store.read_lock(running.name))
        assert body["kind"] == "make" and body["pid"] == os.getpid() and body["started"]
        # the lock is not taken for a chunk
        assert _ages(store) == before and set(store.iter_ids()) == set(before)
        with pytest.raises(locks.StoreLocked) as refused:
            collect_garbage(store, [read_index(keep)], grace=0)
        message = str(refused.value)
        assert message.startswith(f"a make is writing to store {url} (lock .cafuse-locks/make-")
        assert f"host {locks._host()}" in message and "s old" in message
        assert "cafuse gc --break-locks after checking" in message and "\n" not in message
        proc = run_cafuse("gc", url, keep, "--grace", "0", env=env, check=False)
        assert_user_error(proc, "a make is writing to store", "--break-locks")
        assert _ages(store) == before  # nothing deleted
        assert _lock_names(store) == [running.name]  # the refused gcs removed their locks
        # --dry-run takes no lock and says gc would refuse
        dry = run_cafuse("gc", url, keep, "--grace", "0", "--dry-run", env=env).stdout
        assert "would delete" in dry and "gc would refuse now: 1 fresh make lock" in dry
        # a second make is welcome beside the first
        _make_in_process(tmp_path / "again.caibx", random_bytes(200_000, seed=41), store)
    assert _lock_names(store) == []

    # a gc is running: make fails in one line, and writes no index
    with locks.store_lock(store, "gc") as gc_lock:
        with pytest.raises(locks.StoreLocked) as refused:
            _make_in_process(tmp_path / "new.caibx", random_bytes(200_000, seed=43), store)
        message = str(refused.value)
        assert message.startswith(f"store {url} is being garbage-collected (lock .cafuse-locks/gc-")
        assert "run make again when gc is done" in message and "\n" not in message
        assert not (tmp_path / "new.caibx").exists()
        image = tmp_path / "new.img"
        proc = run_cafuse(
            "make", tmp_path / "new2.caibx", image, "--store", url, env=env, check=False
        )
        assert_user_error(proc, "is being garbage-collected", "run make again when gc is done")
        assert not (tmp_path / "new2.caibx").exists()
        assert _lock_names(store) == [gc_lock.name]
        assert _ages(store) == before  # no chunk uploaded
    assert _lock_names(store) == []
    # nothing holds the store: gc runs (Last-Modified has whole seconds, and gc counts an
    # object as up to a second younger than it says: let the newest chunks turn 1 s old)
    time.sleep(1.1)
    out = run_cafuse("gc", url, keep, "--grace", "0", env=env).stdout
    assert f"deleted {len(read_index(drop).distinct_positions())}" in out
    assert _lock_names(store) == []


def test_s3_stale_locks_are_ignored_and_removed(
    seaweed: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock of a killed process (never refreshed) stops the other kind only until it is
    LOCK_STALE old, by the server's clock; then it is ignored and removed."""
    from cafuse import locks
    from cafuse.maintenance import collect_garbage
    from cafuse.stores import open_store

    _s3_env(seaweed, monkeypatch)
    monkeypatch.setattr(locks, "LOCK_STALE", 3.0)
    monkeypatch.setattr(locks, "LOCK_REFRESH", 0.5)
    store = open_store("s3://cafuse-gc/stale/store", writable=True)
    index = tmp_path / "a.caibx"
    _make_in_process(index, random_bytes(100_000, seed=51), store)
    start = time.monotonic()

    def at(seconds: float) -> None:
        time.sleep(max(0.0, start + seconds - time.monotonic()))

    dead_make = _fake_lock(store, "make")
    with pytest.raises(locks.StoreLocked, match="host elsewhere, pid 4242"):
        collect_garbage(store, [read_index(index)], grace=0)
    at(2.0)
    dead_gc = _fake_lock(store, "gc", host="other-host")
    with pytest.raises(locks.StoreLocked, match="host other-host, pid 4242"):
        _make_in_process(tmp_path / "b.caibx", random_bytes(100_000, seed=52), store)
    assert _lock_names(store) == sorted([dead_make, dead_gc])
    at(4.0)  # the make lock is stale now, the gc lock not yet
    report = collect_garbage(store, [read_index(index)], grace=0)
    assert report.deleted == 0 and not report.broken  # ran, nothing to delete
    assert _lock_names(store) == [dead_gc]  # the stale one removed, the fresh one kept
    at(5.6)  # now the gc lock is stale too
    _make_in_process(tmp_path / "b.caibx", random_bytes(100_000, seed=52), store)
    assert _lock_names(store) == []
    assert collect_garbage(store, [read_index(index)], grace=0).kept > 0  # runs again
    # something in the lock directory that is no cafuse lock is left alone and stops nobody
    store.put_lock("README", b"cafuse store locks")
    collect_garbage(store, [read_index(index)], grace=0)
    assert _lock_names(store) == ["README"]
    store.delete_lock("README")


def test_s3_gc_break_locks(
    seaweed: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--break-locks removes fresh make locks; a make whose lock was broken notices and
    fails before writing its index."""
    from cafuse import locks
    from cafuse.maintenance import collect_garbage
    from cafuse.stores import open_store

    _s3_env(seaweed, monkeypatch)
    env = seaweed.env()
    url = "s3://cafuse-gc/break/store"
    store = open_store(url, writable=True)
    keep = tmp_path / "keep.caibx"
    _make_in_process(keep, random_bytes(100_000, seed=61), store)
    _make_in_process(tmp_path / "drop.caibx", random_bytes(100_000, seed=62), store)
    dead = _fake_lock(store, "make")
    time.sleep(1.1)  # the chunks older than the grace (0) by whole-second Last-Modified
    out = run_cafuse("gc", url, keep, "--grace", "0", "--break-locks", env=env).stdout
    assert "removed 1 make locks (--break-locks)" in out and "deleted 0" not in out
    assert _lock_names(store) == []
    assert dead not in _lock_names(store)

    # a make whose lock is broken while it runs commits no index
    gc_store = open_store(url)  # another "process"
    put = store.put
    broke: list[object] = []

    def put_then_break(chunk_id: bytes, blob: bytes) -> bool:
        new = put(chunk_id, blob)
        if not broke:
            broke.append(collect_garbage(gc_store, [read_index(keep)], break_locks=True))
        return new

    monkeypatch.setattr(store, "put", put_then_break)
    new = tmp_path / "new.caibx"
    with pytest.raises(locks.LockLost) as lost:
        _make_in_process(new, random_bytes(300_000, seed=63), store, threads=1)
    assert broke and len(broke[0].broken) == 1
    message = str(lost.value)
    assert "was removed by someone else (cafuse gc --break-locks?)" in message
    assert "run make again" in message and "\n" not in message
    assert not new.exists()
    assert _lock_names(store) == []


def test_s3_lock_refresh_and_loss(
    seaweed: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A held lock is rewritten every LOCK_REFRESH; a holder that could not refresh in time
    (suspended) or whose lock vanished counts it as lost; release removes it, even after
    an error."""
    from cafuse import locks
    from cafuse.stores import open_store

    _s3_env(seaweed, monkeypatch)
    monkeypatch.setattr(locks, "LOCK_REFRESH", 0.3)
    store = open_store("s3://cafuse-gc/refresh/store", writable=True)
    with locks.store_lock(store, "gc") as lock:
        (first,) = store.list_locks()
        time.sleep(2.2)
        (later,) = store.list_locks()
        assert later[0] == first[0] == lock.name and later[1] > first[1]
        lock.check()
        lock.verify()
        lock._stop.set()  # as if the process had been stopped for an hour
        lock._thread.join()
        lock._refreshed -= 3600
        with pytest.raises(locks.LockLost, match="not refreshed for 1h"):
            lock.check()
    assert _lock_names(store) == []
    with pytest.raises(KeyboardInterrupt), locks.store_lock(store, "make") as lock:
        store.delete_lock(lock.name)
        time.sleep(1)
        with pytest.raises(locks.LockLost, match="removed by someone else"):
            lock.check()
        raise KeyboardInterrupt
    assert _lock_names(store) == []
    # local directories and web servers take no lock
    from cafuse.stores import LocalStore

    assert not locks.lockable(LocalStore(tmp_path / "local", create=True))
    assert not locks.lockable(open_store("http://127.0.0.1:1/store"))
    assert not (tmp_path / "local" / ".cafuse-locks").exists()


def test_s3_make_and_gc_starting_together_never_both_run(
    seaweed: SeaweedFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Write, then list: of a make and a gc taking their locks at the same moment, at least
    one sees the other and gives up."""
    from cafuse import locks
    from cafuse.stores import open_store

    _s3_env(seaweed, monkeypatch)
    url = "s3://cafuse-gc/together/store"
    stores = {"make": open_store(url, writable=True), "gc": open_store(url, writable=True)}
    outcomes = []
    for _ in range(12):
        barrier = threading.Barrier(2)
        got: dict[str, bool] = {}
        held: list[locks.StoreLock] = []

        def take(kind: str, barrier=barrier, got=got, held=held) -> None:
            lock = locks.StoreLock(stores[kind], kind)
            barrier.wait()
            try:
                lock.acquire()
            except locks.StoreLocked:
                got[kind] = False
                return
            got[kind] = True
            held.append(lock)

        threads = [threading.Thread(target=take, args=(kind,)) for kind in ("make", "gc")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not (got["make"] and got["gc"]), got
        outcomes.append(tuple(sorted(k for k, v in got.items() if v)))
        for lock in held:
            lock.release()
        assert _lock_names(stores["gc"]) == []
    assert outcomes  # (which one wins, or neither, depends on timing)


def test_s3_gc_beside_make_never_deletes_what_the_new_index_needs(
    seaweed: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """make of a new image while gc (given only the old index, grace 0) runs again and
    again on one bucket: gc refuses while make holds its lock, so the new index is
    complete. The new image begins with unreferenced chunks older than the grace, the very
    ones gc is after. gc runs successfully after make, given both indexes."""
    from cafuse import locks
    from cafuse.maintenance import collect_garbage, verify_store
    from cafuse.stores import open_store

    _s3_env(seaweed, monkeypatch)
    url = "s3://cafuse-gc/race/store"
    make_store, gc_store = open_store(url, writable=True), open_store(url)  # two "processes"
    old = tmp_path / "old.caibx"
    _make_in_process(old, random_bytes(1 << 20, seed=21), make_store)
    stale = random_bytes(4 << 20, seed=22)
    _make_in_process(tmp_path / "stale.caibx", stale, make_store)
    _make_in_process(tmp_path / "garbage.caibx", random_bytes(1 << 20, seed=24), make_store)
    time.sleep(1.1)  # all of them older than the grace (0), whole-second Last-Modified
    reused = threading.Event()
    touch = make_store.touch

    def touch_and_tell(chunk_id: bytes, bare: bool = False) -> bool:
        there = touch(chunk_id, bare=bare)
        if there:
            reused.set()  # make holds its lock and reuses stale chunks: let gc loose
        return there

    monkeypatch.setattr(make_store, "touch", touch_and_tell)
    # gc with only the old index would rightly delete the new image's chunks once make is
    # done: the loop stops when make lets go of its lock (a test artifact, not the race)
    made, guard = threading.Event(), threading.Lock()
    release = locks.StoreLock.release

    def release_and_tell(self: locks.StoreLock) -> None:
        if self.kind == "make":
            with guard:
                made.set()
        release(self)

    monkeypatch.setattr(locks.StoreLock, "release", release_and_tell)
    reports, refusals = [], []
    errors: list[BaseException] = []

    def gc_loop() -> None:
        try:
            reused.wait(60)
            while True:
                with guard:
                    if made.is_set():
                        return
                    try:
                        reports.append(collect_garbage(gc_store, [read_index(old)], grace=0))
                    except locks.StoreLocked as exc:
                        refusals.append(str(exc))
                time.sleep(0.05)
        except BaseException as exc:
            errors.append(exc)

    gc_thread = threading.Thread(target=gc_loop)
    gc_thread.start()
    new = tmp_path / "new.caibx"
    try:
        _make_in_process(new, stale + random_bytes(8 << 20, seed=23), make_store)
    finally:
        made.set()
        reused.set()
        gc_thread.join(120)
    assert not errors, errors
    assert refusals and all("a make is writing to store" in r for r in refusals)
    assert not reports  # never while make ran
    report = verify_store(read_index(new), gc_store, progress=False)
    assert not report.missing and not report.corrupt
    # gc runs once make is done, given every index in use, and deletes the garbage
    after = collect_garbage(gc_store, [read_index(old), read_index(new)], grace=0)
    assert after.deleted > 0
    assert not verify_store(read_index(new), gc_store, progress=False).missing
    assert not verify_store(read_index(old), gc_store, progress=False).missing
    assert _lock_names(gc_store) == []
