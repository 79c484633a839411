"""Mount options: from the command line and from ``-o a,b=c`` strings (mount(8), fstab)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CafuseError
from ..sizes import parse_size

DEFAULT_FUSE_OPTIONS = ("ro", "nodev", "nosuid", "default_permissions")
# mount(8)/fstab words that concern mount itself or systemd, not the file system
IGNORED_OPTIONS = {
    "defaults",
    "auto",
    "noauto",
    "nofail",
    "_netdev",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "ro",
    "nodev",
    "nosuid",
    "noexec",
    "exec",
    "noatime",
    "relatime",
    "atime",
    "nodiratime",
    "suid",
    "dev",
}
PASSED_OPTIONS = {"allow_other", "allow_root", "noexec", "noatime"}
VALUE_OPTIONS = {
    "store",
    "seed",
    "name",
    "memory_cache",
    "memory-cache",
    "readahead",
    "timeout",
    "concurrency",
    "log",
    "retries",
    "cache",
    "cache_size",
    "cache-size",
    "s3_endpoint",
    "s3-endpoint",
    "s3_region",
    "s3-region",
}


@dataclass
class MountOptions:
    index: str
    mountpoint: str
    stores: list[str] = field(default_factory=list)
    seeds: list[str] = field(default_factory=list)
    name: str | None = None
    memory_cache: int = 256 << 20
    readahead: int = 32
    concurrency: int = 16
    timeout: float = 30.0
    retries: int = 4
    cache: str | None = None
    cache_size: str = "10G"
    s3_endpoint: str | None = None
    s3_region: str | None = None
    foreground: bool = False
    log_file: str | None = None
    fuse_options: set[str] = field(default_factory=lambda: set(DEFAULT_FUSE_OPTIONS))

    @property
    def file_name(self) -> str:
        if self.name:
            return self.name
        base = Path(self.index).name
        return base[: -len(".caibx")] if base.endswith(".caibx") else base

    def apply(self, spec: str) -> None:
        """Apply one ``-o`` string: cafuse keys and FUSE options, comma-separated."""
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key, sep, value = item.partition("=")
            if key in (
                "store",
                "seed",
                "name",
                "memory_cache",
                "memory-cache",
                "readahead",
                "timeout",
                "concurrency",
                "log",
            ) and not (sep and value):
                raise CafuseError(f"mount option {key!r} needs a value ({key}=...)")
            if key == "store":
                self.stores.append(value)
            elif key == "seed":
                self.seeds.append(value)
            elif key == "name":
                self.name = value
            elif key in ("memory_cache", "memory-cache"):
                self.memory_cache = parse_size(value, "memory_cache")
            elif key == "readahead":
                self.readahead = _whole(value, key)
            elif key == "concurrency":
                self.concurrency = max(1, _whole(value, key))
            elif key == "timeout":
                self.timeout = _seconds(value)
            elif key == "log":
                self.log_file = value
            elif key == "retries":
                self.retries = _whole(value, key)
            elif key == "cache":
                self.cache = value
            elif key in ("cache_size", "cache-size"):
                parse_size(value, "cache_size")
                self.cache_size = value
            elif key in ("s3_endpoint", "s3-endpoint"):
                self.s3_endpoint = value
            elif key in ("s3_region", "s3-region"):
                self.s3_region = value
            elif key == "rw":
                raise CafuseError("cafuse mounts are read-only: drop the 'rw' mount option")
            elif key in PASSED_OPTIONS:
                self.fuse_options.add(key)
            elif key in IGNORED_OPTIONS or key.startswith(("x-", "comment=")):
                continue
            else:
                raise CafuseError(f"unknown mount option {item!r} (see cafuse mount --help)")


def _whole(value: str, key: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise CafuseError(f"mount option {key}={value!r}: expected a whole number") from None
    if number < 0:
        raise CafuseError(f"mount option {key}={value!r}: must not be negative")
    return number


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise CafuseError(f"bad timeout {value!r}: expected seconds") from None
    if seconds <= 0:
        raise CafuseError(f"bad timeout {value!r}: must be positive")
    return seconds
