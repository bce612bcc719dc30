"""Freezing and thawing a process tree: PTRACE_SEIZE + PTRACE_INTERRUPT of every thread.

Threads and children may appear while we seize.  Each thread is seized with
PTRACE_O_TRACECLONE|TRACEFORK|TRACEVFORK, so anything it creates afterwards
starts traced and stopped; what existed before shows up when we list
/proc/PID/task and /proc/PID/task/*/children again, which we do until a pass
finds nothing new.  Zombies are recorded (with their exit status), not seized;
a zombie left by the snapshot of a leave-running dump whose engine died
(snapshot.py: exit signal 0, exit status SNAPSHOT_EXIT or SIGKILL) is not part
of the tree: it is recorded apart, for dump.py to reap.
"""
from __future__ import annotations

import os
import signal
import time

from .errors import AccessDenied, DumpError, EngineError, ProcessGone, SysError
from .sigframe import SNAPSHOT_EXIT
from .sys import proc, ptrace, userns, waitstatus

PTRACE_EVENT_FORK, PTRACE_EVENT_VFORK = 1, 2
_OPTIONS = ptrace.PTRACE_O_TRACESYSGOOD | ptrace.PTRACE_O_TRACECLONE | 0x2 | 0x4      # TRACEFORK, TRACEVFORK


class FrozenTree:
    """Every thread of every process in the tree, in a ptrace stop."""

    def __init__(self, root: int):
        self.root = root
        self.order: list[int] = []              # live processes, parents before children
        self.tids: dict[int, list[int]] = {}    # pid -> tids, leader first
        self.zombies: dict[int, int] = {}       # pid -> wait status (proc(5) exit_code)
        self.stopped: set[int] = set()          # job-control stopped before the dump
        self.leftovers: dict[int, int] = {}     # snapshot zombie of a dead engine -> its parent
        self._traced: set[int] = set()

    # --- freeze ---------------------------------------------------------------
    def freeze(self) -> "FrozenTree":
        state = proc.pid_state(self.root)
        if not state:
            raise DumpError(f"process {self.root} does not exist")
        if state in "Zx":
            raise DumpError(f"process {self.root} is a zombie; there is nothing to checkpoint")
        try:
            changed = True
            while changed:
                changed = False
                for pid in [self.root] + [c for p in list(self.order) for c in proc.all_children(p)]:
                    if pid in self.tids or pid in self.zombies or pid in self.leftovers:
                        continue
                    if self._freeze_process(pid):
                        changed = True
                for pid in list(self.order):
                    if self._freeze_threads(pid):
                        changed = True
        except BaseException:
            self.thaw()
            raise
        for pid in self.order:
            if pid not in self.tids[pid]:
                self.thaw()
                raise DumpError(f"process {pid}: its main thread has exited while others run; not supported")
            self.tids[pid].sort(key=lambda t: (t != pid, t))
        return self

    def _freeze_process(self, pid: int) -> bool:
        state = proc.pid_state(pid)
        if not state:
            return False
        if state == "Z":
            st = proc.stat(pid)
            if int(st[38]) == 0 and int(st[52]) in (SNAPSHOT_EXIT << 8, signal.SIGKILL):
                self.leftovers[pid] = int(st[4])
                return False
            self.zombies[pid] = int(st[52])
            return True
        if state == "T":
            self.stopped.add(pid)
        self.order.append(pid)
        self.tids[pid] = []
        self._freeze_threads(pid)
        return True

    def _freeze_threads(self, pid: int) -> bool:
        new = False
        try:
            current = proc.tids(pid)
        except ProcessGone:
            return False
        for tid in current:
            if tid in self.tids[pid]:
                continue
            if tid not in self._traced:
                try:
                    ptrace.seize(tid, _OPTIONS)
                except ProcessGone:                 # exited meanwhile
                    continue
                except AccessDenied:
                    raise DumpError(f"cannot seize thread {tid} of process {pid}: {why_not_traceable(pid)}") from None
                self._traced.add(tid)
                ptrace.interrupt(tid)
            if self._wait_stop(tid):
                self.tids[pid].append(tid)
                new = True
        return new

    def _wait_stop(self, tid: int) -> bool:
        """Wait until tid is in PTRACE_EVENT_STOP; False if it died instead."""
        while True:
            _, status = ptrace.wait(tid)
            if not waitstatus.stopped(status):
                self._traced.discard(tid)
                return False
            event = waitstatus.stop_event(status)
            if event == ptrace.PTRACE_EVENT_STOP:
                return True
            if event in (ptrace.PTRACE_EVENT_CLONE, PTRACE_EVENT_FORK, PTRACE_EVENT_VFORK):
                # Created while we were seizing: already traced; it reports its own
                # stop, and the next pass over /proc lists it.
                self._traced.add(ptrace.geteventmsg(tid))
                ptrace.cont(tid)
                ptrace.interrupt(tid)
                continue
            # A signal arrived before our interrupt: deliver it, then stop.
            ptrace.cont(tid, waitstatus.stop_signal(status))
            ptrace.interrupt(tid)

    # --- release ----------------------------------------------------------------
    def all_tids(self) -> list[int]:
        return [t for pid in self.order for t in self.tids[pid]]

    def thaw(self) -> None:
        """Detach every thread; each resumes where it was (syscalls restart)."""
        for tid in self.all_tids() + [t for t in self._traced if t not in self.all_tids()]:
            detach(tid)
        self.tids, self.order, self._traced = {}, [], set()

    def kill(self) -> None:
        """SIGKILL every process while still frozen, so none runs again.

        As their tracer we are told of each thread's death first; consume those
        reports so the real parents can reap them.  A leader's death is reported
        only after all its other threads are gone.
        """
        for pid in self.order:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in reversed(self.order):
            for tid in sorted(self.tids[pid], key=lambda t: t == pid):
                try:
                    while waitstatus.stopped(ptrace.wait(tid)[1]):
                        pass
                except SysError:
                    pass
        self.tids, self.order, self._traced = {}, [], set()


def interrupt_one(pid: int) -> int | None:
    """Seize and stop one thread of a running process, for a brief injected call.

    The leader if it can be, else any thread; None if none can be seized
    (the process is gone, or someone else traces it).  detach() it after.
    """
    try:
        tids = sorted(proc.tids(pid), key=lambda t: t != pid)
    except ProcessGone:
        return None
    for tid in tids:
        try:
            ptrace.seize(tid, ptrace.PTRACE_O_TRACESYSGOOD)
        except (ProcessGone, AccessDenied):
            continue
        ptrace.interrupt(tid)
        while True:
            _, status = ptrace.wait(tid)
            if not waitstatus.stopped(status):
                break                               # it exited meanwhile
            if waitstatus.stop_event(status) == ptrace.PTRACE_EVENT_STOP:
                return tid
            ptrace.cont(tid, waitstatus.stop_signal(status))  # a signal came first: deliver it
            ptrace.interrupt(tid)
    return None


def detach(tid: int) -> None:
    try:
        ptrace.detach(tid)
    except SysError:
        pass


def kill_for_restore(root: int, via: int | None = None, timeout: float = 10.0) -> None:
    """Kill the live tree under `root` so that its image can be restored in its place.

    Connections inside the tree end silently (files.inet.hold_internal), so their
    address pairs are free for the restored copies at once.  `via`: kill this process
    instead (e.g. the init of the tree's PID namespace, which takes the namespace down);
    it is reaped if it is our child.  Returns once every process of the tree is gone.
    """
    from .files import inet
    pids, i = [root], 0
    while i < len(pids):
        pids.extend(c for c in proc.all_children(pids[i]) if c not in pids)
        i += 1
    held = inet.hold_internal(pids)
    try:
        for p in ([via] if via else pids):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        if via:
            ptrace.reap([via], timeout)     # an init waits for its namespace to empty: bounded
        while any(proc.pid_state(p) not in ("", "X", "Z") for p in pids):
            if time.monotonic() > deadline:
                raise EngineError(f"the tree under {root} did not die within {timeout:.0f} s")
            time.sleep(0.002)
    finally:
        for fd in held:
            os.close(fd)


def why_not_traceable(pid: int) -> str:
    """Why PTRACE_SEIZE of `pid` was refused, in the user's terms, with what would allow it."""
    try:
        st = proc.status(pid)
    except OSError:
        return "it is gone or hidden from us"
    tracer = int(st.get("TracerPid", "0"))
    if tracer:
        try:
            name = proc.status(tracer).get("Name", "?")
        except OSError:
            name = "?"
        return f"it is already traced by process {tracer} ({name}): a debugger or another checkpoint"
    uid, me = int(st["Uid"].split()[1]), os.geteuid()
    if uid != me and not userns.privileged():
        return (f"it runs as uid {uid} and you are uid {me}: only root may checkpoint another user's "
                "processes")
    try:
        scope = proc.sysctl_int("kernel/yama/ptrace_scope")
    except OSError:
        scope = 0
    if scope and not userns.privileged():
        return (f"kernel.yama.ptrace_scope={scope} forbids it ("
                + ("only a process's ancestors may trace it: start it under the tracer, or an administrator "
                   "sets kernel.yama.ptrace_scope=0" if scope == 1 else "only root may trace") + ")")
    return ("ptrace is denied (a setuid/setgid or non-dumpable process, or a security module): "
            "checkpoint it as root")
