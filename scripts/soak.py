"""Soak: many readers of a mounted image through a store that fails a share of requests,
for a long time, with the daemon's memory sampled. Every byte read is compared with the
image; a read that fails (EIO) is counted. The claim to check: 0 wrong bytes, 0 EIO,
memory flat.

    .venv/bin/python scripts/soak.py --minutes 10 --readers 8 --fault-rate 0.1

The daemon keeps a small memory cache and no disk cache, and the kernel's page cache is
dropped before every read, so reads keep reaching the store for the whole run.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import build_tree, mkfs_ext4  # noqa: E402  (the tests' implementations)
from mounting import drop_page_cache, unmount, wait_for_mount  # noqa: E402
from servers import Faults, faulty_server  # noqa: E402

CAFUSE = [str(ROOT / ".venv/bin/python"), "-m", "cafuse"]
KINDS = ("500", "reset", "stall", "truncate", "wrong")


@dataclass
class Tally:
    reads: int = 0
    bytes: int = 0
    wrong: int = 0
    eio: int = 0
    other_errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def reader(blob: Path, image: bytes, stop: float, seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    fd = os.open(blob, os.O_RDONLY)
    try:
        while time.monotonic() < stop:
            size = rng.choice((4096, 65536, 1 << 20))
            offset = rng.randrange(0, len(image) - size)
            drop_page_cache(blob)
            try:
                data = os.pread(fd, size, offset)
            except OSError as exc:
                with tally.lock:
                    if exc.errno == errno.EIO:
                        tally.eio += 1
                    else:
                        tally.other_errors.append(str(exc))
                continue
            with tally.lock:
                tally.reads += 1
                tally.bytes += len(data)
                if data != image[offset : offset + size]:
                    tally.wrong += 1
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--fault-rate", type=float, default=0.1)
    parser.add_argument("--image-mb", type=int, default=64)
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cafuse-soak-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        tree = build_tree(work / "tree", budget=(args.image_mb * 2 // 5) << 20)
        image_path = mkfs_ext4(tree, work / "image.ext4", args.image_mb)
        index, store = work / "image.caibx", work / "store"
        subprocess.run([*CAFUSE, "make", index, image_path, "--store", store], check=True)
        image = image_path.read_bytes()
        faults = Faults(rate=args.fault_rate, kinds=KINDS, stall_seconds=3, get_only=True)
        mnt = work / "mnt"
        mnt.mkdir()
        with faulty_server(store, faults) as url:
            daemon = subprocess.Popen(
                [
                    *CAFUSE,
                    "mount",
                    "-f",
                    str(index),
                    str(mnt),
                    "--store",
                    url,
                    "--memory-cache",
                    "16M",
                ],
                stderr=subprocess.DEVNULL,
            )
            try:
                try:
                    wait_for_mount(mnt, daemon)
                except RuntimeError as exc:
                    raise SystemExit(f"soak: {exc}") from None
                blob = mnt / "image"
                tally = Tally()
                started = time.monotonic()
                stop = started + args.minutes * 60
                threads = [
                    threading.Thread(target=reader, args=(blob, image, stop, n, tally))
                    for n in range(args.readers)
                ]
                for thread in threads:
                    thread.start()
                samples: list[tuple[float, float]] = []
                while any(t.is_alive() for t in threads):
                    samples.append((time.monotonic() - started, rss_mb(daemon.pid)))
                    print(
                        f"soak: {samples[-1][0]:6.0f} s  rss {samples[-1][1]:6.1f} MB  "
                        f"reads {tally.reads}  wrong {tally.wrong}  eio {tally.eio}",
                        flush=True,
                    )
                    time.sleep(args.sample_seconds)
                for thread in threads:
                    thread.join()
                stats = json.loads(
                    subprocess.run(
                        [*CAFUSE, "stats", str(mnt), "--json"],
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout
                )
            finally:
                daemon.terminate()
                daemon.wait(timeout=30)
                unmount(mnt)
    rss = [mb for _, mb in samples]
    settled = rss[len(rss) // 5 :] or rss  # after the first fifth: caches full
    store_stats = stats["stores"].get(url, {})
    summary = {
        "minutes": args.minutes,
        "readers": args.readers,
        "fault_rate": args.fault_rate,
        "reads": tally.reads,
        "bytes_read": tally.bytes,
        "wrong_reads": tally.wrong,
        "eio": tally.eio,
        "other_errors": tally.other_errors[:5],
        "rss_mb_first": rss[0],
        "rss_mb_settled_min": min(settled),
        "rss_mb_settled_max": max(settled),
        "rss_mb_last": rss[-1],
        "store_requests": store_stats.get("requests"),
        "store_errors": store_stats.get("errors"),
        "faults_served": {k: faults.faults.count(k) for k in KINDS},
        "hedged": stats["scheduler"].get("hedged"),
    }
    print(json.dumps(summary, indent=2))
    ok = tally.wrong == 0 and tally.eio == 0 and not tally.other_errors
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
