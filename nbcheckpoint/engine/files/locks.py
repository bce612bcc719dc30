"""File locks (--file-locks): flock(2), POSIX (fcntl F_SETLK) and OFD (F_OFD_SETLK) locks;
docs/engine.md, "File locks", says what is kept and when a lock is refused.

Who owns what (fs/locks.c): flock and OFD locks belong to an *open file description*, so
they are saved and re-acquired once per description (FileEntry id), through any fd of the
first process that has it; POSIX locks belong to a process and a file, so each process
re-acquires its own, through the fd it set them through.  The fdinfo ``lock:`` lines list the
granted locks set through that description and owned by it (flock, OFD) or by the reading
process (POSIX): the mapping to a description is exact.  Like CRIU, a held lock fails the
dump unless --file-locks is given (it is safe only if every process using it is in the dump).
"""
from __future__ import annotations

import errno
import os
import struct

from ..errors import ImageError, RestoreError, UnsupportedError
from ..images import locks_pb2, names
from ..sys import proc

LOCK_SH, LOCK_EX, LOCK_NB = 1, 2, 4
F_RDLCK, F_WRLCK = 0, 1
F_SETLK, F_OFD_SETLK = 6, 37
SEEK_SET = 0
# struct flock (x86_64): short l_type, short l_whence, [pad], off_t l_start, off_t l_len, pid_t l_pid, [pad]
_FLOCK = struct.Struct("<hh4xqqi4x")
assert _FLOCK.size == 32

_KINDS = {"FLOCK": locks_pb2.LOCK_FLOCK, "POSIX": locks_pb2.LOCK_POSIX, "OFDLCK": locks_pb2.LOCK_OFD}


def describe(lk, path: str | None = None) -> str:
    """'a flock() exclusive lock [on PATH]', 'a POSIX (fcntl F_SETLK) read lock on bytes 100-104 [of PATH]' ..."""
    if lk.kind == locks_pb2.LOCK_FLOCK:
        return f"a flock() {'exclusive' if lk.write else 'shared'} lock" + (f" on {path}" if path else "")
    what = "a POSIX (fcntl F_SETLK)" if lk.kind == locks_pb2.LOCK_POSIX else "an OFD (fcntl F_OFD_SETLK)"
    rng = f"bytes {lk.start}-{lk.start + lk.len - 1}" if lk.len else f"bytes {lk.start}-EOF"
    return f"{what} {'write' if lk.write else 'read'} lock on {rng}" + (f" of {path}" if path else "")


# --- dump ----------------------------------------------------------------------

class _SeenLocks(set):
    """Per dump (``ctx.state(_SeenLocks)``): the flock and OFD locks saved, tree-wide."""

    @classmethod
    def new_dump_state(cls, ctx) -> "_SeenLocks":
        return cls()


def dump_locks(ctx, pid: int, fds, vpid: int | None = None) -> list:
    """Save the file locks process `pid` holds through its fds (FdEntry list).

    `pid` is the engine's view (/proc); `vpid` the process's own (the image
    file's name), when it lives in another PID namespace.  Without
    ctx.options.file_locks a held lock raises UnsupportedError (the dump then
    fails and the tree is thawed).  Returns the saved FileLock list.
    """
    # (file id, kind, start, len, write): flock/OFD locks tree-wide, POSIX ones per process
    seen_ofd = ctx.state(_SeenLocks)
    seen_posix: set = set()
    out = []
    for e in fds:
        try:
            held = proc.fd_locks(proc.fdinfo(pid, e.fd))
        except (ValueError, IndexError) as ex:
            raise UnsupportedError(f"process {pid}: fd {e.fd}: cannot parse its fdinfo lock lines ({ex})") from None
        if not held:
            continue
        path = _path(pid, e.fd)
        for h in held:
            kind = _KINDS.get(h.kind)
            if kind is None or h.mode != "ADVISORY" or h.type not in ("READ", "WRITE"):
                raise UnsupportedError(
                    f"process {pid}: fd {e.fd} ({path}) holds a {h.kind} {h.mode} {h.type} lock (a lease or "
                    "mandatory lock), which this version cannot checkpoint; release it before checkpointing")
            lk = locks_pb2.FileLock(kind=kind, write=h.type == "WRITE", file_id=e.id, fd=e.fd, path=path)
            if kind != locks_pb2.LOCK_FLOCK:
                lk.start = h.start
                lk.len = 0 if h.end is None else h.end - h.start + 1
            if not ctx.options.file_locks:
                raise UnsupportedError(
                    f"process {pid}: fd {e.fd} holds {describe(lk, path)}; file locks are checkpointed "
                    "only with --file-locks (Options(file_locks=True)) on both dump and restore, and only "
                    "if every process using the lock is in the dump")
            key = (e.id, kind, lk.start, lk.len, lk.write)
            seen = seen_posix if kind == locks_pb2.LOCK_POSIX else seen_ofd
            if key in seen:
                continue        # the same description through another fd (dup, fork)
            seen.add(key)
            out.append(lk)
    if out:
        w = ctx.img.messages(names.locks(pid if vpid is None else vpid), locks_pb2.FileLock)
        for lk in out:
            w.add(lk)
    return out


def _path(pid: int, fd: int) -> str:
    try:
        return proc.fdlink(pid, fd)
    except OSError:
        return "?"


# --- restore -------------------------------------------------------------------

def load_locks(ctx, pid: int) -> list:
    name = names.locks(pid)
    return ctx.reader.messages(name, locks_pb2.FileLock) if ctx.reader.has(name) else []


def check_locks(ctx, pid: int, fds) -> list:
    """Before any process exists: the image's locks of `pid` can be restored with these options."""
    locks = load_locks(ctx, pid)
    if not locks:
        return locks
    by_fd = {e.fd: e.id for e in fds}
    for lk in locks:
        if by_fd.get(lk.fd) != lk.file_id:
            raise ImageError(f"process {pid}: {names.locks(pid)} names fd {lk.fd} (file {lk.file_id}), "
                             "which the process's fd table does not have: damaged image")
    if not ctx.options.file_locks:
        lk = locks[0]
        raise RestoreError(
            f"process {pid} held {len(locks)} file lock(s) at the dump (e.g. {describe(lk, lk.path)}, "
            f"fd {lk.fd}); the image was taken with --file-locks: restore with --file-locks too "
            "(Options(file_locks=True)) so that they are re-acquired")
    return locks


def restore_locks(ctx, remote, pid: int, fds) -> None:
    """Re-acquire process `pid`'s locks inside it, its fds being in place.

    `pid` is the image's (as the process sees itself); remote.pid the engine's view.
    """
    locks = check_locks(ctx, pid, fds)
    if not locks:
        return
    scratch, mapped = remote.scratch, 0
    if not scratch:
        # MAP_PRIVATE | MAP_ANONYMOUS, PROT_READ | PROT_WRITE
        scratch = mapped = remote.syscall("mmap", 0, 4096, 3, 0x22, -1, 0)
    try:
        for lk in locks:
            if lk.kind == locks_pb2.LOCK_FLOCK:
                res = remote.syscall("flock", lk.fd, (LOCK_EX if lk.write else LOCK_SH) | LOCK_NB, check=False)
            else:
                remote.write(scratch, _FLOCK.pack(F_WRLCK if lk.write else F_RDLCK, SEEK_SET, lk.start, lk.len, 0))
                cmd = F_SETLK if lk.kind == locks_pb2.LOCK_POSIX else F_OFD_SETLK
                res = remote.syscall("fcntl", lk.fd, cmd, scratch, check=False)
            if res < 0:
                raise RestoreError(_why(ctx, remote, pid, lk, -res))
    finally:
        if mapped:
            remote.syscall("munmap", mapped, 4096, check=False)


def _why(ctx, remote, pid: int, lk, err: int) -> str:
    head = f"process {pid}: cannot re-acquire {describe(lk, lk.path)} (fd {lk.fd})"
    if err not in (errno.EAGAIN, errno.EACCES):
        return f"{head}: {errno.errorcode.get(err, err)} ({os.strerror(err)})"
    holders = _holders(remote.pid, lk.fd)
    by = f"held by {', '.join(holders[:4])}" if holders else "held by another process"
    hint = ""
    if ctx.reader.inventory.leave_running:
        hint = (" The image was taken with --leave-running: the original process may still be "
                "running and holding it.")
    return f"{head}: a conflicting lock is {by}.{hint} Stop the process that holds it and restore again"


def _holders(rpid: int, fd: int) -> list[str]:
    """Who holds locks on the file behind the restored process's fd (for the message)."""
    out: list[str] = []
    try:
        s = os.stat(f"/proc/{rpid}/fd/{fd}")
        held = [h for h in proc.locks() if not h.blocked and (h.dev, h.ino) == (s.st_dev, s.st_ino)]
    except OSError:
        return out
    for h in held:
        if h.pid > 0 and h.pid != rpid:
            out.append(f"pid {h.pid} ({h.kind} {h.type})")
    if any(h.pid < 0 for h in held):        # OFD locks show no owner: look for the description
        out.extend(_ofd_holders(rpid, s))
    return list(dict.fromkeys(out))


def _ofd_holders(rpid: int, s: os.stat_result) -> list[str]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == rpid:
            continue
        try:
            for fd in os.listdir(f"/proc/{name}/fd"):
                with open(f"/proc/{name}/fdinfo/{fd}") as f:
                    if "OFDLCK" not in f.read():
                        continue
                fs = os.stat(f"/proc/{name}/fd/{fd}")
                if (fs.st_dev, fs.st_ino) == (s.st_dev, s.st_ino):
                    out.append(f"pid {name} (OFD lock through its fd {fd})")
        except OSError:
            continue
    return out
