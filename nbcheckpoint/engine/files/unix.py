"""Unix domain sockets: stream, datagram and seqpacket; pairs, named and abstract sockets,
listeners with their pending connections, receive queues, shutdown state and options.

Dump.  What a socket cannot tell about itself comes from unix_diag (``sys/sockdiag.py``, one
netlink dump per dump): its name, peer, pending connections (``icons``), queue lengths and
shutdown state.  Each socket's peer is classified:

* ``IN_IMAGE``  the peer is a socket of the dumped tree;
* ``PENDING``   the socket connect()ed to a listener of the tree and was not accepted yet (its
  kernel peer is an "embryo" with no inode: the listener's icons name the client instead);
* ``DEAD``      the peer was closed (its inode is 0 or no longer exists);
* ``EXTERNAL``  the peer belongs to a process outside the tree.  That fails the dump with
  CRIU's "external socket is used" unless ``--ext-unix-sk`` is given (or
  ``--ext-unix-sk=INO`` naming this socket, seed 004); then restore reconnects to the peer's
  name (or to PATH with ``--ext-unix-sk=INO=PATH``), or takes a replacement from
  ``--inherit-fd fd[N]:socket:[INO]`` (``external_key``).

The receive queue is read without consuming it: MSG_PEEK on a pidfd_getfd duplicate (the same
socket), with SO_PEEK_OFF moving over the queue message by message (dgram, seqpacket) or byte
by byte (stream); the socket's own SO_PEEK_OFF is put back afterwards.  Data sent on a not yet
accepted connection cannot be read this way: the dump refuses it.

Files in flight (SCM_RIGHTS, docs/engine.md "Files in flight"): peeking a message that carries
fds installs copies of them in the engine; each becomes a description (``dump_in_flight``) whose
id is recorded with the message.  A socket in flight is a socket of the tree, so a peer that
looked external is classified again in ``dump_done``.  A stream queue is saved as pieces that
each end with the bytes that carried fds (a peek stops only after such an skb), and restore
sends each piece with one sendmsg.

Restore builds every unix socket of the image at the first open() (connections need both
ends, and the order matters), in the engine, and remembers each description:

1. create: listeners socket+bind+listen(backlog); pairs socketpair() (their names bound
   afterwards); a socket whose peer died is one end of a fresh pair whose other end is closed
   at the end; everything else socket()+bind().  A path name's stale socket file is unlinked
   first (only if it is a socket); a name whose file had been unlinked is bound and unlinked.
2. datagram queues of sockets with no peer to send from: sendto() from a temporary socket,
   before anyone connects to them;
3. listeners: for each accepted connection a new socket connects and the listener accepts it;
   then the pending connections connect, in their queue order;
4. one-way datagram connects (ordered so that each socket is connected to before it
   connects elsewhere: a connected datagram socket accepts only its peer) and the external
   peers' reconnects by name;
5. queues written back from the peer end (datagrams one by one, files in flight sent with
   their messages), then the dead peers' ends closed, shutdown() replayed, options and
   O_NONBLOCK set last (SO_PASSCRED earlier would autobind sockets as they connect).

Limits: sockets in another network namespace than the engine's; epolls, ttys and inet sockets
in flight (``files.IN_FLIGHT_KINDS``); SCM_CREDENTIALS of queued messages (a restored message
carries the engine's credentials); the sender address of queued datagrams (kept in the image,
not restored); data queued on an external stream socket (the peer is a new connection); the
name a connected client socket had bound itself is kept only when it is restored through its
listener.
"""
from __future__ import annotations

import array
import contextlib
import logging
import os
import socket
import stat
from socket import MSG_CMSG_CLOEXEC, SO_PASSCRED, SO_PASSSEC, SO_RCVLOWAT, SO_RCVTIMEO, SO_SNDTIMEO

from ..errors import DumpError, EngineError, ImageError, RestoreError, UnsupportedError
from ..images import files_pb2, unix_pb2
from ..sys import sockdiag
from ..sys.sockdiag import TCP_ESTABLISHED, TCP_LISTEN
from .kind import Built, BuiltTogether, buffer_limit, by_ino, set_buffer, set_status_flags

log = logging.getLogger(__name__)

SOL_SOCKET = socket.SOL_SOCKET
SO_PEEK_OFF = 42     # not in Python's socket module
_TIMEVAL = 16
_ANC = socket.CMSG_SPACE(253 * 4) + socket.CMSG_SPACE(12) + 64   # SCM_MAX_FD fds + ucred + secdata
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT | MSG_CMSG_CLOEXEC
_MAX_PACKETS = 1 << 20
_MAX_DGRAM = 1 << 26

_TYPES = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "dgram", socket.SOCK_SEQPACKET: "seqpacket"}
_SHUT = {1: socket.SHUT_RD, 2: socket.SHUT_WR, 3: socket.SHUT_RDWR}


def _show(name: bytes) -> str:
    """A name as ss(8) shows it: abstract names with a leading @."""
    if not name:
        return ""
    if name[:1] == b"\0":
        return "@" + name[1:].decode("utf-8", "backslashreplace")
    return os.fsdecode(name)


def _norm(name: bytes | str | None) -> bytes:
    """An address as bytes: a path without its trailing NULs, an abstract name as it is."""
    if not name:
        return b""
    if isinstance(name, str):
        name = os.fsencode(name)
    if name[:1] == b"\0":
        return bytes(name)
    return bytes(name).split(b"\0", 1)[0]


# ----------------------------------------------------------------------------- dump

class _DumpState:
    """Per dump: the kernel's table of unix sockets and the inodes of the tree's sockets."""

    def __init__(self, ctx):
        self.diag = sockdiag.unix_sockets()
        self.listener_of: dict[int, sockdiag.UnixDiag] = {}      # client inode -> its listener
        self.listening_names: dict[bytes, int] = {}
        for d in self.diag.values():
            if d.listening:
                for c in d.icons:
                    if c:
                        self.listener_of[c] = d
                if d.name:
                    self.listening_names[_norm(d.name)] = d.ino
        self.inodes = ctx.inodes(files_pb2.UNIX)     # and the sockets found in flight
        self.unresolved: list[tuple] = []   # (entry, peer inode, kind if found, error): see dump_done


def _dump(ctx, pid: int, fd: int, s: os.stat_result, link: str, info: dict, entry: files_pb2.FileEntry) -> None:
    st = ctx.state(KIND)
    ino = s.st_ino
    d = st.diag.get(ino) or sockdiag.unix_sockets(ino).get(ino)
    if d is None:
        raise UnsupportedError(f"process {pid}: fd {fd} is unix socket:[{ino}], which sock_diag does not "
                               "show: it lives in another network namespace than the engine's, which this "
                               "version cannot checkpoint")
    if d.type not in _TYPES:
        raise UnsupportedError(f"process {pid}: fd {fd} is a unix socket of type {d.type}, which this "
                               "version cannot checkpoint")
    u = entry.unix
    u.ino, u.type, u.state, u.shutdown = ino, d.type, d.state, d.shutdown
    if pid == os.getpid():
        st.inodes.add(ino)          # in flight: a socket of the tree from now on
    if d.name:
        u.name = _norm(d.name)
        if u.name[:1] != b"\0":
            _dump_path(pid, u, d)
    sk = ctx.getsock(pid, fd)
    try:
        _dump_opts(sk, u)
        if d.listening:
            u.backlog = d.wqueue
            u.icons.extend(d.icons)
            return
        if d.state == TCP_ESTABLISHED and d.type != socket.SOCK_DGRAM and u.name:
            lst = st.listening_names.get(u.name)
            u.accepted = lst is not None and lst != ino
        _classify_peer(ctx, st, pid, fd, d, u, sk)
        _peek_queue(ctx, f"process {pid}: fd {fd} (unix socket:[{ino}])", sk, d, u)
    except OSError as e:
        if isinstance(e, EngineError):
            raise
        raise DumpError(f"process {pid}: fd {fd} (unix socket:[{ino}]): {e.strerror or e}") from None
    finally:
        sk.close()


def _dump_path(pid: int, u, d: sockdiag.UnixDiag) -> None:
    """Where a path name's socket file is, and whether it still is the socket's."""
    path = os.fsdecode(u.name)
    if not path.startswith("/"):
        try:
            u.name_dir = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            u.name_dir = "/"
    full = os.path.join(u.name_dir, path) if u.name_dir else path
    try:
        lst = os.lstat(f"/proc/{pid}/root{full}")
    except OSError:
        lst = None
    if lst is not None and stat.S_ISSOCK(lst.st_mode) and lst.st_ino == d.vfs_ino:
        u.name_mode, u.name_uid, u.name_gid = lst.st_mode & 0o7777, lst.st_uid, lst.st_gid
    else:
        u.name_unlinked = True


def _dump_opts(sk: socket.socket, u) -> None:
    g = sk.getsockopt
    u.passcred = bool(g(SOL_SOCKET, SO_PASSCRED))
    with contextlib.suppress(OSError):
        u.passsec = bool(g(SOL_SOCKET, SO_PASSSEC))
    u.rcvbuf = g(SOL_SOCKET, socket.SO_RCVBUF)
    u.sndbuf = g(SOL_SOCKET, socket.SO_SNDBUF)
    u.peek_off = g(SOL_SOCKET, SO_PEEK_OFF)
    u.rcvlowat = g(SOL_SOCKET, SO_RCVLOWAT)
    for opt, field in ((SO_RCVTIMEO, "rcvtimeo"), (SO_SNDTIMEO, "sndtimeo")):
        tv = g(SOL_SOCKET, opt, _TIMEVAL)
        if tv.strip(b"\0"):
            setattr(u, field, tv)


def _peer_name(pid: int, sk: socket.socket, pd: sockdiag.UnixDiag | None) -> bytes:
    name = _norm(pd.name) if pd is not None and pd.name else b""
    if not name:
        try:
            name = _norm(sk.getpeername())
        except OSError:
            name = b""
    if name and name[:1] not in (b"\0", b"/"):
        # relative to the directory the peer bound it in; our best guess is the target's cwd
        try:
            name = os.fsencode(os.path.join(os.readlink(f"/proc/{pid}/cwd"), os.fsdecode(name)))
        except OSError:
            pass
    return name


def _classify_peer(ctx, st: _DumpState, pid: int, fd: int, d: sockdiag.UnixDiag, u, sk) -> None:
    if d.peer:
        pd = st.diag.get(d.peer)
        if d.peer in st.inodes:
            u.peer_kind = unix_pb2.IN_IMAGE
            u.peer_ino = d.peer
            if pd is not None and pd.name:
                u.peer_name = _norm(pd.name)
            if d.type == socket.SOCK_DGRAM and pd is not None and pd.peer != d.ino and not pd.name:
                raise UnsupportedError(
                    f"process {pid}: fd {fd} is a unix dgram socket (socket:[{d.ino}]) connected to "
                    f"socket:[{d.peer}], which has no name and is connected elsewhere; this version "
                    "cannot recreate that connection")
            return
        _external(ctx, st, pid, fd, d, u, d.peer, _peer_name(pid, sk, pd), unix_pb2.IN_IMAGE)
    elif d.has_peer:
        # (a datagram socket someone connect()ed to is "established" too, with no peer)
        lst = st.listener_of.get(d.ino)
        if lst is None:
            u.peer_kind = unix_pb2.DEAD
        elif lst.ino in st.inodes:
            u.peer_kind = unix_pb2.PENDING
            u.listener_ino = lst.ino
            if d.wqueue:
                raise UnsupportedError(
                    f"process {pid}: fd {fd} is a unix {_TYPES[d.type]} socket (socket:[{d.ino}]) whose "
                    f"connection to {_show(_norm(lst.name)) or f'socket:[{lst.ino}]'} is not accepted yet "
                    "and holds data sent on it, which this version cannot save; accept the connection "
                    "before checkpointing")
        else:
            u.listener_ino = lst.ino
            _external(ctx, st, pid, fd, d, u, lst.ino, _norm(lst.name), unix_pb2.PENDING)


def _external(ctx, st: _DumpState, pid: int, fd: int, d: sockdiag.UnixDiag, u, peer: int, peer_name: bytes,
              if_found: int) -> None:
    """The peer is outside the tree -- unless it turns up in flight later (dump_done decides)."""
    u.peer_kind = unix_pb2.EXTERNAL
    u.external = True
    u.peer_ino = peer
    u.peer_name = peer_name
    own = f", {_show(u.name)}" if u.name else ""
    who = f"socket:[{peer}] ({_show(peer_name)})" if peer_name else f"socket:[{peer}] (no name)"
    where = f"process {pid}: fd {fd}" if pid != os.getpid() else "a socket in flight"
    err = UnsupportedError(
        f"{where} is a unix {_TYPES[d.type]} socket (socket:[{d.ino}]{own}) connected to "
        f"{who}, which is outside the checkpointed tree: external socket is used. "
        f"Dump (and restore) with --ext-unix-sk (or --ext-unix-sk={d.ino}: this socket only) to reconnect "
        "it to its peer's name on restore"
        + ("" if peer_name else " (this peer has no name, so only --inherit-fd can replace it)")
        + f", or dump with --ext-unix-sk and restore with --inherit-fd fd[N]:socket:[{d.ino}] "
        "to hand in a replacement socket")
    st.unresolved.append((u, peer, if_found, err))


def _dump_done(ctx) -> None:
    """Peers that looked external: in the tree after all if they were found in flight."""
    if not any(f.kind == files_pb2.UNIX for f in ctx.files):
        return
    st = ctx.state(KIND)
    for u, peer, if_found, err in st.unresolved:
        if peer in st.inodes:
            u.peer_kind, u.external = if_found, False
            if if_found == unix_pb2.PENDING:
                u.peer_ino = 0
        elif not ctx.options.ext_unix_allowed(u.ino):
            raise err
    st.unresolved.clear()


def _received_fds(anc) -> list[int]:
    """The fds a peek installed in the engine (SCM_RIGHTS), in their order."""
    fds = []
    for level, typ, data in anc:
        if level == SOL_SOCKET and typ == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


def _close_all(fds: list[int]) -> None:
    for f in fds:
        try:
            os.close(f)
        except OSError:
            pass


def _peek(ctx, where: str, sk: socket.socket, bufsize: int):
    """One peek: (data, ids of the files in flight with it, flags, sender).  Peeking the same
    message again gives the same ids (dump_in_flight matches the new copies by kcmp)."""
    data, anc, flags, addr = sk.recvmsg(bufsize, _ANC, _PEEK)
    fds = _received_fds(anc)
    if flags & socket.MSG_CTRUNC:
        _close_all(fds)
        raise DumpError(f"{where}: the control data of a queued message did not fit the engine's buffer")
    ids = []
    for i, f in enumerate(fds):
        try:
            ids.append(ctx.dump_in_flight(where, f))    # owns f from now on
        except BaseException:
            _close_all(fds[i + 1:])
            raise
    return data, ids, flags, addr


def _peek_queue(ctx, where: str, sk: socket.socket, d: sockdiag.UnixDiag, u) -> None:
    """The receive queue, peeked through our duplicate; the socket's SO_PEEK_OFF is put back."""
    stream = d.type == socket.SOCK_STREAM
    if stream and d.rqueue == 0:
        return
    sk.setsockopt(SOL_SOCKET, SO_PEEK_OFF, 0)
    try:
        if stream:
            # each peek ends after a piece with fds, or at the end of the queue
            pieces, total = [], 0
            while total < d.rqueue:
                try:
                    data, ids, _fl, _addr = _peek(ctx, where, sk, d.rqueue - total)
                except BlockingIOError:
                    break
                if not data:
                    break
                pieces.append((data, ids))
                total += len(data)
            if total != d.rqueue:
                raise UnsupportedError(f"{where}: could read only {total} of its {d.rqueue} queued bytes "
                                       "(out-of-band data?)")
            if not any(ids for _data, ids in pieces):
                pieces = [(b"".join(p for p, _ids in pieces), [])]
            for data, ids in pieces:
                u.queue.add(data=data, fds=ids)
            return
        bufsize, off, total = 1 << 16, 0, 0
        while True:
            try:
                data, ids, flags, addr = _peek(ctx, where, sk, bufsize)
            except BlockingIOError:
                break
            if flags & socket.MSG_TRUNC:
                if bufsize >= _MAX_DGRAM:
                    raise UnsupportedError(f"{where} has a queued message larger than {_MAX_DGRAM} bytes")
                bufsize *= 4
                sk.setsockopt(SOL_SOCKET, SO_PEEK_OFF, off)
                continue
            if not data and d.type == socket.SOCK_SEQPACKET and d.shutdown & 1 and total >= d.rqueue:
                break       # end of file, not an empty message
            u.queue.add(data=data, sender=_norm(addr), fds=ids)
            off += len(data)
            total += len(data)
            if len(u.queue) > _MAX_PACKETS:
                raise UnsupportedError(f"{where}: more than {_MAX_PACKETS} queued messages")
    finally:
        sk.setsockopt(SOL_SOCKET, SO_PEEK_OFF, u.peek_off)


# ----------------------------------------------------------------------------- restore

def _addr(u, use_dir: bool = True) -> bytes:
    """The address to connect() to for a socket's name (relative paths made absolute)."""
    if u.name[:1] != b"\0" and u.name_dir and use_dir:
        return os.fsencode(os.path.join(u.name_dir, os.fsdecode(u.name)))
    return bytes(u.name)


def _peer_desc(u) -> str:
    return _show(u.peer_name) if u.peer_name else f"socket:[{u.peer_ino}]"


class _InFlight:
    """Stands for the fd in check() messages of a file in flight, which has no fd number."""

    def __init__(self, fid: int, ino: int):
        self.id = fid
        self.fd = f"(in flight on unix socket:[{ino}])"


class _RestoreState(Built):
    def __init__(self, ctx):
        self.checked: set[int] = set()      # files in flight, each checked once
        self.diag: dict | None = None       # unix_diag, for external peers' abstract names


def _check(ctx, pid: int, fde, f: files_pb2.FileEntry) -> None:
    u = f.unix
    st = ctx.state(KIND)
    # the files in flight on it, each checked once (a socket in flight may hold itself)
    checked = st.checked
    for p in u.queue:
        for fid in p.fds:
            g = ctx.files.get(fid)
            if g is None:
                raise ImageError(f"process {pid}: fd {fde.fd} (unix socket:[{u.ino}]) has file {fid} in "
                                 "flight, which the image lacks")
            if fid not in checked:
                checked.add(fid)
                ctx.check_one(pid, _InFlight(fid, u.ino), g)
    ents = {e.unix.ino for e in ctx.files.values() if e.kind == files_pb2.UNIX}
    if u.peer_kind == unix_pb2.IN_IMAGE and u.peer_ino not in ents:
        raise ImageError(f"process {pid}: fd {fde.fd} (unix socket:[{u.ino}]) is connected to "
                         f"socket:[{u.peer_ino}], which the image lacks")
    if u.peer_kind == unix_pb2.PENDING and u.listener_ino not in ents:
        raise ImageError(f"process {pid}: fd {fde.fd} (unix socket:[{u.ino}]) is connecting to "
                         f"socket:[{u.listener_ino}], which the image lacks")
    if not (u.external or u.peer_kind == unix_pb2.EXTERNAL) or ctx.inherited(f) is not None:
        return
    what = (f"process {pid}: fd {fde.fd} is a unix {_TYPES.get(u.type, u.type)} socket (socket:[{u.ino}]) "
            f"whose peer {_peer_desc(u)} was outside the image")
    if not ctx.options.ext_unix_allowed(u.ino):
        raise RestoreError(f"{what} (external socket); restore with --ext-unix-sk to reconnect it"
                           + (f" to {_show(u.peer_name)}" if u.peer_name else "")
                           + f", or hand in a replacement with --inherit-fd fd[N]:socket:[{u.ino}]")
    name = _reconnect_name(ctx, u)
    if not name:
        raise RestoreError(f"{what} and had no name to reconnect to; hand in a replacement with "
                           f"--inherit-fd fd[N]:socket:[{u.ino}], or give one with --ext-unix-sk={u.ino}=PATH")
    if name[:1] == b"\0":
        if st.diag is None:
            st.diag = sockdiag.unix_sockets()
        table = st.diag
        need_listen = u.type != socket.SOCK_DGRAM
        if not any(_norm(d.name) == name and (d.listening or not need_listen)
                   for d in table.values() if d.name):
            raise RestoreError(f"{what}: nothing is {'listening' if need_listen else 'bound'} on "
                               f"{_show(name)} any more, so --ext-unix-sk cannot reconnect it; "
                               "start the peer first")
        return
    path = os.fsdecode(name)
    try:
        ok = stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        ok = False
    if not ok:
        raise RestoreError(f"{what}: {path} is gone (or is no longer a socket), so --ext-unix-sk "
                           "cannot reconnect it; start the peer first")


def _reconnect_name(ctx, u) -> bytes:
    """Where an external socket is reconnected: --ext-unix-sk=INO=PATH, else its peer's name."""
    path = ctx.options.ext_unix_path(u.ino)
    if path:
        return b"\0" + os.fsencode(path[1:]) if path.startswith("@") else os.fsencode(path)
    return bytes(u.peer_name)


class _Restorer:
    def __init__(self, ctx):
        self.ctx = ctx
        self.ents, self.inh = by_ino(ctx, files_pb2.UNIX, "unix")
        self.socks: dict[int, socket.socket] = {}
        self.others: dict[int, socket.socket] = {}   # ino -> the other end of its pair (closed at the end)
        self.writer: dict[int, socket.socket] = {}   # ino -> the socket that writes its queue back
        self.connects: list[tuple[int, int | None]] = []   # (ino, in-image target or None: external)
        self.unlink_later: list[str] = []
        self.bumped: set[int] = set()
        self._defaults: dict[int, tuple[int, int]] = {}

    def u(self, ino: int):
        return self.ents[ino].unix

    # -- the phases ------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._create()
            self._fill_from_outside()
            self._listeners()
            self._connect()
            self._write_queues()
            for o in self.others.values():
                o.close()
            self.others.clear()
            self._finish()
        except BaseException:
            for s in list(self.socks.values()) + list(self.others.values()):
                s.close()
            raise
        for ino, s in self.socks.items():
            self.ctx.remember(self.ents[ino].id, s.detach())

    def _create(self) -> None:
        for ino, f in self.ents.items():
            if ino in self.inh or ino in self.socks:
                continue
            u = f.unix
            k = u.peer_kind
            with self._failing(ino, "recreate"):
                if u.state == TCP_LISTEN:
                    s = self._new(ino)
                    self._bind(s, u)
                    s.listen(u.backlog)
                elif k == unix_pb2.IN_IMAGE:
                    pu = self.u(u.peer_ino)
                    mutual = pu.peer_kind == unix_pb2.IN_IMAGE and pu.peer_ino == ino
                    if not mutual:                       # a one-way datagram connection
                        self._bind(self._new(ino), u)
                        self.connects.append((ino, u.peer_ino))
                    elif u.peer_ino in self.inh:         # its peer is the caller's: as if it had closed
                        self._pair(ino, None)
                    elif self._listener_for(u) or self._listener_for(pu):
                        continue                         # made by its listener (phase 3)
                    else:
                        self._pair(ino, u.peer_ino)
                elif k == unix_pb2.PENDING:
                    continue                             # phase 3
                elif k == unix_pb2.DEAD:
                    self._pair(ino, None)
                else:
                    self._bind(self._new(ino), u)
                    if k == unix_pb2.EXTERNAL:
                        self.connects.append((ino, None))

    def _fill_from_outside(self) -> None:
        """Datagram queues no peer of the image can write: sendto() the socket's name from a
        temporary socket, while nothing is connected to it yet."""
        for ino, s in self.socks.items():
            u = self.u(ino)
            if not u.queue or ino in self.writer:
                continue
            if u.type != socket.SOCK_DGRAM or not u.name:
                if u.peer_kind != unix_pb2.PENDING:
                    log.warning("unix socket:[%d]: %d queued bytes cannot be restored (its peer %s is "
                                "not in the image)", u.ino, sum(len(p.data) for p in u.queue), _peer_desc(u))
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as tmp:
                set_buffer(tmp, socket.SO_SNDBUF, self._need(u))
                addr = _addr(u)
                with self._failing(ino, f"write back {len(u.queue)} queued datagrams to"):
                    for p in u.queue:
                        tmp.sendmsg([p.data], self._in_flight(p), socket.MSG_DONTWAIT, addr)

    def _listeners(self) -> None:
        for lino, lf in self.ents.items():
            lu = lf.unix
            if lu.state != TCP_LISTEN or lino in self.inh:
                continue
            ls = self.socks[lino]
            addr = _addr(lu)
            # accepted connections first: they left the queue before the pending ones came
            for aino, af in self.ents.items():
                au = af.unix
                if (au.state == TCP_LISTEN or au.peer_kind != unix_pb2.IN_IMAGE or aino in self.socks
                        or aino in self.inh or au.peer_ino in self.inh):
                    continue
                cino = au.peer_ino
                if self._listener_for(au) != lino or self._listener_for(self.u(cino)):
                    continue
                with self._failing(aino, f"reconnect through its listener {_show(lu.name)}"):
                    c = self._client(cino, addr)
                    a, _ = ls.accept()
                self.socks[aino] = a
                self.writer[aino], self.writer[cino] = c, a
            for cino in lu.icons:
                self._pending(cino, lino, addr)
        for cino, cf in self.ents.items():      # pending on an inherited listener
            if cf.unix.peer_kind == unix_pb2.PENDING and cino not in self.socks:
                self._pending(cino, cf.unix.listener_ino, _addr(self.u(cf.unix.listener_ino)))

    def _pending(self, cino: int, lino: int, addr: bytes) -> None:
        cf = self.ents.get(cino)
        if (cf is None or cino in self.socks or cino in self.inh or cf.unix.peer_kind != unix_pb2.PENDING
                or cf.unix.listener_ino != lino):
            return      # a client outside the image: its connection is gone with the old listener
        with self._failing(cino, f"reconnect (pending) to {_show(self.u(lino).name)}"):
            self._client(cino, addr)

    def _connect(self) -> None:
        """One-way datagram connections and external peers.  A socket must be connected to
        before it connects elsewhere (a connected datagram socket accepts only its peer)."""
        incoming: dict[int, int] = {}
        for _src, dst in self.connects:
            if dst is not None:
                incoming[dst] = incoming.get(dst, 0) + 1
        todo = list(self.connects)
        while todo:
            ready = [c for c in todo if not incoming.get(c[0])] or todo[:1]
            for src, dst in ready:
                todo.remove((src, dst))
                u = self.u(src)
                if dst is None:
                    addr = _reconnect_name(self.ctx, u)
                    if not addr:
                        raise RestoreError(f"unix socket:[{u.ino}] was connected to {_peer_desc(u)} outside "
                                           f"the image, which has no name: hand in a replacement with "
                                           f"--inherit-fd fd[N]:socket:[{u.ino}]")
                    what = f"reconnect to its external peer {_show(addr)}"
                else:
                    addr, what = _addr(self.u(dst)), f"connect to {_show(self.u(dst).name)}"
                    incoming[dst] -= 1
                with self._failing(src, what):
                    self._connect_to(self.socks[src], addr)

    def _write_queues(self) -> None:
        for ino, w in self.writer.items():
            if ino not in self.socks:
                continue
            u = self.u(ino)
            if not u.queue:
                continue
            with self._failing(ino, f"write back {sum(len(p.data) for p in u.queue)} queued bytes of"):
                set_buffer(w, socket.SO_SNDBUF, self._need(u))
                for wino, ws in self.socks.items():
                    if ws is w:
                        self.bumped.add(wino)
                if u.type == socket.SOCK_STREAM:
                    for p in u.queue:       # a piece's fds go with its first bytes
                        view, anc = memoryview(p.data), self._in_flight(p)
                        while view:
                            n = w.sendmsg([view], anc, socket.MSG_DONTWAIT)
                            view, anc = view[n:], []
                else:
                    for p in u.queue:
                        w.sendmsg([p.data], self._in_flight(p), socket.MSG_DONTWAIT)

    def _finish(self) -> None:
        for ino, s in self.socks.items():
            u = self.u(ino)
            if u.shutdown & 3:
                with contextlib.suppress(OSError):      # e.g. ENOTCONN: nothing to shut down
                    s.shutdown(_SHUT[u.shutdown & 3])
            with self._failing(ino, "set the options of"):
                self._options(ino, s, u)
                set_status_flags(s.fileno(), self.ents[ino].flags)
        for path in self.unlink_later:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # -- helpers ---------------------------------------------------------------------
    def _in_flight(self, p) -> list:
        """The SCM_RIGHTS control message that sends a packet's files in flight again."""
        if not p.fds:
            return []
        fds = array.array("i")
        for fid in p.fds:
            f = self.ctx.files.get(fid)
            if f is None:
                raise ImageError(f"a queued message carries file {fid}, which the image lacks")
            if f.kind == files_pb2.UNIX and f.unix.ino in self.socks:
                fds.append(self.socks[f.unix.ino].fileno())     # made here, not remembered yet
            else:
                fds.append(self.ctx.open(fid))
        return [(SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())]

    def _listener_for(self, u) -> int | None:
        """The listener of the image an accepted socket came from."""
        if not u.accepted or u.state == TCP_LISTEN:
            return None
        for ino, f in self.ents.items():
            if f.unix.state == TCP_LISTEN and f.unix.name == u.name and ino not in self.inh:
                return ino
        return None

    def _client(self, ino: int, addr: bytes) -> socket.socket:
        """Socket ino made anew and connected to a listener's address."""
        c = self._new(ino)
        self._bind(c, self.u(ino))
        self._connect_to(c, addr)
        return c

    def _new(self, ino: int) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, self.u(ino).type)
        self.socks[ino] = s
        return s

    def _pair(self, ino: int, peer: int | None) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, self.u(ino).type)
        self.socks[ino], self.writer[ino] = a, b
        if peer is None:
            self.others[ino] = b
        else:
            self.socks[peer], self.writer[peer] = b, a
        self._bind(a, self.u(ino))
        if peer is not None:
            self._bind(b, self.u(peer))

    def _bind(self, s: socket.socket, u) -> None:
        if not u.name or u.accepted:
            return
        if u.name[:1] == b"\0":
            s.bind(bytes(u.name))
            return
        full = os.fsdecode(_addr(u))
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise RestoreError(f"cannot bind unix socket:[{u.ino}] to {full}: the path exists and is "
                                   "not a socket")
            os.unlink(full)     # a stale socket file (its socket was dumped and killed)
        if u.name_dir:
            # keep the name relative, as the process bound it
            here = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.chdir(u.name_dir)
                s.bind(bytes(u.name))
            finally:
                os.fchdir(here)
                os.close(here)
        else:
            s.bind(bytes(u.name))
        if u.name_unlinked:
            self.unlink_later.append(full)
        else:
            try:
                os.chown(full, u.name_uid, u.name_gid)
                os.chmod(full, u.name_mode)
            except OSError:
                pass

    @staticmethod
    def _connect_to(s: socket.socket, addr: bytes) -> None:
        s.settimeout(10.0)      # a full backlog would block forever
        try:
            s.connect(addr)
        finally:
            s.settimeout(None)

    @staticmethod
    def _need(u) -> int:
        return min(max(sum(len(p.data) for p in u.queue) * 4 + (len(u.queue) + 16) * 4096, 1 << 20), 1 << 30)

    def _default_bufs(self, typ: int) -> tuple[int, int]:
        if typ not in self._defaults:
            with socket.socket(socket.AF_UNIX, typ) as s:
                self._defaults[typ] = (s.getsockopt(SOL_SOCKET, socket.SO_RCVBUF),
                                       s.getsockopt(SOL_SOCKET, socket.SO_SNDBUF))
        return self._defaults[typ]

    def _options(self, ino: int, s: socket.socket, u) -> None:
        rcv, snd = self._default_bufs(u.type)
        if u.rcvbuf and u.rcvbuf != rcv:
            set_buffer(s, socket.SO_RCVBUF, u.rcvbuf // 2)
        if u.sndbuf and (u.sndbuf != snd or ino in self.bumped):
            set_buffer(s, socket.SO_SNDBUF, u.sndbuf // 2)
        if u.passcred:
            s.setsockopt(SOL_SOCKET, SO_PASSCRED, 1)
        if u.passsec:
            with contextlib.suppress(OSError):
                s.setsockopt(SOL_SOCKET, SO_PASSSEC, 1)
        if u.rcvtimeo:
            s.setsockopt(SOL_SOCKET, SO_RCVTIMEO, bytes(u.rcvtimeo))
        if u.sndtimeo:
            s.setsockopt(SOL_SOCKET, SO_SNDTIMEO, bytes(u.sndtimeo))
        if u.rcvlowat > 1:
            s.setsockopt(SOL_SOCKET, SO_RCVLOWAT, u.rcvlowat)
        if u.peek_off >= 0:
            s.setsockopt(SOL_SOCKET, SO_PEEK_OFF, u.peek_off)

    @contextlib.contextmanager
    def _failing(self, ino: int, what: str):
        """An OSError in the block fails the restore, naming the socket and what was done to it."""
        try:
            yield
        except OSError as e:
            u = self.u(ino)
            name = f" ({_show(u.name)})" if u.name else ""
            why = e.strerror or str(e)
            if isinstance(e, BlockingIOError):      # a queue bigger than the buffer we could get
                why += (f": the queue is bigger than the socket buffer an ordinary user may set "
                        f"({buffer_limit(socket.SO_SNDBUF)}); restore as root, or raise that sysctl")
            raise RestoreError(f"cannot {what} unix {_TYPES.get(u.type, u.type)} socket:[{u.ino}]{name}: "
                               f"{why}") from None


class Unix(BuiltTogether):
    """Dump state: _DumpState; every socket is built at the first open (_Restorer)."""

    new_dump_state = staticmethod(_DumpState)
    new_restore_state = staticmethod(_RestoreState)
    dump = staticmethod(_dump)
    dump_done = staticmethod(_dump_done)
    check = staticmethod(_check)
    restorer = _Restorer

    def name(self, f) -> str:
        return f"unix socket:[{f.unix.ino}]"

    def external_key(self, f) -> str:
        return f"socket:[{f.unix.ino}]"

    def facts(self, f) -> dict:
        return dict(ino=f.unix.ino, external=bool(f.unix.external or f.unix.peer_kind == unix_pb2.EXTERNAL))


KIND = Unix()
