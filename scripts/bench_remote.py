"""Remote sections of scripts/bench.py: HTTP (nginx on loopback) and WAN (delay proxy)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from bench_local import cafuse_mount, read_sequential
from benchkit import CAFUSE, ROOT, Report, mbps, sh, timed

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
