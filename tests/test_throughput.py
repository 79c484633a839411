"""Mount throughput through the kernel (issue 11): adaptive readahead over a real HTTP
store, several readers within the readahead memory, the kernel's readahead on the mount,
and the options' errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from helpers import assert_user_error, run_cafuse, sha256_file
from mounting import drop_page_cache, mounted
from servers import nginx_serving

from cafuse.mount.daemon import KERNEL_READAHEAD_KB, _mountinfo
from cafuse.mount.options import MountOptions


@pytest.fixture
def served(made_image: tuple[Path, Path], tmp_path: Path):
    """The made image's store behind nginx: (index, store URL)."""
    index, store = made_image
    root = tmp_path / "www"
    root.mkdir()
    shutil.copytree(store, root / "store")
    with nginx_serving(root, tmp_path / "nginx") as server:
        yield index, f"{server.url}/store"


def stats(mnt: Path) -> dict:
    return json.loads(run_cafuse("stats", mnt, "--json").stdout)


def test_sequential_read_over_http_reads_ahead_and_shows_it(
    served, ext4_image: Path, tmp_path: Path
) -> None:
    index, url = served
    mnt = tmp_path / "mnt"
    with mounted(index, mnt, "--store", url) as blob:
        found = _mountinfo(str(mnt))
        assert found is not None
        ra_kb = Path(f"/sys/class/bdi/{found[0]}/read_ahead_kb").read_text().strip()
        assert ra_kb == str(KERNEL_READAHEAD_KB)  # 1 MiB FUSE requests
        digest = hashlib.sha256()
        with open(blob, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
            during = stats(mnt)  # the stream is still open
            human = run_cafuse("stats", mnt).stdout
        assert digest.hexdigest() == sha256_file(ext4_image)
        readahead = during["readahead"]
        (stream,) = readahead["streams"].values()
        assert stream["window"] > 0 and stream["phase"] != "off"
        assert readahead["min_latency_ms"] is not None  # remote fetches were timed
        assert readahead["ahead_bytes"] <= readahead["budget"]
        assert "readahead:" in human and "in flight" in human
        assert during["reads"]["failed"] == 0
        assert during["scheduler"]["fetched"]["readahead"] > 0
        assert during["scheduler"]["remote_slots"] >= 16


def test_concurrent_readers_stay_within_the_readahead_memory(
    served, ext4_image: Path, tmp_path: Path
) -> None:
    index, url = served
    mnt = tmp_path / "mnt"
    budget = 2 << 20
    expected = ext4_image.read_bytes()
    with mounted(index, mnt, "--store", url, "--readahead-memory", "2M") as blob:
        drop_page_cache(blob)
        size = len(expected)
        parts = 6
        step = size // parts
        results: dict[int, bytes] = {}
        samples: list[dict] = []
        started = threading.Barrier(parts + 1)

        def read(k: int) -> None:
            fd = os.open(blob, os.O_RDONLY)
            try:
                started.wait()
                chunks, offset = [], k * step
                end = size if k == parts - 1 else offset + step
                while offset < end:
                    data = os.pread(fd, min(256 << 10, end - offset), offset)
                    chunks.append(data)
                    offset += len(data)
                results[k] = b"".join(chunks)
            finally:
                os.close(fd)

        threads = [threading.Thread(target=read, args=(k,)) for k in range(parts)]
        for t in threads:
            t.start()
        started.wait()
        while any(t.is_alive() for t in threads):
            samples.append(stats(mnt)["readahead"])
        for t in threads:
            t.join()
        assert b"".join(results[k] for k in range(parts)) == expected
        assert samples
        for sample in samples:
            assert sample["budget"] == budget
            assert sample["ahead_bytes"] <= budget
            assert sum(s["in_flight"] for s in sample["streams"].values()) <= budget
        assert stats(mnt)["reads"]["failed"] == 0


def test_throughput_options(tmp_path: Path) -> None:
    opts = MountOptions(index="x.caibx", mountpoint=str(tmp_path))
    opts.apply("readahead_memory=32M,max_concurrency=64")
    assert (opts.readahead_memory, opts.max_concurrency) == (32 << 20, 64)
    opts.check_throughput()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--max-concurrency", "0"), "--max-concurrency: expected a number >= 1"),
        (("--max-concurrency", "4", "--concurrency", "8"), "below --concurrency"),
        (("--readahead-memory", "200M", "--memory-cache", "256M"), "more than half"),
        (("-o", "readahead_memory=lots"), "readahead_memory"),
        (("-o", "max_concurrency=0"), "must be at least 1"),
    ],
)
def test_mount_refuses_bad_throughput_options(
    made_image: tuple[Path, Path], tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    index, store = made_image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    err = assert_user_error(
        run_cafuse("mount", index, mnt, "--store", store, *args, check=False), message
    )
    assert err.startswith("cafuse: error:")
    assert not os.path.ismount(mnt)
