"""Every default a user can override, in one place: the CLI help, the mount options, the
stores and the reader all read them from here (a leaf module: it imports nothing)."""

from __future__ import annotations

TIMEOUT = 30.0  # seconds for one chunk, every store and retry included
RETRIES = 10  # retry rounds for one chunk
CACHE_SIZE = "10G"  # bound of the --cache directory
REMOTE_CONCURRENCY = 16  # chunks in flight with remote stores (jobs and the mount)
MEMORY_CACHE = 256 << 20  # the mount's decompressed chunks in memory
MEMORY_CACHE_TEXT = "256M"
READAHEAD = 32  # most chunks the mount fetches ahead of sequential reads
GC_GRACE = "1h"
ZSTD_LEVEL = 3
CHUNK_SIZES = "16K:64K:256K"  # casync's
