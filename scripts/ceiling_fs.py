"""The ceiling for the mount benchmarks: a minimal pyfuse3 file served from memory.

Usage: ceiling_fs.py IMAGE MOUNTPOINT  (foreground; SIGTERM unmounts)
It does the least a pyfuse3 file system can: one file, its bytes in RAM, reads answered
with a memoryview slice, ``keep_cache`` like cafuse. Whatever cafuse adds on top of this is
cafuse's own cost.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

FILE_INODE = pyfuse3.ROOT_INODE + 1


class MemoryFile(pyfuse3.Operations):
    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = memoryview(data)

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attrs.st_mode = stat.S_IFDIR | 0o555
        elif inode == FILE_INODE:
            attrs.st_mode = stat.S_IFREG | 0o444
            attrs.st_size = len(self.data)
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attrs.attr_timeout = attrs.entry_timeout = 3600
        return attrs

    async def getattr(self, inode, ctx=None):
        return self._attrs(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == pyfuse3.ROOT_INODE and name == b"image":
            return self._attrs(FILE_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, b"image", self._attrs(FILE_INODE), 1)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        return self.data[off : off + size]


async def serve() -> None:
    async def on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main() -> None:
    image, mountpoint = sys.argv[1:3]
    with open(image, "rb") as f:
        data = f.read()
    pyfuse3.init(MemoryFile(data), mountpoint, {"ro", "fsname=ceiling", "default_permissions"})
    os.write(1, b"ready\n")
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
