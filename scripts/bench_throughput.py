"""Mount throughput rows for scripts/bench.py (issue 11): a cold sequential read of the mount
through a WAN delay proxy next to one plain HTTP download of a big file through the same
proxy, and the daemon's CPU use (cores busy) during a local cold read."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (one-way delay in seconds, rate in Mbit/s, MB read by each side)
WAN_LINKS = ((0.050, 400, 400), (0.020, 100, 200))


def read_prefix(
    path: Path, nbytes: int, block: int = 1 << 20, before_close: Callable[[], object] = lambda: None
) -> float:
    """Seconds to read the first ``nbytes`` of ``path`` in 1 MiB reads; ``before_close``
    runs while the file is still open (its readahead state still there)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(block)
        view = memoryview(buf)
        done = 0
        started = time.perf_counter()
        while done < nbytes:
            n = os.readv(fd, [view[: min(block, nbytes - done)]])
            if not n:
                break
            done += n
        seconds = time.perf_counter() - started
        before_close()
        return seconds
    finally:
        os.close(fd)


def http_download(url: str, nbytes: int) -> float:
    """Seconds for one HTTP GET of the first ``nbytes`` of ``url`` (curl, one connection)."""
    started = time.perf_counter()
    subprocess.run(
        ["curl", "-sSf", "-o", "/dev/null", "-r", f"0-{nbytes - 1}", url],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


def daemon_pid(mnt: Path) -> int:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mount" in cmdline and str(mnt).encode() in cmdline and b"-m" in cmdline:
            return int(proc.name)
    raise RuntimeError("mount daemon not found")


def daemon_rss_mb(mnt: Path) -> float:
    """Resident memory of the daemon serving ``mnt``, in MB."""
    for line in Path(f"/proc/{daemon_pid(mnt)}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("mount daemon has no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mount_stats(mnt: Path) -> dict:
    import json

    out = subprocess.run(
        [str(ROOT / ".venv/bin/python"), "-m", "cafuse", "stats", "--json", str(mnt)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def bench_wan_throughput(
    work: Path, v1: Path, url: str, report, cafuse_mount: Callable, proxy_port: int
) -> None:
    """For each link: one download of the raw image's first bytes, then a fresh mount's
    cold sequential read of as many bytes, both through the same proxy (one run each)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from wanproxy import WanProxy

    port = int(url.rsplit(":", 1)[1])
    rows = {}
    for delay, mbit, mb in WAN_LINKS:
        nbytes = min(mb * 1_000_000, v1.stat().st_size)
        proxy = WanProxy(proxy_port, port, delay=delay, rate=mbit * 1e6 / 8).start()
        wan = f"http://127.0.0.1:{proxy_port}"
        try:
            t_http = http_download(f"{wan}/{v1.name}", nbytes)
            carried = proxy.down.carried
            stats: dict = {}
            with cafuse_mount(work / "v1.caibx", work / "mnt", "--store", f"{wan}/c.store") as blob:
                t_mount = read_prefix(
                    blob, nbytes, before_close=lambda s=stats: s.update(mount_stats(work / "mnt"))
                )
            carried = proxy.down.carried - carried
        finally:
            proxy.stop()
        mount_mbps, http_mbps = nbytes / t_mount / 1e6, nbytes / t_http / 1e6
        sched = stats["scheduler"]
        streams = stats.get("readahead", {}).get("streams", {})
        window = max((s["window"] for s in streams.values()), default=0)
        report.add(
            f"WAN ({delay * 1000:.0f} ms each way, {mbit} Mbit/s): cold sequential read of "
            f"the mount, first {nbytes / 1e6:.0f} MB",
            f"{mount_mbps:.1f} MB/s",
            f"{http_mbps:.1f} MB/s (one HTTP download of the raw image, same proxy)",
            mount_mbps / http_mbps,
            ">= 0.7x",
            f"(chunks are compressed: the mount moved {carried / 1e6:.0f} MB over the link; "
            f"readahead window at the end {window / 1e6:.1f} MB, "
            f"{sched['remote_slots']} remote slots; one run each)",
        )
        rows[f"{delay * 1000:.0f}ms/{mbit}Mbit"] = {
            "mount_mbps": mount_mbps,
            "http_mbps": http_mbps,
            "window": window,
            "remote_slots": sched["remote_slots"],
            "wire_bytes": carried,
        }
    report.extra["wan_throughput"] = rows


def system_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy so far (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def decode_cpu_per_gb(index: Path, store: Path) -> float:
    """CPU seconds per GB of the image that reading, decompressing and verifying every
    chunk it holds costs, in one thread of this process (best of three passes): the work
    a cold read through the mount must do on top of what the in-memory ceiling does."""
    from cafuse.fetch import ChunkSource
    from cafuse.index import read_index
    from cafuse.stores.local import LocalStore

    table = read_index(index)
    source = ChunkSource(table.digest, [LocalStore(store)])
    chunks = []
    for i in range(table.chunk_count):
        if not table.is_zero(i):
            start, end = table.span(i)
            chunks.append((table.chunk_id(i), end - start))
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        for chunk_id, size in chunks:
            assert source.get_local(chunk_id, size) is not None
        best = min(best, time.process_time() - started)
    return best / (table.blob_size / 1e9)


def ceiling_widened(ceiling_mount: Callable, image: Path, mnt: Path, measure: Callable) -> float:
    """The in-memory ceiling with the same 1 MiB kernel readahead the daemon sets on its
    own mount (what cafuse does to its bdi, done to the ceiling's): for comparison."""
    with ceiling_mount(image, mnt) as blob:
        from cafuse.mount.daemon import KERNEL_READAHEAD_KB, _mountinfo

        found = _mountinfo(str(mnt))
        assert found is not None
        Path(f"/sys/class/bdi/{found[0]}/read_ahead_kb").write_text(f"{KERNEL_READAHEAD_KB}\n")
        return measure(blob)
