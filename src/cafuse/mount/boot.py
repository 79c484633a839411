"""Boot profiles and background fill, wired into a mount: which profile, record, replay,
fill, their statistics, and saving the recording at unmount.

A profile that cannot be used (corrupt, unreadable, of another format) is a warning, never
a failed mount: the mount works as it would without it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import CafuseError
from ..profile import MAX_PROFILE_BYTES, Profile, ProfileError, Recorder, parse, read_local
from .options import MountOptions

if TYPE_CHECKING:  # trio and numpy load in the daemon, after the fork
    from .fill import Fill
    from .reader import BlobReader
    from .replay import Replay

log = logging.getLogger(__name__)

PROFILE_SUFFIX = ".profile"


def default_profile(index_text: str) -> str:
    """``<index name>.profile`` beside the index (``img.caibx`` -> ``img.profile``), as
    ``default.castr`` is found: a path beside a local index, a URL beside a remote one."""
    from ..stores import parse_location
    from ..stores.location import parent_and_name

    location = parse_location(index_text, "index")
    directory, name = parent_and_name(location)
    if location.is_local:
        name = os.path.basename(location.path)
    stem = name[: -len(".caibx")] if name.endswith(".caibx") else name
    if location.is_local:
        return os.path.join(os.path.dirname(os.path.abspath(location.path)), stem + PROFILE_SUFFIX)
    return f"{directory}/{stem}{PROFILE_SUFFIX}"


def check_options(opts: MountOptions) -> None:
    """Checks before the fork, so the error reaches the terminal."""
    from ..stores import parse_location

    if opts.fill_rate is not None and not opts.cache:
        raise CafuseError("--fill-rate fills the disk cache: add --cache DIR")
    if opts.fill_rate is not None and opts.fill_rate <= 0:
        raise CafuseError("--fill-rate must be more than 0 bytes per second")
    if opts.profile and opts.no_profile:
        raise CafuseError("--profile and --no-profile contradict each other: keep one")
    if opts.profile:
        location = parse_location(opts.profile, "profile")
        if location.is_local and not os.path.exists(location.path):
            raise CafuseError(f"profile {opts.profile} does not exist")
    if opts.record_profile:
        opts.record_profile = os.path.abspath(opts.record_profile)
        directory = os.path.dirname(opts.record_profile)
        if not os.path.isdir(directory):
            raise CafuseError(
                f"--record-profile {opts.record_profile}: directory {directory} does not exist"
            )
        if not os.access(directory, os.W_OK):
            raise CafuseError(
                f"--record-profile {opts.record_profile}: cannot write in {directory}"
            )


def load_profile(opts: MountOptions) -> tuple[Profile | None, list[str]]:
    """The profile to replay (none with --no-profile or when there is none beside the
    index), and warnings for the terminal."""
    if opts.no_profile:
        return None, []
    explicit = opts.profile is not None
    text = opts.profile if explicit else default_profile(opts.index)
    assert text is not None
    try:
        profile = _fetch(text, opts)
    except FileNotFoundError:
        if explicit:
            return None, [f"profile {text} not found: mounting without it"]
        log.info("no profile beside the index (%s)", text)
        return None, []
    except _Unreachable as exc:
        if explicit:
            return None, [f"{exc}: mounting without a profile"]
        # offline, or a store that answers 403 for a missing object: no profile, quietly
        log.info("%s: mounting without a profile", exc)
        return None, []
    except ProfileError as exc:
        return None, [f"{exc}: mounting without a profile"]
    log.info("profile %s: %d ranges", text, len(profile.ranges))
    return profile, []


class _Unreachable(ProfileError):
    """The profile could not be fetched (as opposed to fetched and found corrupt)."""


def _fetch(text: str, opts: MountOptions) -> Profile:
    from ..resolve import RemoteOptions
    from ..stores import StoreError, parse_location
    from ..stores.location import parent_and_name

    location = parse_location(text, "profile")
    if location.is_local:
        if not os.path.exists(location.path):
            raise FileNotFoundError(text)
        return read_local(location.path)
    remote = RemoteOptions(
        timeout=opts.timeout,
        # the default one beside the index is looked up once: a dead server must not hold
        # an offline mount (served from the cache) with retries
        retries=opts.retries if opts.profile else 0,
        s3_endpoint=opts.s3_endpoint,
        s3_region=opts.s3_region,
    )
    directory, name = parent_and_name(location)
    try:
        raw = remote.open(directory).fetch_file(name)  # type: ignore[attr-defined]
    except StoreError as exc:
        if "not found" in str(exc):
            raise FileNotFoundError(text) from None
        raise _Unreachable(f"cannot fetch profile {location.display}: {exc}") from None
    if len(raw) > MAX_PROFILE_BYTES:
        raise ProfileError(f"profile {location.display}: larger than 64 MiB")
    return parse(raw, location.display)


@dataclass
class Boot:
    """What a mount does for boots: record, replay, fill."""

    reader: BlobReader
    record_to: str | None = None
    recorder: Recorder | None = None
    replay: Replay | None = None
    fill: Fill | None = None

    @classmethod
    def build(cls, reader: BlobReader, opts: MountOptions, profile: Profile | None) -> Boot:
        from ..scheduler import Priority
        from .fill import Fill
        from .replay import Replay

        boot = cls(reader, record_to=opts.record_profile)
        # prefetched chunks enter the memory cache as least recently used; filled ones go
        # to the disk cache only
        reader.scheduler.deliver_for[Priority.PROFILE] = reader.cache.put_cold
        reader.scheduler.deliver_for[Priority.FILL] = None
        if opts.record_profile:
            boot.recorder = Recorder(reader.size)
            reader.observers.append(boot.recorder.observe)
        if profile is not None and profile.ranges:
            replay = Replay(reader, profile)
            boot.replay = replay
            reader.observers.append(replay.observe)
            reader.extra_stats["profile"] = replay.snapshot
        if opts.fill_rate is not None and reader.source.cache is not None:
            fill = Fill(reader, reader.source.cache, opts.fill_rate)
            boot.fill = fill
            reader.extra_stats["fill"] = fill.snapshot
        return boot

    async def run(self) -> None:
        """Replay, then fill; returns when both are done (or cancelled at unmount)."""
        import trio

        async with trio.open_nursery() as nursery:
            after = None
            if self.replay is not None:
                nursery.start_soon(self.replay.run)
                after = self.replay.done
            if self.fill is not None:
                nursery.start_soon(self.fill.run, after)

    def save(self) -> None:
        """Write the recording (at unmount)."""
        if self.recorder is None or self.record_to is None:
            return
        try:
            self.recorder.save(self.record_to)
        except (CafuseError, OSError) as exc:
            log.error("cannot write the profile %s: %s", self.record_to, exc)


def stats_lines(stats: dict) -> list[str]:
    """``cafuse stats`` lines for the profile replay and the fill."""
    from ..sizes import format_size

    lines = []
    replay = stats.get("profile")
    if replay:
        state = "done" if replay["done"] else "running"
        lines.append(
            f"profile: {replay['source']} ({state}): {replay['chunks_fetched']} chunks "
            f"({format_size(replay['bytes_fetched'])}) fetched, "
            f"{replay['chunks_read_later']} read since, {replay['chunks_never_read']} never read"
            + (f", {replay['chunks_failed']} failed" if replay["chunks_failed"] else "")
            + (
                f"; {replay['ranges_beyond_end']} ranges past the end"
                if replay["ranges_beyond_end"]
                else ""
            )
        )
        if replay.get("stopped"):
            lines.append(f"  stopped early: {replay['stopped']}")
    fill = stats.get("fill")
    if fill:
        total = fill["bytes_total"]
        share = f" ({100 * fill['bytes_done'] / total:.1f}%)" if total else ""
        rate = f", {format_size(fill['rate'])}/s" if fill.get("rate") else ""
        eta = f", ETA {fill['eta_s']:.0f} s" if fill.get("eta_s") is not None else ""
        lines.append(
            f"fill: {fill['state']}: {format_size(fill['bytes_done'])} of "
            f"{format_size(total)}{share} local{rate} (limit "
            f"{format_size(fill['rate_limit'])}/s){eta}"
        )
    return lines
