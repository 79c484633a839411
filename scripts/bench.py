"""Side-by-side benchmarks of cafuse against casync (and against pyfuse3's own ceiling).

Every comparison runs in one process run, on the same images, on the same machine, and the
results table in docs/benchmarks.md is written from what this run measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from mounting import drop_page_cache  # noqa: E402  (one implementation, shared with tests)

CAFUSE = [str(ROOT / ".venv/bin/python"), "-m", "cafuse"]
UUID = "5f0c7e8a-1b2c-4d5e-8f90-a1b2c3d4e5f6"
HASH_SEED = "0c6e4a1d-2b3f-4a5b-9c8d-7e6f5a4b3c2d"


@dataclass
class Row:
    job: str
    cafuse: str
    baseline: str
    ratio: float | None
    target: str
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)

    def add(self, *args: object, **kwargs: object) -> None:
        row = Row(*args, **kwargs)  # type: ignore[arg-type]
        self.rows.append(row)
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        print(
            f"  {row.job}: cafuse {row.cafuse} | baseline {row.baseline} | {ratio} "
            f"(target {row.target}) {row.note}",
            flush=True,
        )


def sh(*cmd: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], check=True, text=True, capture_output=True, **kwargs
    )  # type: ignore[call-overload]


def timed(
    fn: Callable[[], object], repeat: int = 3, before: Callable[[], object] | None = None
) -> float:
    """Best wall time of ``repeat`` runs; ``before`` resets state outside the timing."""
    best = float("inf")
    for _ in range(repeat):
        if before:
            before()
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def mbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:.0f} MB/s"


def default_work_dir() -> Path:
    """tmpfs when it has room: this machine's virtual disk makes file-creation times swing
    by 3x between runs, which would drown the comparison of the tools themselves."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 10 << 30:
        return shm / "cafuse-bench"
    return Path("/var/tmp/cafuse-bench")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


# ------------------------------------------------------------------ images


def build_images(work: Path, size_mb: int) -> tuple[Path, Path]:
    """v1: an ext4 image of real files from /usr; v2: the same with some files changed."""
    v1, v2 = work / "v1.ext4", work / "v2.ext4"
    if v1.exists() and v2.exists():
        return v1, v2
    tree = work / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    budget = int(size_mb * 0.8) << 20
    copied = 0
    for root in (Path("/usr/lib"), Path("/usr/share"), Path("/usr/bin")):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                src = Path(dirpath, name)
                if src.is_symlink() or not src.is_file():
                    continue
                dest = tree / src.relative_to("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copyfile(src, dest)
                except OSError:
                    continue
                copied += dest.stat().st_size
                if copied >= budget:
                    break
            if copied >= budget:
                break
    mkfs(tree, v1, size_mb)
    # v2: a release later: ~2% of files rewritten in part, some removed, some added
    rng = random.Random(7)
    files = sorted(p for p in tree.rglob("*") if p.is_file())
    for path in rng.sample(files, len(files) // 50):
        data = bytearray(path.read_bytes())
        if data:
            pos = rng.randrange(len(data))
            data[pos : pos + 64] = os.urandom(min(64, len(data) - pos))
            path.write_bytes(bytes(data))
    for path in rng.sample(files, len(files) // 200):
        path.unlink(missing_ok=True)
    (tree / "new").mkdir(exist_ok=True)
    for i in range(8):
        (tree / "new" / f"blob{i}.bin").write_bytes(os.urandom(2 << 20))
    mkfs(tree, v2, size_mb)
    shutil.rmtree(tree)
    return v1, v2


def mkfs(tree: Path, image: Path, size_mb: int) -> None:
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    sh(
        "mkfs.ext4",
        "-q",
        "-F",
        "-U",
        UUID,
        "-E",
        f"hash_seed={HASH_SEED},root_owner=0:0",
        "-d",
        tree,
        image,
    )


# ------------------------------------------------------------------ byte accounting


def cacnk_bytes_opened(cmd: list[str]) -> int:
    """Bytes of the chunk files a command opens, counted with strace (same method for both)."""
    trace = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=openat", "-e", "signal=none", *cmd],
        text=True,
        capture_output=True,
        check=True,
    )
    total = 0
    seen: set[str] = set()
    for match in re.finditer(r'openat\([^"]*"([^"]+\.cacnk)"', trace.stderr):
        path = match.group(1)
        if path not in seen and os.path.exists(path):
            seen.add(path)
            total += os.path.getsize(path)
    return total


# ------------------------------------------------------------------ sections


def bench_make(work: Path, v1: Path, report: Report) -> None:
    size = v1.stat().st_size
    warm(v1)

    def reset(store: Path) -> Callable[[], None]:
        return lambda: shutil.rmtree(store, ignore_errors=True)

    t_cafuse = timed(
        lambda: sh(*CAFUSE, "make", work / "m.caibx", v1, "--store", work / "m.store"),
        before=reset(work / "m.store"),
    )
    t_casync = timed(
        lambda: sh("casync", "make", f"--store={work / 'mc.castr'}", work / "mc.caibx", v1),
        before=reset(work / "mc.castr"),
    )
    report.add(
        "make, 1 image to a local store",
        mbps(size, t_cafuse),
        mbps(size, t_casync),
        t_casync / t_cafuse,
        ">= 5x",
        f"(cafuse blake3, casync sha512-256; {t_cafuse:.2f} s vs {t_casync:.2f} s)",
    )
    t_sha = timed(
        lambda: sh(
            *CAFUSE,
            "make",
            work / "ms.caibx",
            v1,
            "--store",
            work / "ms.store",
            "--digest",
            "sha512-256",
        ),
        before=reset(work / "ms.store"),
    )
    report.add(
        "make --digest sha512-256 (casync-readable)",
        mbps(size, t_sha),
        mbps(size, t_casync),
        t_casync / t_sha,
        ">= 5x",
    )
    t_fast = timed(
        lambda: sh(
            *CAFUSE, "make", work / "mf.caibx", v1, "--store", work / "mf.store", "--level", "1"
        ),
        before=reset(work / "mf.store"),
    )
    report.add(
        "make --level 1", mbps(size, t_fast), mbps(size, t_casync), t_casync / t_fast, "(info)"
    )


def prepare_stores(work: Path, v1: Path, v2: Path) -> None:
    """One store per tool holding v1 and v2: cafuse's (blake3) and casync's own."""
    if not (work / "c.done").exists():
        for name, image in (("v1", v1), ("v2", v2)):
            sh(*CAFUSE, "make", work / f"{name}.caibx", image, "--store", work / "c.store")
            sh("casync", "make", f"--store={work / 'cs.castr'}", work / f"{name}.cs.caibx", image)
        (work / "c.done").touch()


def bench_extract(work: Path, v1: Path, report: Report) -> None:
    size = v1.stat().st_size
    out = work / "out.img"

    def clean() -> None:
        out.unlink(missing_ok=True)

    t_cafuse = timed(
        lambda: sh(*CAFUSE, "extract", work / "v1.caibx", out, "--store", work / "c.store"),
        before=clean,
    )
    t_cafuse_cs = timed(
        lambda: sh(*CAFUSE, "extract", work / "v1.cs.caibx", out, "--store", work / "cs.castr"),
        before=clean,
    )
    t_casync = timed(
        lambda: sh("casync", "extract", f"--store={work / 'cs.castr'}", work / "v1.cs.caibx", out),
        before=clean,
    )
    report.add(
        "extract from a local store",
        mbps(size, t_cafuse),
        mbps(size, t_casync),
        t_casync / t_cafuse,
        ">= 3x",
        f"({t_cafuse:.2f} s vs {t_casync:.2f} s)",
    )
    report.add(
        "extract casync's own index and store",
        mbps(size, t_cafuse_cs),
        mbps(size, t_casync),
        t_casync / t_cafuse_cs,
        ">= 3x",
    )
    clean()


def bench_update(work: Path, v1: Path, v2: Path, report: Report) -> None:
    out = work / "out.img"

    def clean() -> None:
        out.unlink(missing_ok=True)

    cafuse_cmd = [
        *CAFUSE,
        "extract",
        str(work / "v2.caibx"),
        str(out),
        "--store",
        str(work / "c.store"),
        "--seed",
        f"{work / 'v1.caibx'}:{v1}",
    ]
    casync_cmd = [
        "casync",
        "extract",
        f"--store={work / 'cs.castr'}",
        f"--seed={v1}",
        str(work / "v2.cs.caibx"),
        str(out),
    ]
    t_cafuse = timed(lambda: sh(*cafuse_cmd), before=clean)
    t_casync = timed(lambda: sh(*casync_cmd), before=clean)
    clean()
    b_cafuse = cacnk_bytes_opened(cafuse_cmd)
    clean()
    b_casync = cacnk_bytes_opened(casync_cmd)
    clean()
    report.add(
        "v1 -> v2 update, v1 as seed",
        f"{t_cafuse:.2f} s",
        f"{t_casync:.2f} s",
        t_casync / t_cafuse,
        ">= 5x, bytes <=",
        f"(chunk bytes read from the store: cafuse {b_cafuse / 1e6:.1f} MB, "
        f"casync {b_casync / 1e6:.1f} MB)",
    )
    report.extra["update_bytes"] = {"cafuse": b_cafuse, "casync": b_casync}


# ------------------------------------------------------------------ mount


@contextlib.contextmanager
def cafuse_mount(index: Path, mnt: Path, *args: object) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    sh(*CAFUSE, "mount", index, mnt, *args)
    try:
        yield mnt / os.listdir(mnt)[0]
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)


@contextlib.contextmanager
def ceiling_mount(image: Path, mnt: Path) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [CAFUSE[0], str(ROOT / "scripts" / "ceiling_fs.py"), str(image), str(mnt)],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        yield mnt / "image"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True)


def read_sequential(path: Path, block: int = 1 << 20) -> float:
    """Seconds to read the whole file in 1 MiB reads."""
    fd = os.open(path, os.O_RDONLY)
    try:
        started = time.perf_counter()
        buf = bytearray(block)
        view = memoryview(buf)
        while os.readv(fd, [view]):
            pass
        return time.perf_counter() - started
    finally:
        os.close(fd)


def random_reads_per_second(path: Path, count: int = 20000, threads: int = 4) -> float:
    """4 KiB preads at random page-aligned offsets, kernel readahead off, 4 threads."""
    size = path.stat().st_size
    rng = random.Random(3)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(count)]
    drop_page_cache(path)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    try:

        def work(part: list[int]) -> None:
            for offset in part:
                os.pread(fd, 4096, offset)

        parts = [offsets[i::threads] for i in range(threads)]
        started = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, parts))
        return count / (time.perf_counter() - started)
    finally:
        os.close(fd)


def cold_read_mbps(path: Path, size: int) -> float:
    drop_page_cache(path)
    return size / read_sequential(path) / 1e6


def bench_mount(work: Path, v1: Path, report: Report) -> None:
    """Every figure is the best of three: on this VM the first pass over fresh memory is
    slowed by first-touch page faults, whichever program makes it."""
    size = v1.stat().st_size
    index, store = work / "v1.caibx", work / "c.store"
    results: dict[str, float] = {}
    with ceiling_mount(v1, work / "ceil") as blob:
        results["ceiling cold"] = max(cold_read_mbps(blob, size) for _ in range(3))
        results["ceiling random"] = max(random_reads_per_second(blob) for _ in range(3))
    warm(v1)
    results["page cache"] = size / min(read_sequential(v1) for _ in range(3)) / 1e6
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_throughput import ceiling_widened, cpu_seconds, daemon_pid

    results["ceiling cold, 1 MiB kernel readahead"] = max(
        ceiling_widened(ceiling_mount, v1, work / "ceil", lambda b: cold_read_mbps(b, size))
        for _ in range(3)
    )
    cold, warm_reads, cores = [], [], []
    for _ in range(3):  # a fresh daemon each time: nothing cached anywhere
        with cafuse_mount(index, work / "mnt", "--store", store) as blob:
            pid = daemon_pid(work / "mnt")
            cpu_before = cpu_seconds(pid)
            seconds = read_sequential(blob)
            cores.append((cpu_seconds(pid) - cpu_before) / seconds)
            cold.append(size / seconds / 1e6)
            warm_reads.append(size / read_sequential(blob) / 1e6)
    results["cafuse cold"] = max(cold)
    results["cafuse cold cores"] = cores[cold.index(max(cold))]
    results["cafuse warm"] = max(warm_reads)
    with cafuse_mount(index, work / "mnt", "--store", store, "--memory-cache", "4G") as blob:
        read_sequential(blob)  # every chunk into the daemon's memory cache
        results["cafuse memory"] = max(cold_read_mbps(blob, size) for _ in range(3))
        results["cafuse random"] = max(random_reads_per_second(blob) for _ in range(3))
    report.add(
        "mount: cold sequential read, local store",
        f"{results['cafuse cold']:.0f} MB/s",
        f"{results['ceiling cold']:.0f} MB/s (in-memory pyfuse3 file)",
        results["cafuse cold"] / results["ceiling cold"],
        ">= 0.75x",
        f"(daemon CPU during that read: {results['cafuse cold cores']:.2f} cores busy)",
    )
    report.add(
        "mount: cold sequential read, local store, vs a ceiling with 1 MiB kernel readahead",
        f"{results['cafuse cold']:.0f} MB/s",
        f"{results['ceiling cold, 1 MiB kernel readahead']:.0f} MB/s (in-memory pyfuse3 file, "
        "read_ahead_kb 1024 as cafuse sets on its mount)",
        results["cafuse cold"] / results["ceiling cold, 1 MiB kernel readahead"],
        "(info)",
    )
    report.add(
        "mount: sequential read, chunks in daemon memory, page cache cold",
        f"{results['cafuse memory']:.0f} MB/s",
        f"{results['ceiling cold']:.0f} MB/s (in-memory pyfuse3 file)",
        results["cafuse memory"] / results["ceiling cold"],
        "(info)",
        "(the FUSE path alone, without fetching, decompressing and verifying)",
    )
    report.add(
        "mount: warm re-read",
        f"{results['cafuse warm']:.0f} MB/s",
        f"{results['page cache']:.0f} MB/s (raw image, page cache)",
        results["cafuse warm"] / results["page cache"],
        ">= 0.5x",
    )
    report.add(
        "mount: random 4 KiB reads, chunks in memory",
        f"{results['cafuse random']:.0f} reads/s",
        f"{results['ceiling random']:.0f} reads/s (in-memory pyfuse3 file)",
        results["cafuse random"] / results["ceiling random"],
        ">= 0.7x",
    )
    report.extra["mount"] = results


def bench_startup(work: Path, report: Report) -> None:
    """Mount start-up time and daemon RSS for a synthetic index of 1,000,000 chunks."""
    import numpy as np

    from cafuse.digest import FLAG_BLAKE3
    from cafuse.index import Index, write_index

    n = 1_000_000
    index = work / "million.caibx"
    ends = np.arange(1, n + 1, dtype=np.uint64) * 65536
    ids = np.random.default_rng(5).integers(0, 256, (n, 32), dtype=np.uint8)
    write_index(index, Index(FLAG_BLAKE3, 16384, 65536, 262144, ends, ids))
    store = work / "empty.store"
    store.mkdir(exist_ok=True)
    mnt = work / "mnt-million"
    mnt.mkdir(exist_ok=True)
    best = float("inf")
    rss_mb = 0.0
    for _ in range(3):
        started = time.perf_counter()
        sh(*CAFUSE, "mount", index, mnt, "--store", store)
        best = min(best, time.perf_counter() - started)
        try:
            assert (mnt / "million").stat().st_size == n * 65536
            rss_mb = max(rss_mb, daemon_rss_mb(mnt))
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    report.add(
        "mount start-up, 1M-chunk index",
        f"{best:.2f} s, {rss_mb:.0f} MB RSS",
        "-",
        None,
        "< 1 s, < 150 MB",
        "(time until `cafuse mount` returns with the mount live; RSS of the daemon)",
    )
    report.extra["startup"] = {"seconds": best, "rss_mb": rss_mb}


def daemon_rss_mb(mnt: Path) -> float:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if b"mount" in cmdline and str(mnt).encode() in cmdline:
                for line in (proc / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            continue
    raise RuntimeError("mount daemon not found")


# ------------------------------------------------------------------ remote


@contextlib.contextmanager
def nginx_for(work: Path) -> Iterator[str]:
    from servers import nginx_serving  # the tests' nginx set-up, one implementation

    with nginx_serving(work, work / "nginx") as server:
        yield server.url


def bench_http(work: Path, v1: Path, report: Report) -> None:
    size = v1.stat().st_size
    out = work / "out.img"

    def clean() -> None:
        out.unlink(missing_ok=True)

    with nginx_for(work) as url:
        t_cafuse = timed(
            lambda: sh(*CAFUSE, "extract", work / "v1.cs.caibx", out, "--store", f"{url}/cs.castr"),
            before=clean,
        )
        t_own = timed(
            lambda: sh(*CAFUSE, "extract", work / "v1.caibx", out, "--store", f"{url}/c.store"),
            before=clean,
        )
        t_casync = timed(
            lambda: sh("casync", "extract", f"--store={url}/cs.castr", work / "v1.cs.caibx", out),
            before=clean,
        )
        clean()
        report.add(
            "extract from an HTTP store (nginx), casync's index and store",
            mbps(size, t_cafuse),
            mbps(size, t_casync),
            t_casync / t_cafuse,
            ">= 4x",
            f"({t_cafuse:.2f} s vs {t_casync:.2f} s)",
        )
        report.add(
            "extract from an HTTP store (nginx), cafuse's own store",
            mbps(size, t_own),
            mbps(size, t_casync),
            t_casync / t_own,
            ">= 4x",
        )
        cold = 0.0
        for _ in range(2):
            with cafuse_mount(work / "v1.caibx", work / "mnt", "--store", f"{url}/c.store") as blob:
                cold = max(cold, size / read_sequential(blob) / 1e6)
        report.add(
            "mount: cold sequential read, HTTP store",
            f"{cold:.0f} MB/s",
            mbps(size, t_casync) + " (casync extract, same store)",
            cold / (size / t_casync / 1e6),
            "(info)",
        )


def pick_file(image: Path, work: Path, low: int = 1 << 20, high: int = 4 << 20) -> str:
    """A file of 1-4 MiB inside the ext4 image (path relative to its root)."""
    target = work / "pick"
    target.mkdir(exist_ok=True)
    sh("mount", "-o", "loop,ro", image, target)
    try:
        for dirpath, _, names in os.walk(target):
            for name in sorted(names):
                path = Path(dirpath, name)
                if path.is_file() and not path.is_symlink() and low <= path.stat().st_size <= high:
                    return str(path.relative_to(target))
    finally:
        sh("umount", target)
    raise RuntimeError("no file of 1-4 MiB in the image")


def bench_wan(work: Path, v1: Path, report: Report) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from wanproxy import WanProxy

    name = pick_file(v1, work)
    with nginx_for(work) as url:
        port = int(url.rsplit(":", 1)[1])
        proxy_port = port + 1
        proxy = WanProxy(proxy_port, port, delay=0.025, rate=100e6 / 8).start()
        wan = f"http://127.0.0.1:{proxy_port}"
        try:
            started = time.perf_counter()
            with cafuse_mount(work / "v1.caibx", work / "mnt", "--store", f"{wan}/c.store") as blob:
                rootfs = work / "rootfs"
                rootfs.mkdir(exist_ok=True)
                sh("mount", "-o", "loop,ro", blob, rootfs)
                try:
                    data = (rootfs / name).read_bytes()
                    t_file = time.perf_counter() - started
                finally:
                    sh("umount", rootfs)
            b_file = proxy.down.carried
            out = work / "out.img"
            started = time.perf_counter()
            sh("casync", "extract", f"--store={wan}/cs.castr", work / "v1.cs.caibx", out)
            t_casync = time.perf_counter() - started
            b_casync = proxy.down.carried - b_file
            out.unlink()
        finally:
            proxy.stop()
        from bench_throughput import bench_wan_throughput

        bench_wan_throughput(work, v1, url, report, cafuse_mount, port + 2)
    report.add(
        f"WAN (25 ms each way, 100 Mbit/s): read one {len(data) >> 10} KiB file "
        "from the loop-mounted image",
        f"{t_file:.2f} s, {b_file / 1e6:.1f} MB fetched",
        f"{t_casync:.1f} s, {b_casync / 1e6:.1f} MB (casync extract of the whole image)",
        t_casync / t_file,
        "(info)",
        "(cafuse: mount + loop mount + read; bytes as carried by the proxy)",
    )
    report.extra["wan"] = {
        "file": name,
        "cafuse_s": t_file,
        "cafuse_bytes": b_file,
        "casync_s": t_casync,
        "casync_bytes": b_casync,
    }


SECTIONS = ("make", "extract", "update", "mount", "startup", "http", "wan", "faults", "soak")


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


# ------------------------------------------------------------------ report


def plot(report: Report) -> None:
    """Each row's ratio on a log scale, its target as a black tick (green: met)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if r.ratio is not None][::-1]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(11, 0.42 * len(rows) + 1.4))
    targets = [_target_value(r.target) for r in rows]
    colors = [
        "#9aa5b1" if t is None else "#2a9d8f" if r.ratio >= t else "#e76f51"
        for r, t in zip(rows, targets, strict=True)
    ]
    ax.barh([r.job for r in rows], [r.ratio for r in rows], color=colors)
    for y, (row, target) in enumerate(zip(rows, targets, strict=True)):
        if target is not None:
            ax.plot([target, target], [y - 0.42, y + 0.42], color="black", linewidth=2.5)
        ax.text(row.ratio * 1.08, y, f"{row.ratio:.2f}x", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.axvline(1.0, color="#555555", linewidth=0.8, linestyle=":")
    ax.set_xlabel(
        "cafuse / baseline, log scale (black tick: target; green met, red missed, grey: no target)"
    )
    ax.set_title("cafuse against casync and the pyfuse3 ceiling (one run)")
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "benchmarks.png", dpi=110)
    plt.close(fig)


def _target_value(target: str) -> float | None:
    match = re.search(r">=\s*([0-9.]+)", target)
    return float(match.group(1)) if match else None


def write_markdown(
    report: Report, args: argparse.Namespace, v1: Path | None, seconds: float
) -> None:
    image_mb = v1.stat().st_size >> 20 if v1 else args.size_mb
    lines = [
        "# Benchmarks",
        "",
        f"Written by `{' '.join(['scripts/bench', *sys.argv[1:]])}` "
        f"on {time.strftime('%Y-%m-%d')}; every row "
        "was measured side by side in that one run, on this machine: "
        f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}, {sh('casync', '--version').stdout.strip()}.",
        "",
        f"Image: an ext4 filesystem of {image_mb} MiB built with `mkfs.ext4 -d` "
        "from real files of /usr; v2 is the same tree with 2% of the files changed in place, "
        "0.5% removed and 16 MiB added. Times are the best of three runs; for make, extract "
        "and update the page cache is warm for both tools, the mount rows say what is cold. "
        f"The work directory (images, stores, outputs) was `{args.work}` (tmpfs: this VM's "
        "virtual disk makes file-creation times swing by 3x between runs). The WAN row is "
        "one run of each. The faults rows use an ext4 image of their own, of "
        f"{args.faults_size_mb} MiB (see the notes below).",
        "",
        "| job | cafuse | baseline | ratio | target | notes |",
        "|---|---|---|---|---|---|",
    ]
    for row in report.rows:
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        lines.append(
            f"| {row.job} | {row.cafuse} | {row.baseline} | {ratio} | {row.target} | {row.note} |"
        )
    lines += ["", "![ratios](benchmarks.png)", "", f"Total benchmark time: {seconds:.0f} s.", ""]
    notes = ROOT / "docs" / "benchmarks-notes.md"
    if notes.exists():
        lines += [notes.read_text()]
    if set(args.only.split(",")) != set(SECTIONS):
        # a partial run must not replace the published, complete side-by-side table
        partial = ROOT / "docs" / "benchmarks-partial.md"
        partial.write_text("\n".join(lines))
        print(f"bench: partial run (--only), wrote {partial.relative_to(ROOT)}")
        return
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(lines))
    (ROOT / "docs" / "benchmarks.json").write_text(
        json.dumps({"rows": [vars(r) for r in report.rows], "extra": report.extra}, indent=2)
    )
    plot(report)
    print("bench: wrote docs/benchmarks.md")


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
    if only - {"faults", "soak"}:
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
    write_markdown(report, args, v1, time.monotonic() - started)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
