"""TCP connections without TCP_REPAIR: what an ordinary user can do (files/inet.py's other way).

TCP_REPAIR needs CAP_NET_ADMIN over the socket's network namespace (``tcprepair.allowed()``
says whether we have it).  Without it, a connection cannot be read or rebuilt as it was --
but one whose two ends are both in the tree needs no sequence numbers, windows or options:
a fresh connected pair on the same addresses, with each end's unread bytes sent again by
the other end, is indistinguishable to the processes.

Dump.  The receive queue is peeked (recv MSG_PEEK through the pidfd_getfd duplicate, SO_PEEK_OFF
saved and put back: the live process loses nothing).  The send queue cannot be read: on
loopback what was sent is acknowledged at once, so it must be empty (SIOCOUTQ 0); bytes still
unacknowledged or unsent (the peer's window is full) fail the dump by name.  Two readings must
agree.  The image marks the connection ``plain`` (only the receive queue and the FIN flags).
A connection to an outside peer cannot come back live: refused with ``--tcp-established``
(kill mode), stored without state (restored closed) otherwise.  When the tree is killed, the
engine's duplicates close with SO_LINGER {1, 0}: a RST, so no TIME_WAIT holds the 4-tuple.

Restore (``pairs`` runs before the listeners listen):

* a connection with both ends in the image: the end whose address is a listener's of the
  image (else the lower port) is the server.  A temporary listener (SO_REUSEADDR) binds the
  server end's address -- a new port on that address if it is taken (by an inherited listener
  of the new manager: the pair then uses the new port) -- the client end binds its old address
  (a new port with a warning if a TIME_WAIT of the original holds it) and connects; the
  accepted socket becomes the server end.  Then each end sends the other's queued bytes, in
  order (a repair image's unacknowledged send queue after them, minus what the peer already
  has), then its FIN if it had sent one; restore waits until they have arrived;
* a connection whose peer is gone: the same, with a temporary peer that sends the queued
  bytes (and a FIN if one had arrived) and is closed at the end;
* ``--tcp-close``: connected to a temporary loopback listener whose accepted end is closed
  with SO_LINGER {1, 0}; the RST leaves the socket as TCP repair's reset does: recv ECONNRESET
  (SO_ERROR) then 0, send EPIPE, poll/epoll IN|OUT|ERR|HUP|RDHUP.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import time

from ..errors import DumpError, RestoreError, UnsupportedError
from ..images import inet_pb2
from ..sys import tcprepair
from . import inet_common

log = logging.getLogger(__name__)

SOL_SOCKET = socket.SOL_SOCKET
_TRIES = 8
_TIMEOUT = 10.0
_LINGER_RST = struct.pack("ii", 1, 0)
WHY = "needs CAP_NET_ADMIN over the socket's network namespace (TCP_REPAIR)"


# ----------------------------------------------------------------------------- dump

def dump(pid: int, fd: int, sk: socket.socket, n) -> None:
    """The receive queue of a connection whose send queue is empty; until two readings agree."""
    t = n.tcp
    for i in range(_TRIES):
        state = tcprepair.tcp_info(sk)[0]
        inq, outq, nsd = tcprepair.queue_lengths(sk)
        if outq == 0:
            rq = _peek(sk, inq, n.peek_off)
            if len(rq) == inq and tcprepair.queue_lengths(sk) == (inq, 0, 0) and tcprepair.tcp_info(sk)[0] == state:
                break
        time.sleep(0.005 * (i + 1))       # loopback acknowledges at once: give it the chance
    else:
        if outq:
            raise UnsupportedError(
                f"process {pid}: fd {fd} ({inet_common.desc(n)}): {outq} byte(s) it sent are not yet acknowledged "
                f"by its peer ({nsd} never sent: the peer's receive window is full). Reading them {WHY}: retry when the "
                "peer has read them, or run as root")
        raise DumpError(f"process {pid}: fd {fd} ({inet_common.desc(n)}): its receive queue kept changing while being "
                        f"read ({_TRIES} tries); is its peer outside the tree still sending?")
    t.plain = True
    t.recv_queue = rq
    t.fin_sent, t.fin_received = state in inet_common.FIN_SENT, state in inet_common.FIN_RECEIVED
    n.state = state


def _peek(sk: socket.socket, inq: int, peek_off: int) -> bytes:
    if inq <= 0:
        return b""
    if peek_off >= 0:
        sk.setsockopt(SOL_SOCKET, inet_common.SO_PEEK_OFF, 0)
    try:
        return sk.recv(inq + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""
    finally:
        if peek_off >= 0:
            sk.setsockopt(SOL_SOCKET, inet_common.SO_PEEK_OFF, peek_off)


def refuse_established(pid: int, fd: int, n) -> UnsupportedError:
    return UnsupportedError(
        f"process {pid}: fd {fd} is an established TCP connection to an outside peer "
        f"({inet_common.show(n.src_addr, n.src_port)} -> {inet_common.show(n.dst_addr, n.dst_port)}, "
        f"socket:[{n.ino}]); "
        f"--tcp-established checkpoints it with TCP repair, which {WHY}: run as root, or dump with "
        "--tcp-close to restore it closed (the process sees the connection reset)")


def end_quietly(fd: int) -> None:
    """Closing the last reference to this connection sends a RST and leaves no TIME_WAIT."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sk:
            sk.setsockopt(SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass


# ----------------------------------------------------------------------------- restore

def check(ctx, pid: int, fdentry, n) -> None:
    """Before any process exists: what only TCP repair could bring back."""
    if n.proto != socket.IPPROTO_TCP or n.state not in inet_common.CONNECTED or n.closed or not n.HasField("tcp"):
        return
    where = (f"process {pid}: fd {fdentry.fd}, TCP {inet_common.show(n.src_addr, n.src_port)} -> "
             f"{inet_common.show(n.dst_addr, n.dst_port)} (socket:[{n.ino}])")
    if n.peer_kind == inet_pb2.INET_EXTERNAL and not ctx.options.tcp_close:
        raise RestoreError(f"{where} is an established connection to an outside peer, which the image holds with "
                           f"its TCP repair state; rebuilding it live {WHY}: restore as root, or with --tcp-close "
                           "(the restored process finds the connection reset)")
    if n.peer_kind == inet_pb2.INET_IN_IMAGE and ctx.options.inherit_fd.get(f"socket:[{n.peer_ino}]") is not None:
        raise RestoreError(f"{where}: its peer socket:[{n.peer_ino}] is handed in with --inherit-fd, and joining "
                           f"a connection to a socket that exists already {WHY}: restore as root")


def pairs(r) -> None:
    """Every connection of r (inet._Restorer) in REPAIR mode, as fresh connected pairs."""
    done: set[int] = set()
    for ino in r._of(r.REPAIR):
        if ino in done:
            continue
        n = r.n(ino)
        peer = n.peer_ino if (n.peer_kind == inet_pb2.INET_IN_IMAGE and n.peer_ino in r.ents
                              and r.mode.get(n.peer_ino) == r.REPAIR and n.peer_ino not in r.inh) else None
        if peer is None:
            r._step(ino, "rebuild (with a stand-in for its closed peer)", _pair, r, ino, None)
        else:
            client, server = (peer, ino) if _is_server(r, ino, peer) else (ino, peer)
            r._step(client, "rebuild (as a fresh connected pair)", _pair, r, client, server)
        done.update((ino, peer))


def _is_server(r, a: int, b: int) -> bool:
    """a is the server end of the pair (a, b): its address is a listener's, else its port is lower."""
    def listens(ino):
        n = r.n(ino)
        return any(m == r.LISTEN and r.n(i).src_port == n.src_port and r.n(i).family == n.family
                   and (inet_common.wildcard(r.n(i).src_addr)
                        or inet_common.norm(r.n(i).src_addr) == inet_common.norm(n.src_addr))
                   for i, m in r.mode.items())
    la, lb = listens(a), listens(b)
    return la if la != lb else r.n(a).src_port <= r.n(b).src_port


def _target(fam: int, addr: tuple) -> tuple:
    """addr (of a socket of any family) as a socket of family fam connects to it."""
    host, port = addr[0], addr[1]
    if fam == socket.AF_INET6:
        return ("::ffff:" + host if "." in host and ":" not in host else host, port, 0, 0)
    return (host[7:] if host.startswith("::ffff:") else host, port)


def _listener(r, fam: int, addr: tuple, server_ino: int | None, what: str) -> socket.socket:
    """A temporary listener on addr (its port, else a new one on the same address)."""
    t = socket.socket(fam, socket.SOCK_STREAM)
    try:
        t.setsockopt(SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if server_ino is not None:
            for _name, level, num, val in r._changed_opts(r.n(server_ino), before_bind=True):
                t.setsockopt(level, num, val)       # the accepted end inherits them
            t.setsockopt(SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _room(r, t, server_ino)
        try:
            t.bind(addr)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            t.bind((addr[0], 0) + tuple(addr[2:]))
            log.info("%s: its server address %s is taken (an inherited listener?): the pair uses port %d",
                     what, inet_common.show(addr[0], addr[1]), t.getsockname()[1])
        t.listen(8)
        return t
    except BaseException:
        t.close()
        raise


def _room(r, s: socket.socket, ino: int) -> None:
    """A receive buffer (before the handshake: the window scale follows it) with room for the
    bytes about to be sent to this end."""
    need = 2 * len(_incoming(r, ino)) + (1 << 16)
    want = max(int(r._opt(r.n(ino), "SO_RCVBUF")), need)
    if want > s.getsockopt(SOL_SOCKET, socket.SO_RCVBUF):
        r._setbuf(s, socket.SO_RCVBUF, want // 2 + 1)
        r.bumped.add(ino)


def _incoming(r, ino: int) -> bytes:
    """What end ino must find to read: its receive queue, then (a repair image) what its peer
    had sent and not yet had acknowledged, minus what it already holds."""
    n = r.n(ino)
    data = bytes(n.tcp.recv_queue)
    if n.peer_kind == inet_pb2.INET_IN_IMAGE and n.peer_ino in r.ents:
        p = r.n(n.peer_ino).tcp
        if p.send_queue and not p.plain and not n.tcp.plain:
            una = (p.snd_seq - len(p.send_queue)) & 0xFFFFFFFF
            have = (n.tcp.rcv_seq - una) & 0xFFFFFFFF
            if have < len(p.send_queue):
                data += bytes(p.send_queue[have:])
    return data


def _pair(r, cli: int, srv: int | None) -> None:
    cn, cs = r.n(cli), r.socks[cli]
    fam = r.n(srv).family if srv is not None else cn.family
    saddr = inet_common.addr(r.n(srv), True) if srv is not None else _target(fam, inet_common.addr(cn, False))
    what = inet_common.desc(cn)
    lst = _listener(r, fam, saddr, srv, what)
    try:
        _room(r, cs, cli)
        bind_old(r, cli)
        cs.settimeout(_TIMEOUT)
        cs.connect(_target(cn.family, lst.getsockname()))
        cs.settimeout(None)
        acc = _accept(lst, cs.getsockname())
    finally:
        lst.close()
    if srv is None:
        r.temps.append(acc)
        _send(acc, _incoming(r, cli), what)
        if cn.tcp.fin_received:
            acc.shutdown(socket.SHUT_WR)
        _arrived(cs, len(_incoming(r, cli)), what)
        return
    r.socks[srv].close()
    r.socks[srv] = acc
    acc.setsockopt(SOL_SOCKET, socket.SO_REUSEADDR, int(r._opt(r.n(srv), "SO_REUSEADDR")))
    to_cli, to_srv = _incoming(r, cli), _incoming(r, srv)
    _send(acc, to_cli, what)
    _send(cs, to_srv, what)
    for ino, s in ((srv, acc), (cli, cs)):
        if r.n(ino).tcp.fin_sent:
            s.shutdown(socket.SHUT_WR)
    _arrived(cs, len(to_cli), what)
    _arrived(acc, len(to_srv), what)


def bind_old(r, ino: int) -> None:
    """Bind to the dumped local address; a new port there if it is taken (the original's
    TIME_WAIT, after a --leave-running dump whose original has ended)."""
    n, s = r.n(ino), r.socks[ino]
    if not n.src_port:
        return
    s.setsockopt(SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(inet_common.addr(n, True))
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        a = inet_common.addr(n, True)
        s.bind((a[0], 0) + tuple(a[2:]))
        log.warning("%s: its port is still taken (by the connection of the original, ended after a "
                    "--leave-running dump?); restored on port %d. Rebinding a taken port %s, or run as root",
                    inet_common.desc(n), s.getsockname()[1], WHY)
    s.setsockopt(SOL_SOCKET, socket.SO_REUSEADDR, int(r._opt(n, "SO_REUSEADDR")))


def _accept(lst: socket.socket, want: tuple) -> socket.socket:
    """The connection from `want` (anyone else who connected meanwhile to our temporary
    listener is closed)."""
    lst.settimeout(_TIMEOUT)
    while True:
        s, peer = lst.accept()
        s.settimeout(None)
        if inet_common.norm(peer[0]) == inet_common.norm(want[0]) and peer[1] == want[1]:
            return s
        s.close()


def _send(s: socket.socket, data: bytes, what: str) -> None:
    view = memoryview(data)
    deadline = time.monotonic() + _TIMEOUT
    while view:
        try:
            view = view[s.send(view, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL):]
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RestoreError(f"{what}: could not send its {len(data)} queued bytes again ({len(view)} "
                                   "left): the receive buffer cannot grow enough (net.core.rmem_max)") from None
            select.select([], [s], [], 0.05)


def _arrived(s: socket.socket, n: int, what: str) -> None:
    """Until the n bytes sent to s are in its receive queue (or all that its buffer takes)."""
    deadline = time.monotonic() + _TIMEOUT
    while tcprepair.queue_lengths(s)[0] < n:
        if time.monotonic() > deadline:
            raise RestoreError(f"{what}: only {tcprepair.queue_lengths(s)[0]} of its {n} queued bytes arrived "
                               f"within {_TIMEOUT:.0f} s")
        time.sleep(0.001)


def closed(r, ino: int) -> None:
    """A socket reset by its peer: connected to a temporary loopback listener whose accepted end
    is closed with SO_LINGER {1, 0}."""
    n = r.n(ino)
    mapped = n.family == socket.AF_INET6 and n.src_addr.startswith("::ffff:")
    fam = socket.AF_INET if mapped else n.family
    lst = socket.socket(fam, socket.SOCK_STREAM)
    try:
        lst.bind(("::1", 0, 0, 0) if fam == socket.AF_INET6 else ("127.0.0.1", 0))
        lst.listen(8)
        try:
            bind_old(r, ino)
            r.socks[ino].connect(_target(n.family, lst.getsockname()))
        except OSError as e:            # its old address cannot reach loopback: without it
            log.info("%s: restored closed without its old address (%s)", inet_common.desc(n), e.strerror or e)
            r.socks[ino].close()
            del r.socks[ino]
            r._create(ino)
            r.socks[ino].connect(_target(n.family, lst.getsockname()))
        acc = _accept(lst, r.socks[ino].getsockname())
    finally:
        lst.close()
    acc.setsockopt(SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    acc.close()
    s = r.socks[ino]
    p = select.poll()
    p.register(s, select.POLLERR)
    if not p.poll(_TIMEOUT * 1000):
        raise RestoreError(f"{inet_common.desc(n)}: the reset that restores it closed did not arrive")
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
