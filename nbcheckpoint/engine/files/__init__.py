"""File descriptors: classified in ONE place (:func:`classify`), one module per kind.

The model is CRIU's: an *open file description* (what open(2) returns, shared by dup(2),
fork(2) and SCM_RIGHTS) is one ``FileEntry`` with an id; each process has a table of
``FdEntry`` (fd number, close-on-exec, id).  Two fds refer to the same description when
kcmp(2) KCMP_FILE says so.  Each kind is one ``FileKind`` (``kind.py``; docs/engine.md, "Fd
kinds") in the one table :data:`KINDS`.  Files in flight (SCM_RIGHTS messages queued on a unix
socket) are descriptions too (:meth:`DumpContext.dump_in_flight`).  Restore opens each
description once in the engine; the stubs inherit the fds and injected dup3() calls put them
at their numbers (restore.py).
"""
from __future__ import annotations

import os
import socket
import stat
from typing import NamedTuple

from ..errors import DumpError, EngineError, ImageError, SysError, UnsupportedError
from ..images import files_pb2
from ..netlock import DumpLock
from ..options import Options
from ..sys import proc
from ..sys.libc import syscall
from ..sys.memory import pidfd_getfd, pidfd_open
from ..sys.x86_64 import NR
from . import anon, inet, pidfd, pipe, regfile, tty, unix
from .kind import FileKind, set_status_flags

KCMP_FILE = 0

# The one table of supported kinds.  A kind missing here fails the dump by name.
KINDS: dict[int, FileKind] = {
    files_pb2.REG: regfile.KIND,
    files_pb2.CHR: regfile.KIND,
    files_pb2.EVENTFD: anon.KIND, files_pb2.EPOLL: anon.KIND, files_pb2.TIMERFD: anon.KIND,
    files_pb2.SIGNALFD: anon.KIND, files_pb2.INOTIFY: anon.KIND,
    files_pb2.PIPE: pipe.KIND,
    files_pb2.FIFO: pipe.KIND,
    files_pb2.UNIX: unix.KIND,
    files_pb2.INET: inet.KIND,
    files_pb2.TTY: tty.KIND,
    files_pb2.PIDFD: pidfd.KIND,
}

_ANON_KINDS = {"[eventfd]": files_pb2.EVENTFD, "[eventpoll]": files_pb2.EPOLL, "[timerfd]": files_pb2.TIMERFD,
               "[signalfd]": files_pb2.SIGNALFD, "inotify": files_pb2.INOTIFY, "[pidfd]": files_pb2.PIDFD}


# What the engine can save when it is only in flight (held by no process, just queued on a
# unix socket): kinds whose dump needs nothing of a holder.  An epoll's registrations name
# fds of its holder; ttys and inet sockets are classified against the tree's processes; a
# pidfd is opened again inside its holder.
IN_FLIGHT_KINDS = {files_pb2.REG, files_pb2.CHR, files_pb2.PIPE, files_pb2.FIFO, files_pb2.EVENTFD,
                   files_pb2.TIMERFD, files_pb2.SIGNALFD, files_pb2.UNIX}


class TreeFd(NamedTuple):
    """One fd of the frozen tree, as :meth:`DumpContext.prepare` classified it."""
    fd: int
    kind: int
    stat: os.stat_result
    link: str


def classify(pid: int, fd: int) -> tuple[int, os.stat_result, str]:
    """(FdKind, stat, link) of one fd; a kind we cannot save raises, naming it."""
    kind, s, link, what = _kind_of(pid, fd)
    if kind is None or kind not in KINDS:
        raise UnsupportedError(f"process {pid}: fd {fd} is a {what}, which this version cannot "
                               "checkpoint; close it before checkpointing")
    return kind, s, link


def _kind_of(pid: int, fd: int) -> tuple[int | None, os.stat_result, str, str]:
    """(FdKind or None, stat, link, what it is in words) of one fd."""
    link = proc.fdlink(pid, fd)
    s = os.stat(f"/proc/{pid}/fd/{fd}")
    mode = s.st_mode
    kind, what = None, link
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        kind = files_pb2.REG
    elif stat.S_ISCHR(mode):
        dev = (os.major(s.st_rdev), os.minor(s.st_rdev))
        if dev in regfile.SIMPLE_DEVICES:
            kind = files_pb2.CHR
        elif dev[0] in (136, 5) or (dev[0] == 4 and dev[1] >= 64):   # devpts slaves, /dev/tty, /dev/ptmx
            kind, what = files_pb2.TTY, f"terminal {link}"
        else:
            what = f"character device {dev[0]}:{dev[1]} ({link})"
    elif stat.S_ISFIFO(mode):
        kind = files_pb2.PIPE if link.startswith("pipe:") else files_pb2.FIFO
        what = f"pipe ({link})" if kind == files_pb2.PIPE else f"FIFO {link}"
    elif stat.S_ISSOCK(mode):
        fam = _socket_family(pid, fd)
        kind = {1: files_pb2.UNIX, 2: files_pb2.INET, 10: files_pb2.INET}.get(fam)
        what = f"socket ({link}, family {fam})"
    elif stat.S_ISBLK(mode):
        what = f"block device ({link})"
    elif link.startswith("anon_inode:"):
        name = link[len("anon_inode:"):]
        kind = _ANON_KINDS.get(name)
        what = f"{name.strip('[]')} ({link})"
    return kind, s, link, what


def _socket_family(pid: int, fd: int) -> int:
    # a socket cannot be opened through /proc (ENXIO): ask a duplicate
    pidfd = pidfd_open(pid)
    try:
        dup = pidfd_getfd(pidfd, fd, pid)
    finally:
        os.close(pidfd)
    with socket.socket(fileno=dup) as sk:
        return int(sk.family)


def _adopt(fd: int, f: files_pb2.FileEntry) -> int:
    """A caller's fd standing in for `f` (--inherit-fd), with the dumped O_NONBLOCK.

    It is the caller's own open file description, so the caller sees the change too."""
    try:
        set_status_flags(fd, f.flags)
    except OSError:
        pass
    return os.dup(fd)


class DumpContext:
    """What the fd dumpers share: the image, ids, and duplicates of target fds."""

    def __init__(self, img, options=None):
        self.img = img
        self.options = options or Options()
        self.files: list[files_pb2.FileEntry] = []
        self._seen: dict[tuple[int, int], list[tuple[int, int, int]]] = {}   # (dev, ino) -> [(pid, fd, id)]
        self._pidfds: dict[int, int] = {}
        self._at_close: list = []
        self._states: dict = {}
        self.tree: dict[int, list[TreeFd]] = {}
        self.netlock = DumpLock()       # connections to outside peers (files/inet.py)

    def state(self, kind):
        """kind's own state for this dump, made by kind.new_dump_state(self) at first use."""
        if kind not in self._states:
            self._states[kind] = kind.new_dump_state(self)
        return self._states[kind]

    def prepare(self, pids) -> None:
        """Once the tree is frozen: classify every fd of its processes (`pids`) once, into
        self.tree, and let each kind prepare with it (before any fd is dumped)."""
        self.tree = {p: [TreeFd(fd, *classify(p, fd)) for fd in proc.fds(p)] for p in pids}
        for kind in dict.fromkeys(KINDS.values()):
            kind.prepare(self, self.tree)

    def inodes(self, *kinds: int) -> set[int]:
        """The inodes of the tree's fds of these kinds (e.g. its sockets)."""
        return {t.stat.st_ino for fds in self.tree.values() for t in fds if t.kind in kinds}

    def at_close(self, fn, *args) -> None:
        """Call fn(*args) when the dump is over (DumpContext.close, in dump()'s finally)."""
        self._at_close.append((fn, args))

    def getfd(self, pid: int, fd: int) -> int:
        """A duplicate of the target's fd in the engine (pidfd_getfd); the caller closes it."""
        if pid not in self._pidfds:
            self._pidfds[pid] = pidfd_open(pid)
        return pidfd_getfd(self._pidfds[pid], fd, pid)

    def getsock(self, pid: int, fd: int):
        """getfd() of a socket, as a socket object (closing it closes the duplicate)."""
        dup = self.getfd(pid, fd)
        try:
            return socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            raise

    def _identify(self, pid: int, fd: int, s: os.stat_result) -> int | None:
        for opid, ofd, oid in self._seen.get((s.st_dev, s.st_ino), []):
            if syscall(NR["kcmp"], pid, opid, KCMP_FILE, fd, ofd, request="kcmp", pid=pid) == 0:
                return oid
        return None

    def dump_fds(self, pid: int) -> list[files_pb2.FdEntry]:
        out = []
        for fd, kind, s, link in self.tree[pid]:
            info = proc.fdinfo(pid, fd)
            flags = int(info["flags"], 8)
            fid = self._identify(pid, fd, s)
            if fid is None:
                fid = self._dump_new(pid, fd, kind, s, link, info)
            out.append(files_pb2.FdEntry(fd=fd, cloexec=bool(flags & os.O_CLOEXEC), id=fid))
        return out

    def _dump_new(self, pid: int, fd: int, kind: int, s: os.stat_result, link: str, info: dict) -> int:
        fid = len(self.files) + 1
        entry = files_pb2.FileEntry(id=fid, kind=kind, flags=int(info["flags"], 8) & ~os.O_CLOEXEC)
        # known before its payload is dumped: a unix socket may hold itself in flight
        self._seen.setdefault((s.st_dev, s.st_ino), []).append((pid, fd, fid))
        self.files.append(entry)
        KINDS[kind].dump(self, pid, fd, s, link, info, entry)
        return fid

    def dump_in_flight(self, where: str, fd: int) -> int:
        """The id of a file in flight: `fd` is the engine's copy, which peeking an SCM_RIGHTS
        message of the socket `where` ("process P: fd N (unix socket:[I])") installed.

        The engine keeps `fd` open until the dump ends, so that kcmp() can match it with
        the same description held by a process dumped later."""
        me = os.getpid()
        self.at_close(os.close, fd)
        kind, s, link, what = _kind_of(me, fd)
        if kind not in IN_FLIGHT_KINDS:
            raise UnsupportedError(f"{where} has a file in flight (SCM_RIGHTS) in its receive queue that "
                                   f"this version cannot checkpoint while in flight: {what}; let the "
                                   "process receive it first")
        fid = self._identify(me, fd, s)
        if fid is not None:
            return fid
        try:
            return self._dump_new(me, fd, kind, s, link, proc.fdinfo(me, fd))
        except EngineError as e:
            # the kind's message names the engine's copy; say where the file really is
            msg = str(e).replace(f"process {me}: fd {fd}", f"a file in flight on {where}")
            raise (DumpError(msg) if isinstance(e, SysError) else type(e)(msg)) from None

    def dump_done(self) -> None:
        for kind in dict.fromkeys(KINDS.values()):
            kind.dump_done(self)

    def close(self) -> None:
        # explicitly, not when collected: a long-lived caller (the Jupyter shim) must not
        # keep duplicates of the tree's sockets alive after the dump
        while self._at_close:
            fn, args = self._at_close.pop(0)
            fn(*args)
        self.netlock.close()            # after the sockets: they close while still locked
        for fd in self._pidfds.values():
            os.close(fd)
        self._pidfds.clear()


def kind_name(kind: int) -> str:
    """An FdKind's name; the number if it has none (an image from a newer version, or damaged)."""
    return files_pb2.FdKind.Name(kind) if kind in files_pb2.FdKind.values() else str(kind)


class RestoreContext:
    """Opens each file description once, in the engine; kinds may open peers together."""

    def __init__(self, reader, files: list[files_pb2.FileEntry], options=None):
        self.reader = reader
        self.options = options or Options()
        self.files = {f.id: f for f in files}
        self.opened: dict[int, int] = {}
        self._states: dict = {}
        self.shmem: dict[int, int] = {}     # shmem objects the tree maps, restored: id (inode) -> fd

    def state(self, kind):
        """kind's own state for this restore, made by kind.new_restore_state(self) at first use."""
        if kind not in self._states:
            self._states[kind] = kind.new_restore_state(self)
        return self._states[kind]

    def check(self, pid: int, fds) -> None:
        """Before any process exists: is everything these fds need still there?"""
        for e in fds:
            f = self.files.get(e.id)
            if f is None:
                raise ImageError(f"process {pid}: fd {e.fd} refers to file {e.id}, which the image lacks")
            self.check_one(pid, e, f)

    def check_one(self, pid: int, fde, f: files_pb2.FileEntry) -> None:
        """The kind's own check of one description (fde.fd names it in messages)."""
        kind = KINDS.get(f.kind)
        if kind is None or f.flags >= 2**31:    # refused before any process exists
            why = (f"is a file of kind {kind_name(f.kind)}, which this version cannot restore" if kind is None
                   else f"has flags {f.flags:#o}, no open(2) flags: damaged image")
            raise ImageError(f"process {pid}: fd {fde.fd} {why}")
        kind.check(self, pid, fde, f)

    def open(self, fid: int) -> int:
        if fid not in self.opened:
            f = self.files[fid]
            kind = KINDS.get(f.kind)
            if kind is None:
                raise ImageError(f"file {fid} is of kind {kind_name(f.kind)}, "
                                 "which this version cannot restore")
            inherited = self.inherited(f)
            self.opened[fid] = _adopt(inherited, f) if inherited is not None else kind.open(self, f)
        return self.opened[fid]

    def inherited(self, f: files_pb2.FileEntry) -> int | None:
        """The caller's fd handed in for this object with --inherit-fd, if any."""
        kind = KINDS.get(f.kind)
        key = kind.external_key(f) if kind is not None else None
        return self.options.inherit_fd.get(key) if key else None

    def remember(self, fid: int, fd: int) -> None:
        """For kinds that create several descriptions at once (pipe ends, socketpairs)."""
        self.opened.setdefault(fid, fd)

    def open_group(self, f: files_pb2.FileEntry, group, make) -> int:
        """f's fd, made with the other descriptions of `group` (pipe ends, a pty pair) by
        make(made), which fills made {id: fd}; the others are remembered, all closed on failure."""
        made: dict[int, int] = {}
        try:
            make(made)
        except BaseException:
            for fd in set(made.values()):
                os.close(fd)
            raise
        for e in group:
            if e.id != f.id:
                self.remember(e.id, made[e.id])
        return made[f.id]

    def after_place(self, remote, pid: int, fds) -> None:
        for fid in dict.fromkeys(e.id for e in fds):
            f = self.files[fid]
            KINDS[f.kind].after_place(self, remote, pid, fds, f)

    def close(self) -> None:
        for fd in self.opened.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.opened.clear()
