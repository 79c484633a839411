"""The one exception type a user sees; the CLI prints its message and exits non-zero."""


class CafuseError(Exception):
    """A problem the user can fix: the message says what is wrong and what to do."""

    exit_code = 1


class ChunkUnavailable(CafuseError):
    """No source could deliver a verified copy of a chunk."""

    def __init__(self, chunk_id: bytes, reasons: list[str]) -> None:
        self.chunk_id = chunk_id
        self.reasons = reasons
        why = "; ".join(reasons) if reasons else "no store configured"
        super().__init__(f"chunk {chunk_id.hex()} unavailable: {why}")
