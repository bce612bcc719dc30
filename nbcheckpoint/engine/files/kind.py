"""The contract of an fd kind (CRIU's fdtype_ops / file_desc_ops): one object per kind, in
``files.KINDS``, whose methods are called in the order written here; every one has a no-op
default (docs/engine.md, "Fd kinds").  A kind keeps its state across calls in
``ctx.state(kind)``, made at first use by ``new_dump_state`` / ``new_restore_state``.
"""
from __future__ import annotations

import fcntl
import os
import socket

from ..errors import RestoreError
from ..images import files_pb2


class FileKind:
    # -- dump
    def new_dump_state(self, ctx):
        """This kind's state for one dump (``ctx.state(self)``)."""
        return None

    def prepare(self, ctx, tree: dict) -> None:
        """Once the tree is frozen, before any fd is dumped; `tree` is ``ctx.tree``: every
        process's fds as ``{pid: [TreeFd(fd, kind, stat, link)]}``."""

    def dump(self, ctx, pid: int, fd: int, s: os.stat_result, link: str, info: dict,
             entry: files_pb2.FileEntry) -> None:
        """Fill entry's payload for process pid's fd (s, link, info: its stat, link, fdinfo)."""
        raise NotImplementedError

    def dump_done(self, ctx) -> None:
        """After every process's fds (and the files in flight) are dumped."""

    # -- restore
    def new_restore_state(self, ctx):
        """This kind's state for one restore (``ctx.state(self)``)."""
        return None

    def check(self, ctx, pid: int, fde, f: files_pb2.FileEntry) -> None:
        """Before any process exists: raise RestoreError (or ImageError) if f cannot be
        opened; fde.fd names it in messages."""

    def open(self, ctx, f: files_pb2.FileEntry) -> int:
        """An engine fd for the description f (a kind making several at once hands the
        others to ctx.remember)."""
        raise NotImplementedError

    def after_place(self, ctx, remote, pid: int, fds, f: files_pb2.FileEntry) -> None:
        """State that needs the process's own fd numbers (remote: injection into it)."""

    def external_key(self, f: files_pb2.FileEntry) -> str | None:
        """"socket:[INO]", "pipe:[INO]" ... for --inherit-fd, or None."""
        return None

    # -- show
    def describe(self, f: files_pb2.FileEntry) -> str:
        """One line about the entry for ``nbcheckpoint show``: its payload, whatever it is."""
        for field, payload in f.ListFields():
            if field.message_type is not None:
                return f"flags {f.flags:#o} {field.name} {{{' '.join(str(payload).split())}}}"
        return f"flags {f.flags:#o}"

    def facts(self, f: files_pb2.FileEntry) -> dict:
        """Kind-specific fields of ``show.objects`` (e.g. an inet socket's port)."""
        return {}


SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33


def set_buffer(s: socket.socket, opt: int, half: int) -> None:
    """SO_RCVBUF / SO_SNDBUF to 2 * half: past net.core.rmem_max / wmem_max with the *FORCE
    variant where we may (CAP_NET_ADMIN), else as far as those sysctls let an ordinary user."""
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE if opt == socket.SO_RCVBUF else SO_SNDBUFFORCE, half)
    except PermissionError:
        s.setsockopt(socket.SOL_SOCKET, opt, half)


def buffer_limit(opt: int) -> str:
    """What caps `opt` for an ordinary user, for messages: "net.core.wmem_max=212992"."""
    name = "rmem_max" if opt == socket.SO_RCVBUF else "wmem_max"
    try:
        with open(f"/proc/sys/net/core/{name}") as f:
            return f"net.core.{name}={f.read().strip()}"
    except OSError:
        return f"net.core.{name}"


def set_status_flags(fd: int, flags: int, mask: int = os.O_NONBLOCK) -> None:
    """The status flags of `mask` (F_SETFL) on fd as they are in the dumped `flags`."""
    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, (fl & ~mask) | (flags & mask))


def by_ino(ctx, kind: int, payload: str) -> tuple[dict[int, files_pb2.FileEntry], set[int]]:
    """A socket kind's entries by inode, in id order, and the inodes handed in with --inherit-fd."""
    ents = {getattr(f, payload).ino: f for f in sorted(ctx.files.values(), key=lambda e: e.id) if f.kind == kind}
    return ents, {ino for ino, f in ents.items() if ctx.inherited(f) is not None}


class Built:
    """The restore state of a BuiltTogether kind (a kind may subclass it to keep more)."""
    built = False


class BuiltTogether(FileKind):
    """A kind whose descriptions are all made at its first open() (sockets: a connection
    needs both ends, and the order matters), by ``restorer(ctx).run()``, which hands each
    to ctx.remember()."""
    restorer: type

    def new_restore_state(self, ctx) -> Built:
        return Built()

    def name(self, f: files_pb2.FileEntry) -> str:
        raise NotImplementedError

    def open(self, ctx, f: files_pb2.FileEntry) -> int:
        st = ctx.state(self)
        if not st.built:
            st.built = True         # once, even if it fails
            self.restorer(ctx).run()
        fd = ctx.opened.get(f.id)
        if fd is None:
            raise RestoreError(f"{self.name(f)} (file {f.id}) could not be recreated")
        return fd
