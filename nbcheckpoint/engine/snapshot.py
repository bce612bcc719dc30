"""The --leave-running snapshot: the tree runs again while its memory is copied.

A leave-running dump needs the tree frozen only for what can change under the
engine's feet without a trace: registers, fds, sockets, shared memory.  The
private memory, by far the bulk, is taken from a copy-on-write copy instead,
like Redis's BGSAVE, except that the fork is injected:

1. while the tree is frozen, after everything else, each process runs an
   injected ``clone(CLONE_FILES)`` with exit signal 0 (:func:`take`).  The child
   is a CoW copy of the address space at that instant.  It shares the fd table,
   so it holds no extra reference to any pipe or socket (peers see EOF exactly
   when they would have); with exit signal 0 its parent gets no SIGCHLD and a
   plain ``waitpid(-1)`` (without __WALL/__WCLONE) never sees it.  The freeze
   traces with PTRACE_O_TRACECLONE, so the child starts traced and stopped,
   before its first instruction; the engine never resumes it and sets
   PTRACE_O_EXITKILL on it;
2. the tree is thawed; the pages are read out of the children (pages.py:
   PAGEMAP_SCAN, then /proc/PID/mem -- not process_vm_readv, whose pinning of
   a page shared copy-on-write makes the kernel copy it first) while the
   processes run;
3. each child is SIGKILLed and waited for (we are its tracer); that leaves a
   zombie only its parent can reap, so one thread of the parent is interrupted
   for one injected ``wait4(child, NULL, __WALL|WNOHANG, NULL)`` (:meth:`Snapshot.release`).

What fork does not copy is read while frozen, from the process itself: VMAs
with MADV_DONTFORK (VmFlags ``dc``: absent in the child) and MADV_WIPEONFORK
(``wf``: empty in the child); MAP_SHARED memory is the same object in both and
is saved while frozen anyway (pages.dump_shmem).  Fork copies the page tables
only of VMAs with an anon_vma (mm/memory.c vma_needs_copy); a private file
mapping never written has none, and its pages are page cache, which the dump
skips in any case.

Safety: the clone runs at the gadget of sigframe.py (CLONE_GADGET), whose
child side is ``exit_group``: if the engine dies before the child has
PTRACE_O_EXITKILL, the kernel detaches it and it exits on its first
instructions; after that the kernel kills it.  The parent side is the usual
rt_sigreturn safety net.  Either way a dead engine leaves at most a zombie
child (exit signal 0: invisible to the process's plain waitpid calls) until
the process exits or waits with __WALL.

If the clone fails (EAGAIN from pids.max, ENOMEM under strict overcommit ...)
or the process has a seccomp filter (which might forbid or punish the clone),
that process's pages are copied while frozen, as without a snapshot, and the
dump says so (a warning, progress phase "no-snapshot", DumpStats.snapshot).
"""
from __future__ import annotations

import bisect
import errno
import logging
import os
import signal

from . import seize, sigframe
from .errors import ProcessGone, SysError
from .inject import Remote, find_syscall_insn, libc_guard
from .sys import proc, ptrace, waitstatus

log = logging.getLogger(__name__)

CLONE_FILES = 0x400
WNOHANG, WALL = 1, 0x40000000
# VmFlags of VMAs a fork does not copy as they are: read them while frozen.
NOT_FORKED = {"dc": "MADV_DONTFORK", "wf": "MADV_WIPEONFORK"}
# Tests only: SIGKILL the engine at one of these points ("clone": at the clone's
# syscall-exit stop, the process's registers still ours and the child not yet
# given EXITKILL; "snapshot": once the child is set up; "thawed": right after the thaw).
DEBUG_KILL_ENV = "NBCHECKPOINT_DEBUG_KILL_AT"


class CloneFailed(Exception):
    pass


def forked_intact(vma) -> bool:
    """Does a fork copy this VMA's private pages as they are?"""
    return not NOT_FORKED.keys() & set(vma.vmflags)


def unsuitable(pid: int) -> str | None:
    """Why process `pid` should not be forked by injection, or None."""
    try:
        mode = proc.status(pid).get("Seccomp", "0")
    except ProcessGone:
        return None
    if mode != "0":
        return f"it runs under seccomp (mode {mode}), which may forbid or punish a clone"
    return None


def debug_kill(point: str) -> None:
    if os.environ.get(DEBUG_KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


class Snapshot:
    """A stopped CoW child of process `pid`; read its memory, then release() it."""

    def __init__(self, pid: int, child: int, vchild: int):
        self.pid = pid              # the process it copies (the engine's view of PIDs)
        self.child = child          # the engine's view: ptrace, /proc/PID/mem
        self.vchild = vchild        # the process's view: what an injected wait4 names
        self._dead = False
        self._released = False

    def attach(self) -> None:
        """Wait for the child's first stop (before its first instruction), then EXITKILL."""
        _, status = ptrace.wait(self.child)
        if not waitstatus.stopped(status):
            self._dead = True
            raise SysError(errno.ESRCH, "snapshot child", self.child, f"it died at once (status {status:#x})")
        ptrace.setoptions(self.child, ptrace.PTRACE_O_EXITKILL | ptrace.PTRACE_O_TRACESYSGOOD)
        debug_kill("snapshot")

    def missing(self, vmas) -> list:
        """The VMAs of `vmas` the child does not map over their whole range (none are
        expected: the caller reads those out of the frozen process instead)."""
        spans = sorted((m.start, m.end) for m in proc.maps(self.child, vmflags=False))
        out = []
        for v in vmas:
            pos, i = v.start, bisect.bisect_right(spans, (v.start, 1 << 64)) - 1
            while 0 <= i < len(spans) and spans[i][0] <= pos < spans[i][1] and pos < v.end:
                pos, i = spans[i][1], i + 1
            if pos < v.end:
                out.append(v)
        return out

    def release(self) -> None:
        """Kill the child and reap it from its parent; idempotent, never raises for the reap."""
        if self._released:
            return
        self._released = True
        if not self._dead:
            try:
                os.kill(self.child, signal.SIGKILL)
            except ProcessLookupError:
                pass
            while True:                     # as its tracer we hear of its death first
                try:
                    _, status = ptrace.wait(self.child)
                except SysError:
                    break
                if not waitstatus.stopped(status):
                    break
            self._dead = True
        try:
            self._reap()
        except Exception as e:          # noqa: BLE001 -- runs in dump()'s finally: never mask its outcome
            log.warning("process %d: could not reap its snapshot child %d (%s); it stays a zombie "
                        "until the process exits or waits for it", self.pid, self.vchild, e)

    def _reap(self) -> None:
        """One injected wait4 in the parent, which runs again: interrupt a thread, inject, detach."""
        areas = [(m.start, m.end, _prot(m.perms), m.path, not m.shared and m.inode == 0)
                 for m in proc.maps(self.pid, vmflags=False)]
        vdso = next((a for a in areas if a[3] == "[vdso]"), None)
        if vdso is None:
            raise SysError(errno.ENOENT, "find [vdso]", self.pid)
        syscall_addr = find_syscall_insn(self.pid, vdso[0], vdso[1])
        tid = seize.interrupt_one(self.pid)
        if tid is None:
            if proc.exists(self.pid):
                raise SysError(errno.EPERM, "seize a thread to reap the snapshot", self.pid)
            return                          # gone: the child went to init with the rest
        try:
            guard = libc_guard(self.pid, tid, areas)
            with Remote(self.pid, tid, syscall_addr, per_call=True, guard=guard) as r:
                res = r.syscall("wait4", self.vchild, 0, WALL | WNOHANG, 0, check=False)
        finally:
            seize.detach(tid)
        if res not in (self.vchild, -errno.ECHILD):
            raise SysError(-res if res < 0 else errno.EAGAIN, "injected wait4", self.pid,
                           f"for snapshot child {self.vchild}: returned {res}")


def take(pid: int, syscall_addr: int, page: int, guard: sigframe.Guard, scratch: int) -> Snapshot:
    """Fork process `pid` (frozen, its gadget page at `page`) by an injected clone.

    Returns the Snapshot as soon as the child exists; call attach() next (the
    caller keeps it first, so that a failure still releases it).  Raises
    CloneFailed when the kernel refuses the clone.
    """
    clone_guard = guard._replace(rip=page + sigframe.CLONE_OFFSET)
    with Remote(pid, pid, syscall_addr, scratch=scratch, guard=clone_guard) as r:
        res = r.syscall("clone", CLONE_FILES, 0, 0, 0, 0, check=False, at_exit=lambda: debug_kill("clone"))
        children = list(r.clone_tids)
    if res < 0:
        raise CloneFailed(f"injected clone failed: {errno.errorcode.get(-res, -res)} ({os.strerror(-res)})")
    if not children:
        # Not traced (cannot happen while the tree is traced with TRACECLONE): it ran
        # the gadget's exit_group at once.  Reap it while we still hold the process.
        with Remote(pid, pid, syscall_addr, scratch=scratch, guard=guard) as r:
            r.syscall("wait4", res, 0, WALL, 0, check=False)
        raise CloneFailed("the injected clone's child was not traced")
    return Snapshot(pid, children[-1], res)


def _prot(perms: str) -> int:
    return (1 if perms[0] == "r" else 0) | (2 if perms[1] == "w" else 0) | (4 if perms[2] == "x" else 0)
