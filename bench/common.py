"""Helpers the benchmarks share: process ownership and reaping, memory and page-cache tools,
medians."""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import statistics
import time

PR_SET_CHILD_SUBREAPER = 36


class BenchError(RuntimeError):
    pass


class Owned:
    """Every process this benchmark is responsible for, so that it can clean up."""

    pids: set[int] = set()

    @classmethod
    def kill(cls, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        reap(pid)

    @classmethod
    def kill_all(cls) -> None:
        for pid in list(cls.pids):
            cls.kill(pid)


def reap(pid: int, timeout: float = 30.0) -> None:
    """Wait for our child (or subreaped orphan) `pid` to be gone."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            break
        if done:
            break
        if time.monotonic() > deadline:
            raise BenchError(f"process {pid} did not exit within {timeout:.0f}s")
        time.sleep(0.005)
    Owned.pids.discard(pid)


def set_subreaper() -> None:
    """Orphans below us (a process restored by `nbcheckpoint restore -d`) become our children."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def private_dirty(pid: int) -> int:
    """Private_Dirty + Swap of `pid`, bytes, from /proc/PID/smaps_rollup."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Private_Dirty", "Swap"):
                total += int(rest.split()[0]) * 1024
    return total


def evict(path: str) -> None:
    """Drop a (synced) file or every file of a dir from the page cache: a cold read follows."""
    files = [path] if os.path.isfile(path) else [os.path.join(path, n) for n in os.listdir(path)]
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def stat(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def rm(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
