from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import build_tree, mkfs_ext4, run_cafuse


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "casync: needs the casync binary (interop)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without mkfs.ext4 nothing can be tested; without casync only the interop tests are
    skipped (marked ``casync``, or in test_casync_interop.py)."""
    if shutil.which("mkfs.ext4") is None:
        raise pytest.UsageError("mkfs.ext4 is not installed: run scripts/setup")
    if shutil.which("casync") is None:
        skip = pytest.mark.skip(reason="casync is not installed (scripts/setup installs it)")
        for item in items:
            if "casync" in item.keywords or item.path.name == "test_casync_interop.py":
                item.add_marker(skip)


@pytest.fixture(scope="session")
def sample_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tree(tmp_path_factory.mktemp("tree") / "root", budget=24 << 20)


@pytest.fixture(scope="session")
def ext4_image(tmp_path_factory: pytest.TempPathFactory, sample_tree: Path) -> Path:
    """An ext4 image built with ``mkfs.ext4 -d`` from real files."""
    return mkfs_ext4(sample_tree, tmp_path_factory.mktemp("img") / "rootfs.ext4", 64)


@pytest.fixture(scope="session")
def made_image(tmp_path_factory: pytest.TempPathFactory, ext4_image: Path) -> tuple[Path, Path]:
    """(index, store) of ``ext4_image`` made by cafuse with its defaults."""
    work = tmp_path_factory.mktemp("made")
    index, store = work / "rootfs.caibx", work / "store"
    run_cafuse("make", index, ext4_image, "--store", store)
    return index, store
