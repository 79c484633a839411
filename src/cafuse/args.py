"""What every command line of cafuse shares: the parser class, value types, the argument
groups of stores, seeds and remote access, and ``print_json``.

A leaf: ``cli`` and ``mount.cli`` both import it and neither imports the other's commands.
Defaults come from ``cafuse.defaults`` and the help shows them as they are. Adding an
option to a group is one ``add_argument`` here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

from . import defaults
from .errors import CafuseError

log = logging.getLogger(__name__)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem and where to look."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.partition(" ")[2]
        where = f"{command}: " if command else ""
        self.exit(2, f"cafuse: error: {where}{message} (see {self.prog} --help)\n")


def count(minimum: int) -> Callable[[str], int]:
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


positive_int = count(1)
nonnegative_int = count(0)


def size(text: str) -> int:
    """A byte count with an optional K/M/G/T suffix, as every size option takes."""
    from .sizes import parse_size

    try:
        return parse_size(text)
    except CafuseError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def print_json(data: object) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def add_remote_options(p: argparse.ArgumentParser, cache: bool = True) -> None:
    """--timeout, --retries, --s3-*, and (for readers) --cache, --cache-size.

    Defaults are left None and filled by ``remote_options``/the mount options, so that a
    mount's ``-o timeout=`` is not overridden by a default; the help says the real value.
    """
    g = p.add_argument_group("remote stores")
    g.add_argument(
        "--timeout",
        type=positive_float,
        metavar="SECONDS",
        help="deadline for one chunk, every store and retry included; one request gets at "
        f"most a third of it; a mount fails a read with EIO past it "
        f"(default: {defaults.TIMEOUT:g})",
    )
    g.add_argument(
        "--retries",
        type=nonnegative_int,
        metavar="N",
        help="most retry rounds for one chunk after network errors, timeouts, 5xx, 429 or "
        f"corrupt transfers, within --timeout (default: {defaults.RETRIES})",
    )
    g.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL, else AWS)",
    )
    g.add_argument(
        "--s3-region", metavar="REGION", help="S3 region (default: $AWS_REGION, else us-east-1)"
    )
    if cache:
        g.add_argument(
            "--cache",
            metavar="DIR",
            help="local chunk cache in front of the stores, shared by processes (default: none)",
        )
        g.add_argument(
            "--cache-size",
            metavar="SIZE",
            help="bound of the cache; least recently used chunks go first "
            f"(default: {defaults.CACHE_SIZE})",
        )


def add_store_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        "-s",
        action="append",
        metavar="STORE",
        help="chunk store (path or URL; A|B is a failover group); repeat to try "
        "several in order (default: default.castr next to the index)",
    )


def add_seed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seed",
        action="append",
        metavar="SEED_INDEX:SEED_FILE",
        help="local image whose chunks are used before any store; repeatable. One that "
        "cannot be used (missing, shorter than its index) is skipped with a warning",
    )
    p.add_argument(
        "--seed-dir",
        action="append",
        metavar="DIR",
        help="every NAME.caibx in DIR is a seed, its file NAME beside it (as desync "
        "--seed-dir); repeatable",
    )


def add_concurrency_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--concurrency",
        "--threads",
        dest="concurrency",
        type=positive_int,
        metavar="N",
        help=f"{what} (default: {defaults.REMOTE_CONCURRENCY} with remote stores, "
        "2 per core otherwise)",
    )


def add_source_options(p: argparse.ArgumentParser, seeds: bool = True) -> None:
    """Where a reading job gets chunks: stores, seeds, concurrency, remote options."""
    add_store_option(p)
    if seeds:
        add_seed_options(p)
    add_concurrency_option(p, "chunks in flight")
    add_remote_options(p)


def seed_specs(args: argparse.Namespace) -> list[str]:
    """``--seed`` specs, then those of every ``--seed-dir``."""
    specs = list(getattr(args, "seed", None) or [])
    for directory in getattr(args, "seed_dir", None) or []:
        specs += specs_in_dir(directory)
    return specs


def specs_in_dir(directory: str) -> list[str]:
    """``--seed-dir``: every ``NAME.caibx`` in ``directory`` paired with ``NAME`` beside it
    (desync's convention), as absolute ``SEED_INDEX:SEED_FILE`` specs."""
    directory = os.path.abspath(directory)
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise CafuseError(f"--seed-dir {directory}: cannot list: {exc.strerror}") from None
    specs = [
        f"{directory}/{name}:{directory}/{name[: -len('.caibx')]}"
        for name in names
        if name.endswith(".caibx") and len(name) > len(".caibx")
    ]
    if not specs:
        log.warning("--seed-dir %s holds no .caibx index: no seeds from it", directory)
    return specs
