"""Chunk digests: BLAKE3 (cafuse's default), SHA-512/256 (casync's default) and SHA-256."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import lru_cache

import blake3

from .errors import CafuseError

# Index feature flags that select the digest (see docs/format.md).
FLAG_SHA512_256 = 0x2000000000000000
FLAG_BLAKE3 = 0x0800000000000000
FLAG_EXCLUDE_NODUMP = 0x8000000000000000
FLAG_EXCLUDE_FILE = 0x1000000000000000

DIGESTS = ("blake3", "sha512-256", "sha256")

HashFn = Callable[[bytes | memoryview], bytes]


def _blake3(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest()


def _sha512_256(data: bytes | memoryview) -> bytes:
    return hashlib.new("sha512_256", data).digest()


def _sha256(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


_FUNCTIONS: dict[str, HashFn] = {
    "blake3": _blake3,
    "sha512-256": _sha512_256,
    "sha256": _sha256,
}


def hash_function(name: str) -> HashFn:
    """The function computing a chunk id for digest ``name``."""
    try:
        return _FUNCTIONS[name]
    except KeyError:
        raise CafuseError(f"unknown digest {name!r}: use one of {', '.join(DIGESTS)}") from None


def digest_from_flags(flags: int) -> str:
    """The digest an index's feature flags select."""
    if flags & FLAG_BLAKE3:
        return "blake3"
    if flags & FLAG_SHA512_256:
        return "sha512-256"
    return "sha256"


def flags_for_digest(name: str) -> int:
    """Feature flags to write for ``name``; SHA variants carry casync's usual exclude bits."""
    hash_function(name)  # validates the name
    if name == "blake3":
        return FLAG_BLAKE3
    base = FLAG_EXCLUDE_NODUMP | FLAG_EXCLUDE_FILE
    return base | FLAG_SHA512_256 if name == "sha512-256" else base


@lru_cache(maxsize=64)
def zero_chunk_id(digest: str, length: int) -> bytes:
    """Id of a chunk of ``length`` zero bytes."""
    return hash_function(digest)(bytes(length))
