"""Opening files the user names (inputs, seeds, indexes) without trusting what they are.

``open()`` of a FIFO waits for a writer forever, and a character device reads forever:
files are opened with O_NONBLOCK, checked with fstat, and refused with a one-line error
unless they are of a kind the caller reads.
"""

from __future__ import annotations

import fcntl
import os
import stat

from .errors import CafuseError


def describe_file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISFIFO, "named pipe (FIFO)"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "special file"


def open_for_reading(path: str, what: str, *, block_device_ok: bool) -> int:
    """A blocking read-only fd of a regular file (or block device): never waits in open.

    ``what`` names the file in the error ("input", "seed file", "index"). OSError from
    open(2) is left to the caller, which knows how to word it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or (block_device_ok and stat.S_ISBLK(mode))):
            wanted = "a regular file or block device" if block_device_ok else "a regular file"
            raise CafuseError(
                f"{path}: {what} is a {describe_file_type(mode)}, not {wanted}: give {wanted}"
            )
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd
