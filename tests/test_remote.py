"""Remote stores against real servers on 127.0.0.1: nginx (HTTP), SeaweedFS (S3)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_user_error, run_cafuse, sha256_file
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
