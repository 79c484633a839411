"""Command-line interface: argument parsing and error reporting only.

Heavy modules (numpy, pyfuse3, obstore) are imported inside the commands that use them so
that ``cafuse --help`` and the mount helper start fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from . import __version__, defaults
from .args import (
    Parser,
    add_concurrency_option,
    add_remote_options,
    add_source_options,
    positive_int,
    print_json,
    seed_specs,
    size,
)
from .errors import CafuseError

log = logging.getLogger("cafuse")

Handler = Callable[[argparse.Namespace], int]
REMOTE_CONCURRENCY = defaults.REMOTE_CONCURRENCY


# ---------------------------------------------------------------- shared helpers


def remote_options(args: argparse.Namespace):
    from .resolve import RemoteOptions

    return RemoteOptions(
        timeout=defaults.TIMEOUT if args.timeout is None else args.timeout,
        retries=defaults.RETRIES if args.retries is None else args.retries,
        s3_endpoint=args.s3_endpoint,
        s3_region=args.s3_region,
        cache=getattr(args, "cache", None),
        cache_size=getattr(args, "cache_size", None) or defaults.CACHE_SIZE,
    )


def _concurrency(args: argparse.Namespace, stores) -> int:
    """--concurrency, or its default: more for the network's latency than for local disks."""
    if args.concurrency:
        return args.concurrency
    if any(not store.is_local for store in stores):
        return REMOTE_CONCURRENCY
    return max(4, 2 * (os.cpu_count() or 2))


def _index_and_source(args: argparse.Namespace):
    from .resolve import build_source, load_index, probe_stores

    remote = remote_options(args)
    index = load_index(args.index, remote)
    source = build_source(index, args.index, args.store, seed_specs(args), remote)
    probe_stores(source, index, offline_ok=source.cache is not None)
    return index, source


def _print_store_lines(source) -> None:
    from .stats import store_lines

    for line in store_lines(source.store_stats()):
        print(line)


# ---------------------------------------------------------------- commands


def cmd_make(args: argparse.Namespace) -> int:
    from .chunker import DEFAULT_SIZES, ChunkSizes, open_input
    from .make import make

    sizes = ChunkSizes.parse(args.chunk_size) if args.chunk_size else DEFAULT_SIZES
    if not 1 <= args.level <= 22:
        raise CafuseError(f"bad --level {args.level}: zstd levels are 1..22")
    with open_input(args.file):  # a bad input is refused before the store is created
        pass
    store = remote_options(args).open(args.store, writable=True)
    threads = args.threads or (os.cpu_count() or 2 if store.is_local else REMOTE_CONCURRENCY)
    result = make(
        args.index,
        args.file,
        store,
        digest=args.digest,
        sizes=sizes,
        compression=args.compression,
        level=args.level,
        threads=threads,
        sync=args.sync,
    )
    print(result.summary(args.index))
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from .extract import extract

    index, source = _index_and_source(args)
    result = extract(
        index,
        args.output,
        source,
        in_place=args.in_place,
        threads=_concurrency(args, source.stores),
    )
    print(result.summary(args.output))
    _print_store_lines(source)
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    from .cat import cat

    index, source = _index_and_source(args)
    try:
        cat(
            index,
            source,
            sys.stdout.buffer,
            args.offset,
            args.length,
            threads=_concurrency(args, source.stores),
        )
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from .prefetch import fill_cache

    if not args.cache:
        raise CafuseError("cafuse cache needs --cache DIR: the directory to fill")
    index, source = _index_and_source(args)
    report = fill_cache(index, source, threads=_concurrency(args, source.stores))
    print(report.summary(args.cache))
    _print_store_lines(source)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .maintenance import index_info, store_presence
    from .resolve import load_index

    remote = remote_options(args)
    index = load_index(args.index, remote)
    info = index_info(index)
    for text in args.store or []:
        store = remote.open(text)
        info.setdefault("stores", {})[store.url] = store_presence(index, store)
    if args.json:
        print_json(info)
        return 0
    for line in _text_lines(info):
        print(line)
    return 0


def _text_lines(data: dict[str, object], indent: str = "") -> list[str]:
    """``key: value`` lines, nested dicts indented under their key (never a Python repr)."""
    lines = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines += _text_lines(value, indent + "  ")
        else:
            lines.append(f"{indent}{key}: {value}")
    return lines


LISTED = 10  # verify names at most this many chunks of each kind (-v: all)


def _listing(kind: str, names: list[str], verbose: bool) -> list[str]:
    """``  missing <id>`` lines, at most ``LISTED`` unless verbose, then how many more."""
    shown = names if verbose else names[:LISTED]
    lines = [f"  {kind} {name}" for name in shown]
    if len(names) > len(shown):
        lines.append(f"  ... and {len(names) - len(shown)} more {kind} (all of them with -v)")
    return lines


def cmd_verify(args: argparse.Namespace) -> int:
    from .maintenance import verify_all_copies, verify_store
    from .resolve import load_index

    remote = remote_options(args)
    store = remote.open(args.store)
    threads = _concurrency(args, [store])
    if args.index is None:
        report = verify_all_copies(store, repair=args.repair, threads=threads)
        what = "chunk files"
    else:
        index = load_index(args.index, remote)
        report = verify_store(index, store, repair=args.repair, threads=threads)
        what = "chunks"
    print(
        f"{store.url}: {report.checked} {what} checked, "
        + (f"{len(report.missing)} missing, " if args.index is not None else "")
        + f"{len(report.corrupt)} corrupt"
        + (f", {len(report.unreadable)} unreadable" if report.unreadable else "")
        + (f", {report.repaired} deleted" if args.repair else "")
    )
    for line in _listing("missing", [c.hex() for c in report.missing], args.verbose > 0):
        print(line)
    for line in _listing("corrupt", report.corrupt_copies, args.verbose > 0):
        print(line)
    if report.unreadable:
        raise CafuseError(
            f"store {store.url} did not answer for {len(report.unreadable)} chunks "
            f"(first {report.unreadable[0].hex()}: {report.first_error}): "
            "check the store, then verify again"
        )
    if not (report.missing or report.corrupt):
        return 0
    counts = ", ".join(
        f"{n} {kind}"
        for n, kind in ((len(report.missing), "missing"), (len(report.corrupt), "corrupt"))
        if n
    )
    if report.corrupt and not args.repair:
        hint = (
            "run verify with --repair to delete the corrupt copies"
            if store.writable
            else "fix them on the server (a read-only store cannot be repaired from here)"
        )
        if args.index is not None and store.writable:
            hint += ", then re-run make of this image to put them back"
    elif args.index is None:  # repaired: which indexes lack them now, only make can say
        hint = "re-run make of the images that use them to put them back"
    else:
        hint = "re-run make of this image, or copy the chunks back, to fill the store"
    target = f"for {args.index}" if args.index is not None else "(store-wide check)"
    raise CafuseError(f"store {store.url} is incomplete {target} ({counts}): {hint}")


def cmd_gc(args: argparse.Namespace) -> int:
    from .maintenance import collect_garbage
    from .resolve import load_index
    from .sizes import format_duration, parse_duration

    remote = remote_options(args)
    indexes = [load_index(path, remote) for path in args.indexes]
    store = remote.open(args.store)
    grace = parse_duration(args.grace, "--grace")
    report = collect_garbage(
        store, indexes, dry_run=args.dry_run, grace=grace, break_locks=args.break_locks
    )
    verb = "would delete" if args.dry_run else "deleted"
    print(
        f"{store.url}: kept {report.kept} chunks, {verb} {report.deleted}"
        + (
            f"; spared {report.young} unreferenced chunks younger than "
            f"{format_duration(grace)} (--grace)"
            if report.young
            else ""
        )
        + (f"; removed {report.temps} stale temporary files" if report.temps else "")
        + (f"; removed {len(report.broken)} make locks (--break-locks)" if report.broken else "")
    )
    if report.blocking:
        first = report.blocking[0]
        print(
            f"{store.url}: gc would refuse now: {len(report.blocking)} fresh make lock(s), "
            f"e.g. .cafuse-locks/{first.name} ({first.age:.0f} s old)"
            + ("; --break-locks would remove them" if args.break_locks else "")
        )
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cafuse",
        description="casync-compatible chunk stores and indexes, mounted lazily through FUSE.",
    )
    parser.add_argument("--version", action="version", version=f"cafuse {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (repeat for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    p = sub.add_parser("make", help="chunk an image into a store and write its index")
    p.add_argument("index", metavar="INDEX", help="index file to write (.caibx)")
    p.add_argument("file", metavar="FILE", help="image file or block device to read")
    p.add_argument(
        "--store",
        "-s",
        required=True,
        help="chunk store to write to: a directory or s3://bucket/prefix",
    )
    p.add_argument(
        "--digest",
        choices=("blake3", "sha512-256", "sha256"),
        default="blake3",
        help="chunk id digest; sha512-256 or sha256 for casync/desync (default: %(default)s)",
    )
    p.add_argument(
        "--chunk-size",
        metavar="[MIN:]AVG[:MAX]",
        help=f"chunk sizes, e.g. 64K or 16K:64K:256K (default: {defaults.CHUNK_SIZES})",
    )
    p.add_argument(
        "--compression",
        choices=("zstd", "none"),
        default="zstd",
        help="zstd: <id>.cacnk files; none: bare <id> files, as casync and desync keep "
        "uncompressed chunks (default: %(default)s)",
    )
    p.add_argument(
        "--level", type=int, default=defaults.ZSTD_LEVEL, help="zstd level (default: %(default)s)"
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        help="hashing/compression/upload threads (default: one per core, 16 for a remote store)",
    )
    p.add_argument(
        "--sync",
        action="store_true",
        help="flush the store to disk before writing the index (power-cut safe)",
    )
    add_remote_options(p, cache=False)
    p.set_defaults(handler=cmd_make)

    p = sub.add_parser("extract", help="rebuild an image from its index")
    p.add_argument("index", metavar="INDEX", help="index file or URL")
    p.add_argument("output", metavar="OUTPUT", help="file or block device to write")
    add_source_options(p)
    p.add_argument(
        "--in-place",
        action="store_true",
        help="write into OUTPUT directly, keeping chunks it already holds. Not atomic: "
        "if killed midway, OUTPUT is a mix of old and new bytes under its final name; "
        "running the same extract again repairs it",
    )
    p.set_defaults(handler=cmd_extract)

    p = sub.add_parser("cat", help="write (part of) an image to stdout")
    p.add_argument("index", metavar="INDEX", help="index file or URL")
    add_source_options(p)
    p.add_argument(
        "--offset", type=size, default=0, metavar="SIZE", help="first byte (e.g. 1M; default 0)"
    )
    p.add_argument(
        "--length", type=size, default=None, metavar="SIZE", help="bytes (default: to the end)"
    )
    p.set_defaults(handler=cmd_cat)

    p = sub.add_parser("cache", help="fetch every chunk an index needs into --cache DIR")
    p.add_argument("index", metavar="INDEX", help="index file or URL")
    add_source_options(p, seeds=False)
    p.set_defaults(handler=cmd_cache)

    p = sub.add_parser("info", help="describe an index (and what a store holds of it)")
    p.add_argument("index", metavar="INDEX", help="index file or URL")
    p.add_argument("--store", "-s", action="append", metavar="STORE", help="count what STORE holds")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_remote_options(p, cache=False)
    p.set_defaults(handler=cmd_info)

    p = sub.add_parser(
        "verify",
        help="check every chunk of an index in a store (or, with no index, every chunk file)",
    )
    p.add_argument(
        "index",
        metavar="INDEX",
        nargs="?",
        help="index file or URL; without one, every chunk file of the store is checked "
        "(bare and .cacnk, each copy on its own), as desync verify does",
    )
    p.add_argument("--store", "-s", required=True, metavar="STORE", help="store to check")
    p.add_argument("--repair", action="store_true", help="delete corrupt copies")
    add_concurrency_option(p, "chunks checked at once")
    add_remote_options(p, cache=False)
    p.set_defaults(handler=cmd_verify)

    p = sub.add_parser(
        "gc",
        help="delete chunks that no given index references",
        description="Delete the chunks of STORE that no given INDEX references and that are "
        "older than --grace. Safe beside a make writing to the same store. On a local store "
        "make refreshes the mtime of every chunk it reuses and writes new ones with a fresh "
        "mtime, so a chunk a running make needs is never older than the grace period. On "
        "S3, GCS and Azure make and gc take store locks (objects under "
        "STORE/.cafuse-locks/) and exclude each other: gc refuses to start while a make "
        "holds a fresh lock (one rewritten in the last 30 minutes), and make refuses while "
        "gc runs. A killed process's lock goes stale after 30 minutes; --break-locks "
        "removes make locks at once. casync, desync and older cafuse take no lock: the "
        "grace period is what protects their uploads. Also removes temporary files that "
        "killed writers left (older than an hour).",
    )
    p.add_argument("store", metavar="STORE")
    p.add_argument("indexes", metavar="INDEX", nargs="+")
    p.add_argument(
        "--dry-run",
        "-n",
        action="store_true",
        help="only count, take no lock, and say whether a make's lock would stop gc",
    )
    p.add_argument(
        "--grace",
        default=defaults.GC_GRACE,
        metavar="DURATION",
        help="spare unreferenced chunks written or reused less than this long ago: longer "
        "than any make takes, and than any casync or desync upload to the store, which "
        "takes no lock (seconds, or 30m, 2h, 1d; default: %(default)s). 0 is safe only "
        "when nothing writes to the store",
    )
    p.add_argument(
        "--break-locks",
        action="store_true",
        help="S3, GCS, Azure: remove every make lock in the store, however fresh, before "
        "collecting. Only after checking that no make is running (a killed one's lock "
        "otherwise goes stale after 30 minutes)",
    )
    add_remote_options(p, cache=False)
    p.set_defaults(handler=cmd_gc)

    from .mount.cli import add_mount_commands  # light: no pyfuse3 import at this point

    add_mount_commands(sub)

    from .profile import add_profile_command

    add_profile_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="cafuse: %(message)s")
    handler: Handler = args.handler
    try:
        return handler(args)
    except CafuseError as exc:
        print(f"cafuse: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cafuse: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
