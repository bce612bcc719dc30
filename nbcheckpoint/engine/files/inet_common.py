"""What both ways of dumping and restoring TCP share -- inet.py (TCP repair) and inet_plain.py
(without it): the TCP states that matter, SO_PEEK_OFF, and a socket's addresses as its image
entry (inet_pb2.InetSk) gives them, for binding and for messages."""
from __future__ import annotations

import socket

from ..sys import sockdiag

SO_PEEK_OFF = 42        # not in Python's socket module
CONNECTED = {sockdiag.TCP_ESTABLISHED, sockdiag.TCP_FIN_WAIT1, sockdiag.TCP_FIN_WAIT2, sockdiag.TCP_CLOSE_WAIT,
             sockdiag.TCP_LAST_ACK, sockdiag.TCP_CLOSING}
FIN_SENT = {sockdiag.TCP_FIN_WAIT1, sockdiag.TCP_FIN_WAIT2, sockdiag.TCP_CLOSING, sockdiag.TCP_LAST_ACK}
FIN_RECEIVED = {sockdiag.TCP_CLOSE_WAIT, sockdiag.TCP_CLOSING, sockdiag.TCP_LAST_ACK}


def norm(addr: str) -> str:
    """An address as the other end sees it: IPv4-mapped IPv6 addresses as IPv4."""
    if addr.startswith("::ffff:") and "." in addr:
        return addr[7:]
    return addr


def show(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def wildcard(addr: str) -> bool:
    return addr in ("0.0.0.0", "::")


def desc(n) -> str:
    proto = "TCP" if n.proto == socket.IPPROTO_TCP else "UDP"
    what = f"{proto} socket:[{n.ino}]"
    if n.src_port:
        what += f" {show(n.src_addr, n.src_port)}"
    if n.dst_port:
        what += f" -> {show(n.dst_addr, n.dst_port)}"
    return what


def addr(n, local: bool) -> tuple:
    """N's local (or peer) address as bind() and connect() take it."""
    a, port, scope = (n.src_addr, n.src_port, n.src_scope) if local else (n.dst_addr, n.dst_port, n.dst_scope)
    if n.family == socket.AF_INET6:
        return (a or "::", port, 0, scope)
    return (a or "0.0.0.0", port)
