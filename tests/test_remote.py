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


def test_unreachable_store_and_bad_urls(www: Path, tmp_path: Path) -> None:
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
    assert_user_error(
        run_cafuse("extract", index, out, "--store", "http://", check=False), "no host"
    )
    assert_user_error(
        run_cafuse("extract", index, out, "--store", "ftp://x/y", check=False),
        "unsupported store URL scheme",
    )
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
    assert_user_error(
        run_cafuse(
            "make", tmp_path / "x.caibx", index, "--store", "http://127.0.0.1:1/store", check=False
        ),
        "read-only",
    )

    # verify tells a store that does not answer from corrupt chunks
    proc = run_cafuse(
        "verify", index, "--store", dead_url(), "--retries", "0", "--timeout", "3", check=False
    )
    assert_user_error(proc, "did not answer", "check the store")
    assert " 0 corrupt" in proc.stdout and "unreadable" in proc.stdout


def test_cache_bound_sharing_and_offline(
    www: Path, nginx: Nginx, ext4_image: Path, tmp_path: Path
) -> None:
    index, store = www / "image.caibx", f"{nginx.url}/default.castr"
    stored = sum(p.stat().st_size for p in (www / "default.castr").rglob("*.cacnk"))
    # a cache smaller than the image's chunks: eviction keeps it within its bound
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

    # two processes filling one cache at once, both right, every cached chunk valid
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

    # fill a cache with `cafuse cache`, resumable, then work with the server gone
    offline = tmp_path / "offline-cache"
    first = run_cafuse("cache", index, "--store", store, "--cache", offline)
    again = run_cafuse("cache", index, "--store", store, "--cache", offline)
    assert " 0 already cached" in first.stdout and "0 fetched" in again.stdout
    gone = dead_url()
    out2 = tmp_path / "offline.img"
    run_cafuse(
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

    # an index given by URL: the cache keeps a copy that stands in for it offline
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


def _make_in_process(index: Path, data: bytes, store, threads: int = 2):
    from cafuse.chunker import ChunkSizes
    from cafuse.make import make

    image = index.with_suffix(".img")
    image.write_bytes(data)
    sizes = ChunkSizes.parse("16K")
    return make(str(index), str(image), store, sizes=sizes, threads=threads, progress=False)


def _ages(store) -> dict[bytes, float]:
    return dict(store.iter_ages())


def test_s3_gc_spares_young_chunks_and_refuses_a_short_grace(
    seaweed: SeaweedFS, tmp_path: Path
) -> None:
    env = seaweed.env()
    store = "s3://cafuse-gc/grace/store"
    keep, drop = tmp_path / "keep.caibx", tmp_path / "drop.caibx"
    for index, seed in ((keep, 31), (drop, 32)):
        image = index.with_suffix(".img")
        image.write_bytes(random_bytes(300_000, seed=seed))
        run_cafuse("make", index, image, "--store", store, "--chunk-size", "16K", env=env)
    dropped = len(read_index(drop).distinct_positions())
    # a make may be reusing the unreferenced chunks right now: the default grace spares them
    out = run_cafuse("gc", store, keep, env=env).stdout
    assert f"deleted 0; spared {dropped} unreferenced chunks younger than 1h" in out
    assert "0 missing" in run_cafuse("verify", drop, "--store", store, env=env).stdout
    # make refreshes a reused chunk only once it is 10 minutes old: a shorter grace is unsafe
    assert_user_error(
        run_cafuse("gc", store, keep, "--grace", "15m", env=env, check=False),
        "--grace 15m is too short",
        "at least 20m",
    )
    assert "would delete 0" in run_cafuse("gc", store, keep, "-n", "--grace", "1m", env=env).stdout
    out = run_cafuse("gc", store, keep, "--grace", "0", env=env).stdout
    assert f"deleted {dropped}" in out
    assert "0 missing, 0 corrupt" in run_cafuse("verify", keep, "--store", store, env=env).stdout
    gone = run_cafuse("verify", drop, "--store", store, env=env, check=False)
    assert f"{dropped} missing" in gone.stdout + gone.stderr


def test_s3_touch_put_and_delete_if_older(
    seaweed: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cafuse.stores import ChunkStore, FailoverGroup, LocalStore, open_store
    from cafuse.stores import objectstore as objectstore_module

    _s3_env(seaweed, monkeypatch)
    store = open_store("s3://cafuse-gc/unit/store", writable=True)
    chunk_id, other = b"\x01" * 32, b"\x02" * 32
    assert not store.touch(chunk_id)  # missing: make must write it
    assert store.put(chunk_id, b"blob")  # new
    assert not store.put(chunk_id, b"blob")  # fresh copy there: nothing uploaded
    written = _ages(store)[chunk_id]
    assert abs(written - time.time()) < 60
    assert store.touch(chunk_id)  # younger than TOUCH_AGE: counts as recently used
    time.sleep(1.1)  # Last-Modified has whole seconds
    assert store.touch(chunk_id) and _ages(store)[chunk_id] == written  # no request but HEAD
    monkeypatch.setattr(objectstore_module, "TOUCH_AGE", 0.0)
    assert not store.touch(chunk_id)  # too old to count: make uploads it again ...
    assert not store.put(chunk_id, b"blob")  # ... which is not a new chunk
    assert _ages(store)[chunk_id] > written  # but a fresh last-modified time
    assert not store.put(chunk_id, b"blob")  # put alone refreshes an old copy too
    assert store.put(other, b"other")  # and reports a missing one as new
    monkeypatch.setattr(objectstore_module, "TOUCH_AGE", 600.0)
    # delete_if_older: only what was last modified before the cutoff goes
    assert not store.delete_if_older(chunk_id, time.time() - 3600)
    assert store.has(chunk_id)
    assert store.delete_if_older(chunk_id, time.time() + 5)
    assert not store.has(chunk_id)
    assert not store.delete_if_older(chunk_id, time.time() + 5)  # already gone
    # a failover group offers its first member's ages, touch and delete_if_older
    group = open_store(f"s3://cafuse-gc/unit/store|{tmp_path / 'local'}", writable=True)
    assert isinstance(group, FailoverGroup)
    assert group.touch(other) and other in dict(group.iter_ages())
    assert group.touch_age == 600.0
    assert group.delete_if_older(other, time.time() + 5) and not store.has(other)
    assert not hasattr(FailoverGroup([LocalStore(tmp_path / "l", create=True)]), "touch_age")

    class Bare(ChunkStore):  # no ages, no touch: a group of it offers none either
        url = "bare"

        def get(self, chunk_id: bytes) -> bytes | None:
            return None

        def has(self, chunk_id: bytes) -> bool:
            return False

    bare_first = FailoverGroup([Bare(), store])
    for name in ("iter_ages", "touch", "delete_if_older", "touch_age"):
        assert getattr(bare_first, name, None) is None, name


def test_s3_make_uploads_old_reused_chunks_again(
    seaweed: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """make refreshes a reused chunk older than TOUCH_AGE by uploading it again, and still
    counts no chunk as new; a younger one is left as it is."""
    from cafuse.stores import objectstore as objectstore_module
    from cafuse.stores import open_store

    _s3_env(seaweed, monkeypatch)
    store = open_store("s3://cafuse-gc/remake/store", writable=True)
    data = random_bytes(400_000, seed=33)
    first = _make_in_process(tmp_path / "a.caibx", data, store)
    assert first.new_chunks == len(read_index(tmp_path / "a.caibx").distinct_positions())
    before = _ages(store)
    time.sleep(1.1)  # Last-Modified has whole seconds
    again = _make_in_process(tmp_path / "b.caibx", data, store)
    assert again.new_chunks == 0 and _ages(store) == before  # young: nothing uploaded
    monkeypatch.setattr(objectstore_module, "TOUCH_AGE", 0.0)
    remade = _make_in_process(tmp_path / "c.caibx", data, store)
    assert remade.new_chunks == 0 and remade.stored_bytes == 0
    after = _ages(store)
    assert after.keys() == before.keys()
    assert all(after[chunk_id] > before[chunk_id] for chunk_id in before)


def test_s3_gc_beside_make_never_deletes_what_the_new_index_needs(
    seaweed: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """make of a new image and gc (given only the old index) at once on one bucket, time
    scaled down (TOUCH_AGE 1 s, grace 6 s): the new index is complete. The new image begins
    with unreferenced chunks older than the grace, the very ones gc is after; gc starts
    once make has gone past them, and runs until make is done."""
    from cafuse.maintenance import collect_garbage, verify_store
    from cafuse.stores import objectstore as objectstore_module
    from cafuse.stores import open_store

    _s3_env(seaweed, monkeypatch)
    monkeypatch.setattr(objectstore_module, "TOUCH_AGE", 1.0)
    grace = 6.0
    url = "s3://cafuse-gc/race/store"
    make_store, gc_store = open_store(url, writable=True), open_store(url)  # two "processes"
    old = tmp_path / "old.caibx"
    _make_in_process(old, random_bytes(1 << 20, seed=21), make_store)
    stale = random_bytes(4 << 20, seed=22)
    _make_in_process(tmp_path / "stale.caibx", stale, make_store)
    _make_in_process(tmp_path / "garbage.caibx", random_bytes(1 << 20, seed=24), make_store)
    time.sleep(grace + 1.5)  # now all of them are older than the grace
    new_chunk_written = threading.Event()
    put = make_store.put

    def put_and_tell(chunk_id: bytes, blob: bytes) -> bool:
        new = put(chunk_id, blob)
        if new:
            new_chunk_written.set()  # make is past the reused chunks
        return new

    monkeypatch.setattr(make_store, "put", put_and_tell)
    made = threading.Event()
    reports = []
    errors: list[BaseException] = []

    def gc_loop() -> None:
        try:
            new_chunk_written.wait(60)
            while not made.is_set() or not reports:
                reports.append(collect_garbage(gc_store, [read_index(old)], grace=grace))
        except BaseException as exc:
            errors.append(exc)

    gc_thread = threading.Thread(target=gc_loop)
    gc_thread.start()
    new = tmp_path / "new.caibx"
    try:
        _make_in_process(new, stale + random_bytes(8 << 20, seed=23), make_store)
    finally:
        made.set()
        new_chunk_written.set()
        gc_thread.join(120)
    assert not errors, errors
    assert sum(r.deleted for r in reports) > 0  # gc did delete (the garbage) meanwhile
    report = verify_store(read_index(new), gc_store, progress=False)
    assert not report.missing and not report.corrupt
    assert not verify_store(read_index(old), gc_store, progress=False).missing
