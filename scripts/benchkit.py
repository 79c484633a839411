"""The benchmark harness: result rows and the report, running and timing commands, the
images every section uses, and writing docs/benchmarks.md. Sections (``bench_local``,
``bench_remote``, ``bench_faults``, ...) import it; ``scripts/bench.py`` runs them.

Importing it also makes the tests' helpers (tests/helpers.py, mounting.py, servers.py) and
the other scripts importable: one implementation of each, shared with the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "tests", ROOT / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

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


def copy_usr_files(tree: Path, budget: int, max_file_size: int | None = None) -> list[Path]:
    """Copy real files of /usr/lib, /usr/share and /usr/bin (in name order, each of at most
    ``max_file_size`` bytes) under ``tree`` until about ``budget`` bytes: the copies."""
    copied = 0
    files: list[Path] = []
    for root in (Path("/usr/lib"), Path("/usr/share"), Path("/usr/bin")):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                src = Path(dirpath, name)
                if src.is_symlink() or not src.is_file():
                    continue
                if max_file_size is not None and src.stat().st_size > max_file_size:
                    continue
                dest = tree / src.relative_to("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copyfile(src, dest)
                except OSError:
                    continue
                files.append(dest)
                copied += dest.stat().st_size
                if copied >= budget:
                    break
            if copied >= budget:
                break
    return files


def build_images(work: Path, size_mb: int) -> tuple[Path, Path]:
    """v1: an ext4 image of real files from /usr; v2: the same with some files changed."""
    v1, v2 = work / "v1.ext4", work / "v2.ext4"
    if v1.exists() and v2.exists():
        return v1, v2
    tree = work / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    copy_usr_files(tree, int(size_mb * 0.8) << 20)
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
    report: Report,
    args: argparse.Namespace,
    v1: Path | None,
    seconds: float,
    sections: tuple[str, ...],
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
    if set(args.only.split(",")) != set(sections):
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
