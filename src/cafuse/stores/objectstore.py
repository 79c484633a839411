"""Remote chunk stores through obstore: HTTP(S) (read-only, any web server), S3 and
S3-compatible servers, GCS and Azure.

obstore's own retries are off: cafuse's fetch path decides, the same way for every kind.
Errors are classified here, once, from obstore's exception types and the HTTP status and
error kind that obstore carries with them (see ``classify``). A response is never read
past what it may hold: a chunk past the largest a stored chunk can be, an index past
``MAX_INDEX_BYTES``; the declared length is checked before any body is read.

gc beside make (docs/remote.md, ``cafuse.locks``): an object's last-modified time is its
age, but S3 has no cheap "touch" (a copy of an object onto itself is refused unless its
metadata changes, and obstore's copy cannot change metadata), so make and gc exclude each
other with lock objects under ``LOCK_DIR`` instead, and ``touch`` only asks whether a chunk
is there. The lock primitives (``put_lock``, ``list_locks``, ...) are here; the protocol is
in ``cafuse.locks``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

from .base import (
    ChunkStore,
    CorruptChunkError,
    ReadOnlyStore,
    StoreError,
    ThrottledStoreError,
    TransientStoreError,
    Uncompressed,
    chunk_path,
)
from .location import Location, redact
from .retry import RetryPolicy

log = logging.getLogger(__name__)

MAX_INDEX_BYTES = 1 << 30  # an index of 26 million chunks; larger ones are refused
INDEX_TIMEOUT = 600.0  # seconds for an index download, every try included
DEFAULT_MAX_BLOB = (128 << 20) + (4 << 20)  # casync's largest chunk, compressed worst case
# request timeouts come from a few clients, one per power of two of seconds: obstore sets
# the timeout per client, and an attempt must end when its chunk's deadline says so
_TIMEOUT_STEPS = tuple(0.25 * 2**k for k in range(12))  # 0.25 s .. 512 s

# Last-Modified is an HTTP date, whole seconds: an object may be up to this much younger
LAST_MODIFIED_RESOLUTION = 1.0
_MAX_PENDING = 65536  # chunks touch found missing, kept for the put that follows it
# make's and gc's lock objects, under the store's prefix: never taken for chunks, which
# are <4 hex>/<64 hex>.cacnk or bare <4 hex>/<64 hex>
LOCK_DIR = ".cafuse-locks"
MAX_LOCK_BYTES = 64 << 10  # a lock's body is a small JSON object

_CHUNK_KEY = re.compile(r"(?:^|/)([0-9a-f]{4})/([0-9a-f]{64})(\.cacnk)?$")
_STATUS = re.compile(r"\bstatus(?: code)?: (\d{3})\b")
_HTTP_KIND = re.compile(r"HttpError \{\s*kind: (\w+)")


def _one_line(exc: BaseException) -> str:
    text = str(exc).split("Debug source:")[0]
    return " ".join(text.split())


def _cause(exc: BaseException) -> tuple[int | None, str | None, str]:
    """(HTTP status, obstore's HttpErrorKind, a short reason) of an obstore error."""
    full = str(exc)
    debug = full.split("Debug source:", 1)[-1]
    status_match = _STATUS.search(full)
    status = int(status_match.group(1)) if status_match else None
    kind_match = _HTTP_KIND.search(debug)
    kind = kind_match.group(1) if kind_match else None
    if status is not None:
        phrase = re.search(rf"{status} ([A-Za-z][A-Za-z -]*?)(?::|$)", _one_line(exc))
        reason = f"HTTP {status}" + (f" {phrase.group(1)}" if phrase else "")
    elif kind == "Timeout":
        reason = "timed out"
    elif kind == "Connect":
        if "dns error" in debug:
            reason = "DNS lookup failed (check the host name)"
        elif "ConnectionRefused" in debug:
            reason = "connection refused"
        elif re.search(r"(?i)tls|certificate|ssl", debug):
            reason = "TLS handshake failed (check the certificate or use http://)"
        else:
            reason = "cannot connect"
    elif kind in ("Interrupted", "Body", "Decode", "Request"):
        reason = "connection dropped mid-response"
    else:
        reason = _one_line(exc)[:200]
    return status, kind, redact(reason)


def classify(exc: BaseException, where: str) -> StoreError:
    """The typed error for an obstore failure at ``where`` (a store or object URL)."""
    import obstore.exceptions as obe

    status, _, reason = _cause(exc)
    message = f"{where}: {reason}"
    if isinstance(exc, obe.UnauthenticatedError | obe.PermissionDeniedError):
        return StoreError(f"{message} (check the credentials: AWS_* variables, or the URL)")
    if isinstance(
        exc,
        obe.InvalidPathError | obe.NotSupportedError | obe.UnknownConfigurationKeyError,
    ):
        return StoreError(f"{where}: {_one_line(exc)[:200]}")
    if isinstance(exc, obe.PreconditionError):
        return StoreError(f"{where}: changed on the server ({reason})")
    if status is not None:
        if status in (429, 503):
            return ThrottledStoreError(message, status=status)
        if status in (501, 505):  # the server will never do this: not worth a retry
            return StoreError(f"{message} (the server cannot serve GET here: check the URL)")
        if status >= 500 or status == 408:
            return TransientStoreError(message)
        return StoreError(f"{message} (check the URL)")
    if isinstance(exc, obe.BaseError | OSError | TimeoutError):
        return TransientStoreError(message)  # network trouble: connect, timeout, cut body
    return StoreError(message)


def _put_if_absent(client: Any, path: str, body: bytes) -> None:
    """PUT with ``If-None-Match: *``; FileExistsError when the object is there."""
    import obstore
    import obstore.exceptions as obe

    try:
        obstore.put(client, path, body, mode="create")
    except obe.AlreadyExistsError:
        raise FileExistsError(path) from None


def _unsupported(exc: StoreError) -> bool:
    """Whether a failed conditional PUT says the server does not do conditional PUTs."""
    text = str(exc)
    return any(m in text for m in ("HTTP 501", "NotImplemented", "not implemented", "HTTP 400"))


def s3_settings(endpoint: str | None = None, region: str | None = None) -> dict[str, object]:
    """S3 settings from options, then the standard AWS_* environment variables."""
    settings: dict[str, object] = {}
    endpoint = (
        endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    if endpoint:
        settings["endpoint"] = endpoint
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    settings["region"] = region or "us-east-1"
    if not (
        os.environ.get("AWS_ACCESS_KEY_ID")
        or os.environ.get("AWS_PROFILE")
        or os.environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
    ):
        settings["skip_signature"] = True  # public bucket, anonymous reads
    return settings


class ObjectChunkStore(ChunkStore):
    def __init__(
        self,
        location: Location,
        *,
        retry: RetryPolicy | None = None,
        s3_endpoint: str | None = None,
        s3_region: str | None = None,
    ) -> None:
        self.location = location
        self.url = location.display
        self.retry = retry or RetryPolicy()
        self.max_blob_size = DEFAULT_MAX_BLOB
        self.writable = location.scheme != "http" and location.scheme != "https"
        self._s3 = (s3_endpoint, s3_region)
        self._clients: dict[float, Any] = {}
        self._clients_lock = threading.Lock()
        self._store = self._client(self.retry.attempt_timeout(self.retry.timeout))
        # chunks ``touch`` found missing: the ``put`` that follows needs no second HEAD
        self._missing: set[bytes] = set()
        self._missing_lock = threading.Lock()
        # which layout answered last: a store of bare chunks is asked for bare names first
        self._bare_first = False
        self._conditional_put = True  # until the server says it cannot (If-None-Match)

    def _client(self, timeout: float) -> Any:
        """The obstore client whose request timeout is the largest step <= ``timeout``."""
        step = _TIMEOUT_STEPS[0]
        for candidate in _TIMEOUT_STEPS:
            if candidate <= timeout:
                step = candidate
        client = self._clients.get(step)
        if client is None:
            with self._clients_lock:
                client = self._clients.get(step) or self._new_client(step)
                self._clients[step] = client
        return client

    def _new_client(self, timeout: float) -> Any:
        from obstore.store import AzureStore, GCSStore, HTTPStore, S3Store

        client = {
            "timeout": f"{int(timeout * 1000)}ms",
            "connect_timeout": f"{int(min(timeout, 5.0) * 1000)}ms",
            "allow_http": True,
            "pool_idle_timeout": "30s",
        }
        no_retries = {
            "max_retries": 0,
            "retry_timeout": timedelta(seconds=1),
            "backoff": {
                "init_backoff": timedelta(milliseconds=10),
                "max_backoff": timedelta(milliseconds=10),
                "base": 2,
            },
        }
        location = self.location
        if location.scheme in ("http", "https"):
            return HTTPStore.from_url(location.url, client_options=client, retry_config=no_retries)
        if location.scheme == "s3":
            bucket, _, prefix = location.url[len("s3://") :].partition("/")
            return S3Store(
                bucket,
                prefix=prefix or None,
                client_options=client,
                retry_config=no_retries,
                **s3_settings(*self._s3),
            )
        if location.scheme == "gs":
            return GCSStore.from_url(location.url, client_options=client, retry_config=no_retries)
        return AzureStore.from_url(location.url, client_options=client, retry_config=no_retries)

    # ------------------------------------------------------------------ one request

    def _read(self, path: str, timeout: float, limit: int, what: str, where: str) -> bytes:
        """One GET of ``path``, at most ``limit`` bytes, within ``timeout`` seconds.

        Raises FileNotFoundError, or a typed StoreError.
        """
        import obstore

        try:
            result = obstore.get(self._client(timeout), path)
            declared = result.meta["size"]
            if declared is not None and declared > limit:
                raise CorruptChunkError(
                    f"{self.url}/{path}: the server announces {declared} bytes, more than "
                    f"{what} can be ({limit})"
                )
            if declared is not None:
                return bytes(result.bytes())
            parts, total = [], 0
            for part in result.stream(min_chunk_size=1 << 20):
                total += len(part)
                if total > limit:
                    raise CorruptChunkError(
                        f"{self.url}/{path}: more than {limit} bytes, more than {what} can be"
                    )
                parts.append(bytes(part))
            return b"".join(parts)
        except StoreError:
            raise
        except FileNotFoundError as exc:
            status, _, _ = _cause(exc)
            if status not in (None, 404):  # object_store calls 405 "not found" too
                raise classify(exc, where) from None
            raise
        except Exception as exc:
            raise classify(exc, where) from None

    def get(self, chunk_id: bytes, timeout: float | None = None) -> bytes | None:
        """One attempt, no retries (the fetch path retries across stores): the ``.cacnk``
        copy, else the bare one (``Uncompressed``), else None. The layout that answered
        last is asked first, so a store of either kind costs one request per chunk."""
        if timeout is None:
            timeout = self.retry.attempt_timeout(self.retry.timeout)
        end = time.monotonic() + timeout  # both requests within the one attempt's time
        first = self._bare_first
        for bare in (first, not first):
            left = end - time.monotonic()
            if left <= 0.001:
                raise TransientStoreError(f"store {self.url}: timed out")
            blob = self.get_copy(chunk_id, bare, left)
            if blob is not None:
                self._bare_first = bare
                return blob
        return None

    def get_copy(self, chunk_id: bytes, bare: bool, timeout: float | None = None) -> bytes | None:
        """One stored copy (``Uncompressed`` if bare), or None; one request."""
        if timeout is None:
            timeout = self.retry.attempt_timeout(self.retry.timeout)
        try:
            blob = self._read(
                chunk_path(chunk_id, bare),
                timeout,
                self.max_blob_size,
                "a chunk",
                f"store {self.url}",
            )
        except FileNotFoundError:
            return None
        return Uncompressed(blob) if bare else blob

    # ------------------------------------------------------------------ with retries

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        def attempt(left: float) -> Any:
            try:
                return fn(self._client(left), *args)
            except (FileNotFoundError, FileExistsError):
                raise
            except Exception as exc:
                raise classify(exc, f"store {self.url}") from None

        return self.retry.run(f"{self.url} {what}", attempt)

    def has(self, chunk_id: bytes) -> bool:
        first = self._bare_first
        return any(self._last_modified(chunk_id, bare) is not None for bare in (first, not first))

    def _last_modified(self, chunk_id: bytes, bare: bool = False) -> float | None:
        """A copy's last-modified time (epoch seconds, whole seconds), None if missing."""
        import obstore

        try:
            meta = self._call("head", obstore.head, chunk_path(chunk_id, bare))
        except FileNotFoundError:
            return None
        return float(meta["last_modified"].timestamp())

    def touch(self, chunk_id: bytes, bare: bool = False) -> bool:
        """Whether the store holds the chunk as make would write it (bare or ``.cacnk``):
        one HEAD, nothing written.

        ``make`` calls this for every chunk it reuses. An object's last-modified time
        cannot be refreshed in place, and uploading the chunk again would cost what dedup
        saves, so a running make is protected from gc by its store lock (``cafuse.locks``)
        instead. Only the form make writes is asked for: asking for both would double the
        requests of every new chunk, and a chunk then kept both ways is counted once by
        gc. A missing chunk is remembered for the ``put`` that follows (no second HEAD).
        """
        if not self.writable:
            return self.has(chunk_id)
        if self._last_modified(chunk_id, bare) is not None:
            return True
        with self._missing_lock:
            if len(self._missing) >= _MAX_PENDING:
                self._missing.clear()  # puts that never came (a failed make): forget them
            self._missing.add(chunk_id)
        return False

    def put(self, chunk_id: bytes, blob: bytes) -> bool:
        """Upload the chunk unless it is there; True when this call uploaded it.

        A chunk already there is never overwritten: the upload is conditional
        (``If-None-Match: *``) where the server supports it, so two makes racing for the
        same new chunk upload it once between them. After ``touch`` found the chunk missing
        no second HEAD is made: one HEAD and one PUT per new chunk.
        """
        import obstore

        if not self.writable:
            return super().put(chunk_id, blob)
        bare = isinstance(blob, Uncompressed)
        with self._missing_lock:
            known_missing = chunk_id in self._missing
            self._missing.discard(chunk_id)
        if not known_missing and self._last_modified(chunk_id, bare) is not None:
            return False
        path = chunk_path(chunk_id, bare)
        if self._conditional_put:
            try:
                self._call("put", _put_if_absent, path, bytes(blob))
                return True
            except FileExistsError:
                return False
            except StoreError as exc:
                if not _unsupported(exc):
                    raise
                log.info("%s: no conditional PUT (%s), plain PUT from now on", self.url, exc)
                self._conditional_put = False
        self._call("put", lambda s, p, b: obstore.put(s, p, b), path, bytes(blob))
        return True

    def delete(self, chunk_id: bytes) -> None:
        import obstore

        if not self.writable:
            return super().delete(chunk_id)
        for bare in (False, True):
            with contextlib.suppress(FileNotFoundError):
                self._call("delete", obstore.delete, chunk_path(chunk_id, bare))

    def delete_copy(self, chunk_id: bytes, bare: bool) -> None:
        """Delete one stored copy (bare or ``.cacnk``), keeping the other."""
        import obstore

        if not self.writable:
            return super().delete(chunk_id)
        with contextlib.suppress(FileNotFoundError):
            self._call("delete", obstore.delete, chunk_path(chunk_id, bare))

    def delete_if_older(self, chunk_id: bytes, cutoff: float) -> bool:
        """Delete the chunk unless it was modified at ``cutoff`` or later; True if deleted.

        A HEAD, then a DELETE only if the object is older (its whole-second Last-Modified
        is taken as up to a second younger). Object stores have no rename to take the
        object away first, and obstore offers no conditional delete, so one window stays:
        a make that uploads this very chunk again between the HEAD and the DELETE loses
        that upload. Every retry repeats the HEAD, so the window is one request long,
        never a backoff pause. See docs/failure-model.md.
        """

        if not self.writable:
            raise ReadOnlyStore(f"store {self.url} is read-only")
        deleted = False
        for bare in (False, True):  # a chunk may be kept both ways
            deleted |= self._delete_copy_if_older(chunk_path(chunk_id, bare), cutoff)
        return deleted

    def _delete_copy_if_older(self, path: str, cutoff: float) -> bool:
        import obstore

        def attempt(left: float) -> bool:
            client = self._client(left)
            try:
                meta = obstore.head(client, path)
                modified = float(meta["last_modified"].timestamp())
                if modified + LAST_MODIFIED_RESOLUTION > cutoff:
                    return False
                obstore.delete(client, path)
            except FileNotFoundError:
                return False  # gone meanwhile (GCS and Azure say so on delete)
            except Exception as exc:
                raise classify(exc, f"store {self.url}") from None
            return True

        return self.retry.run(f"{self.url} delete", attempt)

    def iter_ids(self) -> Iterator[bytes]:
        for chunk_id, _ in self.iter_ages():
            yield chunk_id

    def iter_ages(self) -> Iterator[tuple[bytes, float]]:
        """Every chunk id with its last-modified time (epoch seconds), one listing."""
        if not self.writable:
            raise StoreError(f"store {self.url} cannot list its chunks")  # a web server
        return self._list_ages()

    def _list_ages(self) -> Iterator[tuple[bytes, float]]:
        """Each chunk once: a listing is sorted by key, so a chunk's bare and ``.cacnk``
        copies come one after the other; the newer one's time counts."""
        last: tuple[bytes, float] | None = None
        for chunk_id, _, modified in self._list_copies():
            if last is not None and last[0] == chunk_id:
                last = (chunk_id, max(last[1], modified))
                continue
            if last is not None:
                yield last
            last = (chunk_id, modified)
        if last is not None:
            yield last

    def iter_copies(self) -> Iterator[tuple[bytes, bool]]:
        """Every stored copy: (id, bare), so a chunk kept both ways comes twice."""
        if not self.writable:
            raise StoreError(f"store {self.url} cannot list its chunks")  # a web server
        for chunk_id, bare, _ in self._list_copies():
            yield chunk_id, bare

    def _list_copies(self) -> Iterator[tuple[bytes, bool, float]]:
        import obstore

        try:
            for batch in obstore.list(self._store):
                for meta in batch:
                    match = _CHUNK_KEY.search(meta["path"])
                    if match and match.group(2).startswith(match.group(1)):
                        yield (
                            bytes.fromhex(match.group(2)),
                            not match.group(3),
                            meta["last_modified"].timestamp(),
                        )
        except Exception as exc:
            raise classify(exc, f"store {self.url}: cannot list chunks") from None

    # ------------------------------------------------------------------ lock objects

    @property
    def supports_locks(self) -> bool:
        """Whether make and gc lock this store (a writable object store; not HTTP)."""
        return self.writable

    def put_lock(self, name: str, body: bytes) -> None:
        """Write (or rewrite, which refreshes its last-modified time) the lock ``name``."""
        import obstore

        self._call("lock put", lambda s, p, b: obstore.put(s, p, b), f"{LOCK_DIR}/{name}", body)

    def lock_exists(self, name: str) -> bool:
        import obstore

        try:
            self._call("lock head", obstore.head, f"{LOCK_DIR}/{name}")
        except FileNotFoundError:
            return False
        return True

    def list_locks(self) -> list[tuple[str, float]]:
        """Every lock object: (name, last-modified time by the server's clock)."""
        import obstore

        def listing(client: Any) -> list[tuple[str, float]]:
            found = []
            for batch in obstore.list(client, prefix=f"{LOCK_DIR}/"):
                for meta in batch:
                    name = meta["path"].rsplit("/", 1)[-1]
                    found.append((name, float(meta["last_modified"].timestamp())))
            return found

        return self._call("lock list", listing)

    def read_lock(self, name: str) -> bytes | None:
        """A lock's body, None if it is gone."""

        def attempt(left: float) -> bytes:
            path = f"{LOCK_DIR}/{name}"
            return self._read(path, left, MAX_LOCK_BYTES, "a lock", f"{self.url}/{path}")

        try:
            return self.retry.run(f"{self.url} lock get", attempt)
        except FileNotFoundError:
            return None

    def delete_lock(self, name: str) -> None:
        import obstore

        with contextlib.suppress(FileNotFoundError):
            self._call("lock delete", obstore.delete, f"{LOCK_DIR}/{name}")

    def fetch_file(self, name: str) -> bytes:
        """A whole object by name (an index next to a store), with retries; raises
        StoreError (FileNotFoundError as a StoreError saying so)."""

        def attempt(left: float) -> bytes:
            return self._read(name, left, MAX_INDEX_BYTES, "an index", f"{self.url}/{name}")

        # a whole file may take far longer than a chunk: give each try minutes, not seconds
        policy = dataclasses.replace(self.retry, timeout=max(self.retry.timeout, INDEX_TIMEOUT))
        try:
            return policy.run(f"{self.url}/{name}", attempt)
        except FileNotFoundError:
            raise StoreError(f"{self.url}/{name}: not found (HTTP 404)") from None
