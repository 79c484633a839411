"""Boot profiles: the byte ranges a boot reads, in the order it first reads them.

A profile is a small JSON file (documented in docs/mount.md)::

    {"format": "cafuse-profile", "version": 1, "blob_size": 1073741824,
     "ranges": [[offset, length, ms], ...]}

``ranges`` are byte ranges of the blob in first-access order, ``ms`` the milliseconds since
the mount when the range was first read. They are byte ranges, not chunk ids, so a profile
recorded on one version of an image prefetches the right chunks of the next one.

``Recorder`` builds one from the reads of a mount: only bytes not read before are
recorded, and a range that continues the previous one extends it.
"""

from __future__ import annotations

import json
import logging
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import AtomicFile
from .errors import CafuseError

log = logging.getLogger(__name__)

FORMAT = "cafuse-profile"
VERSION = 1
MAX_RANGES = 200_000  # a recording stops growing here; a profile with more is refused
MAX_PROFILE_BYTES = 8 << 20  # a profile file larger than this is not read (MAX_RANGES fit)
XATTR_PREFIX = "user.cafuse.profile."  # + page number: the recording so far, in pages
XATTR_PAGE = 60_000  # below the kernel's 64 KiB limit on an xattr value


class ProfileError(CafuseError):
    """A profile that cannot be used (corrupt, wrong format, unreadable)."""


@dataclass
class Profile:
    ranges: list[tuple[int, int, int]] = field(default_factory=list)  # offset, length, ms
    blob_size: int | None = None
    source: str = "profile"

    @property
    def total_bytes(self) -> int:
        return sum(length for _, length, _ in self.ranges)


def dumps(ranges: list[list[int]] | list[tuple[int, int, int]], blob_size: int | None) -> bytes:
    """A profile file's bytes: one range per line, so a diff of two profiles reads well."""
    head = json.dumps({"format": FORMAT, "version": VERSION, "blob_size": blob_size})
    lines = ",\n".join(f"[{o},{n},{t}]" for o, n, t in ranges)
    return f'{head[:-1]}, "ranges": [\n{lines}\n]}}\n'.encode()


def parse(raw: bytes, source: str = "profile") -> Profile:
    """A profile from a file's bytes; ProfileError saying what is wrong with it."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{source}: not a cafuse profile (not JSON: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ProfileError(f'{source}: not a cafuse profile (no "format": "{FORMAT}")')
    version = doc.get("version")
    if version != VERSION:
        raise ProfileError(
            f"{source}: profile version {version!r} is not supported (this cafuse reads "
            f"version {VERSION}): record it again"
        )
    blob_size = doc.get("blob_size")
    ranges = doc.get("ranges")
    if not isinstance(ranges, list) or not (blob_size is None or _natural(blob_size)):
        raise ProfileError(f'{source}: corrupt profile (bad "ranges" or "blob_size")')
    if len(ranges) > MAX_RANGES:
        raise ProfileError(
            f"{source}: {len(ranges)} ranges, more than a profile can hold ({MAX_RANGES}): "
            "record it again"
        )
    out: list[tuple[int, int, int]] = []
    for k, item in enumerate(ranges):
        if not (
            isinstance(item, list)
            and len(item) == 3
            and all(_natural(v) for v in item)
            and item[1] > 0
        ):
            raise ProfileError(
                f"{source}: corrupt profile (range {k} is {item!r}, expected "
                "[offset, length > 0, ms])"
            )
        out.append((item[0], item[1], item[2]))
    return Profile(out, blob_size, source)


def too_large(source: str) -> str:
    return f"profile {source}: larger than a profile can be ({MAX_PROFILE_BYTES >> 20} MiB)"


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_local(path: str | Path) -> Profile:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PROFILE_BYTES + 1)
    except FileNotFoundError:
        raise ProfileError(f"profile {path} does not exist") from None
    except OSError as exc:
        raise ProfileError(f"profile {path}: {exc.strerror}") from None
    if len(raw) > MAX_PROFILE_BYTES:
        raise ProfileError(too_large(str(path)))
    return parse(raw, str(path))


def write(path: str | Path, data: bytes) -> None:
    """Write a profile file atomically (complete or not at all)."""
    file = AtomicFile(Path(path))
    try:
        file.write(data)
        file.commit()
    except BaseException:
        file.abort()
        raise


# ---------------------------------------------------------------------- recording


class Recorder:
    """The byte ranges read from a mount, as they are first read."""

    def __init__(self, blob_size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.blob_size = blob_size
        self.clock = clock
        self.started = clock()
        self.ranges: list[list[int]] = []  # [offset, length, ms], first-access order
        self._starts: list[int] = []  # the bytes read so far, as sorted disjoint intervals
        self._ends: list[int] = []
        self.full = False
        self._page_cache = b""

    def observe(self, offset: int, size: int) -> None:
        """A read of ``[offset, offset+size)``: record the bytes not read before."""
        end = min(offset + size, self.blob_size)
        if offset >= end or self.full:
            return
        starts, ends = self._starts, self._ends
        if ends and starts[-1] <= offset and offset <= ends[-1] and end > ends[-1]:
            pieces = [(ends[-1], end)]  # the common case: a sequential reader goes on
            ends[-1] = end
        else:
            i = bisect_left(ends, offset)  # first interval ending at or after the read
            j = bisect_right(starts, end)  # intervals from i to j touch the read
            pieces = []
            cur = offset
            for k in range(i, j):
                if starts[k] > cur:
                    pieces.append((cur, starts[k]))
                cur = max(cur, ends[k])
            if cur < end:
                pieces.append((cur, end))
            if not pieces:
                return
            lo = min(offset, starts[i]) if i < j else offset
            hi = max(end, ends[j - 1]) if i < j else end
            starts[i:j] = [lo]
            ends[i:j] = [hi]
        ms = int((self.clock() - self.started) * 1000)
        for lo, hi in pieces:
            last = self.ranges[-1] if self.ranges else None
            if last is not None and last[0] + last[1] == lo:
                last[1] += hi - lo
            elif len(self.ranges) >= MAX_RANGES:
                self.full = True
                log.warning("profile recording stopped at %d ranges", MAX_RANGES)
                return
            else:
                self.ranges.append([lo, hi - lo, ms])

    def dumps(self) -> bytes:
        return dumps(self.ranges, self.blob_size)

    def snapshot(self) -> Callable[[], bytes]:
        """The recording so far, taken in O(1): the returned function builds its bytes and
        may run in a worker thread while reads go on. Ranges are only appended and only the
        last one grows, so the first ``n - 1`` are final and the last is copied now."""
        n = len(self.ranges)
        last = list(self.ranges[-1]) if n else None
        ranges, blob_size = self.ranges, self.blob_size

        def build() -> bytes:
            return dumps([*ranges[: n - 1], last] if last is not None else [], blob_size)

        return build

    def set_pages(self, data: bytes) -> None:
        """Keep a snapshot's bytes for ``page`` to serve."""
        self._page_cache = data

    def page(self, number: int) -> bytes:
        """Page ``number`` of the recording so far (an xattr value is limited to 64 KiB):
        page 0 takes a snapshot that the following pages continue. The mount builds the
        snapshot in a thread (``snapshot``, ``set_pages``) and serves ``cached_page``."""
        if number == 0:
            self._page_cache = self.snapshot()()
        return self._page_cache[number * XATTR_PAGE : (number + 1) * XATTR_PAGE]

    def cached_page(self, number: int) -> bytes:
        return self._page_cache[number * XATTR_PAGE : (number + 1) * XATTR_PAGE]

    def save(self, path: str | Path) -> None:
        write(path, self.dumps())
        log.info("profile: %d ranges written to %s", len(self.ranges), path)


# ---------------------------------------------------------------------- use


PLAN_BATCH = 1024  # chunks handed to the replay per worker-thread hop


class ChunkPlan:
    """The chunks covering a profile's ranges, in profile order, each distinct id once,
    zero chunks left out, planned lazily: ``batches()`` yields lists of
    ``(chunk_id, size)`` and stops once ``budget`` bytes (uncompressed) are planned.

    Run it in a worker thread: for a table read by pages, ``chunk_id``/``span`` may read
    one. Memory does not grow with the image: the ids seen are kept as 8-byte keys
    (``tablepass.DistinctKeys``), and only up to the budget. A key collision between two
    ids can only leave a chunk out of the plan (a prefetch less, never a wrong byte).
    """

    def __init__(
        self,
        profile: Profile,
        index,
        *,
        budget: int | None = None,
        is_zero: Callable[[int], bool] | None = None,
        batch: int = PLAN_BATCH,
        distinct_cap: int | None = None,
    ) -> None:
        self.profile = profile
        self.index = index
        self.budget = budget
        self.is_zero = is_zero if is_zero is not None else index.is_zero
        self.batch = batch
        self.distinct_cap = distinct_cap
        self.beyond = sum(1 for o, n, _ in profile.ranges if o + n > index.blob_size)
        self.chunks = 0  # planned so far
        self.bytes = 0
        self.truncated = False  # stopped at the budget: more ranges were left
        self.approximate = False  # distinct_cap reached: a later id may count twice

    def batches(self) -> Iterator[list[tuple[bytes, int]]]:
        import numpy as np

        from .tablepass import DistinctKeys

        index = self.index
        seen = DistinctKeys(cap=self.distinct_cap, narrow=True)  # 8 bytes: a prefetch hint
        pending: list[tuple[bytes, int]] = []
        pending_bytes = 0

        def flush() -> list[tuple[bytes, int]]:
            keys = np.frombuffer(b"".join(cid[:8] for cid, _ in pending), dtype="<u8")
            unique, first = np.unique(keys, return_index=True)
            new = ~seen.seen(unique)
            seen.add(unique[new])
            self.approximate = self.approximate or seen.full
            out = [pending[k] for k in np.sort(first[new]).tolist()]
            for _, size in out:
                self.chunks += 1
                self.bytes += size
            pending.clear()
            return out

        for i in self._positions():
            if self.budget is not None and self.bytes >= self.budget:
                self.truncated = True
                return
            if self.is_zero(i):
                continue
            start, end = index.span(i)
            pending.append((index.chunk_id(i), end - start))
            pending_bytes += end - start
            # flush early near the budget, so the plan ends at most a chunk past it
            near = self.budget is not None and self.bytes + pending_bytes >= self.budget
            if len(pending) >= self.batch or near:
                pending_bytes = 0
                out = flush()
                if out:
                    yield out
        if pending:
            out = flush()
            if out:
                yield out

    def _positions(self) -> Iterator[int]:
        """The chunk positions covering the ranges, asking the table for about a batch's
        worth of bytes at a time: a table read by pages loads every page of what
        ``covering`` returns, and a range may span the whole image."""
        index = self.index
        step = max(self.batch * index.chunk_avg, 1)
        for offset, length, _ in self.profile.ranges:
            end = min(offset + length, index.blob_size)
            while offset < end:
                positions = index.covering(offset, min(end - offset, step))
                if not positions:
                    break
                yield from positions
                offset = index.span(positions[-1])[1]


def describe(profile: Profile, index=None) -> dict[str, object]:
    """What ``cafuse profile`` shows."""
    out: dict[str, object] = {
        "format": FORMAT,
        "version": VERSION,
        "blob_size": profile.blob_size,
        "ranges": len(profile.ranges),
        "bytes": profile.total_bytes,
        "duration_ms": max((t for _, _, t in profile.ranges), default=0),
    }
    if index is not None:
        from .tablepass import INFO_DISTINCT_CAP

        plan = ChunkPlan(profile, index, is_zero=lambda i: False, distinct_cap=INFO_DISTINCT_CAP)
        for _ in plan.batches():
            pass
        out["index"] = {
            "blob_size": index.blob_size,
            "chunks": plan.chunks,
            "chunk_bytes": plan.bytes,
            "ranges_beyond_end": plan.beyond,
            "approximate": plan.approximate,
        }
    return out


def cmd_profile(args) -> int:
    from .args import print_json
    from .sizes import format_size

    profile = read_local(args.file)
    index = None
    if args.index:
        from .resolve import load_index

        index = load_index(args.index)
    info = describe(profile, index)
    if args.json:
        print_json(info)
        return 0
    blob = info["blob_size"]
    print(f"profile: {args.file} (version {VERSION})")
    print(f"recorded on an image of {format_size(blob) if blob is not None else 'unknown size'}")
    print(
        f"ranges: {info['ranges']}, {format_size(info['bytes'])}, "
        f"read over {info['duration_ms'] / 1000:.1f} s"
    )
    if index is not None:
        cover = info["index"]
        assert isinstance(cover, dict)
        about = "about " if cover["approximate"] else ""
        print(
            f"{args.index}: {about}{cover['chunks']} distinct chunks "
            f"({format_size(cover['chunk_bytes'])}) cover these ranges"
        )
        if cover["ranges_beyond_end"]:
            print(f"  {cover['ranges_beyond_end']} ranges reach past the image's end")
    return 0


def add_profile_command(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="describe a boot profile (recorded with mount --record-profile)",
        description="Show what a profile holds: its ranges and bytes, and with --index the "
        "chunks of that index that cover them.",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--index", metavar="INDEX", help="count the chunks of INDEX it covers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_profile)
