from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import build_tree, mkfs_ext4, run_cafuse


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for tool in ("casync", "mkfs.ext4"):
        if shutil.which(tool) is None:
            raise pytest.UsageError(f"{tool} is not installed: run scripts/setup")


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
