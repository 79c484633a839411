"""A web server that misbehaves on purpose (500s, resets, stalls, truncated bodies, wrong
bytes): cafuse gives the right bytes, or a clear error / EIO after its deadline; never wrong
data, never a hang, and the daemon survives."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import assert_user_error, run_cafuse, sha256_file
from mounting import mounted
from servers import Faults, faulty_server

from cafuse.index import read_index

# a hang would show up as the subprocess timeout of run_cafuse, not as a wait forever
HANG_GUARD = 180


def test_flaky_server_gives_right_bytes(made_image, ext4_image: Path, tmp_path: Path) -> None:
    index, store = made_image
    faults = Faults(rate=0.3, kinds=("500", "reset", "truncate"), seed=3)
    with faulty_server(store, faults) as url:
        out = tmp_path / "out.img"
        proc = run_cafuse(
            "extract",
            index,
            out,
            "--store",
            url,
            "--retries",
            "8",
            "--timeout",
            "60",
            timeout=HANG_GUARD,
        )
        assert sha256_file(out) == sha256_file(ext4_image)
        assert "from stores" in proc.stdout
        with mounted(
            index, tmp_path / "mnt", "--store", url, "--retries", "8", "--timeout", "60"
        ) as blob:
            assert sha256_file(blob) == sha256_file(ext4_image)
    assert len(faults.requests) > len(read_index(index).distinct_positions())  # retried


def test_wrong_bytes_are_refetched_then_replaced(
    made_image, ext4_image: Path, tmp_path: Path
) -> None:
    index, store = made_image
    liar = Faults(rate=1.0, kinds=("wrong",))
    with faulty_server(store, liar) as bad:
        out = tmp_path / "out.img"
        proc = run_cafuse(
            "extract", index, out, "--store", bad, "--store", store, timeout=HANG_GUARD
        )
        assert sha256_file(out) == sha256_file(ext4_image)
        assert "bad copies skipped" in proc.stdout
        # each chunk was asked for twice from the lying store (refetched once), not more
        path = liar.requests[-1]
        assert liar.requests.count(path) == 2
        out.unlink()
        err = assert_user_error(
            run_cafuse("extract", index, out, "--store", bad, check=False, timeout=HANG_GUARD),
            "corrupt in",
        )
        assert "digest mismatch" in err or "bad zstd" in err
        assert not out.exists()


def test_missing_chunk_is_not_retried(made_image, tmp_path: Path) -> None:
    index, store = made_image
    parsed = read_index(index)
    victim = parsed.chunk_id(int(parsed.distinct_positions()[-1])).hex()
    faults = Faults()
    partial = tmp_path / "partial"
    subprocess.run(["cp", "-a", str(store), str(partial)], check=True)
    (partial / victim[:4] / f"{victim}.cacnk").unlink()
    with faulty_server(partial, faults) as url:
        assert_user_error(
            run_cafuse(
                "extract", index, tmp_path / "o", "--store", url, check=False, timeout=HANG_GUARD
            ),
            "not in",
            victim,
        )
    assert sum(victim in path for path in faults.requests) == 1


def test_stalled_server_fails_in_bounded_time(made_image, tmp_path: Path) -> None:
    index, store = made_image
    faults = Faults(rate=1.0, kinds=("stall",), stall_seconds=120, methods=("GET",))
    with faulty_server(store, faults) as url:
        assert_user_error(
            run_cafuse(
                "extract",
                index,
                tmp_path / "o",
                "--store",
                url,
                "--timeout",
                "3",
                "--retries",
                "1",
                check=False,
                timeout=HANG_GUARD,
            ),
            "unavailable",
        )
        assert not (tmp_path / "o").exists()
        mnt = tmp_path / "mnt"
        with mounted(index, mnt, "--store", url, "--timeout", "3", "--retries", "1") as blob:
            offset = int(read_index(index).ends[40])
            reader = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    f"import os; fd = os.open({str(blob)!r}, os.O_RDONLY)\n"
                    f"try: os.pread(fd, 4096, {offset})\n"
                    "except OSError as e: print(e.errno)",
                ],
                capture_output=True,
                text=True,
                timeout=HANG_GUARD,
            )
            assert reader.stdout.strip() == str(errno.EIO)
            # the daemon is still there and answers
            assert blob.stat().st_size > 0
            stats = json.loads(run_cafuse("stats", mnt, "--json").stdout)
            assert stats["reads"]["failed"] >= 1
            assert os.path.ismount(mnt)
