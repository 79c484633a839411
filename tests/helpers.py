"""Shared test helpers: running the CLI, building real filesystem images, comparing files."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np


def run_cafuse(
    *args: object, check: bool = True, timeout: float = 300, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess, as a user would."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    proc = subprocess.run(
        [sys.executable, "-m", "cafuse", *map(str, args)],
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
        **kwargs,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"cafuse {args} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def assert_user_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """A failed command printed one line naming the problem, no traceback."""
    assert proc.returncode != 0, proc.stdout
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def random_bytes(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def build_tree(dest: Path, budget: int) -> Path:
    """A directory of real files: Python's standard library and /usr/share/doc up to
    ``budget`` bytes, plus an incompressible file and a run of zeros."""
    dest.mkdir(parents=True)
    copied = 0
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path("/usr/share/doc")]
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "test"))
            for name in sorted(filenames):
                src = Path(dirpath, name)
                if not src.is_file() or src.is_symlink():
                    continue
                target = dest / root.name / src.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)
                copied += src.stat().st_size
                if copied >= budget:
                    break
            if copied >= budget:
                break
    (dest / "random.bin").write_bytes(random_bytes(3 << 20, seed=42))
    (dest / "zeros.bin").write_bytes(bytes(2 << 20))
    return dest


def mkfs_ext4(tree: Path, image: Path, size_mb: int) -> Path:
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", str(tree), str(image)], check=True
    )
    return image


def compare_trees(expected: Path, actual: Path) -> int:
    """Assert every regular file under ``expected`` has the same bytes under ``actual``."""
    count = 0
    for dirpath, _, filenames in os.walk(expected):
        for name in filenames:
            src = Path(dirpath, name)
            got = actual / src.relative_to(expected)
            assert src.read_bytes() == got.read_bytes(), f"{got} differs"
            count += 1
    return count
