"""Hostile stores, concurrent maintenance, killed processes, full disks (issue 12).

Everything runs through real processes and real files: FIFOs and device nodes in a store
directory, gc and make as two processes on one store, writers in separate PID namespaces,
a small tmpfs that fills up. A hang shows up as a subprocess timeout (``HANG_GUARD``),
never as a test that waits forever.
"""

from __future__ import annotations

import errno
import os
import resource
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_user_error, random_bytes, run_cafuse
from mounting import mounted

from cafuse.index import read_index
from cafuse.stores import LocalStore, chunk_path

HANG_GUARD = 60
OLD = time.time() - 2 * 86400  # an mtime two days ago


def _make(tmp_path: Path, name: str, data: bytes, store: Path, *args: object) -> Path:
    image = tmp_path / f"{name}.img"
    image.write_bytes(data)
    index = tmp_path / f"{name}.caibx"
    run_cafuse("make", index, image, "--store", store, "--chunk-size", "16K", *args)
    return index


def _chunk_files(index: Path, store: Path) -> list[Path]:
    parsed = read_index(index)
    return [store / chunk_path(parsed.chunk_id(int(i))) for i in parsed.distinct_positions()]


def _limit_memory() -> None:
    """Child processes get 4 GiB of address space: a runaway read fails instead of
    taking the machine's memory."""
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


# ---------------------------------------------------------------- hostile store files


@pytest.fixture
def small(tmp_path: Path) -> tuple[bytes, Path, Path]:
    data = random_bytes(600_000, seed=11)
    store = tmp_path / "store"
    return data, _make(tmp_path, "a", data, store), store


def test_fifo_chunk_is_refused_not_waited_on(small, tmp_path: Path) -> None:
    """A FIFO where a chunk should be: cat, verify and extract fail at once, naming it."""
    _, index, store = small
    victim = _chunk_files(index, store)[1]
    victim.unlink()
    os.mkfifo(victim)
    for args in (
        ("cat", index, "--store", store),
        ("extract", index, tmp_path / "out.img", "--store", store),
        ("verify", index, "--store", store),
    ):
        proc = run_cafuse(*args, check=False, timeout=HANG_GUARD, stdout=subprocess.DEVNULL)
        assert_user_error(proc, str(victim), "named pipe")
    assert not (tmp_path / "out.img").exists()


def test_device_and_huge_chunk_files_are_refused(small, tmp_path: Path) -> None:
    """A chunk linked to /dev/zero, a device node, a file larger than any chunk: refused
    with a message, never read until memory runs out."""
    _, index, store = small
    files = _chunk_files(index, store)
    files[0].unlink()
    files[0].symlink_to("/dev/zero")
    files[1].unlink()
    os.mknod(files[1], stat.S_IFCHR | 0o644, os.makedev(1, 5))  # /dev/zero's numbers
    for args in (
        ("cat", index, "--store", store),
        ("extract", index, tmp_path / "out.img", "--store", store),
        ("verify", index, "--store", store),
    ):
        proc = run_cafuse(
            *args,
            check=False,
            timeout=HANG_GUARD,
            preexec_fn=_limit_memory,
            stdout=subprocess.DEVNULL,
        )
        assert_user_error(proc, "character device")
    files[0].unlink()
    files[1].unlink()
    # a sparse regular file past the bound: corrupt, and --repair deletes it
    with open(files[0], "wb") as f:
        f.truncate(1 << 30)
    proc = run_cafuse(
        "cat", index, "--store", store, check=False, timeout=HANG_GUARD, stdout=subprocess.DEVNULL
    )
    assert_user_error(proc, str(files[0]), "larger than any chunk")
    proc = run_cafuse(
        "verify", index, "--store", store, "--repair", check=False, timeout=HANG_GUARD
    )
    assert "1 missing, 1 corrupt" in proc.stdout and "1 deleted" in proc.stdout
    assert not files[0].exists()


def test_symlinked_chunk_files_still_work(small, tmp_path: Path) -> None:
    data, index, store = small
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for n, path in enumerate(_chunk_files(index, store)):
        target = elsewhere / f"{n}.cacnk"
        path.rename(target)
        path.symlink_to(target)
    out = tmp_path / "out.img"
    run_cafuse("extract", index, out, "--store", store, timeout=HANG_GUARD)
    assert out.read_bytes() == data
    assert "0 missing, 0 corrupt" in run_cafuse("verify", index, "--store", store).stdout


def test_local_store_read_bound_is_settable(small) -> None:
    _, index, store = small
    local = LocalStore(store, max_blob_size=100)
    chunk_id = read_index(index).chunk_id(0)
    with pytest.raises(Exception, match="larger than any chunk"):
        local.get(chunk_id)
    assert LocalStore(store).get(chunk_id)


def test_fifo_chunks_do_not_tie_up_mount_threads(small, tmp_path: Path) -> None:
    """Each FIFO read fails with EIO at once; with one fetch thread, good chunks are still
    served after several FIFOs were hit."""
    data, index, store = small
    parsed = read_index(index)
    for i in (1, 3, 5):
        path = store / chunk_path(parsed.chunk_id(i))
        path.unlink()
        os.mkfifo(path)
    reader = tmp_path / "read.py"
    reader.write_text(
        "import errno, os, sys\n"
        "blob, spans = sys.argv[1], sys.argv[2:]\n"
        "fd = os.open(blob, os.O_RDONLY | os.O_DIRECT)\n"
        "for span in spans:\n"
        "    start, size = map(int, span.split(':'))\n"
        "    try:\n"
        "        os.pread(fd, size, start)\n"
        "        print('ok')\n"
        "    except OSError as exc:\n"
        "        print(errno.errorcode[exc.errno])\n"
    )
    with mounted(
        index,
        tmp_path / "mnt",
        "--store",
        store,
        "--concurrency",
        "1",
        "--readahead",
        "0",
        "--timeout",
        "20",
    ) as blob:
        spans = []
        for i in (1, 3, 5, 7):
            start, end = parsed.span(i)
            first = (start + 4095) // 4096 * 4096  # O_DIRECT: aligned, inside chunk i
            spans.append(f"{first}:4096")
        proc = subprocess.run(
            [sys.executable, str(reader), str(blob), *spans],
            capture_output=True,
            text=True,
            timeout=HANG_GUARD,
        )
        assert proc.stdout.split() == ["EIO", "EIO", "EIO", "ok"], proc
        start, end = parsed.span(7)
        with open(blob, "rb") as f:
            f.seek(start)
            assert f.read(end - start) == data[start:end]


# ---------------------------------------------------------------- gc beside make


def test_gc_beside_make_never_deletes_what_the_new_index_needs(tmp_path: Path) -> None:
    """make of a new image and gc (given only the old index) run at once on one store: the
    new index verifies. The new image begins with old unreferenced chunks (written two
    days ago), the very ones gc is after; gc starts once make has gone past them."""
    store = tmp_path / "store"
    old = _make(tmp_path, "old", random_bytes(1 << 20, seed=21), store)
    stale = random_bytes(4 << 20, seed=22)
    stale_index = _make(tmp_path, "stale", stale, store)
    for path in store.rglob("*.cacnk"):
        os.utime(path, (OLD, OLD))
    stale_index.unlink()  # nobody lists it for gc any more
    before = len(list(store.rglob("*.cacnk")))
    new_image = tmp_path / "new.img"
    new_image.write_bytes(stale + random_bytes(24 << 20, seed=23))
    new = tmp_path / "new.caibx"
    make = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cafuse",
            "make",
            str(new),
            str(new_image),
            "--store",
            str(store),
            "--chunk-size",
            "16K",
            "--level",
            "12",
            "--threads",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + HANG_GUARD
    while len(list(store.rglob("*.cacnk"))) == before and make.poll() is None:
        assert time.monotonic() < deadline, "make wrote nothing"
        time.sleep(0.01)  # until make writes new chunks: it is past the reused ones
    stop = tmp_path / "stop"
    gc_loop = subprocess.Popen(
        [
            "bash",
            "-c",
            'n=0; while [ ! -e "$1" ] || [ $n -lt 1 ]; do '
            '"$2" -m cafuse gc "$3" "$4" || exit 1; n=$((n+1)); done',
            "gc-loop",
            str(stop),
            sys.executable,
            str(store),
            str(old),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, make_err = make.communicate(timeout=HANG_GUARD)
    finally:
        stop.touch()
        _, gc_err = gc_loop.communicate(timeout=HANG_GUARD)
    assert make.returncode == 0, make_err
    assert gc_loop.returncode == 0, gc_err
    assert "0 missing, 0 corrupt" in run_cafuse("verify", new, "--store", store).stdout
    assert "0 missing, 0 corrupt" in run_cafuse("verify", old, "--store", store).stdout
    # once the grace period is over (here: 0), the chunks no index lists go
    run_cafuse("gc", store, old, new, "--grace", "0")
    assert "0 missing, 0 corrupt" in run_cafuse("verify", new, "--store", store).stdout


def test_gc_grace_spares_young_chunks(tmp_path: Path) -> None:
    store = tmp_path / "store"
    keep = _make(tmp_path, "keep", random_bytes(200_000, seed=24), store)
    young = _make(tmp_path, "young", random_bytes(200_000, seed=25), store)
    young_files = _chunk_files(young, store)
    out = run_cafuse("gc", store, keep).stdout
    assert f"deleted 0; spared {len(young_files)} unreferenced chunks younger than 1h" in out
    for path in young_files[:2]:
        os.utime(path, (OLD, OLD))
    out = run_cafuse("gc", store, keep, "--grace", "1d").stdout
    assert "deleted 2;" in out and not young_files[0].exists() and young_files[2].exists()
    assert_user_error(run_cafuse("gc", store, keep, "--grace", "soon", check=False), "--grace")


def test_gc_puts_back_a_chunk_make_reused_meanwhile(small) -> None:
    """The step between gc's listing and its delete: a chunk touched in between stays."""
    _, index, store = small
    local = LocalStore(store)
    chunk_id = read_index(index).chunk_id(0)
    path = store / chunk_path(chunk_id)
    os.utime(path, (OLD, OLD))
    cutoff = time.time() - 3600  # gc saw the chunk as old ...
    assert local.touch(chunk_id)  # ... then a make reused it
    assert not local.delete_if_older(chunk_id, cutoff)
    assert path.exists() and local.get(chunk_id)
    os.utime(path, (OLD, OLD))
    assert local.delete_if_older(chunk_id, cutoff)
    assert not path.exists() and not local.touch(chunk_id)
    assert not list(path.parent.glob(".*"))  # no temporary names left behind


# ---------------------------------------------------------------- writers in other PID namespaces


def test_writers_in_separate_pid_namespaces_lose_no_chunk(tmp_path: Path) -> None:
    """Two makes of one image into one store, each in its own PID namespace (so their
    thread ids are the same): every chunk arrives whole."""
    image = tmp_path / "a.img"
    image.write_bytes(random_bytes(24 << 20, seed=31))
    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [
                "unshare",
                "--pid",
                "--fork",
                sys.executable,
                "-m",
                "cafuse",
                "make",
                str(tmp_path / f"{n}.caibx"),
                str(image),
                "--store",
                str(store),
                "--chunk-size",
                "16K",
                "--threads",
                "2",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=HANG_GUARD)
        assert proc.returncode == 0, err
    for n in range(2):
        verified = run_cafuse("verify", tmp_path / f"{n}.caibx", "--store", store)
        assert "0 missing, 0 corrupt" in verified.stdout
    assert not [p for p in store.rglob(".*") if p.is_file()]  # no temporary files left


# ---------------------------------------------------------------- FIFOs given as files


def test_fifo_as_input_seed_or_index_is_refused(small, tmp_path: Path) -> None:
    """A FIFO input or index is refused in one line; a FIFO seed (file or index) is a seed
    that cannot be used: skipped with a one-line warning, and the job goes on."""
    data, index, store = small
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    image = tmp_path / "a.img"
    for args, what in (
        (("make", tmp_path / "x.caibx", fifo, "--store", store), "input"),
        (("extract", fifo, tmp_path / "o.img", "--store", store), "index"),
        (("info", fifo), "index"),
    ):
        proc = run_cafuse(*args, check=False, timeout=HANG_GUARD)
        assert_user_error(proc, str(fifo), f"{what} is a named pipe (FIFO)")
    for spec, what in ((f"{index}:{fifo}", "seed file"), (f"{fifo}:{image}", "index")):
        out = tmp_path / "o.img"
        proc = run_cafuse(
            "extract", index, out, "--store", store, "--seed", spec, timeout=HANG_GUARD
        )
        warning = proc.stderr.strip()
        assert len(warning.splitlines()) == 1 and "Traceback" not in warning, warning
        assert "seed" in warning and "skipped" in warning, warning
        assert f"{what} is a named pipe (FIFO)" in warning, warning
        assert out.read_bytes() == data


# ---------------------------------------------------------------- debris of killed writers


def test_debris_of_killed_writers_is_removed_live_writers_kept(small, tmp_path: Path) -> None:
    data, index, store = small
    # extract: an unlocked temp file of the same target is a dead writer's
    dead = tmp_path / ".out.img.dead0001.tmp"
    dead.write_bytes(bytes(1 << 20))
    live = tmp_path / ".out.img.live0001.tmp"
    live.write_bytes(b"")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys; f = open(sys.argv[1], 'rb'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); sys.stdin.read()",
            str(live),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        other = tmp_path / ".other.img.dead0002.tmp"  # another target's: not ours to judge
        other.write_bytes(b"x")
        run_cafuse("extract", index, tmp_path / "out.img", "--store", store)
        assert (tmp_path / "out.img").read_bytes() == data
        assert not dead.exists() and live.exists() and other.exists()
    finally:
        holder.communicate("", timeout=HANG_GUARD)
    # stores: temp files older than an hour go (make and gc), fresh ones stay
    chunk = _chunk_files(index, store)[0]
    stale = chunk.parent / f".{chunk.name}.0123456789abcdef.tmp"
    fresh = chunk.parent / f".{chunk.name}.fedcba9876543210.tmp"
    for path in (stale, fresh):
        path.write_bytes(b"partial")
    os.utime(stale, (OLD, OLD))
    run_cafuse("make", tmp_path / "b.caibx", tmp_path / "a.img", "--store", store)
    assert not stale.exists() and fresh.exists()
    stale.write_bytes(b"partial")
    os.utime(stale, (OLD, OLD))
    out = run_cafuse("gc", store, index, tmp_path / "b.caibx").stdout
    assert "removed 1 stale temporary files" in out
    assert not stale.exists() and fresh.exists()


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def small_fs(tmp_path: Path):
    """An 8 MiB tmpfs, unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_disk_full_is_one_line_and_leaves_no_temp_files(tmp_path: Path, small_fs: Path) -> None:
    data = random_bytes(20 << 20, seed=41)
    store = tmp_path / "store"
    index = _make(tmp_path, "big", data, store)
    # extract's output
    out = small_fs / "out.img"
    proc = run_cafuse("extract", index, out, "--store", store, check=False)
    assert_user_error(proc, str(out), "no space left on device", "the image needs 20.0 MiB")
    assert os.listdir(small_fs) == []
    # make's store
    proc = run_cafuse(
        "make",
        tmp_path / "x.caibx",
        tmp_path / "big.img",
        "--store",
        small_fs / "store",
        check=False,
    )
    assert_user_error(proc, "no space left on device", "the image is 20.0 MiB")
    assert not [p for p in small_fs.rglob(".*") if p.is_file()]
    assert not (tmp_path / "x.caibx").exists()
    subprocess.run(["rm", "-rf", str(small_fs / "store")], check=True)
    # make's index: the disk fills while the index is written
    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    with open(small_fs / "filler", "wb") as f:
        f.write(bytes(free - 8192))
    proc = run_cafuse(
        "make",
        small_fs / "x.caibx",
        tmp_path / "big.img",
        "--store",
        store,
        "--chunk-size",
        "16K",
        check=False,
    )
    assert_user_error(proc, str(small_fs / "x.caibx"), "no space left on device")
    assert os.listdir(small_fs) == ["filler"]


# ---------------------------------------------------------------- a killed mount daemon


def _daemon_pids(mountpoint: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mount" in args and str(mountpoint).encode() in args:
                pids.append(int(entry.name))
    return pids


def _in_mountinfo(mountpoint: Path) -> bool:
    return f" {mountpoint} " in Path("/proc/self/mountinfo").read_text()


def test_killed_daemon_mount_is_reported_and_cleaned_up(small, tmp_path: Path) -> None:
    data, index, store = small
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_cafuse("mount", index, mnt, "--store", store)
    try:
        (pid,) = _daemon_pids(mnt)
        os.kill(pid, 9)
        deadline = time.monotonic() + HANG_GUARD
        while not _stat_errno(mnt):
            assert time.monotonic() < deadline, "the mount stayed alive"
            time.sleep(0.01)  # until the kernel notices the daemon is gone
        assert _stat_errno(mnt) == errno.ENOTCONN
        again = run_cafuse("mount", index, mnt, "--store", store, check=False)
        assert_user_error(again, "dead cafuse mount", f"cafuse umount {mnt}")
        run_cafuse("umount", mnt)
        assert not _in_mountinfo(mnt)
        run_cafuse("mount", index, mnt, "--store", store)
        assert (mnt / "a").read_bytes() == data
        run_cafuse("umount", mnt)
        assert not _in_mountinfo(mnt)
    finally:
        if _in_mountinfo(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def _stat_errno(path: Path) -> int:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno or -1
    return 0


# ---------------------------------------------------------------- a small shared cache

_CACHE_WRITER = """
import sys
import numpy as np
from cafuse.stores import CacheStore
cache = CacheStore(sys.argv[1], int(sys.argv[2]))
rng = np.random.default_rng(int(sys.argv[3]))
for _ in range(int(sys.argv[4])):
    blob = rng.integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    cache.put(rng.bytes(32), blob)
"""


def test_small_shared_cache_stays_within_its_bound(tmp_path: Path) -> None:
    """Two processes fill one cache with 8x its bound: it ends within the bound, not
    emptied, and its ledger agrees with the directory."""
    from cafuse.stores import CacheStore

    bound = 1 << 20
    cache = tmp_path / "cache"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _CACHE_WRITER, str(cache), str(bound), str(seed), "400"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    for proc in writers:
        _, err = proc.communicate(timeout=HANG_GUARD)
        assert proc.returncode == 0, err
    store = CacheStore(cache, bound)
    usage = store.usage()
    assert bound // 2 < usage <= bound
    ledger, _ = store._read_ledger()
    # a chunk linked in while the other process scans is counted by both until the next
    # scan (or one evicted under a concurrent delete, by neither): a few chunks at most
    assert ledger is not None and abs(ledger - usage) <= 4 * 10_000


def test_cache_writes_rarely_rescan_the_cache(tmp_path: Path) -> None:
    """Eviction scans the directory; writes must not: 4 MiB through a 1 MiB cache costs a
    handful of scans (one per fifth of the bound written), not one per write."""
    from cafuse.stores import CacheStore

    bound = 1 << 20
    cache = CacheStore(tmp_path / "cache", bound)
    scans = []
    entries = cache._entries
    cache._entries = lambda: scans.append(1) or entries()  # type: ignore[method-assign]
    written = 0
    for n in range(400):
        blob = random_bytes(10_000, seed=n)
        cache.put(n.to_bytes(32, "big"), blob)
        written += len(blob)
    assert len(scans) <= written // (bound // 5) + 2
    assert cache.usage() <= bound


def test_cache_command_fails_when_the_bound_is_smaller_than_the_image(tmp_path: Path) -> None:
    store = tmp_path / "store"
    index = _make(tmp_path, "a", random_bytes(2 << 20, seed=51), store)
    cache = tmp_path / "cache"
    proc = run_cafuse(
        "cache", index, "--store", store, "--cache", cache, "--cache-size", "512K", check=False
    )
    err = assert_user_error(proc, "stayed cached", "--cache-size 512.0 KiB is too small")
    assert "of 2.0 MiB)" in err
    ok = run_cafuse("cache", index, "--store", store, "--cache", cache, "--cache-size", "8M")
    assert "chunks needed" in ok.stdout


# ---------------------------------------------------------------- extract --in-place


def test_in_place_rerun_repairs_a_half_written_image(small, tmp_path: Path) -> None:
    """A killed --in-place extract leaves a mix of old and new bytes under the final name;
    the same command run again makes it right."""
    data, index, store = small
    out = tmp_path / "out.img"
    old = bytearray(random_bytes(len(data), seed=61))
    half = len(data) // 2
    old[:half] = data[:half]  # the first half written before the kill, the rest old
    old[half + 1000 : half + 5000] = bytes(4000)
    out.write_bytes(bytes(old) + b"trailing bytes of a longer old image")
    run_cafuse("extract", index, out, "--store", store, "--in-place")
    assert out.read_bytes() == data
    assert "Not atomic" in run_cafuse("extract", "--help").stdout


def test_hostile_file_in_the_cache_is_dropped_and_refetched(small, tmp_path: Path) -> None:
    data, index, store = small
    cache = tmp_path / "cache"
    run_cafuse("cache", index, "--store", store, "--cache", cache)
    victim = cache / chunk_path(read_index(index).chunk_id(0))
    victim.unlink()
    os.mkfifo(victim)
    out = tmp_path / "out.img"
    run_cafuse("extract", index, out, "--store", store, "--cache", cache, timeout=HANG_GUARD)
    assert out.read_bytes() == data
    assert victim.is_file() and not stat.S_ISFIFO(victim.lstat().st_mode)
