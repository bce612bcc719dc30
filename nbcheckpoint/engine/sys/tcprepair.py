"""TCP repair mode (TCP_REPAIR, Linux >= 3.5; TCP_REPAIR_WINDOW >= 4.8) and the socket
ioctls that go with it: how a live connection's state is read and a connection is rebuilt
without a packet being sent.  Model: CRIU's libsoccr.  Needs CAP_NET_ADMIN.

In repair mode a socket

* binds to any address and port (SK_FORCE_REUSE), even one a listener holds;
* takes its sequence numbers from TCP_QUEUE_SEQ (per queue, before connect) and its
  negotiated options from TCP_REPAIR_OPTIONS (after connect, before any data);
* connect()s without a SYN (straight to ESTABLISHED);
* MSG_PEEKs either queue (TCP_REPAIR_QUEUE), and send() appends to the chosen queue:
  to the receive queue as if the bytes had arrived, to the send queue as sent-but-unacked;
* closes without a FIN or RST.

Leaving it (TCP_REPAIR 0) sends a window probe, or nothing with TCP_REPAIR_OFF_NO_WP, and
resets SO_REUSEADDR (the caller sets it again).  Failures raise SysError.

:func:`allowed` says whether this process may use it at all (an ordinary user may not:
files/inet_plain.py is the way without it).
"""
from __future__ import annotations

import array
import ctypes
import fcntl
import os
import socket
import struct

from ..errors import SysError
from .libc import check, libc

SOL_TCP = socket.IPPROTO_TCP
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS = 19, 20, 21, 22
TCP_TIMESTAMP, TCP_REPAIR_WINDOW = 24, 29
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
REPAIR_ON, REPAIR_OFF, REPAIR_OFF_NO_WP = 1, 0, -1
TCPOPT_MSS, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = 0x541B, 0x5411, 0x894B

_WINDOW = struct.Struct("=5I")      # snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup
_U32 = struct.Struct("=I")
_QNAMES = {TCP_RECV_QUEUE: "receive", TCP_SEND_QUEUE: "send"}


# Hidden test knob: "1" makes allowed() False, so that root's test runs exercise the way
# without TCP_REPAIR too (tests/test_inet_sockets.py).
FORCE_PLAIN_ENV = "NBCHECKPOINT_NO_TCP_REPAIR"
_allowed: dict[int, bool] = {}      # network namespace inode -> may we


def allowed() -> bool:
    """May this process use TCP_REPAIR in its network namespace (CAP_NET_ADMIN over it)?
    Probed once per namespace on a fresh socket (a closed socket may enter repair mode)."""
    if os.environ.get(FORCE_PLAIN_ENV) == "1":
        return False
    ns = os.stat("/proc/self/ns/net").st_ino
    if ns not in _allowed:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sk:
            try:
                sk.setsockopt(SOL_TCP, TCP_REPAIR, REPAIR_ON)
                sk.setsockopt(SOL_TCP, TCP_REPAIR, REPAIR_OFF_NO_WP)
                _allowed[ns] = True
            except PermissionError:
                _allowed[ns] = False
    return _allowed[ns]


def _fail(e: OSError, request: str) -> SysError:
    return SysError(e.errno or 0, request)


def _setopt(sk: socket.socket, opt: int, val, request: str) -> None:
    try:
        sk.setsockopt(SOL_TCP, opt, val)
    except OSError as e:
        raise _fail(e, request) from None


def repair(sk: socket.socket, mode: int) -> None:
    """REPAIR_ON, REPAIR_OFF (sends a window probe) or REPAIR_OFF_NO_WP."""
    _setopt(sk, TCP_REPAIR, mode, f"setsockopt(TCP_REPAIR, {mode})")


def tcp_info(sk: socket.socket) -> tuple[int, int, int, int]:
    """(state, tcpi_options, snd_wscale, rcv_wscale) from TCP_INFO."""
    try:
        info = sk.getsockopt(SOL_TCP, socket.TCP_INFO, 104)
    except OSError as e:
        raise _fail(e, "getsockopt(TCP_INFO)") from None
    return info[0], info[5], info[6] & 0xF, info[6] >> 4


def _ioctl_int(sk: socket.socket, req: int, name: str) -> int:
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sk.fileno(), req, buf)
    except OSError as e:
        raise _fail(e, f"ioctl({name})") from None
    return buf[0]


def queue_lengths(sk: socket.socket) -> tuple[int, int, int]:
    """(SIOCINQ, SIOCOUTQ, SIOCOUTQNSD): bytes unread; not yet acked (a FIN counts one);
    never sent (a FIN counts one)."""
    return (_ioctl_int(sk, SIOCINQ, "SIOCINQ"), _ioctl_int(sk, SIOCOUTQ, "SIOCOUTQ"),
            _ioctl_int(sk, SIOCOUTQNSD, "SIOCOUTQNSD"))


def select_queue(sk: socket.socket, queue: int) -> None:
    _setopt(sk, TCP_REPAIR_QUEUE, queue, f"setsockopt(TCP_REPAIR_QUEUE, {queue})")


def get_seq(sk: socket.socket, queue: int) -> int:
    """The send queue's write_seq or the receive queue's rcv_nxt (repair mode)."""
    select_queue(sk, queue)
    try:
        return sk.getsockopt(SOL_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
    except OSError as e:
        raise _fail(e, f"getsockopt(TCP_QUEUE_SEQ, {_QNAMES[queue]} queue)") from None


def set_seq(sk: socket.socket, queue: int, seq: int) -> None:
    """The first sequence number of a queue; only on a closed (not yet connected) socket."""
    select_queue(sk, queue)
    _setopt(sk, TCP_QUEUE_SEQ, _U32.pack(seq & 0xFFFFFFFF),
            f"setsockopt(TCP_QUEUE_SEQ, {_QNAMES[queue]} queue)")


def peek_queue(sk: socket.socket, queue: int, length: int) -> bytes:
    """Up to `length` bytes of a queue, not consumed (asks for one more byte, so a longer
    queue shows as a longer result)."""
    select_queue(sk, queue)
    if length <= 0:
        return b""
    try:
        return sk.recv(length + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""
    except OSError as e:
        raise _fail(e, f"recv(MSG_PEEK, {_QNAMES[queue]} queue)") from None


def write_queue(sk: socket.socket, queue: int, data: bytes) -> None:
    """Append to a queue in repair mode: the receive queue (as if received) or the send
    queue (as sent and waiting for its ACK).  The buffers must have room (SO_*BUFFORCE)."""
    select_queue(sk, queue)
    view = memoryview(data)
    chunk = len(view)
    while view:
        try:
            n = sk.send(view[:chunk], socket.MSG_DONTWAIT)
        except OSError as e:
            if chunk > 4096 and e.errno in (12, 11):   # ENOMEM (one linear skb too big), EAGAIN
                chunk //= 2
                continue
            raise _fail(e, f"send(repair, {_QNAMES[queue]} queue, {len(view)} of {len(data)} bytes left)") \
                from None
        view = view[n:]


def get_window(sk: socket.socket) -> tuple[int, int, int, int, int] | None:
    """(snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup), or None on kernels before 4.8."""
    try:
        return _WINDOW.unpack(sk.getsockopt(SOL_TCP, TCP_REPAIR_WINDOW, _WINDOW.size))
    except OSError as e:
        if e.errno == 92:       # ENOPROTOOPT
            return None
        raise _fail(e, "getsockopt(TCP_REPAIR_WINDOW)") from None


def set_window(sk: socket.socket, win: tuple[int, int, int, int, int]) -> None:
    _setopt(sk, TCP_REPAIR_WINDOW, _WINDOW.pack(*win), "setsockopt(TCP_REPAIR_WINDOW)")


def set_options(sk: socket.socket, mss: int, sack: bool, wscale: tuple[int, int] | None,
                timestamps: bool) -> None:
    """The options the handshake negotiated (after connect, before any data is queued)."""
    opts = []
    if sack:
        opts.append((TCPOPT_SACK_PERM, 0))
    if wscale is not None:
        opts.append((TCPOPT_WINDOW, wscale[0] | (wscale[1] << 16)))
    if timestamps:
        opts.append((TCPOPT_TIMESTAMP, 0))
    if mss:
        opts.append((TCPOPT_MSS, mss))
    if opts:
        _setopt(sk, TCP_REPAIR_OPTIONS, b"".join(struct.pack("=II", c, v) for c, v in opts),
                "setsockopt(TCP_REPAIR_OPTIONS)")


def get_timestamp(sk: socket.socket) -> int:
    try:
        return sk.getsockopt(SOL_TCP, TCP_TIMESTAMP) & 0xFFFFFFFF
    except OSError as e:
        raise _fail(e, "getsockopt(TCP_TIMESTAMP)") from None


def set_timestamp(sk: socket.socket, ts: int) -> None:
    _setopt(sk, TCP_TIMESTAMP, _U32.pack(ts & 0xFFFFFFFF), "setsockopt(TCP_TIMESTAMP)")


_connect = libc.connect
_connect.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def disconnect(sk: socket.socket) -> None:
    """connect(AF_UNSPEC): tcp_disconnect().  Outside repair mode an established connection
    sends a RST and the socket is left CLOSE with ECONNRESET pending; in repair mode nothing is
    sent and ECONNABORTED is pending."""
    sa = struct.pack("=H14s", socket.AF_UNSPEC, b"")
    check(_connect(sk.fileno(), sa, len(sa)), "connect(AF_UNSPEC)")
