"""The mount, umount and stats subcommands (``mount.fuse.cafuse`` is in ``helper``).

Kept light: pyfuse3, trio and numpy are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .. import defaults
from ..args import (
    add_remote_options,
    add_seed_options,
    add_store_option,
    count,
    print_json,
    seed_specs,
)
from ..errors import CafuseError
from ..sizes import fetched_text, format_size, parse_size
from . import STATS_XATTR
from .options import FLAG_OPTIONS, PASSED_OPTIONS, SETTERS, MountOptions


def _options_from_args(args: argparse.Namespace) -> MountOptions:
    opts = MountOptions(index=args.index, mountpoint=args.mountpoint)
    for spec in args.o or []:
        opts.apply(spec)
    opts.stores += args.store or []
    opts.seeds += seed_specs(args)
    if args.name:
        opts.name = args.name
    if args.memory_cache:
        opts.memory_cache = parse_size(args.memory_cache, "--memory-cache")
    if args.readahead is not None:
        opts.readahead = args.readahead
    if args.no_hedge:
        opts.hedge = False
    opts.timeout = args.timeout if args.timeout is not None else opts.timeout
    opts.retries = args.retries if args.retries is not None else opts.retries
    opts.cache = args.cache or opts.cache
    opts.cache_size = args.cache_size or opts.cache_size
    opts.s3_endpoint = args.s3_endpoint or opts.s3_endpoint
    opts.s3_region = args.s3_region or opts.s3_region
    if args.concurrency:
        opts.concurrency = args.concurrency
    if args.log:
        opts.log_file = args.log
    opts.foreground = args.foreground
    _profile_options(args, opts)
    if args.allow_other:
        opts.fuse_options.add("allow_other")
    _throughput_options(args, opts)
    if "/" in opts.file_name or opts.file_name in ("", ".", ".."):
        raise CafuseError(f"bad --name {opts.file_name!r}: give a plain file name")
    return opts


def _print_readahead(readahead: dict | None) -> None:
    """The readahead window and bytes in flight of each stream (issue 11)."""
    if not readahead:
        return
    latency = readahead.get("min_latency_ms")
    print(
        f"readahead: {format_size(readahead['ahead_bytes'])} ahead of "
        f"{format_size(readahead['budget'])}"
        + (f", shortest remote fetch {latency} ms" if latency is not None else "")
    )
    for stream, state in sorted(readahead["streams"].items(), key=lambda kv: int(kv[0])):
        print(
            f"  stream {stream}: window {format_size(state['window'])}, "
            f"{format_size(state['in_flight'])} in flight, {state['phase']}, "
            f"{state['rate_mbps']} MB/s"
        )


def _throughput_options(args: argparse.Namespace, opts: MountOptions) -> None:
    """Readahead memory and remote fetches in flight (issue 11)."""
    if args.readahead_memory:
        opts.readahead_memory = parse_size(args.readahead_memory, "--readahead-memory")
    if args.max_concurrency:
        opts.max_concurrency = args.max_concurrency


def _add_throughput_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--readahead-memory",
        metavar="SIZE",
        help="bytes fetched ahead of all sequential readers together, shared fairly "
        "(default: a quarter of --memory-cache)",
    )
    p.add_argument(
        "--max-concurrency",
        type=count(1),
        metavar="N",
        help="most remote chunk fetches in flight when a long fat link needs a large "
        "readahead window (default 8 x --concurrency)",
    )


def _profile_options(args: argparse.Namespace, opts: MountOptions) -> None:
    """Boot profiles and background fill (mount/boot.py)."""
    opts.profile = args.profile or opts.profile
    opts.no_profile = args.no_profile or opts.no_profile
    opts.record_profile = args.record_profile or opts.record_profile
    if args.fill_rate:
        opts.fill_rate = parse_size(args.fill_rate, "--fill-rate")


def _add_profile_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("boot profiles and background fill")
    group.add_argument(
        "--profile",
        metavar="FILE_OR_URL",
        help="replay this profile right after mounting (default: <index name>.profile "
        "beside the index, when there is one)",
    )
    group.add_argument(
        "--no-profile", action="store_true", help="replay no profile, not even the default"
    )
    group.add_argument(
        "--record-profile",
        metavar="FILE",
        help="record the byte ranges read, written to FILE at unmount",
    )
    group.add_argument(
        "--fill-rate",
        metavar="RATE",
        help="after the profile, fetch the rest of the image into --cache at RATE bytes "
        "per second (K/M/G suffixes)",
    )


def save_profile(mountpoint: str, path: str) -> int:
    """Write the recording of a mount started with --record-profile to ``path``."""
    from ..profile import XATTR_PAGE, XATTR_PREFIX, parse, write

    target = _stats_file(mountpoint)
    pages: list[bytes] = []
    while True:
        try:
            page = os.getxattr(target, f"{XATTR_PREFIX}{len(pages)}")
        except OSError as exc:
            if not pages:
                raise CafuseError(
                    f"{mountpoint} is not recording a profile: mount it with --record-profile"
                ) from None
            raise CafuseError(f"{mountpoint}: reading the profile: {exc.strerror}") from None
        pages.append(page)
        if len(page) < XATTR_PAGE:
            break
    raw = b"".join(pages)
    profile = parse(raw, f"the recording of {mountpoint}")  # never write a torn one
    write(path, raw)
    return len(profile.ranges)


def _stats_file(mountpoint: str) -> str:
    try:
        names = os.listdir(mountpoint)
    except OSError as exc:
        raise CafuseError(f"{mountpoint}: {exc.strerror}") from None
    for name in names:
        path = os.path.join(mountpoint, name)
        try:
            os.getxattr(path, STATS_XATTR)
        except OSError:
            continue
        return path
    raise CafuseError(f"{mountpoint} is not a cafuse mount (no statistics found)")


def cmd_mount(args: argparse.Namespace) -> int:
    from .daemon import mount

    return mount(_options_from_args(args))


def cmd_umount(args: argparse.Namespace) -> int:
    from .daemon import umount

    umount(args.mountpoint)
    return 0


def read_stats(mountpoint: str) -> dict:
    try:
        names = os.listdir(mountpoint)
    except OSError as exc:
        raise CafuseError(f"{mountpoint}: {exc.strerror}") from None
    for name in names:
        try:
            return json.loads(os.getxattr(os.path.join(mountpoint, name), STATS_XATTR))
        except OSError:
            continue
    raise CafuseError(f"{mountpoint} is not a cafuse mount (no statistics found)")


def cmd_stats(args: argparse.Namespace) -> int:
    stats = read_stats(args.mountpoint)
    if args.save_profile:
        ranges = save_profile(args.mountpoint, args.save_profile)
        print(f"profile: {ranges} ranges written to {args.save_profile}", file=sys.stderr)
    if args.json:
        print_json(stats)
        return 0
    reads = stats["reads"]
    print(f"image: {format_size(stats['blob_size'])} in {stats['chunks']} chunks")
    if table := stats.get("index"):  # a table read by pages
        fetched = table.get("bytes_fetched")
        print(
            f"index: {table['pages_read']} of {table['pages']} table pages read, "
            f"{table['pages_in_memory']} in memory"
            + (f", {format_size(fetched)} fetched" if fetched is not None else "")
        )
    print(
        f"reads: {reads['served']} served ({format_size(reads['bytes'])}), {reads['failed']} failed"
    )
    for origin, nbytes in reads["bytes_from"].items():
        print(f"  served from {origin}: {format_size(nbytes)}")
    for origin, counter in sorted(stats["origins"].items()):
        print(
            f"fetched from {origin}: {counter['chunks']} chunks, "
            + fetched_text(counter["bytes"], counter["stored_bytes"])
        )
    cache = stats["memory_cache"]
    print(
        f"memory cache: {cache['chunks']} chunks, {format_size(cache['bytes'])} of "
        f"{format_size(cache['capacity'])}"
    )
    lat = stats["fetch_latency_ms"]
    if lat.get("samples"):
        print(f"fetch latency: p50 {lat['p50']} ms, p90 {lat['p90']} ms, p99 {lat['p99']} ms")
    from ..stats import store_lines

    for line in store_lines(stats.get("stores", {})):
        print(line)
    sched = stats.get("scheduler")
    if sched:
        queued = ", ".join(f"{k} {v}" for k, v in sched["queued"].items() if v)
        fetching = ", ".join(f"{k} {v}" for k, v in sched["fetching"].items() if v)
        print(
            f"scheduler: {sched['pending']} chunks pending; queued: {queued or 'none'}; "
            f"fetching: {fetching or 'none'}; {sched['remote_slots']} remote slots, "
            f"{sched['reserved_for_reads']} kept for reads"
        )
    _print_readahead(stats.get("readahead"))
    from .boot import stats_lines

    for line in stats_lines(stats):
        print(line)
    if stats["errors"]:
        print("errors: " + ", ".join(f"{k} {v}" for k, v in sorted(stats["errors"].items())))
    return 0


def _o_list() -> str:
    """Every ``-o`` key, from the table that parses them (so the help never lags)."""
    keys = [f"{key}=" for key in SETTERS] + [*FLAG_OPTIONS, *sorted(PASSED_OPTIONS)]
    return ", ".join(keys)


def add_mount_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mount",
        help="mount an index as one read-only file, fetched lazily",
        description="Mount INDEX at MOUNTPOINT as one read-only file named "
        "after the index. Only chunks that are read are fetched.",
    )
    p.add_argument("index", metavar="INDEX")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    add_store_option(p)
    add_seed_options(p)
    p.add_argument(
        "--memory-cache",
        metavar="SIZE",
        help=f"decompressed chunks kept in memory (default: {defaults.MEMORY_CACHE_TEXT})",
    )
    p.add_argument(
        "--readahead",
        type=count(0),
        metavar="N",
        help=f"max chunks fetched ahead of sequential reads (default: {defaults.READAHEAD}, "
        "0 = off)",
    )
    p.add_argument(
        "--no-hedge",
        action="store_true",
        help="never send a second request for a read stuck on a slow one (for measuring)",
    )
    p.add_argument(
        "--concurrency",
        type=count(1),
        metavar="N",
        help="remote chunk fetches in flight; a quarter serve reads only "
        f"(default: {defaults.REMOTE_CONCURRENCY})",
    )
    _add_throughput_arguments(p)
    p.add_argument("--name", help="file name inside the mount (default: the index's name)")
    p.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users read the mount (needs user_allow_other for non-root)",
    )
    p.add_argument("--log", metavar="FILE", help="daemon log file (default: syslog)")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument(
        "-o",
        action="append",
        metavar="OPTIONS",
        help="comma-separated options as in fstab, each the same as its --option: " + _o_list(),
    )
    _add_profile_options(p)
    add_remote_options(p)
    p.set_defaults(handler=cmd_mount)

    p = sub.add_parser("umount", help="unmount a cafuse mount")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(handler=cmd_umount)

    p = sub.add_parser("stats", help="live statistics of a mount")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--save-profile",
        metavar="FILE",
        help="also write the profile recorded so far (mount --record-profile) to FILE",
    )
    p.set_defaults(handler=cmd_stats)
