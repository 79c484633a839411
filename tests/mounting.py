"""Mounting for tests: a context manager that always unmounts, and kernel-side helpers."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from helpers import run_cafuse


def unmount(mountpoint: Path) -> None:
    for cmd in (
        ["fusermount3", "-u", str(mountpoint)],
        ["fusermount3", "-uz", str(mountpoint)],
        ["umount", "-l", str(mountpoint)],
    ):
        if not os.path.ismount(mountpoint):
            return
        subprocess.run(cmd, capture_output=True)
        deadline = time.monotonic() + 5
        while os.path.ismount(mountpoint) and time.monotonic() < deadline:
            time.sleep(0.05)


def wait_for_mount(mountpoint: Path, daemon: subprocess.Popen, timeout: float = 60) -> None:
    """Until a daemon started with ``cafuse mount -f`` has its mount live; an error if it
    exits or takes longer than ``timeout``."""
    deadline = time.monotonic() + timeout
    while not os.path.ismount(mountpoint):
        if daemon.poll() is not None:
            raise RuntimeError(f"mount daemon exited with {daemon.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mountpoint}: no mount after {timeout} s")
        time.sleep(0.05)


def pread_command(path: Path, offset: int, size: int = 4096) -> list[str]:
    """A child process that reads ``size`` bytes at ``offset`` of ``path`` and prints the
    errno it got (nothing on success): a read that may block, kept out of the test."""
    return [
        sys.executable,
        "-c",
        f"import os; fd = os.open({str(path)!r}, os.O_RDONLY)\n"
        f"try: os.pread(fd, {size}, {offset})\n"
        "except OSError as e: print(e.errno)",
    ]


@contextlib.contextmanager
def mounted(index: Path, mountpoint: Path, *args: object) -> Iterator[Path]:
    """Mount through the real CLI (daemon mode) and yield the path of the blob file."""
    mountpoint.mkdir(exist_ok=True)
    run_cafuse("mount", index, mountpoint, *args)
    try:
        assert os.path.ismount(mountpoint)
        (name,) = os.listdir(mountpoint)
        yield mountpoint / name
    finally:
        unmount(mountpoint)


@contextlib.contextmanager
def loop_mounted(image: Path, target: Path) -> Iterator[Path]:
    target.mkdir(exist_ok=True)
    subprocess.run(
        ["mount", "-o", "loop,ro", str(image), str(target)], check=True, capture_output=True
    )
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def drop_page_cache(path: Path) -> None:
    """Forget the kernel's cached pages of ``path`` so the next reads reach the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
