"""cafuse mount, through the kernel: content, filesystems inside, concurrency, failures."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import assert_user_error, compare_trees, run_cafuse, sha256_file
from mounting import drop_page_cache, loop_mounted, mounted, unmount

from cafuse.index import read_index


def test_whole_file_and_attributes(made_image, ext4_image: Path, tmp_path: Path) -> None:
    index, store = made_image
    with mounted(index, tmp_path / "mnt", "--store", store) as blob:
        assert blob.name == "rootfs"
        st = blob.stat()
        assert stat.S_IMODE(st.st_mode) == 0o444 and stat.S_ISREG(st.st_mode)
        assert st.st_size == ext4_image.stat().st_size
        assert sha256_file(blob) == sha256_file(ext4_image)
        assert blob.stat().st_mtime_ns == st.st_mtime_ns
        with pytest.raises(OSError) as info:
            os.open(blob, os.O_RDWR)
        assert info.value.errno in (errno.EROFS, errno.EACCES)
        opts = next(
            line
            for line in Path("/proc/mounts").read_text().splitlines()
            if str(tmp_path / "mnt") in line
        ).split()[3]
        assert {"ro", "nosuid", "nodev"} <= set(opts.split(","))


def test_random_reads_match(made_image, ext4_image: Path, tmp_path: Path) -> None:
    index, store = made_image
    original = ext4_image.read_bytes()
    ends = read_index(index).ends.tolist()
    rng = random.Random(1)
    ranges = [(end - 1, 2) for end in ends[:50]] + [(end, 4096) for end in ends[50:100]]
    ranges += [
        (len(original) - 1, 1),
        (len(original) - 10, 100),
        (len(original), 10),
        (len(original) + 5000, 10),
        (0, 1),
    ]
    ranges += [
        (rng.randrange(len(original)), rng.choice([1, 512, 4096, 65536, 300_000]))
        for _ in range(300)
    ]
    with mounted(index, tmp_path / "mnt", "--store", store, "--memory-cache", "2M") as blob:
        fd = os.open(blob, os.O_RDONLY)
        try:
            for n, (offset, length) in enumerate(ranges):
                if n % 20 == 0:
                    drop_page_cache(blob)
                assert os.pread(fd, length, offset) == original[offset : offset + length], offset
        finally:
            os.close(fd)


def test_loop_mounted_ext4_and_qemu_img(
    made_image, ext4_image: Path, sample_tree: Path, tmp_path: Path
) -> None:
    index, store = made_image
    with mounted(index, tmp_path / "mnt", "--store", store) as blob:
        with loop_mounted(blob, tmp_path / "rootfs") as root:
            assert compare_trees(sample_tree, root) > 100
        proc = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(blob), str(ext4_image)],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "identical" in proc.stdout.lower()


def test_lazy_fetch_and_stats(made_image, ext4_image: Path, tmp_path: Path) -> None:
    index, store = made_image
    parsed = read_index(index)
    with mounted(index, tmp_path / "mnt", "--store", store) as blob:
        offset = int(parsed.ends[len(parsed.ends) // 2]) + 100
        with open(blob, "rb") as f:
            f.seek(offset)
            f.read(4096)
        stats = json.loads(run_cafuse("stats", tmp_path / "mnt", "--json").stdout)
        fetched = sum(o["chunks"] for o in stats["origins"].values())
        # the chunk read, and at most those the kernel's own readahead touches (it asks for
        # ~384 KiB after a cold 4 KiB read); cafuse adds none for a read that short
        assert 1 <= fetched <= len(parsed.covering(offset, 512 << 10))
        assert sum(o["bytes"] for o in stats["origins"].values()) < parsed.blob_size // 50
        assert stats["reads"]["failed"] == 0
        human = run_cafuse("stats", tmp_path / "mnt").stdout
        assert "fetched from" in human and "reads:" in human


def test_concurrent_readers(made_image, ext4_image: Path, tmp_path: Path) -> None:
    index, store = made_image
    original = ext4_image.read_bytes()
    with mounted(index, tmp_path / "mnt", "--store", store, "--memory-cache", "8M") as blob:

        def reader(k: int) -> int:
            rng = random.Random(k)
            with open(blob, "rb") as f:
                for _ in range(60):
                    offset = rng.randrange(len(original))
                    length = rng.choice([4096, 100_000, 1 << 20])
                    f.seek(offset)
                    assert f.read(length) == original[offset : offset + length]
            return k

        with ThreadPoolExecutor(8) as pool:
            assert sorted(pool.map(reader, range(8))) == list(range(8))
        assert sha256_file(blob) == sha256_file(ext4_image)


def test_missing_chunk_gives_eio_only_where_needed(
    made_image, ext4_image: Path, tmp_path: Path
) -> None:
    index, store = made_image
    parsed = read_index(index)
    broken = tmp_path / "store"
    shutil.copytree(store, broken)
    distinct = parsed.distinct_positions().tolist()
    victim = next(
        i
        for i in distinct[len(distinct) // 2 :]
        if not parsed.zero_mask[i] and int((parsed.ids == parsed.ids[i]).all(axis=1).sum()) == 1
    )
    (broken / parsed.chunk_id(victim).hex()[:4] / f"{parsed.chunk_id(victim).hex()}.cacnk").unlink()
    lo, hi = parsed.span(victim)
    original = ext4_image.read_bytes()
    with mounted(index, tmp_path / "mnt", "--store", broken, "--timeout", "20") as blob:
        fd = os.open(blob, os.O_RDONLY)
        try:
            page = 4096
            for start in range((lo // page - 8) * page, (hi // page + 8) * page, page):
                needs_victim = start < hi and start + page > lo
                if needs_victim:
                    with pytest.raises(OSError) as info:
                        os.pread(fd, page, start)
                    assert info.value.errno == errno.EIO
                else:
                    assert os.pread(fd, page, start) == original[start : start + page]
            assert os.pread(fd, 1 << 20, 0) == original[: 1 << 20]  # still serving
        finally:
            os.close(fd)
        stats = json.loads(run_cafuse("stats", tmp_path / "mnt", "--json").stdout)
        assert stats["reads"]["failed"] >= 1


def test_sigterm_unmounts_and_exits(made_image, tmp_path: Path) -> None:
    index, store = made_image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cafuse",
            "mount",
            str(index),
            str(mnt),
            "--store",
            str(store),
            "-f",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.ismount(mnt)
        assert (mnt / "rootfs").stat().st_size > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not os.path.ismount(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
        unmount(mnt)


def test_daemon_umount_command(made_image, tmp_path: Path) -> None:
    index, store = made_image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_cafuse(
        "mount",
        index,
        mnt,
        "--store",
        store,
        "--name",
        "disk.img",
        "--log",
        tmp_path / "daemon.log",
    )
    try:
        assert os.listdir(mnt) == ["disk.img"]
        with open(mnt / "disk.img", "rb") as f:
            f.read(1 << 20)
    finally:
        run_cafuse("umount", mnt)
    assert not os.path.ismount(mnt)
    assert "mounted" in (tmp_path / "daemon.log").read_text()
    assert_user_error(run_cafuse("umount", mnt, check=False), "not a mount point")
    assert_user_error(run_cafuse("stats", mnt, check=False), "not a cafuse mount")


def test_mount_user_errors(made_image, tmp_path: Path) -> None:
    index, store = made_image
    mnt = tmp_path / "mnt"
    assert_user_error(
        run_cafuse("mount", index, mnt, "--store", store, check=False), "does not exist"
    )
    mnt.mkdir()
    (mnt / "x").write_text("x")
    assert_user_error(run_cafuse("mount", index, mnt, "--store", store, check=False), "not empty")
    (mnt / "x").unlink()
    bad = tmp_path / "bad.caibx"
    bad.write_bytes(index.read_bytes()[:-5])
    assert_user_error(
        run_cafuse("mount", bad, mnt, "--store", store, check=False),
        "not a valid casync blob index",
    )
    assert_user_error(
        run_cafuse("mount", index, mnt, "--store", tmp_path / "nostore", check=False),
        "directory does not exist",
    )
    assert_user_error(run_cafuse("mount", index, mnt, check=False), "no chunk store")
    assert_user_error(
        run_cafuse("mount", index, mnt, "-o", f"store={store},bogus", check=False),
        "unknown mount option",
    )
    assert_user_error(
        run_cafuse("mount", index, mnt, "-o", f"store={store},rw", check=False), "read-only"
    )
    with mounted(index, mnt, "--store", store):
        assert_user_error(
            run_cafuse("mount", index, mnt, "--store", store, check=False), "already a mount point"
        )
    assert not os.listdir(mnt)


def test_mount_helper_and_fstab(made_image, ext4_image: Path, tmp_path: Path) -> None:
    index, store = made_image
    if not Path("/usr/sbin/mount.fuse.cafuse").exists():
        pytest.fail("/usr/sbin/mount.fuse.cafuse missing: scripts/setup installs it")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "fuse.cafuse", str(index), str(mnt), "-o", f"store={store},name=root.img"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    try:
        assert sha256_file(mnt / "root.img") == sha256_file(ext4_image)
    finally:
        unmount(mnt)
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{index} {mnt} fuse.cafuse ro,nofail,store={store},memory_cache=64M 0 0\n")
    proc = subprocess.run(["mount", "-T", str(fstab), str(mnt)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    try:
        assert (mnt / "rootfs").stat().st_size == ext4_image.stat().st_size
    finally:
        unmount(mnt)
    proc = subprocess.run(
        ["mount", "-t", "fuse.cafuse", str(index), str(mnt), "-o", f"store={tmp_path / 'missing'}"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "directory does not exist" in proc.stderr
    assert not os.path.ismount(mnt)


@pytest.mark.casync
def test_mount_casync_index_with_seed(ext4_image: Path, tmp_path: Path) -> None:
    index, store = tmp_path / "c.caibx", tmp_path / "c.castr"
    subprocess.run(
        ["casync", "make", f"--store={store}", str(index), str(ext4_image)],
        check=True,
        capture_output=True,
    )
    with mounted(index, tmp_path / "mnt", "--store", store) as blob:
        assert sha256_file(blob) == sha256_file(ext4_image)
    empty = tmp_path / "empty.castr"
    empty.mkdir()
    with mounted(
        index, tmp_path / "mnt2", "--store", empty, "--seed", f"{index}:{ext4_image}"
    ) as blob:
        assert sha256_file(blob) == sha256_file(ext4_image)
        stats = json.loads(run_cafuse("stats", tmp_path / "mnt2", "--json").stdout)
        assert set(stats["origins"]) == {f"seed:{ext4_image}"}
    # -o seed_dir=: every NAME.caibx there with its file NAME beside it
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    shutil.copy(index, seeds / "old.img.caibx")
    os.symlink(ext4_image, seeds / "old.img")
    with mounted(index, tmp_path / "mnt3", "-o", f"store={empty},seed_dir={seeds}") as blob:
        assert sha256_file(blob) == sha256_file(ext4_image)
        stats = json.loads(run_cafuse("stats", tmp_path / "mnt3", "--json").stdout)
        assert set(stats["origins"]) == {f"seed:{seeds / 'old.img'}"}


def _daemon_pids(mountpoint: Path) -> list[int]:
    """Processes whose command line names ``mountpoint`` (the mount daemon)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mount" in argv and os.fsencode(mountpoint.name) in b" ".join(argv):
            found.append(int(entry))
    return found


def test_daemon_runs_in_root_with_absolute_paths(made_image, tmp_path: Path) -> None:
    """Relative paths (index, store, -o log=) work from where mount ran; the daemon then
    sits in / and pins no file system."""
    index, store = made_image
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(index, work / "rootfs.caibx")
    os.symlink(store, work / "store")
    mnt = tmp_path / "mnt-cwd"
    mnt.mkdir()
    run_cafuse("mount", "rootfs.caibx", "../mnt-cwd", "-o", "store=store,log=daemon.log", cwd=work)
    try:
        pids = _daemon_pids(mnt)
        assert pids, "no daemon found"
        assert {os.readlink(f"/proc/{pid}/cwd") for pid in pids} == {"/"}
        with open(mnt / "rootfs", "rb") as f:
            assert len(f.read(1 << 20)) == 1 << 20
    finally:
        run_cafuse("umount", mnt)
    assert "mounted" in (work / "daemon.log").read_text()


def test_unwritable_log_is_one_line(made_image, tmp_path: Path) -> None:
    index, store = made_image
    mnt = tmp_path / "mnt-log"
    mnt.mkdir()
    for args in (("--log", "/proc/no/such.log"), ("-o", "log=/proc/no/such.log")):
        for fg in ((), ("-f",)):
            proc = run_cafuse("mount", index, mnt, "--store", store, *args, *fg, check=False)
            assert_user_error(proc, "cannot write the log file /proc/no/such.log", "--log")
    assert not os.path.ismount(mnt)


def test_readiness_reports_once_and_forgets_its_fd(tmp_path: Path) -> None:
    from cafuse.mount.daemon import Readiness

    read_fd, write_fd = os.pipe()
    ready = Readiness(write_fd)
    ready.report("ok")
    assert not ready.pending
    reused = os.open(tmp_path / "chunk", os.O_RDWR | os.O_CREAT)  # likely the same number
    try:
        ready.report("mount failed: late error")  # must not reach the reused fd
        assert os.pread(reused, 100, 0) == b""
    finally:
        os.close(reused)
    with os.fdopen(read_fd, "rb") as pipe:
        assert pipe.read() == b"ok\n"


def test_libfuse_reason_is_passed_up() -> None:
    """What libfuse/fusermount3 print on fd 2 becomes the one-line error, with what to do."""
    from cafuse.mount.daemon import _mount_failure, _stderr_captured
    from cafuse.mount.options import MountOptions

    with _stderr_captured() as said:
        os.write(
            2,
            b"fusermount3: option allow_other only allowed if 'user_allow_other' "
            b"is set in /etc/fuse.conf\n",
        )
    opts = MountOptions(index="a.caibx", mountpoint="/mnt/x")
    text = _mount_failure(opts, RuntimeError("fuse_session_mount failed"), said())
    assert "user_allow_other" in text and "without --allow-other" in text
    assert "\n" not in text
    with _stderr_captured() as said:
        os.write(2, b"fuse: failed to open /dev/fuse: Permission denied\n")
    text = _mount_failure(opts, RuntimeError("fuse_session_mount failed"), said())
    assert "failed to open /dev/fuse: Permission denied" in text and "group" in text


_AS_NOBODY = """
import os, sys
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# everything the mount needs, imported while still root (the interpreter may live where
# nobody cannot read), then the privileges go
import importlib, pkgutil, cafuse  # noqa
for module in pkgutil.walk_packages(cafuse.__path__, "cafuse."):
    if module.name != "cafuse.__main__":  # that one runs the command line
        importlib.import_module(module.name)
import pyfuse3, trio, numpy, zstandard, blake3, obstore, logging.handlers  # noqa
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
sys.exit(cafuse.cli.main(sys.argv[1:]))
"""


def test_mount_without_dev_fuse_access_says_why(made_image) -> None:
    """A user who cannot open /dev/fuse gets libfuse's reason and what to do, in one line,
    instead of "fuse_session_mount failed"."""
    import tempfile

    mode = os.stat("/dev/fuse").st_mode
    if mode & 0o006 == 0o006:
        pytest.skip("/dev/fuse is open to every user here: no user lacks access")
    index, store = made_image
    work = Path(tempfile.mkdtemp(prefix="cafuse-nobody-"))
    try:
        work.chmod(0o755)
        shutil.copy(index, work / "a.caibx")
        shutil.copytree(store, work / "store")
        (work / "mnt").mkdir(mode=0o777)
        subprocess.run(["chmod", "-R", "a+rX", str(work)], check=True)
        for extra in ((), ("--allow-other",)):
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _AS_NOBODY,
                    "mount",
                    "a.caibx",
                    "mnt",
                    "-s",
                    "store",
                    *extra,
                ],
                cwd=work,
                capture_output=True,
                text=True,
                timeout=120,
            )
            err = assert_user_error(proc, "cannot mount at", "/dev/fuse")
            assert "fuse_session_mount failed" not in err
            assert "group that owns /dev/fuse" in err or "mount as root" in err
            assert not os.path.ismount(work / "mnt")
    finally:
        shutil.rmtree(work, ignore_errors=True)
