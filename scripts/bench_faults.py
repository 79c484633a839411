"""The ``faults`` section of scripts/bench.py: cafuse's fetch path against stores that fail.

Three questions from issue 7, each measured on a small ext4 image of its own (a Python
server that misbehaves on purpose cannot serve the main 1.2 GiB image in useful time):

1. a store failing 20% of GETs in five ways against the same server failing none: extract
   and a full read of the mount, bytes checked by sha256, retries and errors counted;
2. a dark first store (accepts connections, never answers) before a good one: extract and
   a full read of the mount, against the good store alone, with the issue's bound of
   3x the good-only time plus two --timeouts;
3. the latency of on-demand 4 KiB reads of chunks not yet fetched, through a WAN-like
   proxy, with and without a sequential reader streaming the file at the same time.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
from helpers import build_tree, mkfs_ext4, sha256_file  # noqa: E402  (the tests' implementations, shared)
from mounting import drop_page_cache, unmount  # noqa: E402
from servers import Faults, dark_listener, faulty_server, free_port, nginx_serving  # noqa: E402
from wanproxy import WanProxy  # noqa: E402

from cafuse.mount import STATS_XATTR  # noqa: E402

CAFUSE = [str(ROOT / ".venv/bin/python"), "-m", "cafuse"]
FIVE_FAULTS = ("500", "reset", "stall", "truncate", "wrong")
DEFAULT_TIMEOUT = 30.0  # cafuse's --timeout default


class Report(Protocol):
    def add(self, *args: object, **kwargs: object) -> None: ...


def cafuse(*args: object, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*CAFUSE, *map(str, args)], text=True, capture_output=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"cafuse {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}"
        )
    return proc


@contextlib.contextmanager
def mounted(index: object, mnt: Path, *args: object) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    cafuse("mount", index, mnt, *args)
    try:
        (name,) = os.listdir(mnt)
        yield mnt / name
    finally:
        unmount(mnt)


def mount_stats(mnt: Path) -> dict:
    return json.loads(cafuse("stats", mnt, "--json").stdout)


def hashed_read(path: Path) -> str:
    """sha256 of the whole file, read in 1 MiB reads (the same for every row)."""
    return sha256_file(path)


def summary(stdout: str, url: str) -> tuple[int, str, int]:
    """(retries, errors, times the breaker opened) from the extract summary line of
    store ``url``."""
    for line in stdout.splitlines():
        if line.startswith(f"store {url}:"):
            match = re.search(r"(\d+) retries, errors: ([^;]*);", line)
            opened = re.search(r"\(opened (\d+)x\)", line)
            if match:
                return int(match.group(1)), match.group(2), int(opened.group(1)) if opened else 0
    raise RuntimeError(f"no summary line for {url} in:\n{stdout}")


def store_counts(stats: dict, url: str) -> tuple[int, str, int]:
    s = stats["stores"][url]
    errors = ", ".join(f"{k} {n}" for k, n in sorted(s["errors"].items())) or "none"
    return s["retries"], errors, s["times_opened"]


def stalls(faults: Faults) -> int:
    return faults.faults.count("stall")


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


# ------------------------------------------------------------------ 1. a 20%-faulty store


def bench_faulty_store(work: Path, image: Path, index: Path, store: Path, report: Report) -> None:
    want = sha256_file(image)
    out = work / "out.img"
    runs: dict[str, list[tuple[float, int, str, int, int]]] = {"faulty": [], "clean": []}
    for seed in (1, 2, 3):
        for kind in ("faulty", "clean"):
            faults = (
                Faults(rate=0.2, kinds=FIVE_FAULTS, stall_seconds=3, get_only=True, seed=seed)
                if kind == "faulty"
                else Faults(get_only=True)
            )
            out.unlink(missing_ok=True)
            with faulty_server(store.parent, faults) as url:
                started = time.perf_counter()
                proc = cafuse("extract", index, out, "--store", f"{url}/{store.name}")
                seconds = time.perf_counter() - started
                retries, errors, opened = summary(proc.stdout, f"{url}/{store.name}")
            if sha256_file(out) != want:
                raise RuntimeError(f"extract through the {kind} store: wrong bytes")
            runs[kind].append((seconds, retries, errors, opened, stalls(faults)))
            print(f"    extract {kind} seed {seed}: {runs[kind][-1]}")
    out.unlink(missing_ok=True)
    faulty, clean = min(runs["faulty"]), min(runs["clean"])
    worst = max(r[0] for r in runs["faulty"])
    report.add(
        "faults: extract through a store failing 20% of GETs (500, reset, 3 s stall, "
        "truncate, wrong bytes; HEAD refused)",
        f"{faulty[0]:.2f} s",
        f"{clean[0]:.2f} s (same server, no faults)",
        clean[0] / faulty[0],
        "same sha256 (info)",
        f"(sha256 identical to the image in all 6 runs; best of 3 seeds, worst "
        f"{worst:.2f} s; best run: {faulty[1]} retries, errors: {faulty[2]}, "
        f"{faulty[4]} of them 3 s stalls; breaker opened {faulty[3]}x)",
    )
    # a full sequential read of the mount through each
    reads: dict[str, tuple[float, int, int, str, int, int]] = {}
    for kind in ("faulty", "clean"):
        faults = (
            Faults(rate=0.2, kinds=FIVE_FAULTS, stall_seconds=3, get_only=True, seed=1)
            if kind == "faulty"
            else Faults(get_only=True)
        )
        with faulty_server(store.parent, faults) as url:
            surl = f"{url}/{store.name}"
            started = time.perf_counter()
            with mounted(index, work / "mnt", "--store", surl) as blob:
                digest = hashed_read(blob)
                seconds = time.perf_counter() - started
                stats = mount_stats(work / "mnt")
            if digest != want:
                raise RuntimeError(f"full read through the {kind} store: wrong bytes")
            retries, errors, opened = store_counts(stats, surl)
            reads[kind] = (
                seconds,
                stats["reads"]["failed"],
                retries,
                errors,
                opened,
                stalls(faults),
            )
            print(f"    mount read {kind}: {reads[kind]}")
    f, c = reads["faulty"], reads["clean"]
    report.add(
        "faults: mount + full sequential read through the 20%-faulty store",
        f"{f[0]:.2f} s",
        f"{c[0]:.2f} s (same server, no faults)",
        c[0] / f[0],
        "same sha256, 0 failed reads (info)",
        f"(sha256 identical; failed reads {f[1]} faulty, {c[1]} clean; "
        f"faulty store: {f[2]} retries, errors: {f[3]}, {f[5]} of them 3 s stalls; "
        f"breaker opened {f[4]}x; one run each)",
    )


# ------------------------------------------------------------------ 2. a dark first store


def bench_dark_store(
    work: Path, image: Path, index: Path, store: Path, report: Report, timeouts: tuple[float, ...]
) -> None:
    want = sha256_file(image)
    out = work / "out.img"
    mnt = work / "mnt"
    with nginx_serving(store.parent, work / "nginx") as nginx:
        good = f"{nginx.url}/{store.name}"

        def extract(*stores: str, extra: tuple[object, ...] = ()) -> float:
            out.unlink(missing_ok=True)
            args = [a for s in stores for a in ("--store", s)]
            seconds = timed(lambda: cafuse("extract", index, out, *args, *extra))
            if sha256_file(out) != want:
                raise RuntimeError(f"extract from {stores}: wrong bytes")
            return seconds

        def mount_read(*stores: str, extra: tuple[object, ...] = ()) -> tuple[float, float, int]:
            """(seconds from `cafuse mount` to the last byte read, of which mount, failed)"""
            args = [a for s in stores for a in ("--store", s)]
            started = time.perf_counter()
            with mounted(index, mnt, *args, *extra) as blob:
                t_mount = time.perf_counter() - started
                digest = hashed_read(blob)
                seconds = time.perf_counter() - started
                failed = mount_stats(mnt)["reads"]["failed"]
            if digest != want:
                raise RuntimeError(f"mount read from {stores}: wrong bytes")
            return seconds, t_mount, failed

        t_good = min(extract(good) for _ in range(3))
        m_good = min(mount_read(good) for _ in range(3))
        print(f"    GOOD only: extract {t_good:.2f} s, mount read {m_good[0]:.2f} s")
        for timeout in timeouts:
            extra: tuple[object, ...] = () if timeout == DEFAULT_TIMEOUT else ("--timeout", timeout)
            label = "default --timeout 30" if not extra else f"--timeout {timeout:g}"
            with dark_listener() as dark:
                t_dark = extract(dark.url, good, extra=extra)
                conns_extract = dark.connections
                m_dark = mount_read(dark.url, good, extra=extra)
                conns_mount = dark.connections - conns_extract
            print(
                f"    DARK+GOOD {label}: extract {t_dark:.2f} s ({conns_extract} conns), "
                f"mount read {m_dark} ({conns_mount} conns)"
            )
            bound = 3 * t_good + 2 * timeout
            report.add(
                f"faults: extract, --store DARK --store GOOD ({label})",
                f"{t_dark:.2f} s",
                f"bound {bound:.1f} s = 3 x {t_good:.2f} s (GOOD only) + 2 x {timeout:g} s",
                bound / t_dark,
                ">= 1x (within the bound)",
                f"(DARK accepts and never answers; it got {conns_extract} connections; "
                f"same sha256)",
            )
            bound = 3 * m_good[0] + 2 * timeout
            report.add(
                f"faults: mount + full read, --store DARK --store GOOD ({label})",
                f"{m_dark[0]:.2f} s",
                f"bound {bound:.1f} s = 3 x {m_good[0]:.2f} s (GOOD only) + 2 x {timeout:g} s",
                bound / m_dark[0],
                ">= 1x (within the bound)",
                f"(`cafuse mount` returned after {m_dark[1]:.2f} s, GOOD only {m_good[1]:.2f} "
                f"s; DARK got {conns_mount} connections; {m_dark[2]} failed reads; "
                f"same sha256)",
            )
    out.unlink(missing_ok=True)


# ------------------------------------------------------------------ 3. on-demand latency


class Streamer(threading.Thread):
    """Reads ``path`` sequentially from the start in 1 MiB reads until told to stop."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.position = 0
        self.stop = threading.Event()

    def run(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            while not self.stop.is_set():
                data = os.read(fd, 1 << 20)
                if not data:
                    return
                self.position += len(data)
        finally:
            os.close(fd)


def cold_chunks(index_path: Path) -> list[tuple[int, int]]:
    """(start, size) of chunks that are not zeros and whose id occurs once in the index:
    a read there must be fetched from the store, no other read can have brought it."""
    import numpy as np

    from cafuse.index import read_index

    index = read_index(index_path)
    ids = np.ascontiguousarray(index.ids).view("V32").reshape(-1)
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    unique = (counts[inverse] == 1) & ~index.zero_mask
    starts, sizes = index.starts, index.sizes
    return [(int(starts[i]), int(sizes[i])) for i in np.flatnonzero(unique)]


def one_read(blob: Path, offset: int) -> float:
    """Seconds for one 4 KiB pread at ``offset`` on a fresh descriptor, page cache dropped."""
    drop_page_cache(blob)
    fd = os.open(blob, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel readahead around it
        started = time.perf_counter()
        os.pread(fd, 4096, offset)
        return time.perf_counter() - started
    finally:
        os.close(fd)


def sample_reads(
    blob: Path,
    chunks: list[tuple[int, int]],
    used: set[int],
    rng: random.Random,
    count: int,
    ahead_of: Streamer | None = None,
    margin: int = 16 << 20,
) -> list[float]:
    """Up to ``count`` reads of random chunks not read before; with a streamer, only chunks
    past its readahead window (what the mount has requested ahead of it, from its stats
    before each read, plus 4 MiB for what the window may add meanwhile), and at least
    ``margin`` bytes ahead: a read inside the window waits for a readahead fetch already
    under way, not for a fetch of its own."""
    latencies = []
    while len(latencies) < count:
        floor = (
            ahead_of.position + max(margin, readahead_front(blob) + (4 << 20)) if ahead_of else 0
        )
        candidates = [c for c in chunks if c[0] >= floor and c[0] not in used]
        if not candidates or (ahead_of and not ahead_of.is_alive()):
            break
        start, size = rng.choice(candidates)
        used.add(start)
        offset = start + rng.randrange(0, max(1, size - 4096)) // 4096 * 4096
        latencies.append(one_read(blob, min(offset, start + size - 1)))
        time.sleep(0.05)
    return latencies


def readahead_front(blob: Path) -> int:
    """Bytes the mount has requested ahead of its sequential readers (the largest stream's)."""
    stats = json.loads(os.getxattr(blob, STATS_XATTR))
    streams = stats.get("readahead", {}).get("streams", {})
    return max((stream["in_flight"] for stream in streams.values()), default=0)


def percentile(values: list[float], p: float) -> float:
    import numpy as np

    return float(np.percentile(values, p)) * 1000


def bench_ondemand_latency(
    work: Path, index: Path, store: Path, report: Report, samples: int = 60
) -> None:
    chunks = cold_chunks(index)
    with nginx_serving(work, work / "nginx-wan") as nginx:
        port = free_port()
        proxy = WanProxy(port, nginx.port, delay=0.020, rate=100e6 / 8).start()
        wan = f"http://127.0.0.1:{port}"
        try:
            args = (f"{wan}/{index.name}", work / "mnt", "--store", f"{wan}/{store.name}")
            rng = random.Random(11)
            with mounted(*args) as blob:
                idle = sample_reads(blob, chunks, set(), rng, samples)
                idle_stats = mount_stats(work / "mnt")
            busy: list[float] = []
            rounds = 0
            while len(busy) < samples and rounds < 8:  # a fresh mount (cold) each round
                rounds += 1
                with mounted(*args) as blob:
                    stream = Streamer(blob)
                    stream.start()
                    while stream.position < (1 << 20) and stream.is_alive():
                        time.sleep(0.01)
                    started = time.perf_counter()
                    got = sample_reads(
                        blob, chunks, set(), rng, min(20, samples - len(busy)), ahead_of=stream
                    )
                    elapsed = time.perf_counter() - started
                    stream.stop.set()
                    stream.join(60)
                    busy_stats = mount_stats(work / "mnt")
                busy += got
                print(
                    f"    round {rounds}: {len(got)} reads, stream at "
                    f"{stream.position / elapsed / 1e6:.1f} MB/s"
                )
        finally:
            proxy.stop()
    i50, i99 = percentile(idle, 50), percentile(idle, 99)
    b50, b99 = percentile(busy, 50), percentile(busy, 99)
    print(
        f"    idle: {len(idle)} reads p50 {i50:.1f} ms p99 {i99:.1f} ms; "
        f"stream: {len(busy)} reads p50 {b50:.1f} ms p99 {b99:.1f} ms"
    )
    print(f"    scheduler (last streamed mount): {busy_stats.get('scheduler')}")
    print(f"    idle mount stores: {idle_stats.get('stores')}")
    report.add(
        "faults: on-demand 4 KiB reads of unfetched chunks, WAN (20 ms each way, "
        "100 Mbit/s), while a sequential reader streams the file: p50",
        f"{b50:.0f} ms",
        f"{i50:.0f} ms (no other activity: one chunk fetch)",
        i50 / b50,
        ">= 0.5x (at most ~one more chunk fetch)",
        f"({len(busy)} reads with the stream, {len(idle)} without)",
    )
    report.add(
        "faults: same, p99",
        f"{b99:.0f} ms",
        f"{i99:.0f} ms (no other activity)",
        i99 / b99,
        ">= 0.5x (at most ~one more chunk fetch)",
    )


# ------------------------------------------------------------------ the section


def build_image(work: Path, size_mb: int) -> Path:
    """An ext4 image of ``size_mb`` MiB, ~75% full of real files (the tests' tree: Python's
    standard library and /usr/share/doc, an incompressible file, a run of zeros)."""
    image = work / "faults.ext4"
    if not image.exists():
        work.mkdir(parents=True, exist_ok=True)
        tree = work / "tree"
        shutil.rmtree(tree, ignore_errors=True)
        build_tree(tree, budget=int(size_mb * 0.75) << 20)
        mkfs_ext4(tree, image, size_mb)
        shutil.rmtree(tree)
    return image


def bench_faults(
    work: Path, image: Path, report: Report, timeouts: tuple[float, ...] = (30.0, 6.0)
) -> None:
    """``image``: a small ext4 image (~80 MiB); its store and index are made here."""
    index, store = work / "faults.caibx", work / "faults.store"
    if not index.exists():
        cafuse("make", index, image, "--store", store)
    bench_faulty_store(work, image, index, store, report)
    bench_dark_store(work, image, index, store, report, timeouts)
    bench_ondemand_latency(work, index, store, report)
