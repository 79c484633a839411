"""The pyfuse3 ``Operations``: a thin translation of kernel requests into reader calls.

The file system is one directory holding one read-only regular file, the blob.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import stat
from collections.abc import Callable

import pyfuse3
import trio

from ..profile import XATTR_PREFIX
from . import STATS_XATTR
from .reader import BlobReader, ReadFailed

log = logging.getLogger(__name__)

FILE_INODE = pyfuse3.ROOT_INODE + 1
STATS_XATTR_NAME = STATS_XATTR.encode()
PROFILE_XATTR_PREFIX = XATTR_PREFIX.encode()


class BlobFS(pyfuse3.Operations):
    def __init__(
        self,
        reader: BlobReader,
        name: str,
        mtime_ns: int,
        after_init: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.reader = reader
        self.name = name.encode()
        self.mtime_ns = mtime_ns
        self._handles = itertools.count(1)
        self.recorder = None  # a profile.Recorder: its pages are xattrs of the file
        self.after_init = after_init

    def init(self) -> None:
        # called while libfuse handles the kernel's INIT, before its reply: run the hook
        # on the loop's next turn, once the reply is written
        if self.after_init is not None:
            trio.lowlevel.current_trio_token().run_sync_soon(self.after_init)

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            attrs.st_mode = stat.S_IFDIR | 0o555
            attrs.st_nlink = 2
        elif inode == FILE_INODE:
            attrs.st_mode = stat.S_IFREG | 0o444
            attrs.st_nlink = 1
            attrs.st_size = self.reader.size
            attrs.st_blocks = (self.reader.size + 511) // 512
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attrs.st_ino = inode
        attrs.st_uid = os.getuid()
        attrs.st_gid = os.getgid()
        attrs.st_blksize = 128 * 1024
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self.mtime_ns
        # nothing ever changes while mounted: let the kernel cache attributes and entries
        attrs.attr_timeout = attrs.entry_timeout = 3600
        return attrs

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None):
        return self._attrs(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx=None):
        if parent_inode == pyfuse3.ROOT_INODE and name == self.name:
            return self._attrs(FILE_INODE)
        if parent_inode == pyfuse3.ROOT_INODE and name in (b".", b".."):
            return self._attrs(pyfuse3.ROOT_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode: int, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, self._attrs(FILE_INODE), 1)

    async def releasedir(self, fh: int) -> None:
        return None

    async def open(self, inode: int, flags: int, ctx):
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        # the blob never changes while mounted: keep the kernel page cache across opens
        return pyfuse3.FileInfo(fh=next(self._handles), keep_cache=True)

    async def read(self, fh: int, off: int, size: int):
        try:
            return await self.reader.read(off, size, stream=fh)
        except ReadFailed:
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            # a bug must cost one read, not the mount: log it and keep serving
            log.exception("unexpected error reading %d bytes at %d", size, off)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def release(self, fh: int) -> None:
        self.reader.forget_stream(fh)

    async def getxattr(self, inode: int, name: bytes, ctx):
        if inode == FILE_INODE and name == STATS_XATTR_NAME:
            return json.dumps(self.reader.snapshot()).encode()
        if inode == FILE_INODE and name.startswith(PROFILE_XATTR_PREFIX) and self.recorder:
            page = name[len(PROFILE_XATTR_PREFIX) :]
            if page.isdigit():
                if int(page) == 0:  # a new snapshot: its JSON is built off the loop
                    data = await trio.to_thread.run_sync(self.recorder.snapshot())
                    self.recorder.set_pages(data)
                return self.recorder.cached_page(int(page))
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode: int, ctx):
        return [STATS_XATTR_NAME] if inode == FILE_INODE else []

    async def statfs(self, ctx):
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_blocks = (self.reader.size + 4095) // 4096
        st.f_bfree = st.f_bavail = 0
        st.f_files = 2
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st
