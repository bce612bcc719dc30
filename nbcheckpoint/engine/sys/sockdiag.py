"""sock_diag(7) netlink: what the kernel knows about sockets that userspace cannot ask a socket.

AF_UNIX (unix_diag): one dump of every unix socket of the engine's network namespace, with
name, bound file, peer, pending connections (icons), queue lengths and shutdown state; TCP
and UDP (inet_diag) below.  Failures raise :class:`SysError` (request "sock_diag").
"""
from __future__ import annotations

import errno as _errno
import socket
import struct
from dataclasses import dataclass, field

from ..errors import SysError

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_ROOT, NLM_F_MATCH = 0x1, 0x100, 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLMSG_ERROR, NLMSG_DONE = 2, 3

# linux/unix_diag.h
UDIAG_SHOW_NAME, UDIAG_SHOW_VFS, UDIAG_SHOW_PEER, UDIAG_SHOW_ICONS = 0x1, 0x2, 0x4, 0x8
UDIAG_SHOW_RQLEN, UDIAG_SHOW_UID = 0x10, 0x40
UNIX_DIAG_NAME, UNIX_DIAG_VFS, UNIX_DIAG_PEER, UNIX_DIAG_ICONS, UNIX_DIAG_RQLEN = range(5)
UNIX_DIAG_SHUTDOWN, UNIX_DIAG_UID = 6, 7

# sk_state values unix sockets use (net/tcp_states.h)
TCP_ESTABLISHED, TCP_CLOSE, TCP_LISTEN = 1, 7, 10

_NLHDR = struct.Struct("=IHHII")          # len, type, flags, seq, pid
_REQ = struct.Struct("=BBHIIIII")         # family, protocol, pad, states, ino, show, cookie[2]
_MSG = struct.Struct("=BBBBIII")          # family, type, state, pad, ino, cookie[2]
_NLA = struct.Struct("=HH")


@dataclass
class UnixDiag:
    ino: int
    type: int                  # SOCK_STREAM / SOCK_DGRAM / SOCK_SEQPACKET
    state: int                 # TCP_LISTEN, TCP_ESTABLISHED (connected), TCP_CLOSE
    name: bytes | None = None  # bound address: a path, or b"\0..." for an abstract name
    vfs_ino: int = 0           # inode of the socket file a path name is bound to
    peer: int = 0              # inode of the peer (0: see has_peer)
    has_peer: bool = False     # it has a peer; with peer 0, one without an inode: closed, or the
                               # embryo of a connection not accepted yet (listeners' icons name it)
    icons: list[int] = field(default_factory=list)   # listening: inodes of the clients queued
    rqueue: int = 0            # listening: pending connections; else bytes (first dgram) queued
    wqueue: int = 0            # listening: backlog; else bytes we sent that the peer has not read
    shutdown: int = 0          # RCV_SHUTDOWN 1 | SEND_SHUTDOWN 2
    uid: int | None = None

    @property
    def listening(self) -> bool:
        return self.state == TCP_LISTEN


def _nla(data: bytes, off: int, end: int):
    while off + _NLA.size <= end:
        alen, atype = _NLA.unpack_from(data, off)
        if alen < _NLA.size:
            break
        yield atype & 0x3FFF, data[off + _NLA.size:off + alen]
        off += (alen + 3) & ~3


def _parse(data: bytes, off: int, end: int) -> UnixDiag:
    _fam, typ, state, _pad, ino, _c0, _c1 = _MSG.unpack_from(data, off)
    d = UnixDiag(ino=ino, type=typ, state=state)
    for atype, val in _nla(data, off + _MSG.size, end):
        if atype == UNIX_DIAG_NAME:
            d.name = val
        elif atype == UNIX_DIAG_VFS:
            d.vfs_ino = struct.unpack_from("=I", val)[0]
        elif atype == UNIX_DIAG_PEER:
            d.peer = struct.unpack_from("=I", val)[0]
            d.has_peer = True
        elif atype == UNIX_DIAG_ICONS:
            d.icons = list(struct.unpack(f"={len(val) // 4}I", val[: len(val) // 4 * 4]))
        elif atype == UNIX_DIAG_RQLEN:
            d.rqueue, d.wqueue = struct.unpack_from("=II", val)
        elif atype == UNIX_DIAG_SHUTDOWN:
            d.shutdown = val[0]
        elif atype == UNIX_DIAG_UID:
            d.uid = struct.unpack_from("=I", val)[0]
    return d


def _query(req: bytes, flags: int, what: str, missing_ok: bool = False):
    """Send one sock_diag request; yield (data, start, end) of each answer's payload.

    An exact query (no NLM_F_DUMP) answers with one message and no NLMSG_DONE;
    with missing_ok, ENOENT (no such socket) ends the answer quietly."""
    try:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    except OSError as e:
        raise SysError(e.errno or 0, "socket(AF_NETLINK, NETLINK_SOCK_DIAG)") from None
    try:
        nl.sendto(_NLHDR.pack(_NLHDR.size + len(req), SOCK_DIAG_BY_FAMILY, flags, 1, 0) + req, (0, 0))
        while True:
            data = nl.recv(1 << 20)
            if not data:
                raise SysError(_errno.EIO, what, detail="netlink socket closed")
            off = 0
            while off + _NLHDR.size <= len(data):
                ln, typ, _fl, _seq, _pid = _NLHDR.unpack_from(data, off)
                if ln < _NLHDR.size:
                    raise SysError(_errno.EIO, what, detail=f"bad netlink message length {ln}")
                if typ == NLMSG_DONE:
                    return
                if typ == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", data, off + _NLHDR.size)[0]
                    if err == 0 or (missing_ok and err == _errno.ENOENT):
                        return
                    raise SysError(err, what)
                if typ == SOCK_DIAG_BY_FAMILY:
                    yield data, off + _NLHDR.size, off + ln
                off += (ln + 3) & ~3
            if not flags & NLM_F_DUMP:
                return
    except OSError as e:
        if isinstance(e, SysError):
            raise
        raise SysError(e.errno or 0, what) from None
    finally:
        nl.close()


def unix_sockets(ino: int = 0) -> dict[int, UnixDiag]:
    """Every unix socket of this network namespace by inode (or just `ino`, if given)."""
    show = (UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS
            | UDIAG_SHOW_RQLEN | UDIAG_SHOW_UID)
    req = _REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino, show, 0xFFFFFFFF, 0xFFFFFFFF)
    out: dict[int, UnixDiag] = {}
    for data, start, end in _query(req, NLM_F_REQUEST | (0 if ino else NLM_F_DUMP), "sock_diag(AF_UNIX)",
                                   missing_ok=bool(ino)):
        d = _parse(data, start, end)
        out[d.ino] = d
    return out


# ============================================================================ inet_diag
# TCP and UDP sockets (AF_INET, AF_INET6) of the engine's network namespace: addresses, state,
# queue lengths, owner inode -- including the sockets no process holds an fd of: connections
# waiting in a listener's accept queue (inode 0), orphans and TIME_WAIT.  Used by files/inet.py.

INET_DIAG_SHUTDOWN = 8

# sk_state (net/tcp_states.h)
TCP_SYN_SENT, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_TIME_WAIT = 2, 4, 5, 6
TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING = 8, 9, 11

_INET_REQ = struct.Struct("=BBBBI48s")     # family, protocol, ext, pad, states, sockid
_INET_MSG = struct.Struct("=BBBB48sIIIII")  # family, state, timer, retrans, sockid, expires,
                                            # rqueue, wqueue, uid, inode
_SOCKID = struct.Struct(">HH16s16s")       # sport, dport, src, dst (network order); if, cookie follow


@dataclass
class InetDiag:
    family: int                # AF_INET / AF_INET6
    protocol: int              # IPPROTO_TCP / IPPROTO_UDP
    state: int                 # TCP_* above (UDP: 1 connected, 7 not)
    src: str                   # local address, as inet_ntop shows it
    sport: int
    dst: str
    dport: int
    ino: int                   # 0: no file (accept queue, orphan, TIME_WAIT)
    rqueue: int = 0            # listening: connections in the accept queue; else bytes queued
    wqueue: int = 0            # listening: backlog; else bytes not yet acknowledged (TCP)
    uid: int = 0
    ifindex: int = 0           # bound device (SO_BINDTODEVICE) or IPv6 scope
    shutdown: int = 0          # RCV_SHUTDOWN 1 | SEND_SHUTDOWN 2

    @property
    def local(self) -> tuple[int, str, int]:
        return (self.family, self.src, self.sport)

    @property
    def remote(self) -> tuple[int, str, int]:
        return (self.family, self.dst, self.dport)


def _inet_addr(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw[:4] if family == socket.AF_INET else raw)


def _inet_query(family: int, protocol: int) -> list[InetDiag]:
    what = f"sock_diag({'AF_INET' if family == socket.AF_INET else 'AF_INET6'}, " \
           f"{'TCP' if protocol == socket.IPPROTO_TCP else 'UDP'})"
    req = _INET_REQ.pack(family, protocol, 0, 0, 0xFFFFFFFF, b"\0" * 48)
    return [_inet_parse(data, start, end, protocol)
            for data, start, end in _query(req, NLM_F_REQUEST | NLM_F_DUMP, what)]


def _inet_parse(data: bytes, off: int, end: int, protocol: int) -> InetDiag:
    fam, state, _timer, _retr, sockid, _exp, rq, wq, uid, ino = _INET_MSG.unpack_from(data, off)
    sport, dport, src, dst = _SOCKID.unpack_from(sockid)
    ifindex = struct.unpack_from("=I", sockid, _SOCKID.size)[0]
    d = InetDiag(family=fam, protocol=protocol, state=state, src=_inet_addr(fam, src), sport=sport,
                 dst=_inet_addr(fam, dst), dport=dport, ino=ino, rqueue=rq, wqueue=wq, uid=uid,
                 ifindex=ifindex)
    for atype, val in _nla(data, off + _INET_MSG.size, end):
        if atype == INET_DIAG_SHUTDOWN and val:
            d.shutdown = val[0]
    return d


def inet_sockets(protocol: int) -> list[InetDiag]:
    """Every TCP (or UDP) socket of this network namespace, IPv4 and IPv6, in every state.
    Raises SysError (ENOENT/EOPNOTSUPP...) when the kernel lacks the diag module."""
    return _inet_query(socket.AF_INET, protocol) + _inet_query(socket.AF_INET6, protocol)
