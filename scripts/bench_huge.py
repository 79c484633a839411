"""The ``huge`` section of scripts/bench.py: indexes of 1 and 16 million chunks (issue 9).

A synthetic index whose ids cycle through 300 real chunks (16 KiB to 256 KiB, random
bytes) in a local store; 16 million items describe a ~2 TB image in a 640 MB ``.caibx``.
For each size, locally and by URL (nginx on loopback): how long ``cafuse mount`` takes to
return with the mount live and the daemon's RSS; by URL the index bytes nginx sent at
start and for 200 random reads (1 B to 1 MiB, bytes checked against the chunks); time and
peak RSS of ``cafuse info``; and the time of ``cafuse cat --offset`` near the end by URL.

The index and store are made in ``/var/tmp/cafuse-huge`` (not the repo, not tmpfs) and
removed afterwards unless --keep.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from mounting import unmount  # noqa: E402  (the tests' implementations, shared)
from servers import nginx_bytes_sent, nginx_serving  # noqa: E402
from synthetic import expected_bytes, make_chunks, write_cycling_index  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from bench_throughput import daemon_rss_mb  # noqa: E402

PYTHON = str(ROOT / ".venv/bin/python")
CAFUSE = [PYTHON, "-m", "cafuse"]
WORK = Path("/var/tmp/cafuse-huge")
SIZES = (1_000_000, 16_000_000)
READS = 200


class Report(Protocol):
    extra: dict[str, object]

    def add(self, *args: object, **kwargs: object) -> None: ...


def cafuse(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CAFUSE, *map(str, args)], check=True, text=True, capture_output=True, timeout=900
    )


def measured(*args: object) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, stdout) of a cafuse command, by /usr/bin/time."""
    started = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M", *CAFUSE, *map(str, args)],
        check=True,
        capture_output=True,
        timeout=900,
    )
    seconds = time.perf_counter() - started
    rss = int(proc.stderr.decode().strip().splitlines()[-1]) / 1024
    return seconds, rss, proc.stdout.decode(errors="replace")


@contextlib.contextmanager
def mounted(index: object, mnt: Path, *args: object) -> Iterator[tuple[Path, float]]:
    """The blob's path and how long ``cafuse mount`` took to return with the mount live."""
    mnt.mkdir(exist_ok=True)
    started = time.perf_counter()
    cafuse("mount", index, mnt, *args)
    seconds = time.perf_counter() - started
    try:
        (name,) = os.listdir(mnt)
        yield mnt / name, seconds
    finally:
        unmount(mnt)


def random_reads(blob: Path, table, chunks, choice, seed: int) -> int:
    """200 reads of 1 B to 1 MiB at random offsets, each checked; returns bytes read."""
    rng = random.Random(seed)
    fd = os.open(blob, os.O_RDONLY)
    total = 0
    try:
        for _ in range(READS):
            offset = rng.randrange(table.blob_size)
            size = rng.randrange(1, (1 << 20) + 1)
            got = os.pread(fd, size, offset)
            if got != expected_bytes(table, chunks, choice, offset, size):
                raise RuntimeError(f"wrong bytes at {offset} (+{size}) of {blob}")
            total += len(got)
    finally:
        os.close(fd)
    return total


def bench_huge(report: Report, keep: bool = False, sizes: tuple[int, ...] = SIZES) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {}
    try:
        store = WORK / "store"
        shutil.rmtree(store, ignore_errors=True)
        chunks = make_chunks(store, 300, 16 << 10, 256 << 10)
        with nginx_serving(WORK, WORK / "nginx") as server:
            access_log = server.workdir / "access.log"
            for n in sizes:
                results[str(n)] = one_size(n, chunks, store, server.url, access_log, report)
                for name in ("huge.caibx",):
                    (WORK / name).unlink(missing_ok=True)
    finally:
        if not keep:
            shutil.rmtree(WORK, ignore_errors=True)
    report.extra["huge"] = results


def one_size(n: int, chunks, store: Path, url: str, access_log: Path, report: Report) -> dict:
    from cafuse.index import read_index

    label = f"{n // 1_000_000}M"
    index = WORK / "huge.caibx"
    started = time.perf_counter()
    choice = write_cycling_index(index, chunks, n, 16 << 10, 64 << 10, 256 << 10, seed=n)
    made = time.perf_counter() - started
    size_mb = index.stat().st_size / 1e6
    table = read_index(index)
    print(f"  huge: {label}-chunk index, {size_mb:.0f} MB, made in {made:.1f} s", flush=True)
    out: dict[str, object] = {"index_mb": size_mb, "image_bytes": table.blob_size}
    mnt = WORK / "mnt"

    # local
    with mounted(index, mnt, "--store", store) as (blob, seconds):
        rss = daemon_rss_mb(mnt)
        random_reads(blob, table, chunks, choice, seed=1)
        rss_after = daemon_rss_mb(mnt)
    out["local"] = {"mount_s": seconds, "rss_mb": rss, "rss_after_reads_mb": rss_after}
    report.add(
        f"huge index, {label} chunks ({size_mb:.0f} MB .caibx): mount start-up, local file",
        f"{seconds:.2f} s, {rss:.0f} MB RSS",
        "-",
        None,
        "< 1 s, < 150 MB",
        f"daemon RSS {rss_after:.0f} MB after {READS} random reads of 1 B-1 MiB (bytes checked)",
    )

    # by URL
    access_log.write_text("")
    with mounted(f"{url}/huge.caibx", mnt, "--store", store) as (blob, seconds):
        at_start = nginx_bytes_sent(access_log, "huge.caibx")
        rss = daemon_rss_mb(mnt)
        random_reads(blob, table, chunks, choice, seed=2)
        reads = nginx_bytes_sent(access_log, "huge.caibx") - at_start
        rss_after = daemon_rss_mb(mnt)
    out["url"] = {
        "mount_s": seconds,
        "rss_mb": rss,
        "index_bytes_at_start": at_start,
        "index_bytes_200_reads": reads,
        "rss_after_reads_mb": rss_after,
    }
    report.add(
        f"huge index, {label} chunks: mount start-up by URL (nginx)",
        f"{seconds:.2f} s, {rss:.0f} MB RSS, {at_start / 1e3:.0f} kB of index sent",
        "-",
        None,
        "< 150 MB, < 2 MB of index",
        "time until `cafuse mount` returns with the mount live",
    )
    report.add(
        f"huge index, {label} chunks: index fetched by {READS} random reads by URL",
        f"{reads / 1e6:.1f} MB ({reads / READS / 1e3:.0f} kB a read)",
        "-",
        None,
        "< 20 MB",
        f"reads of 1 B-1 MiB at random offsets, bytes checked; daemon RSS {rss_after:.0f} MB after",
    )

    # info, local and by URL
    for where, source in (("local", index), ("by URL", f"{url}/huge.caibx")):
        seconds, rss, _ = measured("info", source, "--json")
        out[f"info {where}"] = {"seconds": seconds, "rss_mb": rss}
        report.add(
            f"huge index, {label} chunks: `cafuse info`, {where}",
            f"{seconds:.1f} s, {rss:.0f} MB peak RSS",
            "-",
            None,
            "< 10 s, < 200 MB",
            "one pass over the table in batches",
        )

    # cat near the end, by URL
    access_log.write_text("")
    offset = table.blob_size - (3 << 20)
    seconds, rss, _ = measured(
        "cat", f"{url}/huge.caibx", "--store", store, "--offset", offset, "--length", 1 << 20
    )
    fetched = nginx_bytes_sent(access_log, "huge.caibx")
    out["cat_end_url"] = {"seconds": seconds, "rss_mb": rss, "index_bytes": fetched}
    report.add(
        f"huge index, {label} chunks: `cafuse cat --offset` 1 MiB near the end, by URL",
        f"{seconds:.2f} s",
        "-",
        None,
        "< 1 s",
        f"{fetched / 1e3:.0f} kB of index fetched; peak RSS {rss:.0f} MB",
    )
    table.close()
    return out


def main() -> None:
    """Run the section alone: ``.venv/bin/python scripts/bench_huge.py``."""

    class Printed:
        def __init__(self) -> None:
            self.extra: dict[str, object] = {}

        def add(self, *args: object, **kwargs: object) -> None:
            print("  " + " | ".join(str(a) for a in args), flush=True)

    sizes = tuple(int(a) for a in sys.argv[1:] if a.isdigit()) or SIZES
    bench_huge(Printed(), keep="--keep" in sys.argv, sizes=sizes)


if __name__ == "__main__":
    main()
