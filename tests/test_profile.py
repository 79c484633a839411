"""Boot profiles and background fill: recording, replay, fill, through the kernel with nginx."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from helpers import assert_user_error, run_cafuse, sha256_file
from mounting import drop_page_cache, mounted, unmount, wait_for_mount
from servers import nginx_serving

from cafuse.errors import CafuseError
from cafuse.index import read_index
from cafuse.mount.fill import RateLimiter
from cafuse.profile import ProfileError, Recorder, chunk_plan, dumps, parse

# scattered reads, as a boot makes: (offset, size)
READS = [(0, 4096), (1 << 20, 65536), (7 << 20, 4096), (13 << 20, 131072), (30 << 20, 8192)]


def stats(mountpoint: Path) -> dict:
    return json.loads(run_cafuse("stats", mountpoint, "--json").stdout)


def wait_for(mountpoint: Path, predicate, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        snap = stats(mountpoint)
        if predicate(snap):
            return snap
        assert time.monotonic() < deadline, snap
        time.sleep(0.1)


def wait_for_file(path: Path, timeout: float = 30) -> Path:
    """The daemon writes a recorded profile as it exits, just after the unmount."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was not written"
        time.sleep(0.05)
    return path


def remote_chunks(snap: dict) -> int:
    return sum(c["chunks"] for o, c in snap["origins"].items() if o.startswith("http"))


def pread_all(blob: Path, reads: list[tuple[int, int]]) -> list[bytes]:
    fd = os.open(blob, os.O_RDONLY)
    try:
        return [os.pread(fd, size, offset) for offset, size in reads]
    finally:
        os.close(fd)


def expected(image: Path, reads: list[tuple[int, int]]) -> list[bytes]:
    with open(image, "rb") as f:
        out = []
        for offset, size in reads:
            f.seek(offset)
            out.append(f.read(size))
        return out


@pytest.fixture(scope="module")
def www(tmp_path_factory: pytest.TempPathFactory, ext4_image: Path) -> Path:
    root = tmp_path_factory.mktemp("www")
    run_cafuse("make", root / "image.caibx", ext4_image, "--store", root / "default.castr")
    return root


@pytest.fixture(scope="module")
def nginx(www: Path, tmp_path_factory: pytest.TempPathFactory):
    with nginx_serving(www, tmp_path_factory.mktemp("nginx")) as server:
        yield server


# ---------------------------------------------------------------------- units


def test_recorder_first_access_order_merged() -> None:
    now = [0.0]
    rec = Recorder(1000, clock=lambda: now[0])
    rec.observe(100, 50)
    rec.observe(150, 50)  # continues: merged
    now[0] = 0.5
    rec.observe(0, 10)
    rec.observe(120, 100)  # only [200, 220) is new
    rec.observe(220, 30)  # continues the last range: merged
    rec.observe(990, 100)  # clipped at the blob's end
    rec.observe(5, 10)  # only [10, 15) is new
    rec.observe(2000, 10)  # past the end: nothing
    want = [[100, 100, 0], [0, 10, 500], [200, 50, 500], [990, 10, 500], [10, 5, 500]]
    assert rec.ranges == want
    profile = parse(rec.dumps())
    assert profile.ranges == [tuple(r) for r in want]
    assert profile.blob_size == 1000


def test_recorder_pages_are_one_snapshot() -> None:
    rec = Recorder(1 << 40)
    for k in range(20000):
        rec.observe(k * 8192, 4096)
    pages = []
    while True:
        page = rec.page(len(pages))
        pages.append(page)
        if len(page) < 60000:
            break
        rec.observe((1 << 39) + len(pages) * 8192, 4096)  # later reads do not tear it
    assert len(pages) > 2
    assert len(parse(b"".join(pages)).ranges) == 20000


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\x00\xff garbage", "not JSON"),
        (b'{"format": "other"}', "not a cafuse profile"),
        (b'{"format": "cafuse-profile", "version": 9, "ranges": []}', "version 9"),
        (b'{"format": "cafuse-profile", "version": 1, "ranges": [[1, 0, 0]]}', "range 0"),
        (b'{"format": "cafuse-profile", "version": 1, "ranges": [[-1, 5, 0]]}', "range 0"),
        (b'{"format": "cafuse-profile", "version": 1, "ranges": {}}', "corrupt"),
    ],
)
def test_corrupt_profiles_are_refused(raw: bytes, why: str) -> None:
    with pytest.raises(ProfileError, match=why):
        parse(raw, "p")


def test_rate_limiter_holds_the_average_with_a_fake_clock() -> None:
    clock = [0.0]

    async def sleep(seconds: float) -> None:
        clock[0] += seconds

    async def main() -> None:
        limiter = RateLimiter(1_000_000, 100_000, lambda: clock[0], sleep)
        sent = 0
        for k in range(200):
            await limiter.ready()
            limiter.charge(65536)  # estimated
            limiter.charge(40000 - 65536 if k % 2 else 0)  # corrected after the fetch
            sent += 40000 if k % 2 else 65536
        # the average never exceeds the rate by more than the burst, nor falls far below
        assert sent <= 1_000_000 * clock[0] + 100_000 + 65536
        assert sent >= 1_000_000 * clock[0] - 65536

    trio.run(main)


def test_chunk_plan_in_profile_order(made_image) -> None:
    index_path, _ = made_image
    index = read_index(index_path)
    start, _ = index.span(5)
    profile = parse(dumps([(start, 1, 0), (0, 1, 3), (start + 1, 1, 4)], None))
    plan, beyond = chunk_plan(profile, index)
    assert plan == [5, 0] and beyond == 0
    profile = parse(dumps([(index.blob_size - 1, 100, 0), (index.blob_size + 10, 1, 0)], None))
    plan, beyond = chunk_plan(profile, index)
    assert plan == [index.chunk_count - 1] and beyond == 2


# ---------------------------------------------------------------------- through the kernel


def test_record_then_replay(www: Path, nginx, ext4_image: Path, tmp_path: Path) -> None:
    index = f"{nginx.url}/image.caibx"
    recorded = tmp_path / "boot.profile"
    with mounted(index, tmp_path / "mnt", "--record-profile", recorded) as blob:
        assert pread_all(blob, READS) == expected(ext4_image, READS)
        run_cafuse("stats", blob.parent, "--save-profile", tmp_path / "mid.profile")
        assert not recorded.exists()  # written at unmount
    profile = parse(wait_for_file(recorded).read_bytes())
    assert parse((tmp_path / "mid.profile").read_bytes()).ranges == profile.ranges
    # first-access order, every read covered
    assert [r[0] for r in profile.ranges][:1] == [0]
    for offset, size in READS:
        assert any(o <= offset and offset + size <= o + n for o, n, _ in profile.ranges)
    info = json.loads(
        run_cafuse("profile", recorded, "--json", "--index", www / "image.caibx").stdout
    )
    assert info["ranges"] == len(profile.ranges) and info["index"]["chunks"] > 0

    # published beside the index: used by default; the boot's reads need no fetch
    shutil.copy(recorded, www / "image.profile")
    try:
        refined, cache = tmp_path / "refined.profile", tmp_path / "cache"
        args = ("--readahead", "0", "--record-profile", refined, "--cache", cache)
        with mounted(index, tmp_path / "mnt", *args) as blob:
            snap = wait_for(blob.parent, lambda s: s["profile"]["done"])
            replay = snap["profile"]
            assert replay["chunks_planned"] > 0
            assert (
                replay["chunks_fetched"] + replay["chunks_already_there"]
                == (replay["chunks_planned"])
            )
            assert replay["chunks_failed"] == 0
            before = remote_chunks(snap)
            assert pread_all(blob, READS) == expected(ext4_image, READS)
            after = stats(blob.parent)
            assert remote_chunks(after) == before
            assert after["profile"]["chunks_read_later"] > 0
            text = run_cafuse("stats", blob.parent).stdout
            assert "profile: " in text and "read since" in text
            # the replayed chunks went to the disk cache too
            assert len(list(cache.rglob("*.cacnk"))) >= replay["chunks_fetched"]
        # recording on a replayed mount: the reads (the replay's fetches are not reads)
        again = parse(wait_for_file(refined).read_bytes())
        for offset, size in READS:
            assert any(o <= offset and offset + size <= o + n for o, n, _ in again.ranges)
        with mounted(index, tmp_path / "mnt", "--no-profile") as blob:
            assert "profile" not in stats(blob.parent)
    finally:
        (www / "image.profile").unlink()


def test_v1_profile_on_v2(www: Path, nginx, ext4_image: Path, tmp_path: Path) -> None:
    index = f"{nginx.url}/image.caibx"
    recorded = tmp_path / "v1.profile"
    with mounted(index, tmp_path / "mnt", "--record-profile", recorded) as blob:
        pread_all(blob, READS)
    wait_for_file(recorded)
    # v2: the same image with a few regions changed, in the same store
    v2 = tmp_path / "v2.img"
    shutil.copy(ext4_image, v2)
    with open(v2, "r+b") as f:
        for offset in (1 << 20, 13 << 20):
            f.seek(offset + 100)
            f.write(os.urandom(3000))
    run_cafuse("make", www / "v2.caibx", v2, "--store", www / "default.castr")
    try:
        with mounted(
            f"{nginx.url}/v2.caibx", tmp_path / "mnt", "--profile", recorded, "--readahead", "0"
        ) as blob:
            snap = wait_for(blob.parent, lambda s: s["profile"]["done"])
            assert snap["profile"]["chunks_fetched"] > 0
            before = remote_chunks(snap)
            assert pread_all(blob, READS) == expected(v2, READS)
            assert remote_chunks(stats(blob.parent)) == before  # v2's chunks were replayed
    finally:
        (www / "v2.caibx").unlink()


def test_bad_profiles_warn_and_the_mount_works(
    www: Path, nginx, ext4_image: Path, tmp_path: Path
) -> None:
    index = f"{nginx.url}/image.caibx"
    size = ext4_image.stat().st_size
    beyond = tmp_path / "beyond.profile"
    beyond.write_bytes(dumps([(0, 4096, 0), (size - 10, 5000, 1), (size * 2, 10, 2)], size * 3))
    with mounted(index, tmp_path / "mnt", "--profile", beyond) as blob:
        snap = wait_for(blob.parent, lambda s: s["profile"]["done"])
        assert snap["profile"]["ranges_beyond_end"] == 2
        assert snap["profile"]["chunks_fetched"] >= 1
        assert pread_all(blob, READS) == expected(ext4_image, READS)

    corrupt = tmp_path / "corrupt.profile"
    corrupt.write_bytes(b'{"format": "cafuse-profile", "version": 1, "ranges": [[1,')
    (tmp_path / "mnt").mkdir(exist_ok=True)
    proc = run_cafuse("mount", index, tmp_path / "mnt", "--profile", corrupt)
    try:
        assert "cafuse: warning:" in proc.stderr and "not a cafuse profile" in proc.stderr
        assert str(corrupt) in proc.stderr
        (name,) = os.listdir(tmp_path / "mnt")
        assert pread_all(tmp_path / "mnt" / name, READS) == expected(ext4_image, READS)
        assert "profile" not in stats(tmp_path / "mnt")
    finally:
        unmount(tmp_path / "mnt")

    # a profile URL that is not there: a warning too
    proc = run_cafuse("mount", index, tmp_path / "mnt", "--profile", f"{nginx.url}/gone.profile")
    try:
        assert "cafuse: warning:" in proc.stderr and "gone.profile not found" in proc.stderr
        (name,) = os.listdir(tmp_path / "mnt")
        assert pread_all(tmp_path / "mnt" / name, READS[:1]) == expected(ext4_image, READS[:1])
    finally:
        unmount(tmp_path / "mnt")

    # a corrupt profile beside the index: the same warning, the same working mount
    (www / "image.profile").write_bytes(b"not json")
    try:
        proc = run_cafuse("mount", index, tmp_path / "mnt")
        try:
            assert "not a cafuse profile" in proc.stderr and "image.profile" in proc.stderr
            (name,) = os.listdir(tmp_path / "mnt")
            assert pread_all(tmp_path / "mnt" / name, READS[:1]) == expected(ext4_image, READS[:1])
        finally:
            unmount(tmp_path / "mnt")
    finally:
        (www / "image.profile").unlink()


def test_fill_resumes_after_remount_and_works_offline(
    www: Path, ext4_image: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    access_log = tmp_path / "nginx" / "access.log"
    with nginx_serving(www, tmp_path / "nginx") as server:
        index = f"{server.url}/image.caibx"
        args = ("--cache", cache, "--no-profile")
        with mounted(index, tmp_path / "mnt", *args, "--fill-rate", "1M") as blob:
            snap = wait_for(blob.parent, lambda s: s["fill"]["bytes_done"] > 0)
            assert not snap["fill"]["complete"]
            assert snap["fill"]["bytes_total"] > snap["fill"]["bytes_done"]
        filled = {p.name for p in cache.rglob("*.cacnk")}
        assert filled
        seen = len(access_log.read_text().splitlines())
        with mounted(index, tmp_path / "mnt", *args, "--fill-rate", "200M") as blob:
            snap = wait_for(blob.parent, lambda s: s["fill"]["complete"], timeout=300)
            assert snap["fill"]["bytes_done"] == snap["fill"]["bytes_total"]
            assert "fill: complete" in run_cafuse("stats", blob.parent).stdout
        # what the first mount filled was not fetched again
        again = [
            line.split('"')[1].split()[1].rsplit("/", 1)[-1]
            for line in access_log.read_text().splitlines()[seen:]
            if ".cacnk" in line
        ]
        assert again and not filled & set(again)
    # the server is gone: the whole image is still there, from the cache
    with mounted(index, tmp_path / "mnt", *args, "--timeout", "2") as blob:
        drop_page_cache(blob)
        assert sha256_file(blob) == sha256_file(ext4_image)


@pytest.mark.parametrize("how", ["umount", "sigterm"])
def test_fill_stops_cleanly_at_unmount(www: Path, nginx, tmp_path: Path, how: str) -> None:
    cache, log = tmp_path / "cache", tmp_path / "daemon.log"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    daemon = subprocess.Popen(
        [
            *(sys.executable, "-m", "cafuse", "mount", f"{nginx.url}/image.caibx", str(mnt)),
            *("-f", "--cache", str(cache), "--fill-rate", "1M", "--log", str(log)),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_mount(mnt, daemon)
        wait_for(mnt, lambda s: s["fill"]["bytes_done"] > 0)
        if how == "umount":
            run_cafuse("umount", mnt)
        else:
            daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        assert not os.path.ismount(mnt)
    finally:
        unmount(mnt)
        if daemon.poll() is None:
            daemon.kill()
    text = log.read_text()
    assert "Traceback" not in text and "unmounted" in text, text
    assert "failed" not in text, text  # shutting down is not a failed fetch
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]


def test_profile_and_fill_option_errors(www: Path, tmp_path: Path) -> None:
    index = www / "image.caibx"
    (tmp_path / "mnt").mkdir()
    assert_user_error(
        run_cafuse("mount", index, tmp_path / "mnt", "--fill-rate", "8M", check=False),
        "--fill-rate",
        "--cache",
    )
    assert_user_error(
        run_cafuse(
            "mount",
            index,
            tmp_path / "mnt",
            "--cache",
            tmp_path / "c",
            "--fill-rate",
            "8Q",
            check=False,
        ),
        "bad --fill-rate",
    )
    assert_user_error(
        run_cafuse("mount", index, tmp_path / "mnt", "--profile", tmp_path / "nope", check=False),
        "does not exist",
    )
    assert_user_error(
        run_cafuse(
            "mount",
            index,
            tmp_path / "mnt",
            "--record-profile",
            tmp_path / "no" / "p",
            check=False,
        ),
        "does not exist",
    )
    (tmp_path / "bad.profile").write_text("[]")
    assert_user_error(run_cafuse("profile", tmp_path / "bad.profile", check=False), "not a cafuse")
    assert_user_error(run_cafuse("profile", tmp_path / "nope", check=False), "does not exist")
    with mounted(index, tmp_path / "mnt") as blob:
        assert_user_error(
            run_cafuse("stats", blob.parent, "--save-profile", tmp_path / "p", check=False),
            "not recording",
        )


def test_fstab_options() -> None:
    from cafuse.mount.options import MountOptions

    opts = MountOptions("os.caibx", "/mnt")
    opts.apply("profile=https://h/os.profile,record_profile=/tmp/r.profile,fill_rate=8M")
    assert opts.profile == "https://h/os.profile" and opts.record_profile == "/tmp/r.profile"
    assert opts.fill_rate == 8 << 20 and not opts.no_profile
    opts.apply("noprofile")
    assert opts.no_profile
    with pytest.raises(CafuseError, match="fill_rate"):
        opts.apply("fill_rate=fast")


def test_default_profile_beside_the_index(tmp_path: Path) -> None:
    from cafuse.mount.boot import default_profile

    assert default_profile(str(tmp_path / "os.caibx")) == str(tmp_path / "os.profile")
    assert default_profile("https://h.example/a/os.caibx") == "https://h.example/a/os.profile"
    assert default_profile("s3://bucket/p/v2.caibx") == "s3://bucket/p/v2.profile"


# ---------------------------------------------------------------------- the fill, with fakes


class _Index:
    chunk_count, chunk_max, blob_size = 10, 100, 1000

    def span(self, i: int) -> tuple[int, int]:
        return i * 100, (i + 1) * 100

    def chunk_id(self, i: int) -> bytes:
        return bytes([i]) * 32

    def batches(self, step: int = 0):
        """The whole table as one batch; chunk 9 is zeros (as ``_Reader.is_zero`` says)."""
        import numpy as np

        from cafuse.chunktable import Batch

        ends = np.arange(1, 11, dtype=np.uint64) * 100
        ids = np.stack([np.frombuffer(self.chunk_id(i), dtype=np.uint8) for i in range(10)])
        yield Batch(0, 0, ends, ids, np.arange(10) == 9)


class _Flight:
    def __init__(self, size: int) -> None:
        self.size = size

    async def wait(self) -> bytes:
        await trio.sleep(0.01)
        return b"x" * self.size


class _Scheduler:
    remote_slots, reserved = 16, 4

    def __init__(self, reader: _Reader) -> None:
        self.reader = reader
        self.requests: list[tuple[float, bytes, bool]] = []

    def request(self, items, priority):
        from cafuse.scheduler import Priority

        assert priority == Priority.FILL
        (chunk_id, size), *_ = items
        self.requests.append((trio.current_time(), chunk_id, bool(self.reader.waiting_reads)))
        return [_Flight(size)]


class _Reader:
    def __init__(self) -> None:
        self.index = _Index()
        self.waiting_reads = 0
        self.scheduler = _Scheduler(self)

    def is_zero(self, i: int) -> bool:
        return i == 9


class _Cache:
    max_bytes = 1 << 30

    def __init__(self, held: set[bytes]) -> None:
        self.held = held

    def has(self, chunk_id: bytes) -> bool:
        return chunk_id in self.held

    def _name(self, chunk_id: bytes) -> str:
        return "/nonexistent/chunk"


def test_fill_skips_what_the_cache_holds_waits_for_reads_and_keeps_the_rate() -> None:
    from cafuse.mount.fill import Fill

    reader = _Reader()
    held = {reader.index.chunk_id(i) for i in range(3)}
    fill = Fill(reader, _Cache(held), rate=1000)  # type: ignore[arg-type]

    async def main() -> None:
        reader.waiting_reads = 1  # a read waits: the fill must not start fetching
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fill.run)
            while fill.state != "paused for reads":  # past the walk's first batch
                await trio.sleep(0.01)
            await trio.sleep(2.0)
            assert reader.scheduler.requests == []
            assert fill.state == "paused for reads"
            reader.waiting_reads = 0

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    requests = reader.scheduler.requests
    # chunks 3..8: the cache held 0..2, chunk 9 is zeros
    assert [r[1] for r in requests] == [reader.index.chunk_id(i) for i in range(3, 9)]
    assert not any(r[2] for r in requests)
    assert fill.complete and fill.bytes_done == fill.bytes_total == 900
    # 600 bytes at 1000 B/s with a burst of 200: the last request no sooner than 0.4 s in
    assert requests[-1][0] - requests[0][0] >= (600 - 200 - 100) / 1000
