"""Pipes and FIFOs (docs/engine.md, "Pipes and FIFOs").

One ``FileEntry`` per end (per open file description): the pipe's inode, the access mode,
the FIFO's path, the pipe size; the queued data once per pipe, in ``data_name(f)``.  Dump
peeks the data without consuming it: its own read end through ``/proc/PID/fd/N`` (an
independent description, like opening a FIFO) tee(2)s the buffers into a temporary pipe.

Restore creates each pipe once (pipe2), sets its size, writes the data, opens further
descriptions through ``/proc/self/fd`` and closes an end no description needs, as CRIU does:
the reader of an *external* pipe (one end in the image) reads the data then EOF, a writer
gets EPIPE -- unless ``--inherit-fd fd[N]:pipe:[INO]`` hands in a replacement end.  A FIFO
is reopened by path, O_RDWR first (which never blocks), and its data written back only if
it is empty (else it is still open elsewhere and its data never left).
"""
from __future__ import annotations

import fcntl
import os
import stat
import termios

from ..errors import DumpError, ImageError, RestoreError, UnsupportedError
from ..images import files_pb2, names
from ..sys import proc
from ..sys.ioctl import get_int
from ..sys.libc import syscall
from ..sys.x86_64 import NR
from .kind import FileKind, set_status_flags

F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032
SPLICE_F_NONBLOCK = 0x02
# The status flags F_SETFL can restore on a pipe (O_DIRECT, packet mode, only
# comes from pipe2; O_ASYNC would need its owner, which is not saved).
_SETFL = os.O_APPEND | os.O_NONBLOCK | os.O_NOATIME
_DELETED = " (deleted)"


def _reads(flags: int) -> bool:
    return (flags & os.O_ACCMODE) in (os.O_RDONLY, os.O_RDWR)


def _writes(flags: int) -> bool:
    return (flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)


def _key(f: files_pb2.FileEntry) -> tuple[int, int, int]:
    return (f.kind, f.pipe.dev, f.pipe.pipe_id)


def data_name(f: files_pb2.FileEntry) -> str:
    """The image file holding the pipe's queued data."""
    if f.kind == files_pb2.FIFO:
        return names.fifo_data(f.pipe.dev, f.pipe.pipe_id)
    return names.pipe_data(f.pipe.pipe_id)


def _queued(fd: int) -> int:
    return get_int(fd, termios.FIONREAD, "FIONREAD")


# ----------------------------------------------------------------------------- dump

class _DumpPipe:
    def __init__(self):
        self.entries: list[files_pb2.FileEntry] = []
        self.size = 0
        self.data_bytes = 0


def _dump(ctx, pid: int, fd: int, s: os.stat_result, link: str, info: dict, entry: files_pb2.FileEntry) -> None:
    flags = int(info["flags"], 8)
    fifo = entry.kind == files_pb2.FIFO
    if fifo and link.endswith(_DELETED):
        raise UnsupportedError(f"process {pid}: fd {fd} is a FIFO deleted while open ({link}), "
                               "which this version cannot checkpoint")
    pipes = ctx.state(KIND)
    key = (entry.kind, s.st_dev if fifo else 0, s.st_ino)
    p = pipes.get(key)
    entry.pipe.pipe_id = s.st_ino
    entry.pipe.write_end = (flags & os.O_ACCMODE) == os.O_WRONLY
    if fifo:
        entry.pipe.dev = s.st_dev
        entry.pipe.path = link
    if p is None:
        p = pipes[key] = _DumpPipe()
        p.size, p.data_bytes = _save_data(ctx, pid, fd, link, entry, flags)
    entry.pipe.size = p.size
    entry.pipe.data_bytes = p.data_bytes
    p.entries.append(entry)
    if not fifo:
        # Internal once both ends are seen; earlier entries of this pipe are
        # still ours to update (dump.py writes files.img after all fds).
        external = not (any(_reads(e.flags) for e in p.entries) and any(_writes(e.flags) for e in p.entries))
        for e in p.entries:
            e.pipe.external = external


def _save_data(ctx, pid: int, fd: int, link: str, entry: files_pb2.FileEntry, flags: int) -> tuple[int, int]:
    """(pipe size, queued bytes); the bytes go to the image without being consumed."""
    try:
        peek = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as ex:
        raise DumpError(f"process {pid}: cannot open fd {fd} ({link}) to read its queued data: "
                        f"{ex.strerror}") from None
    try:
        size = fcntl.fcntl(peek, F_GETPIPE_SZ)
        n = _queued(peek)
        if n == 0:
            return size, 0
        if flags & os.O_DIRECT:
            raise UnsupportedError(f"process {pid}: fd {fd} ({link}) is a packet-mode (O_DIRECT) pipe "
                                   f"with {n} bytes queued, which this version cannot checkpoint")
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            if fcntl.fcntl(w, F_GETPIPE_SZ) < size:
                fcntl.fcntl(w, F_SETPIPE_SZ, size)    # as many slots as the source: one tee takes all
            # tee(2) always starts at the head of the pipe and never consumes.
            got = syscall(NR["tee"], peek, w, n, SPLICE_F_NONBLOCK, request="tee", pid=pid)
            if got < n and _queued(peek) >= n:
                raise DumpError(f"process {pid}: fd {fd} ({link}): tee copied {got} of {n} queued bytes")
            out = ctx.img.raw(data_name(entry))
            left = got
            while left:
                chunk = os.read(r, min(left, 1 << 20))
                if not chunk:
                    raise DumpError(f"process {pid}: fd {fd} ({link}): queued data ended early")
                out.write(chunk)
                left -= len(chunk)
            return size, got
        finally:
            os.close(r)
            os.close(w)
    finally:
        os.close(peek)


# ----------------------------------------------------------------------------- restore

def _max_size() -> int:
    try:
        return proc.sysctl_int("fs/pipe-max-size")
    except OSError:
        return 1 << 20


def _check(ctx, pid: int, fde, f: files_pb2.FileEntry) -> None:
    """Before any process exists: the FIFO is still there, the size can be had."""
    p = f.pipe
    if f.kind == files_pb2.FIFO:
        try:
            st = os.stat(p.path)
        except OSError:
            raise RestoreError(f"process {pid}: fd {fde.fd} was the FIFO {p.path}, which no longer "
                               f"exists; recreate it (mkfifo {p.path}) to restore") from None
        if not stat.S_ISFIFO(st.st_mode):
            raise RestoreError(f"process {pid}: fd {fde.fd} was the FIFO {p.path}, which is now "
                               "something else; put the FIFO back to restore")
    if p.data_bytes > p.size:
        raise ImageError(f"pipe {p.pipe_id}: {p.data_bytes} bytes queued in a {p.size}-byte pipe")
    if p.size > _max_size():
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, p.size)
        except OSError as ex:
            raise RestoreError(f"process {pid}: fd {fde.fd} is a pipe of {p.size} bytes, above "
                               f"/proc/sys/fs/pipe-max-size ({_max_size()}), and this engine may not "
                               f"exceed it ({ex.strerror}); raise pipe-max-size to restore") from None
        finally:
            os.close(r)
            os.close(w)


def _open(ctx, f: files_pb2.FileEntry) -> int:
    """Create the whole pipe once: every description of it in the image is opened
    here, the others handed to ctx.remember()."""
    key = _key(f)
    group = [e for e in ctx.files.values()
             if e.kind == f.kind and _key(e) == key and e.id not in ctx.opened
             and (e.id == f.id or ctx.inherited(e) is None)]
    make = _open_fifo if f.kind == files_pb2.FIFO else _open_pipe
    return ctx.open_group(f, group, lambda made: make(ctx, f, group, made))


def _set_size(fd: int, f: files_pb2.FileEntry) -> None:
    size = f.pipe.size
    if size and fcntl.fcntl(fd, F_GETPIPE_SZ) != size:
        try:
            fcntl.fcntl(fd, F_SETPIPE_SZ, size)
        except OSError as ex:
            raise RestoreError(f"cannot set the size of pipe {f.pipe.pipe_id} to {size} bytes: "
                               f"{ex.strerror}") from None


def _data(ctx, f: files_pb2.FileEntry) -> bytes:
    if not f.pipe.data_bytes:
        return b""
    data = ctx.reader.read_bytes(data_name(f))
    if len(data) != f.pipe.data_bytes:
        raise ImageError(f"{data_name(f)} holds {len(data)} bytes, the image says {f.pipe.data_bytes}")
    return data


def _write_all(fd: int, data: bytes, f: files_pb2.FileEntry) -> None:
    """Into a pipe sized for it: never blocks (O_NONBLOCK), EAGAIN means it does not fit."""
    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except BlockingIOError:
        raise RestoreError(f"pipe {f.pipe.pipe_id}: its {len(data)} queued bytes do not fit "
                           f"({len(data) - len(view)} written)") from None
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, fl)


def _set_flags(made: dict[int, int], group) -> None:
    for e in group:
        set_status_flags(made[e.id], e.flags, _SETFL)


def _open_pipe(ctx, f, group, made: dict[int, int]) -> None:
    direct = os.O_DIRECT if any(e.flags & os.O_DIRECT for e in group) else 0
    r, w = os.pipe2(os.O_CLOEXEC | direct)
    ends = {r, w}
    try:
        _set_size(w, f)
        has_reader = any(_reads(e.flags) for e in group)
        if has_reader:    # data for nobody would only be dropped with the read end
            data = _data(ctx, f)
            if data:
                _write_all(w, data, f)
        for e in group:
            acc = e.flags & os.O_ACCMODE
            if acc == os.O_RDONLY and r in ends and r not in made.values():
                made[e.id] = r
            elif acc == os.O_WRONLY and w in ends and w not in made.values():
                made[e.id] = w
            else:
                # a further description of the same pipe, like opening a FIFO;
                # O_NONBLOCK so that it never waits (we hold both ends anyway)
                made[e.id] = os.open(f"/proc/self/fd/{r}", acc | os.O_NONBLOCK | os.O_CLOEXEC)
        _set_flags(made, group)
    finally:
        # The ends no description needs are closed: for an external pipe the
        # restored reader then sees EOF after the data, the writer EPIPE.
        for fd in ends - set(made.values()):
            os.close(fd)


def _open_fifo(ctx, f, group, made: dict[int, int]) -> None:
    path = f.pipe.path
    try:
        helper = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as ex:
        raise RestoreError(f"cannot reopen the FIFO {path}: {ex.strerror}") from None
    try:
        if not stat.S_ISFIFO(os.fstat(helper).st_mode):
            raise RestoreError(f"{path} is no longer a FIFO")
        _set_size(helper, f)
        data = _data(ctx, f)
        if data and _queued(helper) == 0:
            _write_all(helper, data, f)
        for e in group:
            try:
                made[e.id] = os.open(path, (e.flags & os.O_ACCMODE) | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as ex:
                raise RestoreError(f"cannot reopen the FIFO {path}: {ex.strerror}") from None
        _set_flags(made, group)
    finally:
        os.close(helper)


class Pipe(FileKind):
    """PIPE and FIFO.  Dump state: {(kind, dev, ino): _DumpPipe}, each pipe's data saved once."""

    def new_dump_state(self, ctx) -> dict:
        return {}

    dump = staticmethod(_dump)
    check = staticmethod(_check)
    open = staticmethod(_open)

    def external_key(self, f) -> str | None:
        """``pipe:[INO]`` for an end whose peer was outside the dump (for --inherit-fd)."""
        if f.kind == files_pb2.PIPE and f.pipe.external:
            return f"pipe:[{f.pipe.pipe_id}]"
        return None


KIND = Pipe()
