"""Regular files, directories and the simple character devices.

Saved: path, open flags, offset, and the file's identity.  A file unlinked
while open ("... (deleted)") has its content saved in file-ID.img; restore
recreates it next to where it was, opens it, and unlinks it again.
"""
from __future__ import annotations

import os
import stat

from ..errors import RestoreError
from ..images import files_pb2
from ..mm import file_stat

# (major, minor) of devices whose state is just their path: mem(4) / random(4).
SIMPLE_DEVICES = {(1, 3): "/dev/null", (1, 5): "/dev/zero", (1, 7): "/dev/full",
                  (1, 8): "/dev/random", (1, 9): "/dev/urandom"}
DELETED = " (deleted)"
# Flags meaningful only at open time (they would create or truncate again).
_OPEN_ONLY = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY


def dump(ctx, pid: int, fd: int, s: os.stat_result, link: str, info: dict, entry: files_pb2.FileEntry) -> None:
    deleted = link.endswith(DELETED) and s.st_nlink == 0
    path = link[: -len(DELETED)] if deleted else link
    if stat.S_ISCHR(s.st_mode):
        path = SIMPLE_DEVICES[(os.major(s.st_rdev), os.minor(s.st_rdev))]
    entry.reg.CopyFrom(files_pb2.RegFile(stat=file_stat(path, s), pos=int(info["pos"]), deleted=deleted))
    if deleted:
        _save_content(pid, fd, ctx.img, entry.id)


def _save_content(pid: int, fd: int, img, fid: int) -> None:
    out = img.raw(f"file-{fid}.img")
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


def check(ctx, pid: int, fde, f: files_pb2.FileEntry) -> None:
    """Before any process is created: is the file still there?"""
    r = f.reg
    if not r.deleted and not os.path.exists(r.stat.path):
        raise RestoreError(f"process {pid}: fd {fde.fd} was {r.stat.path}, which no longer exists; "
                           "put it back to restore")


def open(ctx, f: files_pb2.FileEntry) -> int:  # noqa: A001 - the kind interface's name
    r = f.reg
    flags = (f.flags & ~_OPEN_ONLY) | os.O_CLOEXEC
    if r.deleted:
        return _recreate_deleted(ctx.reader, f, flags)
    try:
        fd = os.open(r.stat.path, flags)
    except OSError as ex:
        raise RestoreError(f"cannot reopen {r.stat.path}: {ex.strerror}") from None
    if stat.S_ISREG(r.stat.mode) and not flags & os.O_PATH:
        os.lseek(fd, r.pos, os.SEEK_SET)
    return fd


def _recreate_deleted(reader, f: files_pb2.FileEntry, flags: int) -> int:
    r = f.reg
    data = reader.read_bytes(f"file-{f.id}.img")
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
