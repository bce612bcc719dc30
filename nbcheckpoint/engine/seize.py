"""Freezing and thawing a process: PTRACE_SEIZE + PTRACE_INTERRUPT of every thread.

Threads may be created while we seize: we list /proc/PID/task again until a
pass finds no new thread.  PTRACE_O_TRACECLONE on each seized thread makes any
thread it creates afterwards start traced and stopped, so the loop converges.
"""
from __future__ import annotations

import errno
import os
import signal

from .errors import DumpError, SysError
from .sys import proc, ptrace


class Frozen:
    """The threads of one process, all in a ptrace stop; thaw() lets them go."""

    def __init__(self, pid: int):
        self.pid = pid
        self.tids: list[int] = []

    def freeze(self) -> "Frozen":
        state = proc.pid_state(self.pid)
        if not state:
            raise DumpError(f"process {self.pid} does not exist")
        if state in "Zx":
            raise DumpError(f"process {self.pid} is a zombie; there is nothing to checkpoint")
        if state in "Tt":
            raise DumpError(f"process {self.pid} is stopped (state {state}); stopped tasks are "
                            "not supported yet: continue it (kill -CONT) and retry")
        seen: set[int] = set()
        try:
            while True:
                new = [t for t in proc.tids(self.pid) if t not in seen]
                if not new:
                    break
                for tid in new:
                    seen.add(tid)
                    try:
                        ptrace.seize(tid, ptrace.PTRACE_O_TRACECLONE)
                    except SysError as e:
                        if e.errno == errno.ESRCH:      # exited meanwhile
                            continue
                        if e.errno == errno.EPERM:
                            raise DumpError(
                                f"cannot seize thread {tid} of process {self.pid}: it is already "
                                "traced (a debugger or another checkpoint?) or we lack permission") from None
                        raise
                    self.tids.append(tid)
                    ptrace.interrupt(tid)
            for tid in list(self.tids):
                self._wait_stop(tid)
        except BaseException:
            self.thaw()
            raise
        if self.pid not in self.tids:
            self.thaw()
            raise DumpError(f"process {self.pid}: its main thread has exited; not supported")
        self.tids.sort(key=lambda t: (t != self.pid, t))
        return self

    def _wait_stop(self, tid: int) -> None:
        while True:
            _, status = ptrace.wait(tid)
            if (status & 0xFF) != 0x7F:          # exited or killed
                self.tids.remove(tid)
                return
            event = ptrace.stop_event(status)
            if event == ptrace.PTRACE_EVENT_STOP:
                return
            if event == ptrace.PTRACE_EVENT_CLONE:
                # A thread created while we were seizing: it is auto-attached
                # and will report its own stop; list it and keep waiting here.
                child = ptrace.geteventmsg(tid)
                if child not in self.tids:
                    self.tids.append(child)
                    self._wait_stop(child)
                ptrace.cont(tid)
                ptrace.interrupt(tid)
                continue
            # A signal arrived before our interrupt: let it be delivered later
            # by re-injecting it on resume; we must stop first.
            sig = (status >> 8) & 0xFF
            ptrace.cont(tid, sig)
            ptrace.interrupt(tid)

    def thaw(self) -> None:
        """Detach every thread; each resumes where it was (syscalls restart)."""
        for tid in self.tids:
            try:
                ptrace.detach(tid)
            except SysError:
                pass
        self.tids = []

    def kill(self) -> None:
        """SIGKILL the process while it is still frozen, so it never runs again.

        As its tracer we are told of each thread's death first; consume those
        reports so the real parent can reap the process.
        """
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        # The leader's death is reported only after all other threads are gone.
        for tid in sorted(self.tids, key=lambda t: t == self.pid):
            try:
                while (ptrace.wait(tid)[1] & 0xFF) == 0x7F:
                    pass
            except SysError:
                pass
        self.tids = []
