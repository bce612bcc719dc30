"""Which life is this: the kernel a checkpoint was taken of, or a copy restored from it?

Code that runs in both (the wait of a helper-mode %checkpoint, the first cell after a
checkpoint) records a ``Life`` just before the image is taken.  A restored process is a
new task: its CPU clock started again, and its start time differs (proc(5),
/proc/self/stat field 22).  Neither can say "restored" in the original, whose clock never
goes back and whose start time never changes.
"""
from __future__ import annotations

import time


def start_time() -> int | None:
    """This process's start time, clock ticks after boot (proc(5): /proc/self/stat field 22)."""
    try:
        with open("/proc/self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


class Life:
    def __init__(self):
        self.start = start_time()
        self.cpu = time.process_time()      # all threads: the restore's own work is tiny

    def restored(self, read_start: bool = False) -> bool:
        """Is this a copy restored since? read_start also compares start times, which opens
        a file: not where a checkpoint may be taken at that moment (an fd open at a dump
        is in its image, and /proc/PID/stat is gone by the restore)."""
        if time.process_time() < self.cpu:
            return True
        return read_start and start_time() != self.start
