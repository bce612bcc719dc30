"""The network lock: outside peers' packets are dropped while their connections sleep in an image.

A dump that kills the tree with ``--tcp-established`` reads each connection to an outside
peer with TCP repair (files/inet.py).  Without a lock, what the peer sends after that is
acknowledged by our kernel and lost (the image has the queues as they were), and once the
socket is gone the peer's next segment meets a RST: the connection the image holds is dead
before it is restored.  CRIU closes this with netfilter; so do we, with nftables rules that
drop both directions of each such connection (nft(8), through libnftables: sys/nftables.py):

1. dump, before the first such connection is read: table ``inet nbck_dump_<engine pid>``,
   with ``flags owner``, so the kernel deletes it when the engine's netlink socket closes --
   an engine killed mid-dump leaves no lock on the tree that then runs on;
2. dump, once the tree is killed: the same rules in table ``inet nbck_<token>`` (no owner),
   named in the image's inventory (``network_lock``), before the first table goes with the
   dump's end; the peer's TCP keeps retransmitting into it;
3. restore, once the tree runs with its connections rebuilt: that table is deleted, and the
   peer's next retransmission reaches the restored socket.  A restore on another machine
   finds no such table there (``nbcheckpoint unlock DIR`` removes one left behind).

Leave-running dumps take no lock: the original keeps its connections and goes on with them.
Without libnftables the dump goes on unlocked, with a warning.
"""
from __future__ import annotations

import logging
import os
import secrets

from .errors import ImageError
from .sys import nftables

log = logging.getLogger(__name__)

PREFIX = "nbck_"


def _match(family: int, src: str, sport: int, dst: str, dport: int) -> str:
    """An nft match for packets from src:sport to dst:dport."""
    if src.startswith("::ffff:") and "." in src:        # IPv4 on an IPv6 socket
        src, dst, family = src[7:], dst[7:] if dst.startswith("::ffff:") else dst, 2
    ip = "ip" if family == 2 else "ip6"
    return f"{ip} saddr {src} tcp sport {sport} {ip} daddr {dst} tcp dport {dport}"


def _table(name: str, rules: list[str], owner: bool) -> str:
    flags = "flags owner; " if owner else ""
    body = [f"add table inet {name} {{ {flags}}}",
            f"add chain inet {name} in {{ type filter hook input priority -300; policy accept; }}",
            f"add chain inet {name} out {{ type filter hook output priority -300; policy accept; }}"]
    for chain, match in rules:
        body.append(f"add rule inet {name} {chain} {match} drop")
    return "\n".join(body) + "\n"


class DumpLock:
    """The lock of one dump (phases 1 and 2 above)."""

    def __init__(self):
        self.rules: list[tuple[str, str]] = []
        self.name: str | None = None        # the lasting table, once persist() made it
        self._nft: nftables.Nft | None = None
        self._broken: str | None = None

    @property
    def active(self) -> bool:
        return bool(self.rules) and self._nft is not None

    def add(self, family: int, src: str, sport: int, dst: str, dport: int, what: str) -> None:
        """Drop the packets of this connection from now on (both directions)."""
        if self._broken:
            return
        if self._nft is None:
            try:
                self._nft = nftables.Nft()
            except nftables.NftError as e:
                self._broken = str(e)
                log.warning("no network lock for the connections to outside peers (%s): bytes a peer sends "
                            "while the tree is checkpointed are lost, and the connection may be reset", e)
                return
        new = [("in", _match(family, dst, dport, src, sport)), ("out", _match(family, src, sport, dst, dport))]
        table = f"{PREFIX}dump_{os.getpid()}"
        try:
            if not self.rules:
                self._nft.run(_table(table, new, owner=True))
            else:
                self._nft.run("".join(f"add rule inet {table} {c} {m} drop\n" for c, m in new))
        except nftables.NftError as e:
            self._broken = str(e)
            log.warning("no network lock for %s: %s", what, e)
            return
        self.rules += new

    def new_name(self) -> str | None:
        """The lasting table's name, chosen before the image is committed (it goes in it)."""
        if self.active and self.name is None:
            self.name = PREFIX + secrets.token_hex(6)
        return self.name

    def persist(self) -> None:
        """The tree is dead: the rules outlive the engine, in the table new_name() chose."""
        if self.active and self.name:
            self._nft.run(_table(self.name, self.rules, owner=False))

    def close(self) -> None:
        """The dump is over: the owned table goes (a persisted one stays)."""
        if self._nft is not None:
            self._nft.close()
            self._nft = None


def unlock(name: str) -> bool:
    """Delete a lasting lock table; False if there is none here (restored elsewhere, or gone)."""
    if not name.startswith(PREFIX) or not name[len(PREFIX):].replace("_", "").isalnum():
        raise ImageError(f"the image names the network lock {name!r}, which is not the name of an nbcheckpoint "
                         f"lock ({PREFIX} then letters, digits or '_'): its inventory is damaged; nothing was removed")
    if nftables.available() is not None:
        return False
    with nftables.Nft() as nft:
        if f"table inet {name}" not in nft.run("list tables").splitlines():
            return False
        nft.run(f"delete table inet {name}\n")
    return True
