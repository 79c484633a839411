"""Store and index locations: local paths, file://, http(s)://, s3://, gs://, az://.

Also the one place that turns a location into text for messages, with any secret taken out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from ..errors import CafuseError

REMOTE_SCHEMES = ("http", "https", "s3", "gs", "az", "abfs", "abfss")


@dataclass(frozen=True)
class Location:
    scheme: str  # "file" for local paths
    url: str  # normalised: no trailing slash, for http cut at the first ? or ;
    path: str  # local path, or the key prefix / URL path

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def display(self) -> str:
        return redact(self.url)


def parse_location(text: str, what: str = "store") -> Location:
    if not text:
        raise CafuseError(f"empty {what} location")
    if "://" not in text:
        return Location("file", text.rstrip("/") or "/", text.rstrip("/") or "/")
    scheme = text.split("://", 1)[0].lower()
    if scheme == "file":
        path = text[len("file://") :]
        return Location("file", path.rstrip("/") or "/", path.rstrip("/") or "/")
    if scheme not in REMOTE_SCHEMES:
        raise CafuseError(
            f"unsupported {what} URL scheme {scheme!r} in {redact(text)!r}: use a "
            "path, file://, http(s)://, s3://, gs:// or az://"
        )
    if scheme in ("http", "https"):
        # casync's rule: cut at the first ? or ;, strip trailing slashes
        text = re.split(r"[?;]", text, maxsplit=1)[0]
    parts = urlsplit(text)
    if not parts.netloc:
        raise CafuseError(f"bad {what} URL {redact(text)!r}: no host or bucket")
    url = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    return Location(scheme, url, parts.path.strip("/"))


def parent_and_name(location: Location) -> tuple[str, str]:
    """An index location split into its directory URL/path and file name."""
    head, _, name = location.url.rpartition("/")
    if not name or (not location.is_local and head.endswith(":/")):
        raise CafuseError(f"bad index location {location.display!r}: no file name")
    return head or "/", name


def redact(text: str) -> str:
    """A location or message with credentials and signatures removed."""
    text = re.sub(r"(://)[^/@\s]+@", r"\1***@", text)  # user:password@
    text = re.sub(r"(?i)((?:x-amz-[a-z-]+|signature|sig|token|key)=)[^&\s]+", r"\1***", text)
    return text
