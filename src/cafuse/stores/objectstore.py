"""Remote chunk stores through obstore: HTTP(S) (read-only, any web server), S3 and
S3-compatible servers, GCS and Azure. obstore's own retries are off: cafuse's
``RetryPolicy`` decides, the same way for every kind."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from datetime import timedelta

from .base import ChunkStore, StoreError, chunk_path
from .location import Location, redact
from .retry import RetryPolicy, TransientStoreError

log = logging.getLogger(__name__)

_CHUNK_KEY = re.compile(r"(?:^|/)([0-9a-f]{4})/([0-9a-f]{64})\.cacnk$")
_TRANSIENT = re.compile(
    r"error sending request|timed out|timeout|connection|reset|broken pipe|closed|"
    r"incomplete|unexpected eof|status code: 5\d\d|status code: 429|dns|refused|body",
    re.IGNORECASE,
)


def _reason(exc: Exception) -> str:
    """obstore errors are long and multi-line: keep the cause, in one short line."""
    text = str(exc).split("Debug source:")[0]
    text = " ".join(text.split())
    match = re.search(r"(Server returned non-2xx status code: \d+ [A-Za-z ]+?)(?::|$)", text)
    if match:
        return match.group(1)
    for marker in ("HTTP error: ", "Generic HTTP error: "):
        if marker in text:
            text = text.split(marker)[-1]
    return redact(text)[:200]


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
        from obstore.store import AzureStore, GCSStore, HTTPStore, S3Store

        self.location = location
        self.url = location.display
        self.retry = retry or RetryPolicy()
        request_timeout = f"{max(1, int(min(self.retry.timeout, 30)))}s"
        client = {
            "timeout": request_timeout,
            "connect_timeout": "5s",
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
        scheme = location.scheme
        if scheme in ("http", "https"):
            self._store = HTTPStore.from_url(
                location.url, client_options=client, retry_config=no_retries
            )
            self.writable = False
        elif scheme == "s3":
            bucket, _, prefix = location.url[len("s3://") :].partition("/")
            self._store = S3Store(
                bucket,
                prefix=prefix or None,
                client_options=client,
                retry_config=no_retries,
                **s3_settings(s3_endpoint, s3_region),
            )
            self.writable = True
        elif scheme == "gs":
            self._store = GCSStore.from_url(
                location.url, client_options=client, retry_config=no_retries
            )
            self.writable = True
        else:
            self._store = AzureStore.from_url(
                location.url, client_options=client, retry_config=no_retries
            )
            self.writable = True

    def _call(self, what: str, fn, *args):
        def attempt(_left: float):
            try:
                return fn(self._store, *args)
            except FileNotFoundError:
                raise
            except Exception as exc:
                reason = _reason(exc)
                error = TransientStoreError if _TRANSIENT.search(reason) else StoreError
                raise error(f"store {self.url}: {reason}") from None

        return self.retry.run(f"{self.url} {what}", attempt)

    def get(self, chunk_id: bytes) -> bytes | None:
        import obstore

        try:
            result = self._call(
                "get", lambda s, p: bytes(obstore.get(s, p).bytes()), chunk_path(chunk_id)
            )
        except FileNotFoundError:
            return None
        return result

    def has(self, chunk_id: bytes) -> bool:
        import obstore

        try:
            self._call("head", obstore.head, chunk_path(chunk_id))
        except FileNotFoundError:
            return False
        return True

    def put(self, chunk_id: bytes, blob: bytes) -> bool:
        import obstore

        if not self.writable:
            return super().put(chunk_id, blob)
        if self.has(chunk_id):
            return False
        self._call("put", lambda s, p, b: obstore.put(s, p, b), chunk_path(chunk_id), blob)
        return True

    def delete(self, chunk_id: bytes) -> None:
        import obstore

        if not self.writable:
            return super().delete(chunk_id)
        with contextlib.suppress(FileNotFoundError):
            self._call("delete", obstore.delete, chunk_path(chunk_id))

    def iter_ids(self) -> Iterator[bytes]:
        if self.location.scheme in ("http", "https"):
            return super().iter_ids()  # a plain web server cannot list
        return self._list_ids()

    def _list_ids(self) -> Iterator[bytes]:
        import obstore

        try:
            for batch in obstore.list(self._store):
                for meta in batch:
                    match = _CHUNK_KEY.search(meta["path"])
                    if match and match.group(2).startswith(match.group(1)):
                        yield bytes.fromhex(match.group(2))
        except Exception as exc:
            raise StoreError(f"store {self.url}: cannot list chunks: {_reason(exc)}") from None

    def fetch_file(self, name: str) -> bytes:
        """A whole object by name (an index next to a store); raises StoreError."""
        import obstore

        try:
            return self._call("get", lambda s, p: bytes(obstore.get(s, p).bytes()), name)
        except FileNotFoundError:
            raise StoreError(f"{self.url}/{name}: not found") from None
