"""Mounting for tests: a context manager that always unmounts, and kernel-side helpers."""

from __future__ import annotations

import contextlib
import os
import subprocess
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
