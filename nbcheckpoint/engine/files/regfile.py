"""Regular files, directories and the simple character devices.

Saved: path, open flags, offset, and the file's identity.  A file unlinked while open
("... (deleted)") has its content saved in file-ID.img; restore recreates it next to where
it was, opens it, and unlinks it again.  Before any process exists, :func:`check` refuses a
file that is gone, and after a --leave-running dump one replaced since by another file
(docs/engine.md, "Leave running": content that changed in place is accepted).
"""
from __future__ import annotations

import fcntl
import os
import platform
import stat

from ..errors import ImageError, RestoreError
from ..images import files_pb2, names
from ..mm import file_stat
from ..sys import userns
from .kind import FileKind

# (major, minor) of devices whose state is just their path: mem(4) / random(4).
SIMPLE_DEVICES = {(1, 3): "/dev/null", (1, 5): "/dev/zero", (1, 7): "/dev/full",
                  (1, 8): "/dev/random", (1, 9): "/dev/urandom"}
DELETED = " (deleted)"
# Flags meaningful only at open time (they would create or truncate again).
_OPEN_ONLY = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY


class RegFile(FileKind):
    def dump(self, ctx, pid, fd, s, link, info, entry) -> None:
        deleted = link.endswith(DELETED) and s.st_nlink == 0
        path = link[: -len(DELETED)] if deleted else link
        if stat.S_ISCHR(s.st_mode):
            path = SIMPLE_DEVICES[(os.major(s.st_rdev), os.minor(s.st_rdev))]
        entry.reg.CopyFrom(files_pb2.RegFile(stat=file_stat(path, s), pos=int(info["pos"]), deleted=deleted))
        if deleted:
            _save_content(pid, fd, ctx.img, entry.id)

    def check(self, ctx, pid, fde, f) -> None:
        """Before any process is created: is the file still there, and still the same one?"""
        r = f.reg
        if r.pos >= 2**63:
            raise ImageError(f"process {pid}: fd {fde.fd}: file position {r.pos} is out of range: damaged image")
        if r.deleted:
            return                  # its content is in the image
        path = r.stat.path
        running_on = leave_running(ctx)
        try:
            s = os.stat(path)
        except FileNotFoundError:
            what = f"process {pid}: fd {fde.fd} was {path}, which no longer exists"
            if running_on:
                raise leave_running_hazard(what + " (deleted after the dump)", _PUT_BACK) from None
            raise RestoreError(f"{what}; put it back to restore") from None
        except OSError:
            return                  # e.g. EACCES: open() reports it with its reason
        if stat.S_IFMT(s.st_mode) != stat.S_IFMT(r.stat.mode):
            what = (f"process {pid}: fd {fde.fd} was {path}, a {_ftype(r.stat.mode)}, "
                    f"which is now a {_ftype(s.st_mode)}")
            if running_on:
                raise leave_running_hazard(what, _PUT_BACK)
            raise RestoreError(f"{what}; put the original back to restore")
        if (running_on and (stat.S_ISREG(s.st_mode) or stat.S_ISDIR(s.st_mode)) and same_machine(ctx)
                and s.st_dev == r.stat.dev and s.st_ino != r.stat.ino
                and (s.st_size, s.st_mtime_ns) != (r.stat.size, r.stat.mtime_ns)):
            # (a copy put back with its size and mtime, e.g. cp -a from a snapshot, is accepted)
            raise leave_running_hazard(
                f"process {pid}: fd {fde.fd} was {path} (inode {r.stat.ino}), which has been replaced by "
                f"another file (inode {s.st_ino}) since the dump", _PUT_BACK)

    def open(self, ctx, f) -> int:
        r = f.reg
        flags = (f.flags & ~_OPEN_ONLY) | os.O_CLOEXEC
        if r.deleted:
            return _recreate_deleted(ctx, f, flags)
        try:
            # O_NONBLOCK: a FIFO put there since check() must not block the open
            fd = os.open(r.stat.path, flags | os.O_NONBLOCK)
        except PermissionError as ex:
            hint = "" if userns.privileged() else (
                ": an ordinary user reopens a file with their own permissions, and the process had "
                "opened it while it could (its mode, or a directory's on its path, changed since, or "
                "root opened it for the process). Give yourself access to it, or restore as root")
            raise RestoreError(f"cannot reopen {r.stat.path} ({_mode_name(flags)}): {ex.strerror}{hint}") from None
        except OSError as ex:
            raise RestoreError(f"cannot reopen {r.stat.path}: {ex.strerror}") from None
        if stat.S_IFMT(os.fstat(fd).st_mode) != stat.S_IFMT(r.stat.mode):
            os.close(fd)
            raise RestoreError(f"{r.stat.path} is no longer a {_ftype(r.stat.mode)}")
        if not flags & (os.O_PATH | os.O_NONBLOCK):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        if stat.S_ISREG(r.stat.mode) and not flags & os.O_PATH:
            try:
                os.lseek(fd, r.pos, os.SEEK_SET)
            except OSError as ex:
                os.close(fd)
                raise RestoreError(f"cannot seek {r.stat.path} to {r.pos}: {ex.strerror}") from None
        return fd

    def describe(self, f) -> str:
        extra = " (deleted, content saved)" if f.reg.deleted else ""
        return f"{f.reg.stat.path} flags {f.flags:#o} pos {f.reg.pos}{extra}"


KIND = RegFile()


def _save_content(pid: int, fd: int, img, fid: int) -> None:
    out = img.raw(names.file_data(fid))
    # Through /proc/PID/fd we get our own open file description: the target's offset is untouched.
    src = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        while True:
            data = os.read(src, 1 << 20)
            if not data:
                break
            out.write(data)
    finally:
        os.close(src)


def leave_running(ctx) -> bool:
    """Was the image taken with --leave-running (the tree went on after the dump)?"""
    return bool(ctx.reader.inventory.leave_running)


def same_machine(ctx) -> bool:
    """Restoring where the image was taken: device and inode numbers mean the same files."""
    return ctx.reader.inventory.hostname == platform.node()


_PUT_BACK = ("Put the file back as it was at the dump (same content, size and mtime: e.g. cp -a "
             "from a snapshot), or take a new checkpoint")


def _mode_name(flags: int) -> str:
    return {os.O_RDONLY: "for reading", os.O_WRONLY: "for writing", os.O_RDWR: "for reading and writing"}.get(
        flags & os.O_ACCMODE, "")


def leave_running_hazard(what: str, fix: str = "Take a new checkpoint") -> RestoreError:
    """The error for an object a --leave-running dump's process changed after the dump.

    `what` names the process, the object and what became of it; `fix` what the user can
    do.  For other kinds too (e.g. an established TCP connection whose sequence numbers
    moved on): ``raise leave_running_hazard("process 12: fd 5, TCP 10.0.0.1:80 -> ...",
    "Restore with --tcp-close, or take a new checkpoint")``.
    """
    return RestoreError(
        f"{what}. The image was taken with --leave-running: the process went on running after "
        f"the dump (and may itself have done this), so the image no longer matches it. {fix}")


def _ftype(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return f"file of mode {mode:o}"


def _recreate_deleted(ctx, f: files_pb2.FileEntry, flags: int) -> int:
    r = f.reg
    shared = ctx.shmem.get(r.stat.ino) if os.major(r.stat.dev) == 0 else None
    if shared is not None or r.stat.path.startswith("/memfd:"):
        # a memfd or a file unlinked from a tmpfs: when the tree maps it too, this fd must
        # open that very object (restored with the mappings' content), else a new memfd
        own = None
        if shared is None:
            own = shared = os.memfd_create(r.stat.path[len("/memfd:"):], os.MFD_CLOEXEC)
        try:
            if own is not None:
                os.write(own, ctx.reader.read_bytes(names.file_data(f.id)))
            new = os.open(f"/proc/self/fd/{shared}", flags)     # (its own open file description)
        finally:
            if own is not None:
                os.close(own)
        os.lseek(new, r.pos, os.SEEK_SET)
        return new
    data = ctx.reader.read_bytes(names.file_data(f.id))
    d = os.path.dirname(r.stat.path) or "/"
    base = r.stat.path if not os.path.exists(r.stat.path) else os.path.join(
        d, f".nbcheckpoint-ghost-{os.getpid()}-{f.id}")
    fd = os.open(base, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, r.stat.mode & 0o7777)
    try:
        os.write(fd, data)
        new = os.open(base, flags)
        os.lseek(new, r.pos, os.SEEK_SET)
    finally:
        os.unlink(base)
        os.close(fd)
    return new
