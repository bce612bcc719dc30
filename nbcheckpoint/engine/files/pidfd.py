"""pidfds (``anon_inode:[pidfd]``): what asyncio, subprocess and systemd hold of their children.

Dump: fdinfo's ``Pid:`` names the process as the engine sees it (-1: it has exited and been
reaped; 0: it lives in a namespace the engine cannot see).  A process of the tree (or a zombie
child of one) is recorded as the tree sees it (``NSpid``'s last field); any other fails the
dump by name.  O_NONBLOCK (PIDFD_NONBLOCK) and O_EXCL (PIDFD_THREAD, which the kernel keeps
in the file's flags) are in ``FileEntry.flags``; a thread pidfd is kept for a main thread
only (other threads do not exist yet when fds are placed at restore).

Restore: the process may not exist when the engine opens files (before the tree), so
``open`` makes a pidfd of a child of its own that has exited and been reaped -- which is
also what a pidfd of a gone process comes back as (readable, waitid ECHILD) -- and
``after_place`` replaces it by a ``pidfd_open(pid, flags)`` injected into the holder (the pid
resolves in the holder's namespace, so --pidns is right) dup3'ed onto each of its fds.

Not kept: a description shared by two processes (a fork after pidfd_open, SCM_RIGHTS)
comes back as one description per process; a pidfd in flight on a unix socket is refused;
a gone process's pidfd is made in the engine's PID namespace, so in a restored namespace
pidfd_send_signal on it fails with EINVAL instead of ESRCH, and it is no thread pidfd.
"""
from __future__ import annotations

import fcntl
import os

from ..errors import RestoreError, SysError, UnsupportedError
from ..sys import proc, spawn
from .kind import FileKind

PIDFD_THREAD = 0o200                    # O_EXCL
PIDFD_FLAGS = os.O_NONBLOCK | PIDFD_THREAD


class Pidfd(FileKind):
    def dump(self, ctx, pid, fd, s, link, info, entry) -> None:
        nr = int(info["Pid"])
        entry.pidfd.SetInParent()
        if nr == -1:
            return                      # exited and reaped: pid 0
        what = f"process {pid}: fd {fd} is a pidfd of"
        if nr == 0:
            raise UnsupportedError(f"{what} a process in a PID namespace the engine cannot see, outside "
                                   "the checkpointed tree; close it before checkpointing")
        st = proc.status(nr)
        tgid = int(st["Tgid"])
        if tgid not in ctx.tree and not (st["State"].startswith("Z") and int(st["PPid"]) in ctx.tree):
            raise UnsupportedError(f"{what} process {nr}, which is outside the checkpointed tree; close "
                                   "it before checkpointing, or checkpoint a tree that holds that process")
        if tgid != nr:
            raise UnsupportedError(f"{what} thread {nr} of process {tgid} (PIDFD_THREAD), which this version "
                                   "cannot checkpoint (only a main thread's); close it before checkpointing")
        entry.pidfd.pid = int(info["NSpid"].split()[-1])

    def open(self, ctx, f) -> int:
        fd = spawn.reaped_pidfd()
        if f.flags & os.O_NONBLOCK:
            fcntl.fcntl(fd, fcntl.F_SETFL, os.O_NONBLOCK)
        return fd

    def after_place(self, ctx, remote, pid, fds, f) -> None:
        if not f.pidfd.pid:
            return
        try:
            tmp = remote.syscall("pidfd_open", f.pidfd.pid, f.flags & PIDFD_FLAGS)
        except SysError as e:
            raise RestoreError(f"process {pid}: cannot open its pidfd of process {f.pidfd.pid} again: "
                               f"{os.strerror(e.errno)}") from None
        for e in fds:
            if e.id == f.id:
                remote.syscall("dup3", tmp, e.fd, os.O_CLOEXEC if e.cloexec else 0)
        remote.syscall("close", tmp)

    def describe(self, f) -> str:
        of = f"process {f.pidfd.pid}" if f.pidfd.pid else "a process that had exited and been reaped"
        return f"flags {f.flags:#o} pidfd of {of}{' (PIDFD_THREAD)' if f.flags & PIDFD_THREAD else ''}"


KIND = Pidfd()
