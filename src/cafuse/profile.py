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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import AtomicFile
from .errors import CafuseError

log = logging.getLogger(__name__)

FORMAT = "cafuse-profile"
VERSION = 1
MAX_RANGES = 200_000  # a recording stops growing here (memory stays bounded)
MAX_PROFILE_BYTES = 64 << 20  # a profile file larger than this is not read
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
        raise ProfileError(f"profile {path}: larger than {MAX_PROFILE_BYTES >> 20} MiB")
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

    def page(self, number: int) -> bytes:
        """Page ``number`` of the recording so far (an xattr value is limited to 64 KiB):
        page 0 takes a snapshot that the following pages continue."""
        if number == 0:
            self._page_cache = self.dumps()
        return self._page_cache[number * XATTR_PAGE : (number + 1) * XATTR_PAGE]

    def save(self, path: str | Path) -> None:
        write(path, self.dumps())
        log.info("profile: %d ranges written to %s", len(self.ranges), path)


# ---------------------------------------------------------------------- use


def chunk_plan(profile: Profile, index) -> tuple[list[int], int]:
    """Chunk indexes covering the profile's ranges in profile order, each distinct id
    once, and the number of ranges (or parts) beyond the blob's end."""
    seen: set[bytes] = set()
    plan: list[int] = []
    beyond = 0
    size = index.blob_size
    for offset, length, _ in profile.ranges:
        if offset + length > size:
            beyond += 1
        for i in index.covering(offset, length):
            chunk_id = index.chunk_id(i)
            if chunk_id not in seen:
                seen.add(chunk_id)
                plan.append(i)
    return plan, beyond


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
        plan, beyond = chunk_plan(profile, index)
        nbytes = 0
        for i in plan:
            start, end = index.span(i)
            nbytes += end - start
        out["index"] = {
            "blob_size": index.blob_size,
            "chunks": len(plan),
            "chunk_bytes": nbytes,
            "ranges_beyond_end": beyond,
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
        print(
            f"{args.index}: {cover['chunks']} chunks ({format_size(cover['chunk_bytes'])}) "
            "cover these ranges"
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
