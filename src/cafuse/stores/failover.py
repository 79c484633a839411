"""``A|B``: a failover group of stores holding the same chunks (desync's syntax).

Unlike desync, which fails over only when a store errors, a member that *lacks* a chunk
also hands over to the next: mirrors of one store lag behind each other (an upload still
syncing), and asking the next member costs a request only for the chunks the first one
lacks. The group fails only when every member did. The member that answered last is asked
first next time.

Reading jobs and mounts do not call ``get`` here: ``ChunkSource`` puts a group's members in
one tier of its router, ordered by their health (docs/remote.md). ``get``/``has`` serve
info and verify; writes, gc and locks go to the first member.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from .base import ChunkStore, StoreError

# gc and make's protocol (chunk ages, touch, store locks): the first member's, the one
# written to, and absent when it has none (make and gc look these up with getattr)
_FIRST_MEMBERS = frozenset(
    {
        "iter_ages",
        "touch",
        "delete_if_older",
        "supports_locks",
        "put_lock",
        "lock_exists",
        "list_locks",
        "read_lock",
        "delete_lock",
        "iter_copies",
        "get_copy",
        "delete_copy",
        "remove_empty_prefixes",
    }
)


class FailoverGroup(ChunkStore):
    def __init__(self, members: Sequence[ChunkStore]) -> None:
        self.members = list(members)
        self.url = "|".join(m.url for m in self.members)
        self.is_local = all(m.is_local for m in self.members)
        self.writable = self.members[0].writable
        self._preferred = 0  # the member that answered last: tried first next time

    def __getattr__(self, name: str) -> Any:
        if name in _FIRST_MEMBERS and "members" in self.__dict__:
            return getattr(self.members[0], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _order(self) -> list[ChunkStore]:
        first = self._preferred
        return self.members[first:] + self.members[:first]

    def get(self, chunk_id: bytes) -> bytes | None:
        errors: list[str] = []
        for member in self._order():
            try:
                blob = member.get(chunk_id)
            except StoreError as exc:
                errors.append(str(exc))
                continue
            if blob is not None:
                self._preferred = self.members.index(member)
                return blob
        if errors and len(errors) == len(self.members):
            raise StoreError("; ".join(errors))
        return None

    def has(self, chunk_id: bytes) -> bool:
        errors = 0
        for member in self._order():
            try:
                if member.has(chunk_id):
                    return True
            except StoreError:
                errors += 1
        if errors == len(self.members):
            raise StoreError(f"every store of {self.url} failed")
        return False

    def put(self, chunk_id: bytes, blob: bytes) -> bool:
        return self.members[0].put(chunk_id, blob)

    def delete(self, chunk_id: bytes) -> None:
        self.members[0].delete(chunk_id)

    def iter_ids(self) -> Iterator[bytes]:
        return self.members[0].iter_ids()

    def sync(self) -> None:
        self.members[0].sync()
