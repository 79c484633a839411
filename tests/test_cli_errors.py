"""Every mistake a user can make gives one line naming it and a non-zero exit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_user_error, random_bytes, run_cafuse


@pytest.fixture()
def small(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "in.img"
    src.write_bytes(random_bytes(600_000, seed=5))
    index, store = tmp_path / "in.caibx", tmp_path / "store"
    run_cafuse("make", index, src, "--store", store, "--chunk-size", "16K")
    return {"src": src, "index": index, "store": store}


def _some_chunk(store: Path) -> Path:
    return sorted(store.rglob("*.cacnk"))[3]


def test_missing_index(tmp_path: Path) -> None:
    proc = run_cafuse(
        "extract", tmp_path / "nope.caibx", tmp_path / "o", "--store", tmp_path, check=False
    )
    assert_user_error(proc, "index file not found")


def test_garbage_and_truncated_index(small: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.caibx"
    bad.write_bytes(b"this is not an index" * 10)
    assert_user_error(
        run_cafuse("info", bad, check=False), "not a valid casync blob index", "bad header"
    )
    bad.write_bytes(small["index"].read_bytes()[:-13])
    assert_user_error(
        run_cafuse("cat", bad, "--store", small["store"], check=False, stdout=subprocess.DEVNULL),
        "truncated",
    )


def test_wrong_digest_flags(small: dict[str, Path], tmp_path: Path) -> None:
    raw = bytearray(small["index"].read_bytes())
    raw[16:24] = (0x0800000000000000 | 0x2000000000000000).to_bytes(8, "little")
    bad = tmp_path / "flags.caibx"
    bad.write_bytes(bytes(raw))
    assert_user_error(
        run_cafuse("extract", bad, tmp_path / "o", "--store", small["store"], check=False),
        "both BLAKE3 and SHA-512/256",
    )
    # a valid flag for another digest: every chunk then fails verification, never served
    raw[16:24] = (0x2000000000000000).to_bytes(8, "little")
    bad.write_bytes(bytes(raw))
    out = tmp_path / "o"
    assert_user_error(
        run_cafuse("extract", bad, out, "--store", small["store"], check=False), "digest mismatch"
    )
    assert not out.exists()


def test_missing_chunk_leaves_no_output(small: dict[str, Path], tmp_path: Path) -> None:
    chunk = _some_chunk(small["store"])
    chunk.unlink()
    out = tmp_path / "out.img"
    err = assert_user_error(
        run_cafuse("extract", small["index"], out, "--store", small["store"], check=False),
        "unavailable",
        "not in",
    )
    assert chunk.name.removesuffix(".cacnk") in err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.img.*"))  # no temporary file left behind either
    assert_user_error(
        run_cafuse(
            "cat", small["index"], "--store", small["store"], check=False, stdout=subprocess.DEVNULL
        ),
        "unavailable",
    )


def test_corrupt_chunk_is_never_served(small: dict[str, Path], tmp_path: Path) -> None:
    chunk = _some_chunk(small["store"])
    chunk.write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 10)
    assert_user_error(
        run_cafuse(
            "extract", small["index"], tmp_path / "o", "--store", small["store"], check=False
        ),
        "corrupt in",
    )
    # a valid zstd frame of the wrong bytes is caught by the digest
    shutil.copyfile(sorted(small["store"].rglob("*.cacnk"))[0], chunk)
    assert_user_error(
        run_cafuse(
            "extract", small["index"], tmp_path / "o", "--store", small["store"], check=False
        ),
        "digest mismatch",
    )


def test_second_store_serves_what_the_first_lacks(small: dict[str, Path], tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(small["store"], partial)
    _some_chunk(partial).unlink()
    out = tmp_path / "out.img"
    run_cafuse("extract", small["index"], out, "--store", partial, "--store", small["store"])
    assert out.read_bytes() == small["src"].read_bytes()


def test_unwritable_output(small: dict[str, Path], tmp_path: Path) -> None:
    assert_user_error(
        run_cafuse(
            "extract",
            small["index"],
            tmp_path / "no" / "dir" / "o",
            "--store",
            small["store"],
            check=False,
        ),
        "does not exist",
    )
    assert_user_error(
        run_cafuse("extract", small["index"], tmp_path, "--store", small["store"], check=False),
        "is a directory",
    )
    assert_user_error(
        run_cafuse(
            "make",
            tmp_path / "nodir" / "x.caibx",
            small["src"],
            "--store",
            small["store"],
            check=False,
        ),
        "does not exist",
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("abc", "bad --chunk-size"),
        ("1K:512:2K", "MIN <= AVG <= MAX"),
        ("64K:32M", "outside"),
        ("1:2:3:4", "expected [MIN:]AVG[:MAX]"),
        ("16", "outside"),
        ("64", "'64': MIN 16 outside"),
    ],
)
def test_bad_chunk_size(small: dict[str, Path], tmp_path: Path, spec: str, message: str) -> None:
    assert_user_error(
        run_cafuse(
            "make",
            tmp_path / "x.caibx",
            small["src"],
            "--store",
            tmp_path / "s",
            "--chunk-size",
            spec,
            check=False,
        ),
        message,
    )
    assert not (tmp_path / "x.caibx").exists()


def test_bad_flags_and_arguments(small: dict[str, Path], tmp_path: Path) -> None:
    assert_user_error(
        run_cafuse(
            "make",
            tmp_path / "x.caibx",
            small["src"],
            "--store",
            tmp_path / "s",
            "--digest",
            "md5",
            check=False,
        ),
        "invalid choice",
    )
    assert_user_error(
        run_cafuse("extract", small["index"], "o", "--bogus", check=False), "unrecognized arguments"
    )
    assert_user_error(
        run_cafuse(
            "extract",
            small["index"],
            tmp_path / "o",
            "--threads",
            "0",
            "--store",
            small["store"],
            check=False,
        ),
        "--threads",
    )
    assert_user_error(
        run_cafuse(
            "make",
            tmp_path / "x.caibx",
            small["src"],
            "--store",
            tmp_path / "s",
            "--level",
            "99",
            check=False,
        ),
        "--level",
    )
    assert_user_error(
        run_cafuse(
            "make",
            tmp_path / "x.caibx",
            tmp_path / "none.img",
            "--store",
            tmp_path / "s",
            check=False,
        ),
        "input file not found",
    )
    assert_user_error(
        run_cafuse("make", tmp_path / "x.caibx", tmp_path, "--store", tmp_path / "s", check=False),
        "not a regular file",
    )
    assert_user_error(
        run_cafuse("extract", small["index"], tmp_path / "o", check=False), "no chunk store given"
    )
    assert_user_error(
        run_cafuse(
            "extract", small["index"], tmp_path / "o", "--store", tmp_path / "absent", check=False
        ),
        "directory does not exist",
    )
    assert_user_error(
        run_cafuse(
            "extract", small["index"], tmp_path / "o", "--store", "ftp://host/store", check=False
        ),
        "unsupported store URL",
    )
    assert_user_error(run_cafuse(check=False), "required")


def test_cache_command_needs_a_cache_dir(small: dict[str, Path]) -> None:
    assert_user_error(
        run_cafuse("cache", small["index"], "--store", small["store"], check=False),
        "needs --cache DIR",
    )


def test_cache_that_cannot_complete_says_how_to_resume(
    small: dict[str, Path], tmp_path: Path
) -> None:
    _some_chunk(small["store"]).unlink()
    cache = tmp_path / "cache"
    err = assert_user_error(
        run_cafuse(
            "cache", small["index"], "--store", small["store"], "--cache", cache, check=False
        ),
        "could not be cached",
        "run cafuse cache again",
    )
    assert "1 of" in err
    assert len(list(cache.rglob("*.cacnk"))) > 0  # what could be fetched was kept


@pytest.fixture()
def loop_device(tmp_path: Path):
    """A real block device: a loop device over a file, detached afterwards."""
    devices: list[str] = []

    def make(size: int) -> str:
        backing = tmp_path / f"disk{len(devices)}"
        backing.write_bytes(b"\xaa" * size)  # old content that must be overwritten
        dev = subprocess.run(
            ["losetup", "--find", "--show", str(backing)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        devices.append(dev)
        return dev

    yield make
    for dev in devices:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_extract_to_a_block_device(small: dict[str, Path], loop_device) -> None:
    data = small["src"].read_bytes()
    dev = loop_device(1 << 20)
    proc = run_cafuse("extract", small["index"], dev, "--store", small["store"])
    assert "written" in proc.stdout
    with open(dev, "rb") as f:
        assert f.read(len(data)) == data
    again = run_cafuse("extract", small["index"], dev, "--store", small["store"])
    assert "from stores 0 B" in again.stdout  # everything was already on the device
    too_small = loop_device(64 << 10)
    assert_user_error(
        run_cafuse("extract", small["index"], too_small, "--store", small["store"], check=False),
        "block device is",
        "needs",
    )


def test_make_from_a_block_device(small: dict[str, Path], loop_device, tmp_path: Path) -> None:
    dev = loop_device(1 << 20)
    with open(dev, "r+b") as f:
        f.write(small["src"].read_bytes())
    index, store = tmp_path / "dev.caibx", tmp_path / "dev-store"
    run_cafuse("make", index, dev, "--store", store)
    out = tmp_path / "dev.img"
    run_cafuse("extract", index, out, "--store", store)
    with open(dev, "rb") as f:
        assert out.read_bytes() == f.read()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--readahead", "-1"), "--readahead: expected a number >= 0"),
        (("--concurrency", "0"), "--concurrency: expected a number >= 1"),
        (("-o", "concurrency=0"), "must be at least 1"),
        (("-o", "readahead=-2"), "must not be negative"),
    ],
)
def test_mount_refuses_bad_counts(
    small: dict[str, Path], tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    err = assert_user_error(
        run_cafuse("mount", small["index"], mnt, "--store", small["store"], *args, check=False),
        message,
    )
    assert err.startswith("cafuse: error:")  # one prefix for every error
    assert not os.path.ismount(mnt)


def test_cat_takes_sizes_with_suffixes(small: dict[str, Path]) -> None:
    data = small["src"].read_bytes()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cafuse",
            "cat",
            str(small["index"]),
            "--store",
            str(small["store"]),
            "--offset",
            "1K",
            "--length",
            "2K",
        ],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == data[1024 : 1024 + 2048]
    assert_user_error(
        run_cafuse("cat", small["index"], "--store", small["store"], "--offset", "1Q", check=False),
        "bad size '1Q'",
    )


COMMANDS = ("make", "extract", "cat", "cache", "info", "verify", "gc", "mount", "umount", "stats")


def test_help_shows_real_defaults_and_every_mount_option() -> None:
    from cafuse import defaults
    from cafuse.mount.options import SETTERS

    for command in COMMANDS:
        text = run_cafuse(command, "--help").stdout
        assert "default: None" not in text and "(default None)" not in text, command
    mount = " ".join(run_cafuse("mount", "--help").stdout.split())
    for key in SETTERS:
        assert f"{key}=" in mount, key
    for key in ("cache=", "cache_size=", "retries=", "s3_endpoint=", "s3_region="):
        assert key in mount
    assert f"(default: {defaults.TIMEOUT:g})" in mount
    assert f"(default: {defaults.RETRIES})" in mount
    assert f"(default: {defaults.CACHE_SIZE})" in mount


def test_cli_modules_import_no_cycle_and_help_imports_no_tqdm() -> None:
    code = (
        "import sys, cafuse.mount.cli; "
        "assert 'cafuse.cli' not in sys.modules, 'mount.cli imports cli'; "
        "import cafuse.cli, cafuse.mount.helper; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "cafuse", "--help"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0
    imported = proc.stderr
    for heavy in ("tqdm", "numpy", "pyfuse3", "trio", "obstore", "zstandard"):
        assert f"| {heavy}\n" not in imported and f" {heavy}\n" not in imported, heavy


def test_progress_bar_on_a_terminal_only(small: dict[str, Path], tmp_path: Path) -> None:
    """On a terminal: total, ETA and sizes in the summary's units, redrawn in place with
    the line cleared; piped: nothing on stderr."""
    import fcntl
    import pty
    import re
    import struct
    import termios

    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 60, 0, 0))  # narrow
    out = tmp_path / "o.img"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "cafuse", "extract", small["index"], out, "--store",
             small["store"]],
            stdout=subprocess.PIPE,
            stderr=secondary,
            timeout=120,
        )  # fmt: skip
        os.close(secondary)
        chunks = []
        while True:
            try:
                data = os.read(primary, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(primary)
    assert proc.returncode == 0
    bar = b"".join(chunks).decode(errors="replace")
    assert "extract" in bar and "ETA" in bar and "100%" in bar, bar
    assert "\r" in bar and "KiB" in bar, bar
    for frame in re.split(r"[\r\n]+", bar):  # every redraw fits the 60 columns
        assert len(re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", frame)) <= 60, frame
    piped = run_cafuse("extract", small["index"], out, "--store", small["store"])
    assert piped.stderr == ""
