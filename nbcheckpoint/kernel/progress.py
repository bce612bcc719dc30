"""A progress line in the cell's output, updated in place (display_id), and the time format."""
from __future__ import annotations

import html
import sys
import time

from ..engine.units import format_size

PHASES = {
    "frozen": "kernel frozen",
    "pages": "copying memory",
    "stopping": "stopping the kernel",
    "restoring": "restoring",
}


def format_time(epoch) -> str:
    if not epoch:
        return "an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def describe(phase: str, done: int, total: int) -> tuple[str, float | None]:
    """A short text for one progress event, and the fraction done when it is known."""
    label = PHASES.get(phase, phase.replace("_", " "))
    if phase == "pages" and total:
        return f"{label}: {format_size(done)} of {format_size(total)}", min(done / total, 1.0)
    if total:
        return f"{label}: {done}/{total}", min(done / total, 1.0)
    return label, None


class Progress:
    """One line in the cell output ("checkpoint 'x': copying memory 512 MiB of 1.0 GiB").

    In a kernel it is a display (text/plain and an HTML <progress>) updated in place;
    elsewhere a line on stderr.  `callback` is a progress(phase, done, total) function to
    call as well (the checkpoints browser drives its own bar with it); `quiet` shows
    nothing in the output.
    """

    def __init__(self, title: str, quiet: bool = False, callback=None, min_interval: float = 0.2):
        self.title = title
        self.quiet = quiet
        self.callback = callback
        self.min_interval = min_interval
        self._last = 0.0
        self._handle = None
        self._shown = False

    def _in_kernel(self) -> bool:
        try:
            from IPython import get_ipython
            ip = get_ipython()
            return ip is not None and getattr(ip, "kernel", None) is not None
        except Exception:
            return False

    def _bundle(self, text: str, frac: float | None) -> dict:
        line = f"{self.title}: {text}"
        bar = "" if frac is None else f'<progress value="{frac:.3f}" max="1" style="width:12em"></progress> '
        return {"text/plain": line,
                "text/html": f"<div><code>{html.escape(self.title)}</code> {bar}{html.escape(text)}</div>"}

    def show(self, text: str, frac: float | None = None, force: bool = False) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if not force and now - self._last < self.min_interval:
            return
        self._last = now
        if self._in_kernel():
            from IPython.display import display
            if self._handle is None:
                self._handle = display(self._bundle(text, frac), raw=True, display_id=True)
            else:
                self._handle.update(self._bundle(text, frac), raw=True)
        else:
            sys.stderr.write(f"\r{self.title}: {text}\x1b[K")
            sys.stderr.flush()
        self._shown = True

    def event(self, msg: dict) -> None:
        phase, done, total = msg.get("phase", "?"), int(msg.get("done") or 0), int(msg.get("total") or 0)
        if self.callback:
            try:
                self.callback(phase, done, total)
            except Exception:
                pass
        text, frac = describe(phase, done, total)
        self.show(text, frac, force=phase != "pages")

    def finish(self, text: str) -> None:
        """Leave the line with its final text (only if it was ever shown)."""
        if self._shown:
            self.show(text, 1.0, force=True)
            if not self._in_kernel():
                sys.stderr.write("\n")
