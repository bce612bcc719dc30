"""File descriptors: classified in ONE place (:func:`classify`), one module per kind.

Each kind module has ``dump(pid, fd, ...) -> message`` and ``open(msg) -> engine fd``.
Restore opens every file in the engine; the stub inherits those fds when it is
forked, and injected dup3() calls move them to their dumped numbers.
"""
from __future__ import annotations

import os
import stat

from ..errors import UnsupportedError
from ..images import files_pb2
from ..sys import proc
from ..sys.libc import syscall
from ..sys.x86_64 import NR
from . import regfile

O_CLOEXEC = 0o2000000
KCMP_FILE = 0


def classify(pid: int, fd: int) -> tuple[int, os.stat_result, str]:
    """(FdKind, stat, link) of one fd; an unsupported kind raises, naming it."""
    link = proc.fdlink(pid, fd)
    s = os.stat(f"/proc/{pid}/fd/{fd}")
    mode = s.st_mode
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return files_pb2.REG, s, link
    if stat.S_ISCHR(mode) and (os.major(s.st_rdev), os.minor(s.st_rdev)) in regfile.SIMPLE_DEVICES:
        return files_pb2.CHR, s, link
    if stat.S_ISCHR(mode):
        kind = f"character device {os.major(s.st_rdev)}:{os.minor(s.st_rdev)} ({link})"
    elif stat.S_ISFIFO(mode):
        kind = f"pipe or FIFO ({link})"
    elif stat.S_ISSOCK(mode):
        kind = f"socket ({link})"
    elif stat.S_ISBLK(mode):
        kind = f"block device ({link})"
    elif link.startswith("anon_inode:"):
        kind = f"{link[len('anon_inode:'):]} ({link})"
    else:
        kind = link
    raise UnsupportedError(f"process {pid}: fd {fd} is a {kind}, which this version cannot "
                           "checkpoint; close it before checkpointing")


def _same_file(pid: int, fd1: int, fd2: int) -> bool:
    """kcmp(2) KCMP_FILE: do the two fds share one open file description?"""
    return syscall(NR["kcmp"], pid, pid, KCMP_FILE, fd1, fd2, request="kcmp", pid=pid) == 0


def dump_fds(pid: int, img) -> list[files_pb2.FdEntry]:
    """Describe every fd; fds sharing an open file description share an id."""
    out = []
    by_inode: dict[tuple[int, int], list[files_pb2.FdEntry]] = {}
    next_id = 1
    for fd in proc.fds(pid):
        kind, s, link = classify(pid, fd)
        info = proc.fdinfo(pid, fd)
        flags = int(info["flags"], 8)
        e = files_pb2.FdEntry(fd=fd, cloexec=bool(flags & O_CLOEXEC), kind=kind)
        shared = next((o for o in by_inode.get((s.st_dev, s.st_ino), []) if _same_file(pid, o.fd, fd)), None)
        if shared is not None:
            e.reg.CopyFrom(shared.reg)
        else:
            e.reg.CopyFrom(regfile.dump(pid, fd, s, link, flags & ~O_CLOEXEC, int(info["pos"]), next_id, img))
            next_id += 1
        by_inode.setdefault((s.st_dev, s.st_ino), []).append(e)
        out.append(e)
    return out


def check_restorable(pid: int, entries) -> None:
    for e in entries:
        regfile.check(pid, e)


def open_all(reader, entries) -> dict[int, int]:
    """Open each open file description once in the engine: {description id: engine fd}."""
    opened: dict[int, int] = {}
    try:
        for e in entries:
            if e.reg.id not in opened:
                opened[e.reg.id] = regfile.open_file(reader, e)
    except BaseException:
        for fd in opened.values():
            os.close(fd)
        raise
    return opened
