"""TCP and UDP sockets, IPv4 and IPv6: listeners with their accept queues, established
connections (restored byte-exact with TCP repair), bound and connected UDP sockets with their
queued datagrams, and the socket options that matter.

Dump.  inet_diag (``sys/sockdiag.py``, one netlink dump of every TCP socket per dump) gives
each socket's state and addresses, and -- what no fd can tell -- the sockets without a file:
connections waiting in a listener's accept queue, orphans, TIME_WAIT.  A connected TCP
socket's peer is the socket with the reverse address 4-tuple:

* ``INET_IN_IMAGE``  a socket of the dumped tree (ipykernel's connection to its own shell port);
* ``INET_PENDING``   an accept-queue entry of a listener of the tree: the connection was not
  accepted yet.  Restore connects again to the restored listener (new handshake, same client
  port).  Data the client sent on it sits in a socket without an fd: the dump refuses that;
* ``INET_DEAD``      the peer closed (orphan, TIME_WAIT, or nothing left on a loopback address);
* ``INET_EXTERNAL``  anything else: a process outside the tree or another host.  That fails the
  dump ("established TCP connection to an outside peer") unless ``--tcp-established`` (dump
  its repair state; the peer keeps its end) or ``--tcp-close`` (restore it closed) is given.

A connection's state is read with TCP_REPAIR (``sys/tcprepair.py``; CRIU's libsoccr model)
through a pidfd_getfd duplicate while the tree is frozen (what is read: docs/engine.md), until
two readings agree; repair mode is left at once (TCP_REPAIR_OFF_NO_WP: nothing is sent;
SO_REUSEADDR, which leaving repair mode resets, is set back).  The engine keeps its duplicate
until the dump ends (``_release``): once the tree is killed, repair mode then closes the old
connection silently -- no FIN or RST reaches an outside peer, no TIME_WAIT holds its 4-tuple.

The process is frozen but the kernel is not: a kill-mode dump locks each connection to an
outside peer (``netlock.py``, as CRIU does with netfilter) before its queues are read, so that
what the peer sends until the restore is retransmitted to the restored socket, not acknowledged
and lost.  Connections inside the tree are quiet once it is frozen.

Restore builds every inet socket of the image at the first open(), in the engine:

1. sockets with the options that matter before bind (SO_REUSEADDR/PORT, IPV6_V6ONLY,
   IP_FREEBIND, SO_BINDTOIFINDEX);
2. listeners: bind, listen(backlog) -- before any repaired socket shares their port;
3. UDP: bind; queued datagrams sent again (from the socket of the image bound to the sender's
   address when there is one, else from a temporary socket bound to it if it is free);
   then connect;
4. connections, in repair mode: bind (repair mode may share a listener's port), queue
   sequence numbers, connect (no SYN), options, timestamp clock, the receive queue, the
   sent-but-unacked part of the send queue, window;
5. accept-queue connections: bind the client's port, connect to the restored listener;
   SYN_SENT sockets: non-blocking connect again;
6. repair mode off for all (only now: a window probe from one end must find the other);
7. options, then the never-sent bytes with ordinary send(), then shutdown() replayed (a FIN
   we had sent goes out again; one we had received comes from the peer's replay, or is
   stood in for by shutdown(SHUT_RD) when the peer is not in the image);
8. ``--tcp-close``: connections to outside peers are rebuilt in repair mode and then reset
   (connect(AF_UNSPEC) outside repair mode: the peer gets a RST if it still has its end):
   the process's first read returns ECONNRESET, later ones 0, poll() says ERR|HUP at once;
9. buffer sizes, SO_PEEK_OFF, O_NONBLOCK.

Without CAP_NET_ADMIN over the socket's network namespace (an ordinary user:
``tcprepair.allowed()``), connections are dumped and rebuilt without TCP repair
(``inet_plain.py``): both ends in the tree come back as a fresh pair with their queued bytes
sent again; ``--tcp-close`` sockets by a real reset; what only repair can do (bytes waiting in
a send queue, ``--tcp-established`` with an outside peer, the network lock) is refused by name
before anything is killed or created.

Limits (documented, not handled): accept-queue connections of clients outside the tree are
dropped (their clients see a reset when the dumped listener dies); the order of several
accept-queue entries is the kernel's listing order; out-of-order segments (none on loopback)
and urgent data are not saved; multicast memberships are not restored; a UDP datagram's
sender address is kept only when that address can be bound at restore; a pending socket
error (SO_ERROR) of a UDP socket with queued data is consumed by the peek; sockets of another
network namespace than the engine's cannot be dumped.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket

from ..errors import DumpError, EngineError, RestoreError, UnsupportedError
from ..images import files_pb2, inet_pb2
from ..sys import proc, sockdiag, tcprepair
from ..sys.sockdiag import TCP_CLOSE, TCP_ESTABLISHED, TCP_LISTEN
from . import inet_plain, regfile
from .inet_common import CONNECTED as _CONNECTED, FIN_RECEIVED as _FIN_RECEIVED, FIN_SENT as _FIN_SENT, SO_PEEK_OFF
from .inet_common import addr as _addr, desc as _desc, norm as _norm, show as _show, wildcard as _wildcard
from .kind import Built, BuiltTogether, by_ino, set_buffer, set_status_flags

log = logging.getLogger(__name__)

SOL_SOCKET, SOL_IP, SOL_IPV6, SOL_TCP = socket.SOL_SOCKET, socket.IPPROTO_IP, socket.IPPROTO_IPV6, socket.IPPROTO_TCP
SO_REUSEADDR = socket.SO_REUSEADDR
TCP_SYN_SENT = sockdiag.TCP_SYN_SENT
_FIN_UNACKED = {sockdiag.TCP_FIN_WAIT1, sockdiag.TCP_CLOSING, sockdiag.TCP_LAST_ACK}
_EMBRYO = {TCP_ESTABLISHED, sockdiag.TCP_CLOSE_WAIT}      # accept-queue entries (no file)
_ORPHAN = {sockdiag.TCP_FIN_WAIT1, sockdiag.TCP_FIN_WAIT2, sockdiag.TCP_TIME_WAIT, sockdiag.TCP_LAST_ACK,
           sockdiag.TCP_CLOSING, TCP_CLOSE}
_SHUT = {1: socket.SHUT_RD, 2: socket.SHUT_WR, 3: socket.SHUT_RDWR}
_READS = 5
_MAX_DGRAM = 1 << 16

# The options saved, by name: (level, number, size of a struct option or 0 for an int,
# set before bind?, which sockets: "all" / "tcp" / "udp" / "v4" / "v6" / "udp4" / "udp6").  Restore sets those
# that differ from a fresh socket's.  SO_RCVBUF/SO_SNDBUF are saved here and set with the
# *BUFFORCE variants (the kernel doubles what is set).
_OPTS = {
    "SO_REUSEADDR": (SOL_SOCKET, 2, 0, True, "all"),
    "SO_REUSEPORT": (SOL_SOCKET, 15, 0, True, "all"),
    "SO_BINDTOIFINDEX": (SOL_SOCKET, 62, 0, True, "all"),
    "IP_FREEBIND": (SOL_IP, 15, 0, True, "all"),
    "IPV6_V6ONLY": (SOL_IPV6, 26, 0, True, "v6"),
    "SO_KEEPALIVE": (SOL_SOCKET, 9, 0, False, "all"),
    "SO_BROADCAST": (SOL_SOCKET, 6, 0, False, "udp"),
    "SO_OOBINLINE": (SOL_SOCKET, 10, 0, False, "tcp"),
    "SO_PRIORITY": (SOL_SOCKET, 12, 0, False, "all"),
    "SO_RCVLOWAT": (SOL_SOCKET, 18, 0, False, "all"),
    "SO_MARK": (SOL_SOCKET, 36, 0, False, "all"),
    "SO_LINGER": (SOL_SOCKET, 13, 8, False, "all"),
    "SO_RCVTIMEO": (SOL_SOCKET, 20, 16, False, "all"),
    "SO_SNDTIMEO": (SOL_SOCKET, 21, 16, False, "all"),
    "SO_RCVBUF": (SOL_SOCKET, 8, 0, False, "all"),
    "SO_SNDBUF": (SOL_SOCKET, 7, 0, False, "all"),
    "TCP_NODELAY": (SOL_TCP, 1, 0, False, "tcp"),
    "TCP_CORK": (SOL_TCP, 3, 0, False, "tcp"),
    "TCP_KEEPIDLE": (SOL_TCP, 4, 0, False, "tcp"),
    "TCP_KEEPINTVL": (SOL_TCP, 5, 0, False, "tcp"),
    "TCP_KEEPCNT": (SOL_TCP, 6, 0, False, "tcp"),
    "TCP_DEFER_ACCEPT": (SOL_TCP, 9, 0, False, "tcp"),
    "TCP_CONGESTION": (SOL_TCP, 13, 16, False, "tcp"),
    "TCP_USER_TIMEOUT": (SOL_TCP, 18, 0, False, "tcp"),
    "TCP_NOTSENT_LOWAT": (SOL_TCP, 25, 0, False, "tcp"),
    "IP_TOS": (SOL_IP, 1, 0, False, "v4"),
    "IP_TTL": (SOL_IP, 2, 0, False, "v4"),
    "IP_PKTINFO": (SOL_IP, 8, 0, False, "v4"),
    "IP_RECVERR": (SOL_IP, 11, 0, False, "v4"),
    "IP_MULTICAST_TTL": (SOL_IP, 33, 0, False, "udp4"),
    "IP_MULTICAST_LOOP": (SOL_IP, 34, 0, False, "udp4"),
    "IPV6_UNICAST_HOPS": (SOL_IPV6, 16, 0, False, "v6"),
    "IPV6_MULTICAST_HOPS": (SOL_IPV6, 18, 0, False, "udp6"),
    "IPV6_MULTICAST_LOOP": (SOL_IPV6, 19, 0, False, "udp6"),
    "IPV6_RECVERR": (SOL_IPV6, 25, 0, False, "v6"),
    "IPV6_RECVPKTINFO": (SOL_IPV6, 49, 0, False, "v6"),
    "IPV6_TCLASS": (SOL_IPV6, 67, 0, False, "v6"),
}


def _applies(scope: str, family: int, proto: int) -> bool:
    return (scope == "all" or (scope == "tcp" and proto == socket.IPPROTO_TCP)
            or (scope == "udp" and proto == socket.IPPROTO_UDP)
            or (scope == "v4" and family == socket.AF_INET) or (scope == "v6" and family == socket.AF_INET6)
            or (scope == "udp4" and family == socket.AF_INET and proto == socket.IPPROTO_UDP)
            or (scope == "udp6" and family == socket.AF_INET6 and proto == socket.IPPROTO_UDP))


def _get_opts(sk: socket.socket, family: int, proto: int) -> dict[str, int | bytes]:
    out: dict[str, int | bytes] = {}
    for name, (level, num, size, _pre, scope) in _OPTS.items():
        if not _applies(scope, family, proto):
            continue
        try:
            out[name] = sk.getsockopt(level, num, size) if size else sk.getsockopt(level, num)
        except OSError:
            pass        # not on this kernel or this kind of socket
    return out


def _tuple(d: sockdiag.InetDiag) -> tuple:
    return (_norm(d.src), d.sport, _norm(d.dst), d.dport)


# ----------------------------------------------------------------------------- dump

class _DumpState:
    """Per dump: the kernel's TCP sockets, the tree's socket inodes, and the duplicates the
    engine keeps until the tree is gone (see _release)."""

    def __init__(self, ctx):
        try:
            self.tcp = sockdiag.inet_sockets(socket.IPPROTO_TCP)
        except OSError as e:
            raise DumpError(f"cannot list TCP sockets with inet_diag (is the inet_diag/tcp_diag module "
                            f"available?): {e}") from None
        self.udp: dict[int, sockdiag.InetDiag] | None = None
        self.by_ino = {d.ino: d for d in self.tcp if d.ino}
        self.by_tuple: dict[tuple, sockdiag.InetDiag] = {}
        for d in self.tcp:
            if d.state == TCP_LISTEN:
                continue
            old = self.by_tuple.get(_tuple(d))
            if old is None or old.state == sockdiag.TCP_TIME_WAIT:
                self.by_tuple[_tuple(d)] = d
        self.listeners = [d for d in self.tcp if d.state == TCP_LISTEN]
        self.inodes = ctx.inodes(files_pb2.INET)
        self.held: list[int] = []
        ctx.at_close(_release, self.held, list(ctx.tree))

    def udp_diag(self, ino: int) -> sockdiag.InetDiag | None:
        if self.udp is None:
            try:
                self.udp = {d.ino: d for d in sockdiag.inet_sockets(socket.IPPROTO_UDP) if d.ino}
            except OSError:
                self.udp = {}
        return self.udp.get(ino)

    def listener_of(self, e: sockdiag.InetDiag) -> sockdiag.InetDiag | None:
        """The listener whose accept queue holds the file-less connection e."""
        for lst in self.listeners:
            if lst.sport == e.sport and (_wildcard(lst.src) or _norm(lst.src) == _norm(e.src)):
                return lst
        return None


def _release(held: list[int], pids: list[int]) -> None:
    """The engine's duplicates of dumped connections, once the dump is over.  If the tree is
    gone (dumped and killed), each socket goes into repair mode first, so that closing the
    last reference ends the connection without a FIN or RST; if it lives on (leave-running,
    or a failed dump), it is simply closed."""
    gone = all(proc.pid_state(p) in ("", "Z", "X") for p in pids)
    for fd in held:
        if gone:
            _silence(fd)
        os.close(fd)
    held.clear()


def _silence(fd: int) -> None:
    """Repair mode on the connection behind fd (best effort): closing its last reference
    then sends no FIN or RST and leaves no TIME_WAIT.  Without TCP_REPAIR: a RST, and no
    TIME_WAIT either."""
    if not tcprepair.allowed():
        inet_plain.end_quietly(fd)
        return
    try:
        with socket.socket(fileno=os.dup(fd)) as sk:
            tcprepair.repair(sk, tcprepair.REPAIR_ON)
    except OSError:
        pass


def _dump(ctx, pid: int, fd: int, s: os.stat_result, link: str, info: dict, entry: files_pb2.FileEntry) -> None:
    st = ctx.state(KIND)
    n = entry.inet
    n.ino = s.st_ino
    sk = ctx.getsock(pid, fd)
    keep = False
    try:
        n.family, n.type, n.proto = int(sk.family), int(sk.type), sk.proto
        if (n.type, n.proto) not in ((socket.SOCK_STREAM, socket.IPPROTO_TCP), (socket.SOCK_DGRAM, socket.IPPROTO_UDP)):
            kind = {socket.SOCK_RAW: "raw", socket.SOCK_SEQPACKET: "seqpacket"}.get(n.type, f"type {n.type}")
            raise UnsupportedError(f"process {pid}: fd {fd} is an {'IPv6' if n.family == socket.AF_INET6 else 'IPv4'} "
                                   f"{kind} socket of protocol {n.proto} ({link}), which this version cannot "
                                   "checkpoint (only TCP and UDP)")
        n.src_addr, n.src_port, n.src_scope = _sockaddr(sk.getsockname)
        n.dst_addr, n.dst_port, n.dst_scope = _sockaddr(sk.getpeername)
        opts = _get_opts(sk, n.family, n.proto)
        for name, val in opts.items():
            if isinstance(val, bytes):
                n.opts.add(name=name, raw=val)
            else:
                n.opts.add(name=name, value=val)
        n.peek_off = sk.getsockopt(SOL_SOCKET, SO_PEEK_OFF)
        if n.proto == socket.IPPROTO_TCP:
            keep = _dump_tcp(ctx, st, pid, fd, sk, n, int(opts.get("SO_REUSEADDR", 0)))
        else:
            _dump_udp(st, pid, fd, sk, n)
    except OSError as e:
        if isinstance(e, EngineError):
            raise
        raise DumpError(f"process {pid}: fd {fd} ({_desc(n)}): {e.strerror or e}") from None
    finally:
        if keep:
            st.held.append(sk.detach())
        else:
            sk.close()


def _sockaddr(get) -> tuple[str, int, int]:
    """(address, port, IPv6 scope) by getsockname or getpeername; empty if not bound or connected."""
    try:
        a = get()
    except OSError:
        return "", 0, 0
    return a[0], a[1], a[3] if len(a) > 3 else 0


def _dump_tcp(ctx, st: _DumpState, pid: int, fd: int, sk: socket.socket, n, reuse: int) -> bool:
    """Fills n; True if the engine keeps its duplicate (a connection: see _release)."""
    d = st.by_ino.get(n.ino)
    if d is None:
        raise UnsupportedError(f"process {pid}: fd {fd} is TCP socket:[{n.ino}], which inet_diag does not "
                               "show: it lives in another network namespace than the engine's, which this "
                               "version cannot checkpoint")
    n.state, n.shutdown = d.state, d.shutdown
    if d.state == TCP_LISTEN:
        n.backlog = d.wqueue
        for e in st.tcp:
            if e.ino or e.state not in _EMBRYO or st.listener_of(e) is not d:
                continue
            client = st.by_tuple.get((_norm(e.dst), e.dport, _norm(e.src), e.sport))
            if client is not None and client.ino in st.inodes:
                n.pending.append(client.ino)
            else:
                n.dropped += 1
        if n.dropped:
            log.warning("process %d: fd %d (%s): %d connection(s) from outside the tree wait in the accept "
                        "queue; they are not saved (their clients will see a reset)", pid, fd, _desc(n), n.dropped)
        return False
    if d.state == TCP_SYN_SENT or d.state not in _CONNECTED:
        if d.state == TCP_SYN_SENT and not n.dst_port:
            n.dst_addr, n.dst_port = d.dst, d.dport
        return False
    peer = st.by_tuple.get((_norm(d.dst), d.dport, _norm(d.src), d.sport))
    if peer is not None and peer.ino and peer.ino in st.inodes:
        n.peer_kind, n.peer_ino = inet_pb2.INET_IN_IMAGE, peer.ino
    elif peer is not None and not peer.ino and peer.state in _EMBRYO and st.listener_of(peer) is not None:
        lst = st.listener_of(peer)
        if lst.ino in st.inodes:
            n.peer_kind, n.listener_ino = inet_pb2.INET_PENDING, lst.ino
            if peer.rqueue:
                raise UnsupportedError(
                    f"process {pid}: fd {fd} ({_desc(n)}) is connected to a listener of the tree that has not "
                    f"accepted the connection yet, and {peer.rqueue} bytes sent on it wait there; this version "
                    "cannot save them: accept the connection before checkpointing")
        else:
            n.peer_kind = inet_pb2.INET_EXTERNAL
    elif (peer is not None and not peer.ino and peer.state in _ORPHAN) or (
            peer is None and _loopback(d.dst)):
        n.peer_kind = inet_pb2.INET_DEAD
    else:
        n.peer_kind = inet_pb2.INET_EXTERNAL
    plain = not tcprepair.allowed()
    if n.peer_kind == inet_pb2.INET_EXTERNAL and not ctx.options.tcp_established:
        if ctx.options.tcp_close:
            n.closed = True
            return False
        raise UnsupportedError(
            f"process {pid}: fd {fd} is an established TCP connection to an outside peer "
            f"({_show(n.src_addr, n.src_port)} -> {_show(n.dst_addr, n.dst_port)}, socket:[{n.ino}]). "
            "Dump with --tcp-established to checkpoint it with TCP repair (the peer keeps its end and the "
            "restored process goes on with it" + (f"; that {inet_plain.WHY}: run as root" if plain else "")
            + "), or with --tcp-close to restore it closed (the process sees the connection reset)")
    if n.peer_kind == inet_pb2.INET_EXTERNAL and plain:
        if not ctx.options.leave_running:
            raise inet_plain.refuse_established(pid, fd, n)
        return False    # no state: it can only come back closed (as a repair image of a leave-running dump)
    if n.peer_kind == inet_pb2.INET_EXTERNAL and not ctx.options.leave_running:
        # the peer must not reach this socket from now until restore (netlock.py)
        ctx.netlock.add(n.family, n.src_addr, n.src_port, n.dst_addr, n.dst_port, _desc(n))
    if plain:
        inet_plain.dump(pid, fd, sk, n)
    else:
        _repair_dump(pid, fd, sk, n, reuse)
    if n.peer_kind == inet_pb2.INET_PENDING and n.tcp.recv_queue:
        raise UnsupportedError(f"process {pid}: fd {fd} ({_desc(n)}) holds received data on a connection its "
                               "listener has not accepted yet, which this version cannot restore")
    return True


def _loopback(addr: str) -> bool:
    a = _norm(addr)
    return a.startswith("127.") or a == "::1"


def _after(a: int, b: int) -> bool:
    """Sequence number a comes after b (32-bit wrap-around, like the kernel's after())."""
    return ((b - a) & 0xFFFFFFFF) >= 0x80000000


def _repair_dump(pid: int, fd: int, sk: socket.socket, n, reuse: int) -> None:
    """The connection's state through TCP repair, read until two readings agree."""
    t = n.tcp
    for _ in range(_READS):
        state, opts, snd_ws, rcv_ws = tcprepair.tcp_info(sk)
        inq, outq, nsd = tcprepair.queue_lengths(sk)
        mss = sk.getsockopt(SOL_TCP, socket.TCP_MAXSEG)
        peek_off = n.peek_off
        tcprepair.repair(sk, tcprepair.REPAIR_ON)
        try:
            ts = tcprepair.get_timestamp(sk) if opts & tcprepair.TCPI_OPT_TIMESTAMPS else 0
            win = tcprepair.get_window(sk)
            if peek_off >= 0:
                sk.setsockopt(SOL_SOCKET, SO_PEEK_OFF, 0)
            rseq = tcprepair.get_seq(sk, tcprepair.TCP_RECV_QUEUE)
            rq = tcprepair.peek_queue(sk, tcprepair.TCP_RECV_QUEUE, inq)
            sseq = tcprepair.get_seq(sk, tcprepair.TCP_SEND_QUEUE)
            sq = tcprepair.peek_queue(sk, tcprepair.TCP_SEND_QUEUE, outq)
            again = (tcprepair.get_seq(sk, tcprepair.TCP_RECV_QUEUE), tcprepair.get_seq(sk, tcprepair.TCP_SEND_QUEUE))
            tcprepair.select_queue(sk, tcprepair.TCP_NO_QUEUE)
        finally:
            if peek_off >= 0:
                sk.setsockopt(SOL_SOCKET, SO_PEEK_OFF, peek_off)
            tcprepair.repair(sk, tcprepair.REPAIR_OFF_NO_WP)
            sk.setsockopt(SOL_SOCKET, SO_REUSEADDR, reuse)
        fin_sent, fin_received = state in _FIN_SENT, state in _FIN_RECEIVED
        want_sq = outq - (1 if state in _FIN_UNACKED else 0)
        if (again == (rseq, sseq) and len(rq) == inq and len(sq) == want_sq
                and tcprepair.queue_lengths(sk) == (inq, outq, nsd) and tcprepair.tcp_info(sk)[0] == state):
            break
    else:
        raise DumpError(f"process {pid}: fd {fd} ({_desc(n)}): its TCP queues kept changing while being read "
                        f"({_READS} tries); is its peer outside the tree still sending?")
    t.snd_seq = (sseq - (1 if fin_sent else 0)) & 0xFFFFFFFF
    t.rcv_seq = (rseq - (1 if fin_received else 0)) & 0xFFFFFFFF
    t.send_queue, t.recv_queue = sq, rq
    t.unsent = min(max(0, nsd - (1 if fin_sent and nsd else 0)), len(sq))
    t.fin_sent, t.fin_received = fin_sent, fin_received
    t.mss = mss
    t.sack = bool(opts & tcprepair.TCPI_OPT_SACK)
    t.wscale = bool(opts & tcprepair.TCPI_OPT_WSCALE)
    t.snd_wscale, t.rcv_wscale = snd_ws, rcv_ws
    t.timestamps = bool(opts & tcprepair.TCPI_OPT_TIMESTAMPS)
    t.timestamp = ts
    if win is not None:
        t.has_window = True
        t.snd_wl1, t.snd_wnd, t.max_window, t.rcv_wnd, t.rcv_wup = win
    n.state = state


def _dump_udp(st: _DumpState, pid: int, fd: int, sk: socket.socket, n) -> None:
    d = st.udp_diag(n.ino)
    if d is not None:
        n.state, n.shutdown = d.state, d.shutdown
        if not d.rqueue:
            return
    else:
        n.state = TCP_ESTABLISHED if n.dst_port else TCP_CLOSE
    old = n.peek_off
    sk.setsockopt(SOL_SOCKET, SO_PEEK_OFF, 0)
    try:
        while True:
            try:
                data, addr = sk.recvfrom(_MAX_DGRAM, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as e:
                log.warning("process %d: fd %d (%s): peeking its queue consumed a pending error: %s",
                            pid, fd, _desc(n), e)
                continue
            n.queue.add(data=data, addr=addr[0], port=addr[1])
    finally:
        sk.setsockopt(SOL_SOCKET, SO_PEEK_OFF, old)


# ----------------------------------------------------------------------------- restore

def _check(ctx, pid: int, fdentry, f: files_pb2.FileEntry) -> None:
    """Before any process exists: a connection to an outside peer from a --leave-running image
    cannot come back live (the original went on using it: its sequence numbers and queues
    moved on, and the peer knows only the original).  Connections inside the tree can: both
    of their ends come from the same image."""
    n = f.inet
    if _plain(ctx) and ctx.inherited(f) is None:
        inet_plain.check(ctx, pid, fdentry, n)
    if (n.proto == socket.IPPROTO_TCP and n.state in _CONNECTED and n.peer_kind == inet_pb2.INET_EXTERNAL
            and not n.closed and not ctx.options.tcp_close and ctx.inherited(f) is None
            and regfile.leave_running(ctx)):
        raise regfile.leave_running_hazard(
            f"process {pid}: fd {fdentry.fd}, TCP {_show(n.src_addr, n.src_port)} -> "
            f"{_show(n.dst_addr, n.dst_port)} (socket:[{n.ino}]) is an established connection to an outside "
            "peer, which the process kept using after the dump",
            "Restore with --tcp-close (the restored process finds the connection reset), or take a new "
            "checkpoint")


def _plain(ctx) -> bool:
    """Restore connections without TCP_REPAIR (inet_plain.py): we may not use it, or the image
    was dumped without it."""
    st = ctx.state(KIND)
    if st.plain is None:
        st.plain = not tcprepair.allowed() or any(
            f.kind == files_pb2.INET and f.inet.tcp.plain for f in ctx.files.values())
    return st.plain


class _Restorer:
    LISTEN, UDP, PLAIN, CONNECT, REPAIR, PENDING, CLOSED = range(7)

    def __init__(self, ctx):
        self.ctx = ctx
        self.ents, self.inh = by_ino(ctx, files_pb2.INET, "inet")
        self.socks: dict[int, socket.socket] = {}
        self.mode: dict[int, int] = {}
        self.bumped: set[int] = set()
        self._defaults: dict[tuple, dict] = {}
        self.plain = _plain(ctx)
        self.temps: list[socket.socket] = []     # stand-ins for closed peers (inet_plain.py)
        tcp_close = ctx.options.tcp_close
        for ino, f in self.ents.items():
            n = f.inet
            if n.proto == socket.IPPROTO_UDP:
                m = self.UDP
            elif n.state == TCP_LISTEN:
                m = self.LISTEN
            elif n.state == TCP_SYN_SENT:
                m = self.CONNECT
            elif n.state not in _CONNECTED:
                m = self.PLAIN
            elif n.closed or (n.peer_kind == inet_pb2.INET_EXTERNAL and tcp_close) or not n.HasField("tcp"):
                m = self.CLOSED
            elif n.peer_kind == inet_pb2.INET_PENDING:
                m = self.PENDING
            else:
                m = self.REPAIR
            self.mode[ino] = m

    def n(self, ino: int):
        return self.ents[ino].inet

    def _of(self, mode: int) -> list[int]:
        return [ino for ino, m in self.mode.items() if m == mode and ino not in self.inh]

    # -- the phases ------------------------------------------------------------------
    def run(self) -> None:
        try:
            for ino in self.ents:
                if ino not in self.inh:
                    self._create(ino)
            if self.plain:      # before the listeners: temporary ones take their ports meanwhile
                inet_plain.pairs(self)
            self._each(self._of(self.LISTEN), "bind and listen", self._listen)
            self._each([i for i in self._of(self.PLAIN) if self.n(i).src_port], "bind", self._bind)
            self._udp()
            if not self.plain:
                self._each(self._of(self.REPAIR), "rebuild (TCP repair)", self._repair)
            self._each(self._of(self.PENDING), "connect again", self._pending)
            self._each(self._of(self.CONNECT), "connect again", self._connect_again)
            if not self.plain:
                self._each(self._of(self.REPAIR), "leave repair mode", self._repair_off)
            self._each(list(self.socks), "set the options of", self._options)
            self._each(self._of(self.PENDING) + ([] if self.plain else self._of(self.REPAIR)),
                       "write the unsent data of", self._unsent)
            for ino in self.socks:
                self._shutdown(ino)
            self._each(self._of(self.CLOSED), "restore closed",
                       lambda ino: inet_plain.closed(self, ino) if self.plain else self._closed(ino))
            self._each(list(self.socks), "set the buffers and flags of", self._finish)
        except BaseException:
            for s in self.socks.values():
                s.close()
            raise
        finally:
            for s in self.temps:
                s.close()
        for ino, s in self.socks.items():
            self.ctx.remember(self.ents[ino].id, s.detach())

    def _each(self, inos: list[int], what: str, fn) -> None:
        for ino in inos:
            self._step(ino, what, fn, ino)

    def _step(self, ino: int, what: str, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            raise self._error(ino, what, e) from None

    def _error(self, ino: int, what: str, e: OSError) -> RestoreError:
        n = self.n(ino)
        hint = ""
        if e.errno == errno.EADDRINUSE and self.mode[ino] in (self.LISTEN, self.UDP, self.PLAIN):
            hint = (f"; the address is taken by another socket: free it, or hand in a replacement with "
                    f"--inherit-fd fd[N]:socket:[{n.ino}]")
        elif e.errno == errno.EADDRNOTAVAIL:
            hint = "; the address does not exist here, or the connection still exists (is the dumped process " \
                   "still running?)"
        return RestoreError(f"cannot {what} {_desc(n)}: {e.strerror or e}{hint}")

    def _create(self, ino: int) -> None:
        n = self.n(ino)
        try:
            s = socket.socket(n.family, n.type, n.proto)
        except OSError as e:
            raise self._error(ino, "create", e) from None
        self.socks[ino] = s
        for name, level, num, val in self._changed_opts(n, before_bind=True):
            try:
                s.setsockopt(level, num, val)
            except OSError as e:
                raise self._error(ino, f"set {name} on", e) from None

    def _changed_opts(self, n, before_bind: bool):
        """(name, level, number, value) of the saved options set before bind (or after it, but
        for the buffer sizes: _finish) whose value differs from a fresh socket's."""
        for o in n.opts:
            spec = _OPTS.get(o.name)
            if spec is None or spec[3] != before_bind or o.name in ("SO_RCVBUF", "SO_SNDBUF"):
                continue
            level, num, size, _pre, _scope = spec
            val = bytes(o.raw) if size else o.value
            if val != self._default(n).get(o.name):
                yield o.name, level, num, val

    def _default(self, n) -> dict:
        key = (n.family, n.type, n.proto)
        if key not in self._defaults:
            with socket.socket(n.family, n.type, n.proto) as s:
                self._defaults[key] = _get_opts(s, n.family, n.proto)
        return self._defaults[key]

    def _opt(self, n, name: str, default=0):
        for o in n.opts:
            if o.name == name:
                return bytes(o.raw) if _OPTS[name][2] else o.value
        return default

    def _bind(self, ino: int) -> None:
        self.socks[ino].bind(_addr(self.n(ino), True))

    def _listen(self, ino: int) -> None:
        if not self.plain:
            self._bind(ino)
            self.socks[ino].listen(self.n(ino).backlog)
            return
        # the rebuilt pairs' server ends (SO_REUSEADDR) may be on this port already
        s = self.socks[ino]
        s.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
        self._bind(ino)
        s.listen(self.n(ino).backlog)
        s.setsockopt(SOL_SOCKET, SO_REUSEADDR, int(self._opt(self.n(ino), "SO_REUSEADDR")))


    def _udp(self) -> None:
        udp = self._of(self.UDP)
        self._each([i for i in udp if self.n(i).src_port], "bind", self._bind)
        for ino in udp:
            if self.n(ino).queue:
                self._step(ino, "write back the queued datagrams of", self._fill, ino, udp)
        for ino in udp:
            n = self.n(ino)
            if n.state == TCP_ESTABLISHED and n.dst_port:
                self._step(ino, "connect", self.socks[ino].connect, _addr(n, False))

    def _fill(self, ino: int, udp: list[int]) -> None:
        """Send the queued datagrams again, while nothing is connected yet, from their sender's
        address when possible: a socket of the image bound to it, or a temporary one."""
        n, s = self.n(ino), self.socks[ino]
        dest = list(_addr(n, True))
        if _wildcard(dest[0]):
            dest[0] = "::1" if n.family == socket.AF_INET6 else "127.0.0.1"
        dest = tuple(dest)
        need = sum(len(p.data) + 1024 for p in n.queue) * 2
        if need > s.getsockopt(SOL_SOCKET, socket.SO_RCVBUF):
            set_buffer(s, socket.SO_RCVBUF, need // 2)
            self.bumped.add(ino)
        temps: dict[tuple, socket.socket] = {}
        lost = 0
        try:
            for p in n.queue:
                sender = None
                for other in udp:
                    on = self.n(other)
                    if (on.family == n.family and on.src_port == p.port
                            and (_norm(on.src_addr) == _norm(p.addr) or _wildcard(on.src_addr))):
                        sender = self.socks[other]
                        break
                if sender is None:
                    key = (p.addr, p.port)
                    sender = temps.get(key)
                    if sender is None:
                        sender = temps[key] = socket.socket(n.family, socket.SOCK_DGRAM)
                        try:
                            sender.bind((p.addr, p.port) if n.family == socket.AF_INET else (p.addr, p.port, 0, 0))
                        except OSError:
                            lost += 1
                sender.sendto(p.data, socket.MSG_DONTWAIT, dest)
        finally:
            for t in temps.values():
                t.close()
        if lost:
            log.warning("%s: %d queued datagram sender address(es) could not be bound again; those datagrams "
                        "now come from a temporary address", _desc(n), lost)

    def _bufs(self, ino: int, rlen: int, slen: int) -> None:
        """Room for the queues about to be written (before connect: the window follows rcvbuf)."""
        n, s = self.n(ino), self.socks[ino]
        for opt, qlen in ((socket.SO_RCVBUF, rlen), (socket.SO_SNDBUF, slen)):
            want = int(self._opt(n, "SO_RCVBUF" if opt == socket.SO_RCVBUF else "SO_SNDBUF"))
            need = 2 * qlen + (1 << 16) if qlen else 0
            if max(want, need) > s.getsockopt(SOL_SOCKET, opt):
                set_buffer(s, opt, max(want, need) // 2 + 1)
                self.bumped.add(ino)

    def _peer_replays_fin(self, n) -> bool:
        if n.peer_kind != inet_pb2.INET_IN_IMAGE or n.peer_ino not in self.ents or n.peer_ino in self.inh:
            return False
        return self.mode[n.peer_ino] == self.REPAIR and self.n(n.peer_ino).tcp.fin_sent

    def _repair(self, ino: int) -> None:
        n, s = self.n(ino), self.socks[ino]
        t = n.tcp
        tcprepair.repair(s, tcprepair.REPAIR_ON)
        s.bind(_addr(n, True))
        shift = t.fin_received and not self._peer_replays_fin(n)
        tcprepair.set_seq(s, tcprepair.TCP_RECV_QUEUE, t.rcv_seq + shift - len(t.recv_queue))
        tcprepair.set_seq(s, tcprepair.TCP_SEND_QUEUE, t.snd_seq - len(t.send_queue))
        tcprepair.select_queue(s, tcprepair.TCP_NO_QUEUE)
        self._bufs(ino, len(t.recv_queue), len(t.send_queue))
        s.connect(_addr(n, False))
        tcprepair.set_options(s, t.mss, t.sack, (t.snd_wscale, t.rcv_wscale) if t.wscale else None, t.timestamps)
        if t.timestamps:
            tcprepair.set_timestamp(s, t.timestamp)
        if t.recv_queue:
            tcprepair.write_queue(s, tcprepair.TCP_RECV_QUEUE, bytes(t.recv_queue))
        sent = len(t.send_queue) - t.unsent
        if sent > 0:
            tcprepair.write_queue(s, tcprepair.TCP_SEND_QUEUE, bytes(t.send_queue[:sent]))
        if t.has_window:
            rcv_nxt = (t.rcv_seq + shift) & 0xFFFFFFFF
            rcv_wnd, rcv_wup, snd_wl1 = t.rcv_wnd, t.rcv_wup, t.snd_wl1
            if t.fin_received and not shift:
                rcv_wup, rcv_wnd = (rcv_wup - 1) & 0xFFFFFFFF, rcv_wnd + 1
            # The kernel refuses what a live socket may well have (snd_wl1 is the sequence
            # number of the last segment that updated the window, which can lie beyond a
            # closed window): keep within its checks; a lower snd_wl1 only lets the next
            # window update in.
            if _after(snd_wl1, rcv_nxt + rcv_wnd):
                snd_wl1 = rcv_nxt
            if _after(rcv_wup, rcv_nxt):
                rcv_wup = rcv_nxt
            tcprepair.set_window(s, (snd_wl1, t.snd_wnd, max(t.max_window, t.snd_wnd), rcv_wnd, rcv_wup))
        tcprepair.select_queue(s, tcprepair.TCP_NO_QUEUE)

    def _repair_off(self, ino: int) -> None:
        n, s = self.n(ino), self.socks[ino]
        live_peer = n.peer_kind == inet_pb2.INET_EXTERNAL or (
            n.peer_kind == inet_pb2.INET_IN_IMAGE and n.peer_ino in self.ents and n.peer_ino not in self.inh)
        tcprepair.repair(s, tcprepair.REPAIR_OFF if live_peer else tcprepair.REPAIR_OFF_NO_WP)
        s.setsockopt(SOL_SOCKET, SO_REUSEADDR, int(self._opt(n, "SO_REUSEADDR")))

    def _bind_forced(self, ino: int) -> None:
        """bind() to a port that an old connection may still hold (repair mode may share it)."""
        n, s = self.n(ino), self.socks[ino]
        if not n.src_port:
            return
        if self.plain:
            inet_plain.bind_old(self, ino)
            return
        tcprepair.repair(s, tcprepair.REPAIR_ON)
        s.bind(_addr(n, True))
        tcprepair.repair(s, tcprepair.REPAIR_OFF_NO_WP)
        s.setsockopt(SOL_SOCKET, SO_REUSEADDR, int(self._opt(n, "SO_REUSEADDR")))

    def _pending(self, ino: int) -> None:
        n, s = self.n(ino), self.socks[ino]
        self._step(ino, "bind", self._bind_forced, ino)
        self._bufs(ino, 0, len(n.tcp.send_queue))
        s.settimeout(10.0)      # a full backlog would block
        try:
            s.connect(_addr(n, False))
        except OSError as e:
            log.warning("%s waited in the accept queue of socket:[%d], and cannot connect to it again (%s): "
                        "restored closed", _desc(n), n.listener_ino, e.strerror or e)
            s.close()
            del self.socks[ino]
            self._create(ino)
            self.mode[ino] = self.CLOSED
        finally:
            if ino in self.socks:
                self.socks[ino].settimeout(None)

    def _connect_again(self, ino: int) -> None:
        n, s = self.n(ino), self.socks[ino]
        self._bind_forced(ino)
        s.setblocking(False)
        err = s.connect_ex(_addr(n, False))
        if err not in (0, errno.EINPROGRESS):
            log.warning("%s: connecting again failed: %s", _desc(n), os.strerror(err))

    def _options(self, ino: int) -> None:
        n, s = self.n(ino), self.socks[ino]
        for name, level, num, val in self._changed_opts(n, before_bind=False):
            if name == "TCP_CONGESTION":
                val = val.split(b"\0", 1)[0]
            try:
                s.setsockopt(level, num, val)
            except OSError as e:
                if name in ("SO_MARK", "SO_PRIORITY", "TCP_CONGESTION"):
                    log.warning("%s: cannot set %s again: %s", _desc(n), name, e.strerror or e)
                    continue
                raise OSError(e.errno, f"{name}: {e.strerror}") from None

    def _unsent(self, ino: int) -> None:
        n, s = self.n(ino), self.socks[ino]
        t = n.tcp
        data = bytes(t.send_queue) if self.mode[ino] == self.PENDING else \
            bytes(t.send_queue[len(t.send_queue) - t.unsent:]) if t.unsent else b""
        view = memoryview(data)
        while view:
            k = s.send(view, socket.MSG_DONTWAIT)
            view = view[k:]

    def _shutdown(self, ino: int) -> None:
        n, s = self.n(ino), self.socks[ino]
        if self.mode[ino] not in (self.REPAIR, self.PENDING, self.UDP):
            return
        how = n.shutdown & 3
        if n.HasField("tcp") and n.tcp.fin_sent:
            how |= 2
        if how:
            # ENOTCONN on an unconnected UDP socket, for one, is no failure (the flags are set anyway)
            with contextlib.suppress(OSError):
                s.shutdown(_SHUT[how])

    def _closed(self, ino: int) -> None:
        """A connection the process must find closed: rebuilt in repair mode, then reset."""
        n, s = self.n(ino), self.socks[ino]
        t = n.tcp
        tcprepair.repair(s, tcprepair.REPAIR_ON)
        connected = False
        try:
            s.bind(_addr(n, True))
            tcprepair.set_seq(s, tcprepair.TCP_RECV_QUEUE, t.rcv_seq + (1 if t.fin_received else 0))
            tcprepair.set_seq(s, tcprepair.TCP_SEND_QUEUE, t.snd_seq)
            tcprepair.select_queue(s, tcprepair.TCP_NO_QUEUE)
            s.connect(_addr(n, False))
            connected = True
        except OSError as e:
            log.info("%s: restored closed without its old address (%s)", _desc(n), e.strerror or e)
        tcprepair.repair(s, tcprepair.REPAIR_OFF_NO_WP)
        if connected:
            tcprepair.disconnect(s)         # RST to the peer; ECONNRESET for the process
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)    # then end of file

    def _finish(self, ino: int) -> None:
        n, s = self.n(ino), self.socks[ino]
        dflt = self._default(n)
        for name, opt in (("SO_RCVBUF", socket.SO_RCVBUF), ("SO_SNDBUF", socket.SO_SNDBUF)):
            val = int(self._opt(n, name))
            if val and (val != dflt.get(name) or ino in self.bumped):
                set_buffer(s, opt, val // 2)
        if n.peek_off >= 0:
            s.setsockopt(SOL_SOCKET, SO_PEEK_OFF, n.peek_off)
        set_status_flags(s.fileno(), self.ents[ino].flags)


class _RestoreState(Built):
    plain: bool | None = None       # connections without TCP_REPAIR (_plain)


class Inet(BuiltTogether):
    """Dump state: _DumpState; every socket is built at the first open (_Restorer)."""

    def new_restore_state(self, ctx) -> _RestoreState:
        return _RestoreState()

    new_dump_state = staticmethod(_DumpState)
    dump = staticmethod(_dump)
    check = staticmethod(_check)
    restorer = _Restorer

    def name(self, f) -> str:
        return _desc(f.inet)

    def external_key(self, f) -> str:
        return f"socket:[{f.inet.ino}]"

    def facts(self, f) -> dict:
        return dict(ino=f.inet.ino, port=f.inet.src_port, listening=f.inet.state == TCP_LISTEN)


KIND = Inet()


# ----------------------------------------------------------------------------- replacing a live tree

def hold_internal(pids: list[int]) -> list[int]:
    """Before a tree that was dumped with --leave-running is killed to restore its image in
    its place: every TCP connection whose two ends are both in the tree goes into repair
    mode through a duplicate we keep, so the kill ends it without FIN or RST and leaves no
    TIME_WAIT holding the address pair the restored copy needs.  Connections to outside
    peers are left alone: they close normally, so the peers learn at once.  Returns the
    duplicates; close them once the tree is dead."""
    from ..sys import memory
    socks: dict[tuple, int] = {}
    for pid in pids:
        try:
            pidfd = memory.pidfd_open(pid)
        except EngineError:
            continue
        try:
            for fd in proc.fds(pid):
                try:
                    if not proc.fdlink(pid, fd).startswith("socket:"):
                        continue
                    dup = memory.pidfd_getfd(pidfd, fd, pid)
                except (OSError, EngineError):
                    continue
                sk = socket.socket(fileno=dup)
                try:
                    if sk.type != socket.SOCK_STREAM or sk.family not in (socket.AF_INET, socket.AF_INET6):
                        raise OSError
                    key = (sk.getsockname()[:2], sk.getpeername()[:2])
                except OSError:
                    sk.close()
                    continue
                if key in socks:
                    sk.close()
                else:
                    socks[key] = sk.detach()
        finally:
            os.close(pidfd)
    held = []
    for (local, peer), fd in socks.items():
        if (peer, local) in socks:
            _silence(fd)
            held.append(fd)
        else:
            os.close(fd)
    return held
