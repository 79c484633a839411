"""The one exception type a user sees; the CLI prints its message and exits non-zero."""

from __future__ import annotations

from dataclasses import dataclass


class CafuseError(Exception):
    """A problem the user can fix: the message says what is wrong and what to do."""

    exit_code = 1


@dataclass(frozen=True)
class Failure:
    """Why one source did not deliver a chunk: ``kind`` is "not found", "transient",
    "throttled", "corrupt", "permanent", "circuit open" or "deadline"."""

    source: str
    kind: str
    message: str


class ChunkUnavailable(CafuseError):
    """No source could deliver a verified copy of a chunk."""

    def __init__(self, chunk_id: bytes, failures: list[Failure]) -> None:
        self.chunk_id = chunk_id
        self.failures = failures
        super().__init__(f"chunk {chunk_id.hex()} unavailable: {self.why()}")

    @property
    def reasons(self) -> list[str]:
        return [f.message for f in self.failures]

    @property
    def kinds(self) -> set[str]:
        return {f.kind for f in self.failures}

    def why(self) -> str:
        """The distinct reasons, most recent last, each once (a retried error is one)."""
        seen: dict[str, None] = {}
        for failure in self.failures:
            seen.pop(failure.message, None)
            seen[failure.message] = None
        reasons = list(seen)
        if len(reasons) > 4:
            reasons = [*reasons[:1], f"... {len(reasons) - 3} more ...", *reasons[-2:]]
        return "; ".join(reasons) if reasons else "no store configured"
