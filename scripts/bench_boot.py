"""The ``boot`` section of scripts/bench.py: boot profiles and background fill (issue 8).

All through scripts/wanproxy.py (20 ms each way, 100 Mbit/s) in front of nginx, on an ext4
image of its own built from real files of /usr:

1. a cold "boot": mount the index by URL, loop-mount the image, read a fixed list of a few
   hundred files in a fixed order; timed without a profile (recording one), with the
   profile recorded on that first run (published beside the index), and on v2 (5% of the
   files changed) without a profile and with v1's;
2. ``--fill-rate 8M``: the bytes crossing the proxy, averaged over windows of 3 s; the fill
   then finishes, the server stops, and the whole image is read back and compared;
3. on-demand 4 KiB reads of chunks not fetched yet, p50/p99, with and without a fill;
4. a VM (qemu, TCG, a Debian cloud kernel: NVMe and ext4 built in, no initramfs) whose root
   disk is the mounted image and whose init (a static busybox script in the image) reads
   the same files, booted without and with the profile of its first boot. qemu and busybox
   are installed from Debian's packages when missing, the kernel unpacked from its package.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_faults import Report, cafuse, cold_chunks, mounted, one_read, percentile  # noqa: E402
from benchkit import copy_usr_files  # noqa: E402
from helpers import sha256_file  # noqa: E402
from mounting import unmount  # noqa: E402
from servers import Nginx, free_port  # noqa: E402
from wanproxy import WanProxy  # noqa: E402

UUID = "5f0c7e8a-1b2c-4d5e-8f90-a1b2c3d4e5f6"
HASH_SEED = "0c6e4a1d-2b3f-4a5b-9c8d-7e6f5a4b3c2d"
IMAGE_MB = 320
BOOT_FILES = 400
FILL_RATE = 8 << 20
DELAY = 0.020
RATE = 100e6 / 8


# ------------------------------------------------------------------ images


def build_images(work: Path) -> tuple[Path, Path, list[str]]:
    """v1 and v2 (5% of the files changed in place) and the boot's file list."""
    v1, v2, listing = work / "v1.ext4", work / "v2.ext4", work / "boot-files.json"
    if v1.exists() and v2.exists() and listing.exists():
        return v1, v2, json.loads(listing.read_text())
    tree = work / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    # many files of at most 2 MiB, as a root file system has, not a few big ones
    files = copy_usr_files(tree, int(IMAGE_MB * 0.7) << 20, max_file_size=2 << 20)
    rng = random.Random(8)
    # a boot reads a few hundred smallish files scattered over the image, in its own order
    candidates = [p for p in files if 4 << 10 <= p.stat().st_size <= 512 << 10]
    boot = [str(p.relative_to(tree)) for p in rng.sample(candidates, BOOT_FILES)]
    add_init(tree, boot)
    mkfs(tree, v1)
    for path in rng.sample(files, len(files) // 20):  # v2: 5% of the files changed
        data = bytearray(path.read_bytes())
        if data:
            pos = rng.randrange(len(data))
            data[pos : pos + 256] = os.urandom(min(256, len(data) - pos))
            path.write_bytes(bytes(data))
    mkfs(tree, v2)
    shutil.rmtree(tree)
    listing.write_text(json.dumps(boot))
    return v1, v2, boot


INIT = """#!/bin/busybox sh
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox echo "cafuse-boot: start $(/bin/busybox cut -d' ' -f1 /proc/uptime)"
n=0
while IFS= read -r f; do /bin/busybox cat "/$f" > /dev/null && n=$((n+1)); done < /boot-files.txt
/bin/busybox echo "cafuse-boot: done $n files $(/bin/busybox cut -d' ' -f1 /proc/uptime)"
/bin/busybox reboot -f
"""


def add_init(tree: Path, files: list[str]) -> None:
    """What a VM needs to boot from the image: a static busybox and an init that reads the
    boot's files (the same list as the host-side boot), then powers off."""
    for name in ("bin", "sbin", "dev", "proc"):
        (tree / name).mkdir(exist_ok=True)
    busybox = Path("/bin/busybox")
    if busybox.exists():
        shutil.copyfile(busybox, tree / "bin" / "busybox")
        (tree / "bin" / "busybox").chmod(0o755)
    (tree / "sbin" / "cafuse-boot").write_text(INIT)
    (tree / "sbin" / "cafuse-boot").chmod(0o755)
    (tree / "boot-files.txt").write_text("".join(f"{name}\n" for name in files))


def mkfs(tree: Path, image: Path) -> None:
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(IMAGE_MB << 20)
    subprocess.run(
        [
            *("mkfs.ext4", "-q", "-F", "-U", UUID),
            *("-E", f"hash_seed={HASH_SEED},root_owner=0:0", "-d", str(tree), str(image)),
        ],
        check=True,
    )


@contextlib.contextmanager
def wan(root: Path, work: Path) -> Iterator[tuple[Nginx, WanProxy, str]]:
    server = Nginx(root, free_port(), work / "nginx")
    server.start()
    port = free_port()
    proxy = WanProxy(port, server.port, delay=DELAY, rate=RATE).start()
    try:
        yield server, proxy, f"http://127.0.0.1:{port}"
    finally:
        if proxy._thread is not None and proxy._thread.is_alive():  # not stopped already
            proxy.stop()
        server.stop()


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# ------------------------------------------------------------------ 1. boots


def boot(index_url: str, work: Path, files: list[str], proxy: WanProxy, *args: object) -> dict:
    """Mount, loop-mount, read every file of the list: seconds and bytes over the link."""
    drop_caches()
    before = proxy.down.carried
    mnt, rootfs = work / "mnt", work / "rootfs"
    rootfs.mkdir(exist_ok=True)
    started = time.perf_counter()
    with mounted(index_url, mnt, *args) as blob:
        subprocess.run(["mount", "-o", "loop,ro", str(blob), str(rootfs)], check=True)
        try:
            nbytes = 0
            for name in files:
                nbytes += len((rootfs / name).read_bytes())
            seconds = time.perf_counter() - started
        finally:
            subprocess.run(["umount", str(rootfs)], check=True)
        stats = json.loads(cafuse("stats", mnt, "--json").stdout)
    return {
        "seconds": seconds,
        "file_bytes": nbytes,
        "link_bytes": proxy.down.carried - before,
        "profile": stats.get("profile"),
    }


def wait_for_file(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} was not written")
        time.sleep(0.05)


def bench_boots(work: Path, files: list[str], report: Report) -> dict:
    www = work / "www"
    out: dict[str, dict] = {}
    with wan(www, work) as (_, proxy, url):
        recorded = work / "recorded.profile"
        recorded.unlink(missing_ok=True)
        out["v1 cold"] = boot(
            f"{url}/v1.caibx", work, files, proxy, "--no-profile", "--record-profile", recorded
        )
        wait_for_file(recorded)
        shutil.copy(recorded, www / "v1.profile")  # published beside the index
        out["v1 profile"] = boot(f"{url}/v1.caibx", work, files, proxy)
        out["v2 cold"] = boot(f"{url}/v2.caibx", work, files, proxy, "--no-profile")
        out["v2 v1-profile"] = boot(
            f"{url}/v2.caibx", work, files, proxy, "--profile", f"{url}/v1.profile"
        )
    info = json.loads(cafuse("profile", recorded, "--json", "--index", www / "v1.caibx").stdout)
    for name, run in out.items():
        print(
            f"    {name}: {run['seconds']:.2f} s, {run['link_bytes'] / 1e6:.1f} MB over the "
            f"link, profile {run['profile']}"
        )
    print(f"    profile: {info}")
    files_mb = out["v1 cold"]["file_bytes"] / 1e6
    what = f"boot: read {len(files)} files ({files_mb:.1f} MB) of the loop-mounted image, WAN"
    report.add(
        f"{what} (20 ms each way, 100 Mbit/s), with the profile recorded on the first boot",
        f"{out['v1 profile']['seconds']:.2f} s",
        f"{out['v1 cold']['seconds']:.2f} s (no profile)",
        out["v1 cold"]["seconds"] / out["v1 profile"]["seconds"],
        ">= 3x",
        f"(profile: {info['ranges']} ranges, {info['bytes'] / 1e6:.1f} MB, "
        f"{info['index']['chunks']} chunks; "
        f"{out['v1 profile']['link_bytes'] / 1e6:.1f} MB over the link vs "
        f"{out['v1 cold']['link_bytes'] / 1e6:.1f} MB)",
    )
    report.add(
        "boot: the same on v2 (5% of the files changed) with v1's profile",
        f"{out['v2 v1-profile']['seconds']:.2f} s",
        f"{out['v2 cold']['seconds']:.2f} s (no profile)",
        out["v2 cold"]["seconds"] / out["v2 v1-profile"]["seconds"],
        ">= 2x",
        f"({out['v2 v1-profile']['profile']['chunks_fetched']} chunks replayed, "
        f"{out['v2 v1-profile']['profile']['chunks_never_read']} of them never read)",
    )
    return {"runs": out, "profile": info}


# ------------------------------------------------------------------ 2. fill


def fill_stats(mnt: Path) -> dict:
    return json.loads(cafuse("stats", mnt, "--json").stdout)["fill"]


def bench_fill(work: Path, v1: Path, report: Report) -> dict:
    www, cache, mnt = work / "www", work / "fill-cache", work / "mnt"
    shutil.rmtree(cache, ignore_errors=True)
    with wan(www, work) as (server, proxy, url):
        index = f"{url}/v1.caibx"
        args = ("--no-profile", "--cache", cache, "--concurrency", "32")
        samples: list[tuple[float, int]] = []
        with mounted(index, mnt, *args, "--fill-rate", str(FILL_RATE)) as blob:
            while fill_stats(mnt)["state"] != "filling":
                time.sleep(0.05)
            time.sleep(0.5)  # past the start
            for _ in range(25):  # 6 s, or until the fill is done (the image is ~55 MB stored)
                samples.append((time.perf_counter(), proxy.down.carried))
                if json.loads(os.getxattr(blob, "user.cafuse.stats"))["fill"]["complete"]:
                    break
                time.sleep(0.25)
        if len(samples) < 14:
            raise RuntimeError("the fill finished before 3 s of it could be measured")
        samples = samples[:-1]  # the last one may include the fill's end
        windows = []
        for k in range(len(samples) - 12):  # every 3 s window
            (t0, b0), (t1, b1) = samples[k], samples[k + 12]
            windows.append((b1 - b0) / (t1 - t0))
        mean = (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])
        # the rest at full speed (resuming what the first mount filled), then offline
        with mounted(index, mnt, *args, "--fill-rate", "1G") as blob:
            deadline = time.monotonic() + 600
            while not (snap := fill_stats(mnt))["complete"]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"fill not complete: {snap}")
                time.sleep(0.2)
            proxy.stop()
            server.stop()
            drop_caches()
            same = sha256_file(blob) == sha256_file(v1)
    lo, hi = min(windows), max(windows)
    print(
        f"    fill at {FILL_RATE >> 20} MiB/s: mean {mean / 1e6:.2f} MB/s, 3 s windows "
        f"{lo / 1e6:.2f}..{hi / 1e6:.2f} MB/s; offline read identical: {same}"
    )
    worst = max(abs(lo - FILL_RATE), abs(hi - FILL_RATE)) / FILL_RATE
    report.add(
        f"fill: --fill-rate 8M (8 MiB/s), bytes crossing the WAN proxy over "
        f"{samples[-1][0] - samples[0][0]:.1f} s, range of the 3 s windows",
        f"{lo / 1e6:.2f}..{hi / 1e6:.2f} MB/s (mean {mean / 1e6:.2f})",
        f"{FILL_RATE / 1e6:.2f} MB/s",
        1 - worst,
        ">= 0.75x (within 25%)",
        f"(--concurrency 32: at 16 the proxy's ~70 ms per request caps it near 5 MB/s; "
        f"after fill.complete, server stopped: whole image read back identical = {same})",
    )
    return {"mean": mean, "windows": windows, "offline_identical": same}


# ------------------------------------------------------------------ 3. reads during a fill


def fill_position(blob: Path) -> int:
    stats = json.loads(os.getxattr(blob, "user.cafuse.stats"))
    return int(stats["fill"]["position"]) if "fill" in stats else 0


def sample_ahead(
    blob: Path, chunks: list[tuple[int, int]], rng: random.Random, count: int, fill: bool
) -> list[float]:
    """4 KiB reads of random chunks that neither this mount nor its fill fetched yet."""
    used: set[int] = set()
    out = []
    while len(out) < count:
        floor = fill_position(blob) + (32 << 20) if fill else 0
        candidates = [c for c in chunks if c[0] >= floor and c[0] not in used]
        if not candidates:
            break
        start, size = rng.choice(candidates)
        used.add(start)
        out.append(one_read(blob, start + rng.randrange(0, max(1, size - 4096)) // 4096 * 4096))
        time.sleep(0.05)
    return out


def bench_fill_latency(work: Path, report: Report, samples: int = 40) -> dict:
    www, mnt = work / "www", work / "mnt"
    chunks = cold_chunks(www / "v1.caibx")
    results = {}
    with wan(www, work) as (_, _proxy, url):
        for kind in ("idle", "fill"):
            cache = work / f"lat-cache-{kind}"
            shutil.rmtree(cache, ignore_errors=True)
            extra: tuple[object, ...] = ("--fill-rate", str(FILL_RATE)) if kind == "fill" else ()
            args = ("--no-profile", "--cache", cache, "--concurrency", "32", *extra)
            with mounted(f"{url}/v1.caibx", mnt, *args) as b:
                if kind == "fill":
                    while fill_stats(mnt)["state"] != "filling":
                        time.sleep(0.05)
                results[kind] = sample_ahead(b, chunks, random.Random(3), samples, kind == "fill")
                if kind == "fill":
                    print(f"    during the fill: {fill_stats(mnt)}")
            shutil.rmtree(cache, ignore_errors=True)
    i50, i99 = percentile(results["idle"], 50), percentile(results["idle"], 99)
    f50, f99 = percentile(results["fill"], 50), percentile(results["fill"], 99)
    print(f"    reads p50/p99: idle {i50:.1f}/{i99:.1f} ms, during fill {f50:.1f}/{f99:.1f} ms")
    for label, base, busy in (("p50", i50, f50), ("p99", i99, f99)):
        report.add(
            f"fill: on-demand 4 KiB reads of unfetched chunks during a fill at 8 MiB/s, {label}",
            f"{busy:.0f} ms",
            f"{base:.0f} ms (no fill)",
            base / busy,
            ">= 0.5x (the fill must not double it)",
            f"({len(results['fill'])} and {len(results['idle'])} reads, WAN proxy, "
            "--concurrency 32 for both)",
        )
    return {
        "idle_ms": [x * 1000 for x in results["idle"]],
        "fill_ms": [x * 1000 for x in results["fill"]],
    }


# ------------------------------------------------------------------ 4. a VM booting


def vm_tools(work: Path) -> Path:
    """qemu and busybox from Debian's packages (installed when missing), and a Debian cloud
    kernel, unpacked in ``work`` (its NVMe driver and ext4 are built in: no initramfs)."""
    if not (shutil.which("qemu-system-x86_64") and Path("/bin/busybox").exists()):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(
            [
                *("apt-get", "install", "-y", "-qq", "--no-install-recommends"),
                *("qemu-system-x86", "busybox-static"),
            ],
            check=True,
            env=env,
        )
    kernels = sorted((work / "kernel").glob("boot/vmlinuz-*"))
    if kernels:
        return kernels[-1]
    depends = subprocess.run(
        ["apt-cache", "depends", "linux-image-cloud-amd64"], capture_output=True, text=True
    ).stdout
    name = next(
        line.split()[-1] for line in depends.splitlines() if "Depends: linux-image-" in line
    )
    download = work / "kernel-deb"
    download.mkdir(exist_ok=True)
    subprocess.run(["apt-get", "download", name], cwd=download, check=True, capture_output=True)
    (deb,) = download.glob("linux-image-*.deb")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "kernel")], check=True)
    shutil.rmtree(download)
    return sorted((work / "kernel").glob("boot/vmlinuz-*"))[-1]


def vm_boot(index_url: str, work: Path, kernel: Path, proxy: WanProxy, *args: object) -> dict:
    """Mount, boot a VM (qemu, TCG) whose root file system is the mounted image and whose
    init reads the boot's files, until it powers off."""
    drop_caches()
    before = proxy.down.carried
    mnt = work / "mnt"
    started = time.perf_counter()
    marks: dict[str, float] = {}
    with mounted(index_url, mnt, *args) as blob:
        qemu = subprocess.Popen(
            [
                *("qemu-system-x86_64", "-accel", "tcg", "-m", "512M", "-nodefaults"),
                *("-display", "none", "-serial", "stdio", "-no-reboot", "-kernel", str(kernel)),
                "-append",
                "root=/dev/nvme0n1 ro rootfstype=ext4 console=ttyS0 init=/sbin/cafuse-boot "
                "panic=-1 quiet",
                *("-drive", f"file={blob},if=none,id=d0,format=raw,readonly=on"),
                *("-device", "nvme,drive=d0,serial=cafuse"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert qemu.stdout is not None
        lines = []
        for raw in qemu.stdout:
            line = raw.decode(errors="replace").strip()
            lines.append(line)
            for mark in ("start", "done"):
                if f"cafuse-boot: {mark}" in line:
                    marks[mark] = time.perf_counter() - started
        qemu.wait(timeout=600)
        seconds = time.perf_counter() - started
        stats = json.loads(cafuse("stats", mnt, "--json").stdout)
    if "done" not in marks:
        raise RuntimeError("the VM did not finish its boot:\n" + "\n".join(lines[-20:]))
    return {
        "seconds": seconds,
        "to_init": marks["start"],
        "reading": marks["done"] - marks["start"],
        "link_bytes": proxy.down.carried - before,
        "profile": stats.get("profile"),
    }


def bench_vm(work: Path, kernel: Path, report: Report) -> dict:
    www = work / "www"
    out: dict[str, dict] = {}
    with wan(www, work) as (_, proxy, url):
        recorded = work / "vm.profile"
        recorded.unlink(missing_ok=True)
        out["cold"] = vm_boot(
            f"{url}/v1.caibx", work, kernel, proxy, "--no-profile", "--record-profile", recorded
        )
        wait_for_file(recorded)
        out["profile"] = vm_boot(f"{url}/v1.caibx", work, kernel, proxy, "--profile", recorded)
    for name, run in out.items():
        print(
            f"    VM {name}: {run['seconds']:.2f} s (init after {run['to_init']:.2f} s, "
            f"reading {run['reading']:.2f} s), {run['link_bytes'] / 1e6:.1f} MB over the link"
        )
    report.add(
        f"boot: a VM (qemu, TCG, Debian cloud kernel) with the mounted image as its root "
        f"disk; its init reads the {BOOT_FILES} files, WAN, with the profile of its first boot",
        f"{out['profile']['seconds']:.2f} s",
        f"{out['cold']['seconds']:.2f} s (no profile)",
        out["cold"]["seconds"] / out["profile"]["seconds"],
        "(info)",
        f"(mount to power-off; the kernel's own start is {out['profile']['to_init']:.1f} s "
        f"of it; the init's reads alone: {out['profile']['reading']:.2f} s vs "
        f"{out['cold']['reading']:.2f} s)",
    )
    return out


# ------------------------------------------------------------------ the section


def bench_boot(work: Path, report: Report) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    for path in (work / "mnt", work / "rootfs"):
        if path.exists() and os.path.ismount(path):
            unmount(path)
    print(f"bench: boot section in {work}", flush=True)
    kernel = vm_tools(work)  # busybox first: the images carry it for the VM's init
    v1, v2, files = build_images(work)
    www = work / "www"
    if not (www / "v2.caibx").exists():
        www.mkdir(exist_ok=True)
        cafuse("make", www / "v1.caibx", v1, "--store", www / "default.castr")
        cafuse("make", www / "v2.caibx", v2, "--store", www / "default.castr")
    (www / "v1.profile").unlink(missing_ok=True)
    extra = {"boots": bench_boots(work, files, report)}
    extra["fill"] = bench_fill(work, v1, report)
    extra["latency"] = bench_fill_latency(work, report)
    extra["vm"] = bench_vm(work, kernel, report)
    return extra


if __name__ == "__main__":
    from bench import Report as Table

    table = Table()
    bench_boot(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/var/tmp/profile-bench"), table)
