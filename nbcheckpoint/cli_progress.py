"""The command line's progress line on stderr (`nbcheckpoint dump/restore/demo`)."""
from __future__ import annotations

import sys
import time

from .engine.units import format_size


class Progress:
    """One self-overwriting stderr line, only when stderr is a terminal; cleared when the
    `with` block that shows it ends."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.last = 0.0
        self.shown = False

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.1 and done < total):
            return
        self.last = now
        # Large totals are byte counts (pages); small ones are object counts.
        fmt = format_size if total >= 1 << 20 else str
        self.stream.write(f"\r\x1b[K{phase}: {fmt(done)} / {fmt(total)}")
        self.stream.flush()
        self.shown = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *_exc_info) -> None:
        self.clear()

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False
