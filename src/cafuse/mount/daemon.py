"""The mount daemon: checks, fork, pyfuse3 + trio main loop, signals, unmount.

Everything that can fail because of the user's input is checked before the fork, so the
error reaches the terminal. The fork happens before pyfuse3 and trio start (a process with
threads must not fork); the child mounts and reports ``ok`` or its error over a pipe, and
the parent exits 0 only once the mount is live.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import logging.handlers
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from ..errors import CafuseError
from .options import MountOptions

log = logging.getLogger(__name__)


def mount_type(path: str) -> str | None:
    """The file system type mounted at ``path`` (from /proc/self/mountinfo), or None.

    Works on a dead FUSE mount too, where every stat fails with ENOTCONN.
    """
    found = _mountinfo(path)
    return found[1] if found else None


def _mountinfo(path: str) -> tuple[str, str] | None:
    """``(major:minor, type)`` of the last mount at ``path``, without touching it."""
    absolute = os.path.abspath(path)
    parent, name = os.path.split(absolute)
    wanted = {absolute, os.path.join(os.path.realpath(parent), name)}
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 9 or "-" not in fields:
                    continue
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                if point in wanted:  # the last one mounted wins
                    found = (fields[2], fields[fields.index("-") + 1])
    except OSError:
        return None
    return found


def is_dead_mount(path: str) -> bool:
    """A FUSE mount whose daemon is gone: the kernel answers ENOTCONN to everything."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def check_mountpoint(path: str) -> None:
    mp = Path(path)
    if is_dead_mount(path):
        kind = mount_type(path) or "FUSE"
        what = "cafuse" if kind == "fuse.cafuse" else kind
        raise CafuseError(
            f"{path} is a dead {what} mount (transport endpoint not connected): run "
            f"cafuse umount {path}, then mount again"
        )
    if not mp.exists():
        raise CafuseError(f"mountpoint {path} does not exist: create it with mkdir")
    if not mp.is_dir():
        raise CafuseError(f"mountpoint {path} is not a directory")
    if os.path.ismount(mp):
        raise CafuseError(
            f"{path} is already a mount point: unmount it first (cafuse umount {path})"
        )
    if any(mp.iterdir()):
        raise CafuseError(f"mountpoint {path} is not empty: use an empty directory")


def mount(opts: MountOptions) -> int:
    """Mount and serve; without ``foreground`` return once the mount is live."""
    # no thread pools in numpy: the process must have one thread when it forks
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    from ..stores import parse_location

    check_mountpoint(opts.mountpoint)
    opts.check_throughput()
    from .boot import check_options

    check_options(opts)
    # checks that start no threads happen here; opening remote stores starts obstore's
    # runtime threads, which a fork would lose, so that waits for the child
    for text in (opts.index, *opts.stores):
        for part in text.split("|"):
            parse_location(part)
    _make_paths_absolute(opts)
    _check_log_file(opts.log_file)
    # the daemon must not pin the directory it was started in (that file system could
    # not be unmounted): every path is absolute now
    os.chdir("/")
    if opts.foreground:
        _setup_logging(opts, daemon=False)
        return _serve(opts, ready=None)

    if _os_thread_count() != 1:
        raise RuntimeError("internal error: threads running before fork")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode(errors="replace").strip()
        *warnings, message = message.split("\n") or [""]
        for line in warnings:  # from the child before "ok": the profile's, say
            print(f"cafuse: {line}", file=sys.stderr)
        if message == "ok":
            return 0
        if not message:
            _, status = os.waitpid(pid, 0)
            message = (
                f"mount daemon exited during start-up (status {status}); run with -f to see why"
            )
        raise CafuseError(message)
    # child
    os.close(read_fd)
    os.setsid()
    code = 1
    ready = Readiness(write_fd)
    try:
        _setup_logging(opts, daemon=True)
        _detach_stdio()
        code = _serve(opts, ready=ready)
    except CafuseError as exc:  # the user's to fix: the parent prints it as it is
        ready.report(str(exc))
        log.error("%s", exc)
    except BaseException as exc:
        ready.report(f"mount failed: {exc}")
        log.exception("mount daemon failed")
    finally:
        os._exit(code)


class Readiness:
    """The pipe to the parent waiting for the mount: one report (``ok`` or why not), then
    the fd is closed and forgotten, so a later error can never write to whatever file or
    socket reuses that fd number."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @property
    def pending(self) -> bool:
        return self._fd is not None

    def warn(self, message: str) -> None:
        """A warning for the user's terminal, before the one report."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.write(self._fd, f"warning: {message}".replace("\n", " ").encode() + b"\n")

    def report(self, message: str) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(fd, message.replace("\n", " ").encode() + b"\n")
        with contextlib.suppress(OSError):
            os.close(fd)


def _absolute(text: str) -> str:
    """A store or index given as a relative path, made absolute (URLs stay as they are)."""
    from ..stores import parse_location

    parts = []
    for part in text.split("|"):
        location = parse_location(part)
        parts.append(os.path.abspath(location.path) if location.is_local else part)
    return "|".join(parts)


def _make_paths_absolute(opts: MountOptions) -> None:
    """Every path of the options, absolute: the daemon runs in ``/``."""
    from ..seed import split_spec

    opts.index = _absolute(opts.index)
    opts.mountpoint = os.path.abspath(opts.mountpoint)
    opts.stores = [_absolute(text) for text in opts.stores]
    seeds = []
    for spec in opts.seeds:
        index_path, file_path = split_spec(spec)
        seeds.append(f"{os.path.abspath(index_path)}:{os.path.abspath(file_path)}")
    opts.seeds = seeds
    if opts.cache:
        opts.cache = os.path.abspath(opts.cache)
    if opts.log_file:
        opts.log_file = os.path.abspath(opts.log_file)
    if opts.profile:
        opts.profile = _absolute(opts.profile)
    if opts.record_profile:
        opts.record_profile = os.path.abspath(opts.record_profile)


def _check_log_file(path: str | None) -> None:
    """A log file the daemon cannot write is the user's to fix: say so before forking."""
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise CafuseError(
            f"cannot write the log file {path}: {exc.strerror} (give a writable --log path, "
            "or leave --log out to log to syslog)"
        ) from None
    os.close(fd)


def _os_thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _open_image(opts: MountOptions):
    """Index, chunk source and mtime; may start obstore's threads (after the fork)."""
    from ..resolve import RemoteOptions, build_source, load_index, probe_stores
    from ..stores import parse_location

    remote = RemoteOptions(
        timeout=opts.timeout,
        retries=opts.retries,
        s3_endpoint=opts.s3_endpoint,
        s3_region=opts.s3_region,
        cache=opts.cache,
        cache_size=opts.cache_size,
    )
    index = load_index(opts.index, remote)
    source = build_source(index, opts.index, opts.stores, opts.seeds, remote)
    probe_stores(source, index, offline_ok=source.cache is not None)
    if index.chunk_count:
        index.is_zero(0)  # the zero-chunk test set up now, not on the first read
    location = parse_location(opts.index, "index")
    mtime_ns = os.stat(location.path).st_mtime_ns if location.is_local else time.time_ns()
    return index, source, mtime_ns


def _serve(opts: MountOptions, ready: Readiness | None) -> int:
    import pyfuse3
    import trio

    from ..stores import parse_location
    from .boot import Boot, load_profile
    from .fs import BlobFS
    from .reader import BlobReader

    index, source, mtime_ns = _open_image(opts)
    profile, warnings = load_profile(opts)
    # local sources are read in batches by one thread per core (localpool.py), which feed
    # themselves from a queue: a local chunk costs about what a round trip through the event
    # loop does. Remote fetches wait on the network: one chunk per thread, many threads.
    reader = BlobReader(
        index,
        source,
        memory_cache=opts.memory_cache,
        readahead=opts.readahead,
        concurrency=opts.concurrency,
        local_threads=min(opts.concurrency, os.cpu_count() or 2),
        batch=8,
        hedge=opts.hedge,
        readahead_memory=opts.readahead_memory,
        max_concurrency=opts.max_concurrency,
    )
    boot = Boot.build(reader, opts, profile)
    widen = functools.partial(_widen_kernel_readahead, opts.mountpoint)
    fs = BlobFS(reader, opts.file_name, mtime_ns, after_init=widen)
    fs.recorder = boot.recorder
    fuse_options = set(opts.fuse_options)
    location = parse_location(opts.index, "index")
    fuse_options.add(
        f"fsname={os.path.abspath(location.path) if location.is_local else location.display}"
    )
    fuse_options.add("subtype=cafuse")
    with _stderr_captured() as libfuse_said:
        try:
            pyfuse3.init(fs, opts.mountpoint, fuse_options)
        except RuntimeError as exc:
            failure: RuntimeError | None = exc
        else:
            failure = None
    if failure is not None:
        raise CafuseError(_mount_failure(opts, failure, libfuse_said())) from None
    log.info(
        "mounted %s at %s (%d chunks, %d bytes)",
        opts.index,
        opts.mountpoint,
        index.chunk_count,
        index.blob_size,
    )
    for warning in warnings:
        log.warning("%s", warning)
        if ready is not None:
            ready.warn(warning)
    if ready is not None:
        ready.report("ok")
    try:
        trio.run(_main, reader, boot)
    finally:
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", opts.mountpoint)
        boot.save()
    return 0


KERNEL_READAHEAD_KB = 1024  # FUSE's largest request (libfuse negotiates 256 pages)


def _widen_kernel_readahead(mountpoint: str) -> None:
    """Let the kernel read ahead 1 MiB on this mount instead of 128 KiB: its sequential
    reads then arrive as 1 MiB FUSE requests, an eighth of the per-request cost (the
    event loop's hop per request is what bounds a local cold read). Needs root; without
    it the mount works as before. Called once the kernel's INIT is answered: the INIT
    reply would cut it back to what the kernel offered (128 KiB). Never by a stat of the
    mount point: a thread of this daemon waiting on its own mount would keep a killed
    daemon from exiting, and its mount alive."""
    found = _mountinfo(mountpoint)
    if found is None:
        return
    try:
        with open(f"/sys/class/bdi/{found[0]}/read_ahead_kb", "w") as f:
            f.write(f"{KERNEL_READAHEAD_KB}\n")
    except OSError as exc:
        log.info("kernel readahead of %s left as it is: %s", mountpoint, exc)


async def _main(reader, boot) -> None:
    import pyfuse3
    import trio

    async def on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for signum in sigs:
                log.info("signal %d: unmounting", signum)
                await reader.close()  # reads waiting on stalled fetches fail now
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        nursery.start_soon(on_signal)
        nursery.start_soon(boot.run)  # profile replay, then background fill
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


@contextlib.contextmanager
def _stderr_captured():
    """Collect what is written to fd 2 meanwhile (libfuse and fusermount3 print why a mount
    failed there, and a daemon's fd 2 is /dev/null); yields a function returning it."""
    sys.stderr.flush()
    saved = os.dup(2)
    capture = os.memfd_create("cafuse-libfuse-stderr", os.MFD_CLOEXEC)
    text = ""
    try:
        os.dup2(capture, 2)
        yield lambda: text
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        size = os.lseek(capture, 0, os.SEEK_END)
        text = os.pread(capture, min(size, 64 << 10), 0).decode(errors="replace")
        os.close(capture)
        if text.strip():
            log.info("libfuse: %s", " ".join(text.split()))


def _mount_failure(opts: MountOptions, exc: RuntimeError, said: str) -> str:
    """One line: why the mount failed (libfuse's own words) and what to do instead."""
    lines = [line.strip() for line in said.splitlines() if line.strip()]
    reason = lines[-1] if lines else str(exc)
    where = f"cannot mount at {opts.mountpoint}: {reason}"
    if "user_allow_other" in said:
        return (
            f"{where} (--allow-other needs user_allow_other in /etc/fuse.conf: ask root to "
            "add it, or mount without --allow-other)"
        )
    if "/dev/fuse" in said or "fuse device" in said.lower():
        return (
            f"{where} (this user cannot open /dev/fuse: add it to the group that owns "
            "/dev/fuse, load the fuse module, or mount as root)"
        )
    if "Operation not permitted" in said or "Permission denied" in said:
        return f"{where} (mount as root, or check fusermount3 is installed setuid root)"
    return where


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _setup_logging(opts: MountOptions, daemon: bool) -> None:
    root = logging.getLogger()
    if opts.log_file:
        handler: logging.Handler = logging.FileHandler(opts.log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s cafuse[%(process)d] %(message)s"))
    elif daemon and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("cafuse[%(process)d]: %(message)s"))
    elif daemon:
        return
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("cafuse: %(message)s"))
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # a daemon's log is where corrupt copies, failed reads and evictions are reported
    root.setLevel(min(root.level, logging.INFO) if opts.log_file or daemon else root.level)


def umount(mountpoint: str) -> None:
    import shutil
    import subprocess

    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if is_dead_mount(mountpoint):
        # the daemon is gone (killed): nothing can be open on it any more, detach it lazily
        log.info("%s: daemon gone, lazy unmount", mountpoint)
        cmd = [tool, "-u", "-z", mountpoint] if tool else ["umount", "-l", mountpoint]
    elif not os.path.ismount(mountpoint):
        raise CafuseError(f"{mountpoint} is not a mount point")
    else:
        cmd = [tool, "-u", mountpoint] if tool else ["umount", mountpoint]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "unknown error"
        raise CafuseError(f"cannot unmount {mountpoint}: {why} (is a file in it still open?)")
