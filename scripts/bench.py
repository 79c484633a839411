"""Side-by-side benchmarks of cafuse against casync (and against pyfuse3's own ceiling).

Every comparison runs in one process run, on the same images, on the same machine, and the
results table in docs/benchmarks.md is written from what this run measured.

The harness is ``benchkit``; sections live in modules of their own (``bench_local``,
``bench_remote``, ``bench_faults``, ...). A new section is a module plus its name in
``SECTIONS`` and one call in ``main``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_local import (
    bench_extract,
    bench_make,
    bench_mount,
    bench_startup,
    bench_update,
    prepare_stores,
)
from bench_remote import bench_http, bench_wan
from benchkit import (
    ROOT,
    Report,
    Row,
    build_images,
    default_work_dir,
    plot,
)
from benchkit import write_markdown as _write_markdown

SECTIONS = (
    *("make", "extract", "update", "mount", "startup", "http", "wan", "faults", "soak"),
    "boot",
    "huge",
)


def bench_faults(work: Path, size_mb: int, timeouts: str, report: Report) -> None:
    """Stores that fail (scripts/bench_faults.py), on a small image of its own: a Python
    server that misbehaves on purpose cannot serve the main image in useful time."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_faults import bench_faults as run
    from bench_faults import build_image

    image = build_image(work / "faults", size_mb)
    run(work / "faults", image, report, tuple(float(t) for t in timeouts.split(",")))


def bench_soak(minutes: float, report: Report) -> None:
    """scripts/soak.py: 8 readers of a mount through a store failing 10% of requests."""
    proc = subprocess.run(
        [str(ROOT / ".venv/bin/python"), str(ROOT / "scripts/soak.py"), "--minutes", str(minutes)],
        capture_output=True,
        text=True,
    )
    print(proc.stdout[-2000:], flush=True)
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    report.add(
        f"soak: {summary['readers']} readers for {minutes:g} min through a store failing "
        f"{summary['fault_rate']:.0%} of requests",
        f"{summary['reads']} reads, {summary['wrong_reads']} wrong, {summary['eio']} EIO",
        "0 wrong, 0 EIO",
        None,
        "0 wrong bytes, 0 EIO, flat memory",
        f"daemon RSS {summary['rss_mb_first']:.0f} MB at start, "
        f"{summary['rss_mb_settled_min']:.0f}-{summary['rss_mb_settled_max']:.0f} MB after "
        f"the first fifth, {summary['rss_mb_last']:.0f} MB at the end; "
        f"{summary['store_requests']} store requests, faults served "
        f"{summary['faults_served']}, {summary['hedged']} hedged",
    )
    report.extra["soak"] = summary


def write_markdown(
    report: Report, args: argparse.Namespace, v1: Path | None, seconds: float
) -> None:
    _write_markdown(report, args, v1, seconds, SECTIONS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=1200, help="image size (default 1200)")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections from {','.join(SECTIONS)}",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=default_work_dir(),
        help="work directory (default: tmpfs when it has room)",
    )
    parser.add_argument(
        "--faults-size-mb",
        type=int,
        default=80,
        help="image size for the faults section (default 80)",
    )
    parser.add_argument(
        "--faults-timeouts",
        default="30,6",
        help="--timeout values for the dark-store rows (default 30,6; 30 is cafuse's default)",
    )
    parser.add_argument(
        "--soak-minutes", type=float, default=10.0, help="length of the soak (default 10)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--replot",
        action="store_true",
        help="only redraw docs/benchmarks.png from docs/benchmarks.json",
    )
    args = parser.parse_args()
    if args.replot:
        saved = json.loads((ROOT / "docs" / "benchmarks.json").read_text())
        plot(Report([Row(**row) for row in saved["rows"]], saved["extra"]))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report = Report()
    only = set(args.only.split(","))
    v1 = v2 = None
    if only - {"faults", "soak", "boot", "huge"}:
        print(f"bench: building images in {args.work}", flush=True)
        v1, v2 = build_images(args.work, args.size_mb)
    if "make" in only:
        bench_make(args.work, v1, report)
    if only & {"extract", "update", "mount", "http", "wan"}:
        prepare_stores(args.work, v1, v2)
    if "extract" in only:
        bench_extract(args.work, v1, report)
    if "update" in only:
        bench_update(args.work, v1, v2, report)
    if "mount" in only:
        bench_mount(args.work, v1, report)
    if "startup" in only:
        bench_startup(args.work, report)
    if "http" in only:
        bench_http(args.work, v1, report)
    if "wan" in only:
        bench_wan(args.work, v1, report)
    if "faults" in only:
        bench_faults(args.work, args.faults_size_mb, args.faults_timeouts, report)
    if "soak" in only:
        bench_soak(args.soak_minutes, report)
    if "boot" in only:  # boot profiles and fill (scripts/bench_boot.py), an image of its own
        from bench_boot import bench_boot

        report.extra["boot"] = bench_boot(args.work / "boot", report)
    if "huge" in only:  # 1M and 16M-chunk indexes (scripts/bench_huge.py), in /var/tmp
        from bench_huge import bench_huge

        bench_huge(report, keep=args.keep)
    write_markdown(report, args, v1, time.monotonic() - started)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
