"""Mount options: from the command line and from ``-o a,b=c`` strings (mount(8), fstab)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import defaults
from ..args import specs_in_dir
from ..errors import CafuseError
from ..sizes import parse_size
from ..stores.retry import DEFAULT_RETRIES, DEFAULT_TIMEOUT

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
FLAG_OPTIONS = {
    "nohedge": ("hedge", False),
    "noprofile": ("no_profile", True),
}  # cafuse switches without a value
PASSED_OPTIONS = {"allow_other", "allow_root", "noexec", "noatime"}


@dataclass
class MountOptions:
    index: str
    mountpoint: str
    stores: list[str] = field(default_factory=list)
    seeds: list[str] = field(default_factory=list)
    name: str | None = None
    memory_cache: int = defaults.MEMORY_CACHE
    readahead: int = defaults.READAHEAD
    hedge: bool = True
    concurrency: int = defaults.REMOTE_CONCURRENCY
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    cache: str | None = None
    cache_size: str = defaults.CACHE_SIZE
    s3_endpoint: str | None = None
    s3_region: str | None = None
    foreground: bool = False
    log_file: str | None = None
    fuse_options: set[str] = field(default_factory=lambda: set(DEFAULT_FUSE_OPTIONS))
    # boot profiles and background fill (mount/boot.py)
    profile: str | None = None
    no_profile: bool = False
    record_profile: str | None = None
    fill_rate: int | None = None
    # throughput (issue 11): None = derived from memory_cache / concurrency
    readahead_memory: int | None = None
    max_concurrency: int | None = None

    def check_throughput(self) -> None:
        """Readahead that does not fit in the memory cache would evict itself."""
        if self.readahead_memory is not None and self.readahead_memory > self.memory_cache // 2:
            raise CafuseError(
                f"readahead memory {self.readahead_memory} is more than half the memory cache "
                f"({self.memory_cache}): lower --readahead-memory or raise --memory-cache"
            )
        if self.max_concurrency is not None and self.max_concurrency < self.concurrency:
            raise CafuseError(
                f"--max-concurrency {self.max_concurrency} is below --concurrency "
                f"{self.concurrency}: raise it, or lower --concurrency"
            )

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
            key = key.replace("-", "_")
            setter = SETTERS.get(key)
            if setter is not None:
                if not (sep and value):
                    raise CafuseError(f"mount option {key!r} needs a value ({key}=...)")
                setter(self, value)
            elif key in FLAG_OPTIONS and not sep:
                attr, value_set = FLAG_OPTIONS[key]
                setattr(self, attr, value_set)
            elif key == "rw":
                raise CafuseError("cafuse mounts are read-only: drop the 'rw' mount option")
            elif key in PASSED_OPTIONS:
                self.fuse_options.add(key)
            elif not (key in IGNORED_OPTIONS or key.startswith(("x_", "comment"))):
                raise CafuseError(f"unknown mount option {item!r} (see cafuse mount --help)")


def _set_cache_size(opts: MountOptions, value: str) -> None:
    parse_size(value, "cache_size")  # reject a bad size now, not in the daemon
    opts.cache_size = value


SETTERS: dict[str, Callable[[MountOptions, str], None]] = {
    "store": lambda o, v: o.stores.append(v),
    "seed": lambda o, v: o.seeds.append(v),
    "seed_dir": lambda o, v: o.seeds.extend(specs_in_dir(v)),
    "name": lambda o, v: setattr(o, "name", v),
    "memory_cache": lambda o, v: setattr(o, "memory_cache", parse_size(v, "memory_cache")),
    "readahead": lambda o, v: setattr(o, "readahead", _whole(v, "readahead")),
    "concurrency": lambda o, v: setattr(o, "concurrency", _whole(v, "concurrency", minimum=1)),
    "timeout": lambda o, v: setattr(o, "timeout", _seconds(v)),
    "retries": lambda o, v: setattr(o, "retries", _whole(v, "retries")),
    "log": lambda o, v: setattr(o, "log_file", v),
    "cache": lambda o, v: setattr(o, "cache", v),
    "cache_size": _set_cache_size,
    "s3_endpoint": lambda o, v: setattr(o, "s3_endpoint", v),
    "s3_region": lambda o, v: setattr(o, "s3_region", v),
    # boot profiles and background fill
    "profile": lambda o, v: setattr(o, "profile", v),
    "record_profile": lambda o, v: setattr(o, "record_profile", v),
    "fill_rate": lambda o, v: setattr(o, "fill_rate", parse_size(v, "fill_rate")),
    # throughput (issue 11)
    "readahead_memory": lambda o, v: setattr(
        o, "readahead_memory", parse_size(v, "readahead_memory")
    ),
    "max_concurrency": lambda o, v: setattr(
        o, "max_concurrency", _whole(v, "max_concurrency", minimum=1)
    ),
}


def _whole(value: str, key: str, minimum: int = 0) -> int:
    try:
        number = int(value)
    except ValueError:
        raise CafuseError(f"mount option {key}={value!r}: expected a whole number") from None
    if number < minimum:
        raise CafuseError(
            f"mount option {key}={value!r}: "
            + ("must not be negative" if minimum == 0 else f"must be at least {minimum}")
        )
    return number


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise CafuseError(f"bad timeout {value!r}: expected seconds") from None
    if seconds <= 0:
        raise CafuseError(f"bad timeout {value!r}: must be positive")
    return seconds
