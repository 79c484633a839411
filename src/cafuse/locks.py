"""Store locks: ``make`` and ``gc`` on the same object store (S3, GCS, Azure) exclude each
other, as restic's repository locks do.

Why: gc deletes unreferenced chunks older than its grace period, and a make reusing an old
chunk would have to refresh its age to keep gc off it. A local store does that with a cheap
``utime`` (and gc renames before it deletes, see ``LocalStore``), so local stores take no
lock. An object's last-modified time cannot be refreshed without uploading the chunk again,
which would cost what dedup saves, so on an object store make and gc never run together.

The protocol (docs/remote.md):

- Each run writes its own lock object ``<store>/.cafuse-locks/<kind>-<host>-<pid>-<random>.json``
  (kind ``make`` or ``gc``; the body is JSON with host, pid, kind and start time, for people),
  **then** lists the locks. Write-then-check means that of a make and a gc starting together
  at least one sees the other: whichever lists second lists after both locks were written
  (object stores list what was written before, strongly consistent on S3, GCS and Azure). Both
  may see each other and both give up; neither ever misses the other.
- A lock is fresh while its last-modified time is less than ``LOCK_STALE`` old, measured
  against the last-modified time of the lock just written: both are the server's clock,
  so skew between machines does not count. A fresh lock of the other kind makes the new
  run delete its own lock and fail at once (one line; no waiting: run it again later).
  Stale locks (of killed processes) are ignored and removed.
- A holder rewrites its lock every ``LOCK_REFRESH`` from a background thread (after checking
  that it is still there), and deletes it when done, on errors and on Ctrl-C too. A holder
  whose lock was removed (``gc --break-locks``) or not refreshed for ``LOCK_STALE -
  LOCK_REFRESH`` (a suspended process, a store that did not answer) counts its lock as lost:
  make fails before writing its index, gc stops deleting.
- ``gc --break-locks`` removes every make lock, fresh or not: for a make you know is dead.

Locks protect cafuse runs from each other only: casync, desync and older cafuse versions
write without a lock, so gc's grace period still matters for them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .errors import CafuseError
from .sizes import format_duration
from .stores import StoreError

log = logging.getLogger(__name__)

# read when used, so tests can scale time down
LOCK_STALE = 1800.0  # seconds: a lock not rewritten for this long belongs to a dead process
LOCK_REFRESH = 300.0  # seconds between rewrites of a held lock
LOCK_RETRY = 10.0  # seconds before trying again after a failed rewrite

KINDS = ("make", "gc")
_OTHER = {"make": "gc", "gc": "make"}
_LOCK_NAME = re.compile(r"^(make|gc)-(.*)-(\d+)-([0-9a-f]{16})\.json$")


class StoreLocked(CafuseError):
    """A fresh lock of the other kind: make and gc cannot run together on this store."""


class LockLost(CafuseError):
    """This run's lock was removed or went stale while it ran."""


@dataclass
class LockEntry:
    name: str
    kind: str
    modified: float  # server time
    age: float = 0.0  # seconds, server time


def lockable(store: Any) -> bool:
    """Whether make and gc lock this store: writable object stores (and failover groups
    whose first member is one); never local directories or HTTP."""
    return bool(getattr(store, "supports_locks", False))


def _host() -> str:
    return socket.gethostname() or "unknown"


def _parse(name: str, modified: float) -> LockEntry | None:
    match = _LOCK_NAME.match(name)
    return LockEntry(name, match.group(1), modified) if match else None


def _describe(store: Any, entry: LockEntry) -> str:
    """``.cafuse-locks/NAME, host H, pid P`` from the lock's body (or its name)."""
    host = pid = None
    try:
        body = store.read_lock(entry.name)
        if body is not None:
            info = json.loads(body)
            host, pid = str(info.get("host")), info.get("pid")
    except (StoreError, ValueError, AttributeError):
        pass
    if host is None:
        match = _LOCK_NAME.match(entry.name)
        host, pid = (match.group(2), match.group(3)) if match else ("?", None)
    return f"lock .cafuse-locks/{entry.name}, host {host}" + (f", pid {pid}" if pid else "")


def list_locks(store: Any, now: float | None = None) -> list[LockEntry]:
    """The store's lock objects with their ages (against ``now``, a server time; this
    machine's clock when not given)."""
    entries = []
    for name, modified in store.list_locks():
        entry = _parse(name, modified)
        if entry is None:
            log.info("store %s: ignoring .cafuse-locks/%s (not a cafuse lock)", store.url, name)
            continue
        entries.append(entry)
    reference = time.time() if now is None else now
    for entry in entries:
        entry.age = max(0.0, reference - entry.modified)
    return entries


def blocking_locks(store: Any, kind: str) -> list[LockEntry]:
    """The fresh locks that would stop a ``kind`` run now (for ``gc --dry-run``; by this
    machine's clock, as no lock is written)."""
    if not lockable(store):
        return []
    return [e for e in list_locks(store) if e.kind == _OTHER[kind] and e.age < LOCK_STALE]


class NoLock:
    """What make and gc hold on a store that takes no locks."""

    name = ""

    def __init__(self) -> None:
        self.broken: list[LockEntry] = []

    def check(self) -> None:
        return None

    def verify(self) -> None:
        return None


class StoreLock:
    """This run's lock on ``store``; use ``store_lock``."""

    def __init__(self, store: Any, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(kind)
        self.store = store
        self.kind = kind
        host = _host()
        safe_host = re.sub(r"[^A-Za-z0-9.]+", "_", host)[:64] or "unknown"
        self.name = f"{kind}-{safe_host}-{os.getpid()}-{secrets.token_hex(8)}.json"
        started = time.time()
        self.body = json.dumps(
            {
                "kind": kind,
                "host": host,
                "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "started_epoch": round(started, 3),
            },
            sort_keys=True,
        ).encode()
        self.broken: list[LockEntry] = []  # other locks removed by --break-locks
        self._refreshed = 0.0  # this machine's time the last successful write began
        self._lost = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ taking it

    def acquire(self, break_locks: bool = False) -> None:
        """Write the lock, then look for a fresh lock of the other kind (see the module
        docstring for why this order matters); raises StoreLocked."""
        began = time.time()
        self.store.put_lock(self.name, self.body)
        self._refreshed = began
        try:
            self._check_others(break_locks)
        except BaseException:
            self._delete()
            raise
        self._thread = threading.Thread(
            target=self._refresh_loop, name=f"cafuse-{self.kind}-lock", daemon=True
        )
        self._thread.start()

    def _check_others(self, break_locks: bool) -> None:
        raw = self.store.list_locks()
        own = [modified for name, modified in raw if name == self.name]
        # the server's time now: our lock's last-modified, just written (whole seconds)
        now = own[0] if own else time.time()
        other = _OTHER[self.kind]
        blocking = []
        for entry in list_locks(self.store, now):
            if entry.name == self.name:
                continue
            if entry.kind == other and break_locks:
                log.warning(
                    "store %s: removing %s lock .cafuse-locks/%s (%.0f s old; --break-locks)",
                    self.store.url,
                    entry.kind,
                    entry.name,
                    entry.age,
                )
                self.store.delete_lock(entry.name)
                self.broken.append(entry)
            elif entry.age >= LOCK_STALE:
                log.info(
                    "store %s: removing stale lock .cafuse-locks/%s (%.0f s old)",
                    self.store.url,
                    entry.name,
                    entry.age,
                )
                self.store.delete_lock(entry.name)
            elif entry.kind == other:
                blocking.append(entry)
        if not blocking:
            return
        youngest = min(blocking, key=lambda e: e.age)
        what = _describe(self.store, youngest)
        age = f"{youngest.age:.0f} s old"
        more = f" and {len(blocking) - 1} more" if len(blocking) > 1 else ""
        if self.kind == "make":
            raise StoreLocked(
                f"store {self.store.url} is being garbage-collected ({what}, {age}{more}): "
                f"run make again when gc is done (a killed gc's lock goes stale after "
                f"{format_duration(LOCK_STALE)})"
            )
        raise StoreLocked(
            f"a make is writing to store {self.store.url} ({what}, {age}{more}): run gc "
            "when it is done, or remove a stale lock with cafuse gc --break-locks after "
            "checking"
        )

    # ------------------------------------------------------------------ holding it

    def _valid_for(self) -> float:
        """How long after its last write this holder still trusts its lock: others take it
        as stale after LOCK_STALE, so stop one refresh interval earlier (at least half)."""
        return max(LOCK_STALE - LOCK_REFRESH, LOCK_STALE / 2)

    def _refresh_loop(self) -> None:
        pause = LOCK_REFRESH
        while not self._stop.wait(pause):
            began = time.time()
            if began - self._refreshed > self._valid_for():
                self._lose(
                    f"not refreshed for {format_duration(round(began - self._refreshed))} (was the "
                    "process suspended, or the store unreachable?)"
                )
                return
            try:
                if not self.store.lock_exists(self.name):
                    self._lose("removed by someone else (cafuse gc --break-locks?)")
                    return
                self.store.put_lock(self.name, self.body)
            except StoreError as exc:
                log.warning("store %s: cannot refresh lock %s: %s", self.store.url, self.name, exc)
                pause = min(LOCK_REFRESH, LOCK_RETRY)
                continue
            self._refreshed = began
            pause = LOCK_REFRESH

    def _lose(self, why: str) -> None:
        if not self._lost:
            self._lost = why
            log.warning("store %s: lock .cafuse-locks/%s %s", self.store.url, self.name, why)

    def check(self) -> None:
        """Raise LockLost if the lock was lost: cheap (no request), call it often."""
        elapsed = time.time() - self._refreshed
        if not self._lost and elapsed > self._valid_for():
            self._lose(f"not refreshed for {format_duration(round(elapsed))}")
        if self._lost:
            raise LockLost(
                f"store {self.store.url}: this {self.kind}'s lock .cafuse-locks/{self.name} "
                f"was {self._lost}, so a "
                + (
                    "gc may have deleted chunks this make reuses: nothing was committed; "
                    "run make again"
                    if self.kind == "make"
                    else "make may be writing: gc stopped; run gc again"
                )
            )

    def verify(self) -> None:
        """``check``, plus one HEAD: the lock is still there (make, before its index)."""
        self.check()
        try:
            present = self.store.lock_exists(self.name)
        except StoreError as exc:
            raise LockLost(
                f"store {self.store.url}: cannot check this {self.kind}'s lock "
                f".cafuse-locks/{self.name} ({exc}): run {self.kind} again"
            ) from None
        if not present:
            self._lose("removed by someone else (cafuse gc --break-locks?)")
            self.check()

    # ------------------------------------------------------------------ letting go

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._delete()

    def _delete(self) -> None:
        try:
            self.store.delete_lock(self.name)
        except StoreError as exc:
            log.warning(
                "store %s: cannot remove lock .cafuse-locks/%s (%s): it goes stale after %s",
                self.store.url,
                self.name,
                exc,
                format_duration(LOCK_STALE),
            )


@contextmanager
def store_lock(store: Any, kind: str, *, break_locks: bool = False) -> Iterator[Any]:
    """Hold a ``kind`` lock on ``store`` for the block (nothing on stores that take no
    locks); raises StoreLocked when the other kind holds a fresh one."""
    if not lockable(store):
        yield NoLock()
        return
    lock = StoreLock(store, kind)
    lock.acquire(break_locks=break_locks)
    try:
        yield lock
    finally:
        lock.release()
