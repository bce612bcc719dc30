"""Regular files, directories and the simple character devices.

Saved: path, open flags, offset, and the file's identity.  A file unlinked
while open ("... (deleted)") has its content saved in file-ID.img; restore
recreates it next to where it was, opens it, and unlinks it again.
"""
from __future__ import annotations

import os
import stat

from ..errors import RestoreError
from ..images import files_pb2, mm_pb2
from ..mm import file_stat

# (major, minor) of devices whose state is just their path: mem(4) / random(4).
SIMPLE_DEVICES = {(1, 3): "/dev/null", (1, 5): "/dev/zero", (1, 7): "/dev/full",
                  (1, 8): "/dev/random", (1, 9): "/dev/urandom"}
DELETED = " (deleted)"
# Flags meaningful only at open time (they would create or truncate again).
_OPEN_ONLY = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY


def dump(pid: int, fd: int, s: os.stat_result, link: str, flags: int, pos: int, ofd_id: int, img) -> files_pb2.RegFile:
    deleted = link.endswith(DELETED) and s.st_nlink == 0
    path = link[: -len(DELETED)] if deleted else link
    if stat.S_ISCHR(s.st_mode):
        path = SIMPLE_DEVICES[(os.major(s.st_rdev), os.minor(s.st_rdev))]
    r = files_pb2.RegFile(stat=file_stat(path, s), flags=flags, pos=pos, deleted=deleted, id=ofd_id)
    if deleted:
        _save_content(pid, fd, img, ofd_id)
    return r


def _save_content(pid: int, fd: int, img, ofd_id: int) -> None:
    out = img.raw(f"file-{ofd_id}.img")
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


def check(pid: int, e: files_pb2.FdEntry) -> None:
    """Before any process is created: is the file still there?"""
    r = e.reg
    if r.deleted:
        return
    if not os.path.exists(r.stat.path):
        raise RestoreError(f"process {pid}: fd {e.fd} was {r.stat.path}, which no longer exists; "
                           "put it back to restore")


def open_file(reader, e: files_pb2.FdEntry) -> int:
    r = e.reg
    flags = (r.flags & ~_OPEN_ONLY) | os.O_CLOEXEC
    if r.deleted:
        return _recreate_deleted(reader, r, flags)
    try:
        fd = os.open(r.stat.path, flags)
    except OSError as ex:
        raise RestoreError(f"cannot reopen {r.stat.path} for fd {e.fd}: {ex.strerror}") from None
    if stat.S_ISREG(r.stat.mode) and not flags & os.O_PATH:
        os.lseek(fd, r.pos, os.SEEK_SET)
    return fd


def _recreate_deleted(reader, r: files_pb2.RegFile, flags: int) -> int:
    data = reader.read_bytes(f"file-{r.id}.img")
    d = os.path.dirname(r.stat.path) or "/"
    base = r.stat.path if not os.path.exists(r.stat.path) else os.path.join(
        d, f".nbcheckpoint-ghost-{os.getpid()}-{r.id}")
    fd = os.open(base, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, r.stat.mode & 0o7777)
    try:
        os.write(fd, data)
        new = os.open(base, (flags & ~os.O_ACCMODE) | (flags & os.O_ACCMODE) | os.O_CLOEXEC)
        os.lseek(new, r.pos, os.SEEK_SET)
    finally:
        os.unlink(base)
        os.close(fd)
    return new


__all__ = ["dump", "check", "open_file", "SIMPLE_DEVICES", "mm_pb2"]
