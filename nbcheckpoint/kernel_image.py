"""How a Jupyter kernel is dumped and restored, and what its checkpoint records.

Shared by the shim (jupyter/operations.py) and the helper of kernels the shim did not
start (kernel/helper.py).  Uses the engine; imports nothing from Jupyter.
"""
from __future__ import annotations

from ._version import __version__
from .control import CHANNELS
from .engine import Options
from .engine.show import objects
from .store import CheckpointMeta


def dump_options() -> Options:
    """The kernel runs on (leave_running) with its clients' connections (tcp_established),
    its file locks, its control socket whose peer is the shim (ext_unix_sk) and its
    terminal, which is outside the tree (shell_job: the shim's pty, or the terminal of a
    server run from a shell)."""
    return Options(leave_running=True, tcp_established=True, file_locks=True, ext_unix_sk=True,
                   shell_job=True)


def restore_options(pidns: bool, lazy_pages: bool, inherit_fd: dict[str, int]) -> Options:
    """The counterpart of dump_options() for the shim: the clients' connections come back
    closed (they reconnect); with a PID namespace, lazily and dying with the shim (lifeline)."""
    return Options(tcp_close=True, shell_job=True, file_locks=True, ext_unix_sk=True, pidns=pidns,
                   lazy_pages=pidns and lazy_pages, lifeline=pidns, inherit_fd=inherit_fd)


def checkpoint_meta(image, stats, conn: dict, created: float, **fields) -> CheckpointMeta:
    """The metadata of a kernel just dumped into `image` (engine.dump's `stats`) with
    connection file `conn`; `fields` are the builder's own."""
    return CheckpointMeta(created=created, pages_bytes=stats.pages_bytes, frozen_s=round(stats.frozen_seconds, 4),
                          total_s=round(stats.total_seconds, 4), connection=conn,
                          listeners=_channel_listeners(image, conn), engine_version=__version__, **fields)


def _channel_listeners(image, conn: dict) -> dict[str, int]:
    """{channel: socket inode} of the kernel's five listeners in the image."""
    ports = {conn.get(f"{c}_port"): c for c in CHANNELS}
    out: dict[str, int] = {}
    for o in objects(image):
        if o["kind"] == "inet" and o.get("listening") and o["port"] in ports:
            out.setdefault(ports[o["port"]], o["ino"])
    return out


def outside_terminals(image) -> list[str]:
    """The --inherit-fd keys of the terminals in the image that were outside the tree."""
    return [o["key"] for o in objects(image) if o["kind"] == "tty" and o["external"] and o["key"]]
