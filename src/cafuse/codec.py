"""Chunk compression: zstd or none on write; zstd, xz or gzip on read, recognised by magic.

Where a chunk is stored says how to read it, as in casync and desync: ``<id>.cacnk`` is
compressed (the format is told by its magic bytes), a bare ``<id>`` file is the chunk's data
as is. Stores hand bare files over as ``Uncompressed``, which is never decoded, so a raw
chunk that happens to begin with gzip, xz or zstd magic (any chunk of a ``.gz`` image)
stays what it is.
"""

from __future__ import annotations

import lzma
import threading
import zlib

import zstandard

from .errors import CafuseError
from .stores.base import Uncompressed

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd\x37\x7a\x58\x5a\x00"
GZIP_MAGIC = b"\x1f\x8b"

COMPRESSIONS = ("zstd", "none")

_local = threading.local()


def _zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return comp


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "decompressor", None)
    if dec is None:
        dec = _local.decompressor = zstandard.ZstdDecompressor()
    return dec


def compress(data: bytes | memoryview, compression: str = "zstd", level: int = 3) -> bytes:
    """Chunk data as stored: zstd bytes (a ``.cacnk`` file), or ``Uncompressed`` (bare)."""
    if compression == "zstd":
        return _zstd_compressor(level).compress(data)
    if compression == "none":
        return Uncompressed(data)
    raise CafuseError(f"unknown compression {compression!r}: use one of {', '.join(COMPRESSIONS)}")


def _zstd_skippable(blob: bytes) -> bool:
    """Whether ``blob`` begins with a zstd skippable frame (magic 0x184D2A50-5F)."""
    return len(blob) >= 8 and blob[1:4] == b"\x2a\x4d\x18" and blob[0] & 0xF0 == 0x50


def _zstd_frame_length(blob: bytes) -> int | None:
    """Bytes the zstd frame at the start of ``blob`` takes, from its header and block
    headers (RFC 8878, section 3.1.1); None if they do not fit in ``blob``."""
    if len(blob) < 6:
        return None
    descriptor = blob[4]
    single_segment = descriptor >> 5 & 1
    pos = 5 + (0 if single_segment else 1)  # the window descriptor
    pos += (0, 1, 2, 4)[descriptor & 3]  # the dictionary id
    pos += (single_segment, 2, 4, 8)[descriptor >> 6]  # the content size
    while pos + 3 <= len(blob):
        header = int.from_bytes(blob[pos : pos + 3], "little")
        pos += 3 + (1 if header >> 1 & 3 == 1 else header >> 3)  # an RLE block holds 1 byte
        if header & 1:  # the last block
            pos += 4 * (descriptor >> 2 & 1)  # the checksum
            return pos if pos <= len(blob) else None
    return None


def _zstd_frames(blob: bytes, max_size: int) -> bytes:
    """Every frame of ``blob`` in turn, skippable ones skipped, as desync (``DecodeAll``) and
    the zstd tool read a chunk (casync 2 refuses one of two frames: "Bad message"); never
    more than ``max_size``."""
    reader = _zstd_decompressor().stream_reader(blob, read_across_frames=True)
    parts: list[bytes] = []
    total = 0
    while part := reader.read(max_size + 1 - total):
        parts.append(part)
        total += len(part)
        if total > max_size:
            raise ValueError(f"zstd data larger than the chunk's {max_size} bytes")
    return b"".join(parts)


def decompress(blob: bytes, max_size: int) -> bytes:
    """The data of a stored chunk: ``Uncompressed`` as is, anything else decoded by its
    magic bytes. A ``.cacnk`` without known magic is taken as raw data, as cafuse before
    bare files wrote ``--compression none`` chunks (the caller checks the digest).

    ``max_size`` bounds the output so a hostile chunk cannot exhaust memory.
    Raises ``ValueError`` on corrupt data (the caller reports it with the chunk id).
    """
    if isinstance(blob, Uncompressed):
        if len(blob) > max_size:
            raise ValueError(f"uncompressed chunk of {len(blob)} bytes, chunk is {max_size}")
        return blob
    if blob.startswith(ZSTD_MAGIC) or _zstd_skippable(blob):
        try:
            if not blob.startswith(ZSTD_MAGIC):  # a skippable frame first
                return _zstd_frames(blob, max_size)
            declared = zstandard.frame_content_size(blob)
            # a corrupt header can claim any size: check it before anything is allocated
            if declared > max_size:
                raise ValueError(f"zstd frame claims {declared} bytes, chunk is {max_size}")
            if declared <= 0:  # no size in the header (casync's chunks), or an empty frame
                data = _zstd_decompressor().decompress(blob, max_output_size=max_size)
                if len(data) == max_size or _zstd_frame_length(blob) == len(blob):
                    return data  # all the chunk, or the blob's only frame
                return _zstd_frames(blob, max_size)  # more frames follow (or it is corrupt)
            try:  # one frame with its size, nothing after it (cafuse's, desync's chunks)
                return _zstd_decompressor().decompress(
                    blob, max_output_size=max_size, allow_extra_data=False
                )
            except zstandard.ZstdError as exc:
                data = _zstd_frames(blob, max_size)  # more frames follow, or it is corrupt
                if len(data) < declared:  # the first frame is cut short or broken
                    raise ValueError(f"bad zstd data: {exc}") from None
                return data
        except (zstandard.ZstdError, MemoryError) as exc:
            raise ValueError(f"bad zstd data: {exc or type(exc).__name__}") from None
    if blob.startswith(XZ_MAGIC):
        try:
            dec = lzma.LZMADecompressor()
            out = dec.decompress(blob, max_length=max_size + 1)
        except lzma.LZMAError as exc:
            raise ValueError(f"bad xz data: {exc}") from None
        if len(out) > max_size:
            raise ValueError("xz data larger than the maximum chunk size")
        if not dec.eof:
            raise ValueError("bad xz data: truncated")
        return out
    if blob.startswith(GZIP_MAGIC):
        try:
            dec = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
            out = dec.decompress(blob, max_size + 1)
        except zlib.error as exc:
            raise ValueError(f"bad gzip data: {exc}") from None
        if len(out) > max_size:
            raise ValueError("gzip data larger than the maximum chunk size")
        if not dec.eof:
            raise ValueError("bad gzip data: truncated")
        return out
    return blob
