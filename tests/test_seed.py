"""Seeds and in-place updates: v1 supplies every chunk it shares with v2."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_user_error, random_bytes, run_cafuse

from cafuse.extract import extract
from cafuse.fetch import ChunkSource
from cafuse.index import read_index
from cafuse.seed import Seed
from cafuse.stores import LocalStore


@pytest.fixture()
def versions(tmp_path: Path) -> dict[str, Path]:
    v1 = random_bytes(8 << 20, seed=10)
    v2 = bytearray(v1)
    v2[3 << 20 : (3 << 20) + 100_000] = random_bytes(100_000, seed=11)  # changed in place
    v2 += random_bytes(200_000, seed=12)  # grown
    paths = {"v1": tmp_path / "v1.img", "v2": tmp_path / "v2.img", "store": tmp_path / "store"}
    paths["v1"].write_bytes(v1)
    paths["v2"].write_bytes(bytes(v2))
    for name in ("v1", "v2"):
        paths[f"{name}.caibx"] = tmp_path / f"{name}.caibx"
        run_cafuse("make", paths[f"{name}.caibx"], paths[name], "--store", paths["store"])
    return paths


def _shared_bytes(v1_index: Path, v2_index: Path) -> tuple[int, int]:
    """Bytes of v2 whose chunk ids occur in v1, and the rest."""
    a, b = read_index(v1_index), read_index(v2_index)
    in_v1 = {a.chunk_id(i) for i in range(a.chunk_count)}
    shared = np.array([b.chunk_id(i) in in_v1 for i in range(b.chunk_count)])
    return int(b.sizes[shared].sum()), int(b.sizes[~shared].sum())


def test_seed_supplies_shared_chunks(versions: dict[str, Path], tmp_path: Path) -> None:
    shared, new = _shared_bytes(versions["v1.caibx"], versions["v2.caibx"])
    assert shared > 0 and new > 0
    index = read_index(versions["v2.caibx"])
    source = ChunkSource(
        index.digest,
        [LocalStore(versions["store"])],
        [Seed(read_index(versions["v1.caibx"]), str(versions["v1"]))],
    )
    result = extract(index, str(tmp_path / "out.img"), source, progress=False)
    assert (tmp_path / "out.img").read_bytes() == versions["v2"].read_bytes()
    assert result.from_seeds == shared
    assert result.from_stores == new


def test_seed_cli_and_changed_seed_file(versions: dict[str, Path], tmp_path: Path) -> None:
    # a seed file that no longer matches its index is detected chunk by chunk, not trusted
    seed_copy = tmp_path / "seed.img"
    data = bytearray(versions["v1"].read_bytes())
    data[:4096] = bytes(4096)
    seed_copy.write_bytes(bytes(data))
    out = tmp_path / "out.img"
    proc = run_cafuse(
        "extract",
        versions["v2.caibx"],
        out,
        "--store",
        versions["store"],
        "--seed",
        f"{versions['v1.caibx']}:{seed_copy}",
    )
    assert "from seeds" in proc.stdout
    assert out.read_bytes() == versions["v2"].read_bytes()


def test_seed_only_without_store(versions: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "v1-again.img"
    run_cafuse(
        "extract", versions["v1.caibx"], out, "--seed", f"{versions['v1.caibx']}:{versions['v1']}"
    )
    assert out.read_bytes() == versions["v1"].read_bytes()


def test_in_place_keeps_what_the_output_holds(versions: dict[str, Path]) -> None:
    target = versions["v1"]  # update v1 to v2 in place
    index = read_index(versions["v2.caibx"])
    source = ChunkSource(index.digest, [LocalStore(versions["store"])])
    result = extract(index, str(target), source, in_place=True, progress=False)
    assert target.read_bytes() == versions["v2"].read_bytes()
    assert result.from_output > 0 and result.from_stores > 0
    assert result.from_output + result.from_stores == index.blob_size


def test_seed_errors(versions: dict[str, Path], tmp_path: Path) -> None:
    """A malformed --seed is a typo: refused. A seed that cannot be used (file missing,
    another digest) is skipped with one warning line and the job goes on."""
    out = tmp_path / "o.img"
    assert_user_error(
        run_cafuse(
            "extract",
            versions["v2.caibx"],
            out,
            "--store",
            versions["store"],
            "--seed",
            "nocolon",
            check=False,
        ),
        "bad --seed",
    )
    assert not out.exists()
    other = tmp_path / "sha.caibx"
    run_cafuse("make", other, versions["v1"], "--store", tmp_path / "s2", "--digest", "sha256")
    for spec, why in (
        (f"{versions['v1.caibx']}:{tmp_path / 'nope.img'}", "seed file"),
        (f"{other}:{versions['v1']}", "same --digest"),
    ):
        proc = run_cafuse(
            "extract", versions["v2.caibx"], out, "--store", versions["store"], "--seed", spec
        )
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "skipped" in lines[0] and why in lines[0], proc.stderr
        assert out.read_bytes() == versions["v2"].read_bytes()
        out.unlink()


def test_bad_seed_beside_a_good_one(versions: dict[str, Path], tmp_path: Path) -> None:
    """desync's case: a seed whose file is shorter than its index is skipped with a
    warning; the good seed beside it supplies its chunks and the job succeeds."""
    short = tmp_path / "short.img"
    short.write_bytes(versions["v1"].read_bytes()[: 1 << 20])
    out = tmp_path / "o.img"
    proc = run_cafuse(
        "extract",
        versions["v2.caibx"],
        out,
        "--store",
        versions["store"],
        "--seed",
        f"{versions['v1.caibx']}:{short}",
        "--seed",
        f"{versions['v1.caibx']}:{versions['v1']}",
    )
    assert out.read_bytes() == versions["v2"].read_bytes()
    assert "skipped" in proc.stderr and str(short) in proc.stderr
    assert "from seeds 0 B" not in proc.stdout


def test_seed_dir(versions: dict[str, Path], tmp_path: Path) -> None:
    """--seed-dir DIR: every NAME.caibx there is a seed, its file NAME beside it; one
    without its file is skipped."""
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    shutil.copy(versions["v1.caibx"], seeds / "old.img.caibx")
    shutil.copy(versions["v1"], seeds / "old.img")
    shutil.copy(versions["v1.caibx"], seeds / "lost.img.caibx")  # no lost.img
    out = tmp_path / "o.img"
    proc = run_cafuse(
        "extract", versions["v2.caibx"], out, "--seed-dir", seeds, "--store", versions["store"]
    )
    assert out.read_bytes() == versions["v2"].read_bytes()
    assert "from seeds 0 B" not in proc.stdout and "lost.img" in proc.stderr
    assert_user_error(
        run_cafuse(
            "extract", versions["v2.caibx"], out, "--seed-dir", tmp_path / "no", check=False
        ),
        "--seed-dir",
        "cannot list",
    )
