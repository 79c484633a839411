"""``-o`` option strings as mount(8) and fstab pass them."""

from __future__ import annotations

import pytest

from cafuse.errors import CafuseError
from cafuse.mount.options import MountOptions


def test_fstab_style_options() -> None:
    opts = MountOptions("img.caibx", "/mnt")
    opts.apply(
        "ro,nofail,_netdev,x-systemd.automount,store=/a,store=http://h/s,"
        "cache=/var/cache/cafuse,cache-size=20G,memory_cache=64M,readahead=8,"
        "timeout=5,retries=2,allow_other,name=disk.img"
    )
    assert opts.stores == ["/a", "http://h/s"]
    assert (opts.cache, opts.cache_size, opts.memory_cache) == (
        "/var/cache/cafuse",
        "20G",
        64 << 20,
    )
    assert (opts.readahead, opts.timeout, opts.retries) == (8, 5.0, 2)
    assert opts.file_name == "disk.img"
    assert {"ro", "nodev", "nosuid", "allow_other"} <= opts.fuse_options


def test_default_file_name() -> None:
    assert MountOptions("/srv/os-v2.caibx", "/mnt").file_name == "os-v2"
    assert MountOptions("/srv/raw.img", "/mnt").file_name == "raw.img"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cache", "needs a value"),
        ("store=", "needs a value"),
        ("bogus", "unknown mount option"),
        ("rw", "read-only"),
        ("readahead=x", "whole number"),
        ("cache_size=zz", "bad cache_size"),
        ("timeout=-1", "must be positive"),
        ("memory_cache=lots", "bad memory_cache"),
    ],
)
def test_bad_options(spec: str, message: str) -> None:
    with pytest.raises(CafuseError, match=message):
        MountOptions("img.caibx", "/mnt").apply(spec)
