"""The mount, umount and stats subcommands, and the ``mount.fuse.cafuse`` helper.

Kept light: pyfuse3, trio and numpy are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from ..errors import CafuseError
from ..sizes import format_size, parse_size
from . import STATS_XATTR
from .options import MountOptions


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value

    return parse


def _options_from_args(args: argparse.Namespace) -> MountOptions:
    opts = MountOptions(index=args.index, mountpoint=args.mountpoint)
    for spec in args.o or []:
        opts.apply(spec)
    opts.stores += args.store or []
    opts.seeds += args.seed or []
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
        opts.log_file = os.path.abspath(args.log)
    opts.foreground = args.foreground
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
        type=_count(1),
        metavar="N",
        help="most remote chunk fetches in flight when a long fat link needs a large "
        "readahead window (default 8 x --concurrency)",
    )


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
    if args.json:
        from ..cli import print_json

        print_json(stats)
        return 0
    reads = stats["reads"]
    print(f"image: {format_size(stats['blob_size'])} in {stats['chunks']} chunks")
    print(
        f"reads: {reads['served']} served ({format_size(reads['bytes'])}), {reads['failed']} failed"
    )
    for origin, nbytes in reads["bytes_from"].items():
        print(f"  served from {origin}: {format_size(nbytes)}")
    for origin, counter in sorted(stats["origins"].items()):
        wire = (
            f", {format_size(counter['stored_bytes'])} transferred"
            if counter["stored_bytes"]
            else ""
        )
        print(
            f"fetched from {origin}: {counter['chunks']} chunks, "
            f"{format_size(counter['bytes'])}{wire}"
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
    if stats["errors"]:
        print("errors: " + ", ".join(f"{k} {v}" for k, v in sorted(stats["errors"].items())))
    return 0


def add_mount_commands(
    sub: argparse._SubParsersAction, add_remote_options: Callable[[argparse.ArgumentParser], None]
) -> None:
    p = sub.add_parser(
        "mount",
        help="mount an index as one read-only file, fetched lazily",
        description="Mount INDEX at MOUNTPOINT as one read-only file named "
        "after the index. Only chunks that are read are fetched.",
    )
    p.add_argument("index", metavar="INDEX")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument(
        "--store",
        "-s",
        action="append",
        metavar="STORE",
        help="chunk store; repeat to try several in order",
    )
    p.add_argument(
        "--seed",
        action="append",
        metavar="SEED_INDEX:SEED_FILE",
        help="local image whose chunks are used before any store",
    )
    p.add_argument(
        "--memory-cache", metavar="SIZE", help="decompressed chunks kept in memory (default 256M)"
    )
    p.add_argument(
        "--readahead",
        type=_count(0),
        metavar="N",
        help="max chunks fetched ahead of sequential reads (default 32, 0 = off)",
    )
    p.add_argument(
        "--no-hedge",
        action="store_true",
        help="never send a second request for a read stuck on a slow one (for measuring)",
    )
    p.add_argument(
        "--concurrency",
        type=_count(1),
        metavar="N",
        help="remote chunk fetches in flight; a quarter serve reads only (default 16)",
    )
    _add_throughput_arguments(p)
    p.add_argument("--name", help="file name inside the mount (default: index name)")
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
        help="comma-separated options as in fstab: store=,seed=,name=,"
        "memory_cache=,readahead=,readahead_memory=,max_concurrency=,timeout=,log=,"
        "allow_other,nohedge",
    )
    add_remote_options(p)
    # for the mount, --timeout also bounds each read: past it the read fails with EIO
    p.set_defaults(handler=cmd_mount, timeout=None, retries=None, cache_size=None)

    p = sub.add_parser("umount", help="unmount a cafuse mount")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(handler=cmd_umount)

    p = sub.add_parser("stats", help="live statistics of a mount")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_stats)


def helper_main(argv: Sequence[str] | None = None) -> int:
    """``mount.fuse.cafuse SOURCE MOUNTPOINT [-o OPTIONS] [-n] [-s] [-f] [-v]``, as mount(8)
    and fstab call it."""
    from ..cli import main

    argv = list(sys.argv[1:] if argv is None else argv)
    positional: list[str] = []
    options: list[str] = []
    foreground = False
    it = iter(argv)
    for arg in it:
        if arg == "-o":
            options.append(next(it, ""))
        elif arg.startswith("-o") and len(arg) > 2:
            options.append(arg[2:])
        elif arg == "-t":
            next(it, None)
        elif arg == "-f":
            foreground = True
        elif arg in ("-n", "-s", "-v", "-r", "-w") or arg.startswith("--"):
            continue
        else:
            positional.append(arg)
    if len(positional) != 2:
        print(
            "mount.fuse.cafuse: usage: mount.fuse.cafuse INDEX MOUNTPOINT -o store=STORE",
            file=sys.stderr,
        )
        return 2
    cmd = ["mount", *positional]
    for spec in options:
        # mount(8) passes "rw" unless told "ro"; the mount is read-only either way
        kept = ",".join(item for item in spec.split(",") if item.strip() != "rw")
        if kept:
            cmd += ["-o", kept]
    if foreground:
        cmd.append("-f")
    return main(cmd)
