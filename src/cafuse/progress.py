"""A progress bar on a terminal (tqdm); silence when stderr is not a terminal.

tqdm clears the line on every redraw, fits the terminal's width (and follows resizes) and
shows the total and an ETA. Sizes are shown as ``format_size`` shows them in the summaries
(KiB, MiB, ...). tqdm is imported only when a bar is drawn, so ``cafuse --help`` and piped
runs never pay for it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from .sizes import format_size


class Progress:
    def __init__(
        self, total: int, label: str, enabled: bool | None = None, unit: str = "bytes"
    ) -> None:
        """``total`` 0 means unknown (no ETA); ``unit`` is "bytes" or a count's noun."""
        self.total = total
        self.label = label
        self.unit = unit
        self.done = 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar: Any = _bar(total, label, unit) if self.enabled else None

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _bar(total: int, label: str, unit: str) -> Any:
    from tqdm import tqdm

    class Bar(tqdm):  # type: ignore[misc]
        @property
        def format_dict(self) -> dict[str, Any]:
            d = super().format_dict
            if unit == "bytes":
                rate = d["rate"] or (d["n"] / d["elapsed"] if d["elapsed"] else 0)
                d["done_h"] = format_size(d["n"])
                d["total_h"] = format_size(d["total"]) if d["total"] else "?"
                d["rate_h"] = f"{format_size(rate)}/s"
            else:
                d["done_h"], d["total_h"] = str(d["n"]), str(d["total"] or "?")
                rate = d["rate"] or (d["n"] / d["elapsed"] if d["elapsed"] else 0)
                d["rate_h"] = f"{rate:.0f} {unit}/s"
            return d

    if total:
        fmt = "{desc} {percentage:3.0f}%|{bar}| {done_h} / {total_h}, {rate_h}, ETA {remaining}"
    else:
        fmt = "{desc} {done_h} " + unit + ", {rate_h}, {elapsed}"
    try:
        known = os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except OSError:
        known = False
    return Bar(
        total=total or None,
        desc=label,
        file=sys.stderr,
        bar_format=fmt,
        dynamic_ncols=known,  # follow resizes; a terminal of unknown width gets 80 columns
        ncols=None if known else 80,
        mininterval=0.1,
        leave=True,
    )
