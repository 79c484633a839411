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
from cafuse.profile import ChunkPlan, ProfileError, Recorder, dumps, parse

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


def _plan(profile, index, **kw) -> tuple[list[bytes], ChunkPlan]:
    plan = ChunkPlan(profile, index, is_zero=lambda i: False, **kw)
    return [cid for batch in plan.batches() for cid, _ in batch], plan


def test_chunk_plan_in_profile_order(made_image) -> None:
    index_path, _ = made_image
    index = read_index(index_path)
    start, _ = index.span(5)
    profile = parse(dumps([(start, 1, 0), (0, 1, 3), (start + 1, 1, 4)], None))
    ids, plan = _plan(profile, index)
    assert ids == [index.chunk_id(5), index.chunk_id(0)] and plan.beyond == 0
    profile = parse(dumps([(index.blob_size - 1, 100, 0), (index.blob_size + 10, 1, 0)], None))
    ids, plan = _plan(profile, index)
    assert ids == [index.chunk_id(index.chunk_count - 1)] and plan.beyond == 2


class _DupIndex:
    """A table of ``n`` chunks of 100 bytes whose ids repeat every ``period``."""

    chunk_avg = chunk_max = 100

    def __init__(self, n: int, period: int) -> None:
        self.chunk_count, self.blob_size, self.period = n, n * 100, period
        self.id_calls = 0
        self.widest = 0  # a table read by pages loads all of what covering returns

    def covering(self, offset: int, size: int, *, wait: bool = True) -> range:
        out = range(offset // 100, min(-(-(offset + size) // 100), self.chunk_count))
        self.widest = max(self.widest, len(out))
        return out

    def span(self, i: int) -> tuple[int, int]:
        return i * 100, (i + 1) * 100

    def chunk_id(self, i: int) -> bytes:
        self.id_calls += 1
        return (i % self.period).to_bytes(8, "little") * 4

    def is_zero(self, i: int) -> bool:
        return False


def test_chunk_plan_is_lazy_distinct_and_stops_at_its_budget() -> None:
    index = _DupIndex(100_000, 700)
    whole = parse(dumps([(0, index.blob_size, 0)], index.blob_size))
    plan = ChunkPlan(whole, index, batch=64)
    batches = plan.batches()
    first = next(batches)
    assert len(first) <= 64 and index.id_calls <= 64  # nothing planned ahead of its use
    ids = [cid for cid, _ in first] + [cid for b in batches for cid, _ in b]
    assert len(ids) == len(set(ids)) == 700
    # a profile over the whole image stops at the budget: the walk does not go on
    index = _DupIndex(100_000, 100_000)
    plan = ChunkPlan(whole, index, budget=10_000, batch=64)
    ids = [cid for b in plan.batches() for cid, _ in b]
    assert plan.truncated and 10_000 <= plan.bytes <= 10_000 + 100
    assert index.id_calls < 1000 and len(ids) == plan.chunks
    assert index.widest <= 65  # the whole-image range is asked for a batch at a time


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
    chunk_count, chunk_max, blob_size, in_memory = 10, 100, 1000, True

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
    def __init__(self, size: int, fails: bool = False) -> None:
        self.size = size
        self.fails = fails

    async def wait(self) -> bytes:
        await trio.sleep(0.01)
        if self.fails:
            raise RuntimeError("not in any store")
        return b"x" * self.size


class _Scheduler:
    remote_slots, reserved = 16, 4

    def __init__(self, reader: _Reader) -> None:
        self.reader = reader
        self.requests: list[tuple[float, bytes, bool]] = []
        self.fail: dict[bytes, int] = {}  # chunk id -> how many more requests fail

    def request(self, items, priority):
        from cafuse.scheduler import Priority

        assert priority == Priority.FILL
        (chunk_id, size), *_ = items
        self.requests.append((trio.current_time(), chunk_id, bool(self.reader.waiting_reads)))
        fails = self.fail.get(chunk_id, 0) > 0
        if fails:
            self.fail[chunk_id] -= 1
        return [_Flight(size, fails)]


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
    # 100-byte chunks at 1000 B/s with a burst of 200 (mock clock: exact): the request
    # after k chunks were charged comes no sooner than (100 k - 200) / 1000 s after the first
    t0 = requests[0][0]
    for k, (t, _, _) in enumerate(requests):
        assert t - t0 >= (100 * k - 200) / 1000 - 1e-9, (k, t - t0)
    assert requests[-1][0] - t0 >= 0.3 - 1e-9


def _run_fill(fill, reader: _Reader) -> None:
    async def main() -> None:
        await fill.run()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_fill_counts_distinct_chunks_against_the_cache() -> None:
    """A dedup-heavy image whose distinct chunks fit is filled (the image's bytes by
    position do not fit); one that clearly cannot fit is refused, and says so after."""
    from cafuse.mount.fill import Fill

    class _Twins(_Index):
        def chunk_id(self, i: int) -> bytes:
            return bytes([i % 2]) * 32

    reader = _Reader()
    reader.index = _Twins()
    cache = _Cache(set())
    cache.max_bytes = 500  # 900 bytes by position, 200 distinct
    fill = Fill(reader, cache, rate=1000)  # type: ignore[arg-type]
    _run_fill(fill, reader)
    assert fill.complete and fill.bytes_done == fill.bytes_total == 900
    assert sorted(r[1] for r in reader.scheduler.requests) == [bytes([0]) * 32, bytes([1]) * 32]

    reader = _Reader()
    cache = _Cache(set())
    cache.max_bytes = 100  # 900 distinct bytes cannot fit, however well they compress
    fill = Fill(reader, cache, rate=1000)  # type: ignore[arg-type]
    _run_fill(fill, reader)
    assert not fill.complete and reader.scheduler.requests == []
    assert fill.state == "off: the cache is too small"  # not overwritten by "stopped"


def test_fill_retries_only_the_failed_chunks_and_walks_once() -> None:
    from cafuse.mount.fill import Fill

    reader = _Reader()
    walks = []
    batches = reader.index.batches

    def counted(step: int = 0):
        walks.append(step)
        return batches(step)

    reader.index.batches = counted  # type: ignore[method-assign]
    bad = reader.index.chunk_id(5)
    reader.scheduler.fail = {bad: 2}  # missing from every store twice, then found
    fill = Fill(reader, _Cache(set()), rate=10_000)  # type: ignore[arg-type]
    _run_fill(fill, reader)
    ids = [r[1] for r in reader.scheduler.requests]
    # the first pass asks for chunks 0..8 once; then only chunk 5, until it comes
    assert ids == [reader.index.chunk_id(i) for i in range(9)] + [bad, bad]
    assert len(walks) == 2  # one pass to measure, one walk: no walk again
    assert fill.complete and fill.failed == 2 and fill.bytes_done == fill.bytes_total == 900
    retries = [r[0] for r in reader.scheduler.requests[9:]]
    assert retries[1] - retries[0] > 30  # the second wait is longer (backoff; mock clock)


def test_parse_refuses_more_ranges_than_a_profile_holds() -> None:
    from cafuse.profile import MAX_PROFILE_BYTES, MAX_RANGES

    raw = dumps([(k * 2, 1, 0) for k in range(MAX_RANGES + 1)], None)
    assert len(raw) < MAX_PROFILE_BYTES  # refused for its ranges, not its size
    with pytest.raises(ProfileError, match="more than a profile can hold"):
        parse(raw, "p")
    # a recording at its cap is a valid profile: MAX_PROFILE_BYTES fits MAX_RANGES long ranges
    big = dumps([((1 << 44) + k * 10**9, 10**9 - 1, 10**8) for k in range(MAX_RANGES)], 1 << 50)
    assert len(big) <= MAX_PROFILE_BYTES
    assert len(parse(big).ranges) == MAX_RANGES


def test_recorder_snapshot_is_taken_at_once_and_built_later() -> None:
    rec = Recorder(1 << 40)
    for k in range(1000):
        rec.observe(k * 8192, 4096)
    build = rec.snapshot()
    rec.observe(999 * 8192 + 4096, 100)  # the last range grows
    rec.observe(1 << 39, 4096)  # and a new one comes
    ranges = parse(build()).ranges
    assert len(ranges) == 1000 and ranges[-1] == (999 * 8192, 4096, ranges[-1][2])
    assert len(parse(rec.snapshot()()).ranges) == 1001


def test_a_read_waiting_for_a_table_page_holds_the_fill_back(tmp_path: Path) -> None:
    """``waiting_reads`` counts a read while it waits for a page of the table, not only
    while it waits for chunks: the fill pauses for both."""
    import threading

    from cafuse.chunktable import ChunkTable, PageMissing
    from cafuse.fetch import ChunkSource
    from cafuse.mount.reader import BlobReader
    from cafuse.stores.local import LocalStore

    gate = threading.Event()

    class _Paged(ChunkTable):
        flags, chunk_min, chunk_avg, chunk_max = 0, 16, 64, 256
        chunk_count, blob_size, loaded = 1, 100, False

        def covering(self, offset: int, size: int, *, wait: bool = True) -> range:
            if not self.loaded:
                raise PageMissing(0)
            return range(0, 1)

        def load_page(self, page: int) -> None:
            assert gate.wait(10)
            self.loaded = True

        def span(self, i: int) -> tuple[int, int]:
            return 0, 100

        def is_zero(self, i: int) -> bool:
            return True

    table = _Paged()
    reader = BlobReader(table, ChunkSource(table.digest, [LocalStore(str(tmp_path))]))
    seen: list[int] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(reader.run)

            async def read() -> None:
                assert bytes(await reader.read(0, 10)) == bytes(10)

            nursery.start_soon(read)
            with trio.fail_after(10):
                while not reader.waiting_reads:
                    await trio.sleep(0.001)
            seen.append(reader.waiting_reads)
            gate.set()
            with trio.fail_after(10):
                while reader.waiting_reads:
                    await trio.sleep(0.001)
            seen.append(reader.waiting_reads)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert seen == [1, 0]


def test_record_profile_naming_a_directory_is_refused(www: Path, tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    proc = run_cafuse(
        "mount", www / "image.caibx", tmp_path / "mnt", "--record-profile", tmp_path, check=False
    )
    assert_user_error(proc, "--record-profile", "is a directory")
    assert not os.listdir(tmp_path / "mnt")


def test_a_dark_profile_server_does_not_hold_the_mount(tmp_path: Path) -> None:
    """The profile is fetched with --timeout per try (not an index's minutes): a server
    that never answers costs the mount about that, then it goes on without a profile."""
    import threading

    from servers import dark_listener

    from cafuse.mount.boot import load_profile
    from cafuse.mount.options import MountOptions

    with dark_listener() as dark:
        for explicit in (False, True):
            opts = MountOptions(f"{dark.url}/os.caibx", str(tmp_path))
            opts.timeout = 1.0
            opts.retries = 0
            if explicit:
                opts.profile = f"{dark.url}/os.profile"
            result: list = []
            worker = threading.Thread(
                target=lambda o, out: out.append(load_profile(o)), args=(opts, result), daemon=True
            )
            worker.start()
            worker.join(opts.timeout * 10)  # generous: the old code waited 600 s per try
            assert result, "load_profile still waiting on a dark server"
            profile, warnings = result[0]
            assert profile is None
            assert bool(warnings) == explicit and all("without" in w for w in warnings)
        assert dark.connections >= 2


def test_a_profile_url_larger_than_a_profile_is_refused(www: Path, nginx, tmp_path: Path) -> None:
    from cafuse.mount.boot import load_profile
    from cafuse.mount.options import MountOptions
    from cafuse.profile import MAX_PROFILE_BYTES

    (www / "huge.profile").write_bytes(b" " * (MAX_PROFILE_BYTES + 1))
    try:
        opts = MountOptions(f"{nginx.url}/image.caibx", str(tmp_path))
        opts.profile = f"{nginx.url}/huge.profile"
        profile, warnings = load_profile(opts)
        assert profile is None
        assert len(warnings) == 1 and "larger than a profile can be" in warnings[0]
    finally:
        (www / "huge.profile").unlink()


def test_replay_plans_off_the_loop_and_stops_at_its_share() -> None:
    """The table (which may read a page per call) is asked only from worker threads; the
    loop only requests; a whole-image profile stops at half the memory cache."""
    import threading

    from cafuse.mount.replay import Replay
    from cafuse.scheduler import Priority

    main = threading.main_thread()
    on_loop: list[str] = []

    class _Table(_DupIndex):
        def covering(self, offset: int, size: int, *, wait: bool = True) -> range:
            if threading.current_thread() is main:
                on_loop.append("covering")
            return super().covering(offset, size)

        def chunk_id(self, i: int) -> bytes:
            if threading.current_thread() is main:
                on_loop.append("chunk_id")
            return super().chunk_id(i)

        def span(self, i: int) -> tuple[int, int]:
            if threading.current_thread() is main:
                on_loop.append("span")
            return super().span(i)

    class _Memory:
        capacity = 40_000

        def __contains__(self, chunk_id: bytes) -> bool:
            return False

    class _Source:
        cache = None

    class _Sched:
        def __init__(self) -> None:
            self.requested: list[tuple[bytes, int]] = []

        def pending(self, chunk_id: bytes) -> bool:
            return False

        def request(self, items, priority):
            assert priority == Priority.PROFILE
            self.requested += items
            (chunk_id, size), *_ = items
            flight = _Flight(size)
            flight.chunk_id = chunk_id  # type: ignore[attr-defined]
            return [flight]

    class _R:
        index = _Table(100_000, 100_000)
        cache, source, scheduler = _Memory(), _Source(), _Sched()

        def is_zero(self, i: int) -> bool:
            return False

    reader = _R()
    whole = parse(dumps([(0, reader.index.blob_size, 0)], reader.index.blob_size))
    replay = Replay(reader, whole)  # type: ignore[arg-type]

    async def main_task() -> None:
        await replay.run()
        # a read afterwards: counted against what was replayed (the read loaded its pages)
        replay.observe(0, 100)

    trio.run(main_task)
    assert on_loop.count("covering") == 1 and on_loop.count("chunk_id") == 1  # the observe
    sizes = [size for _, size in reader.scheduler.requested]
    assert 20_000 <= sum(sizes) <= 20_000 + 100  # half the memory cache, a chunk over at most
    assert replay.stopped and "memory cache" in replay.stopped
    snap = replay.snapshot()
    assert snap["chunks_fetched"] == len(sizes) and snap["chunks_read_later"] == 1


def test_fill_progress_counts_a_failed_chunk_repeated_in_a_later_batch() -> None:
    """A chunk that fails in one batch and comes in a later one (a repeat) is done: its
    bytes in both batches count, and no retry is left."""
    import numpy as np

    from cafuse.chunktable import Batch
    from cafuse.mount.fill import Fill

    class _Repeats(_Index):
        def chunk_id(self, i: int) -> bytes:
            return bytes([i % 5]) * 32  # chunks 5..9 repeat 0..4

        def batches(self, step: int = 0):
            ends = np.arange(1, 11, dtype=np.uint64) * 100
            ids = np.stack([np.frombuffer(self.chunk_id(i), dtype=np.uint8) for i in range(10)])
            zero = np.zeros(10, dtype=bool)
            if step >= 10:  # the measuring pass
                yield Batch(0, 0, ends, ids, zero)
                return
            yield Batch(0, 0, ends[:5], ids[:5], zero[:5])
            yield Batch(5, 500, ends[5:], ids[5:], zero[5:])

    reader = _Reader()
    reader.index = _Repeats()
    reader.scheduler.fail = {bytes([2]) * 32: 1}
    fill = Fill(reader, _Cache(set()), rate=100_000, batch=5)  # type: ignore[arg-type]
    _run_fill(fill, reader)
    assert fill.complete and fill.failed == 1 and fill.passes == 1
    assert fill.bytes_done == fill.bytes_total == 1000
