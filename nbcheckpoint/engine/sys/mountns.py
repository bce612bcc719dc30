"""A mount namespace of the engine's own with a devpts instance of its own at /dev/pts.

A pty comes back with its old index only if that index is free, and on the host's devpts
other terminals hold the low ones: a restore into a new PID namespace (its init copies the
engine's mount namespace) gives the tree an empty instance instead, where every index is
free -- and its processes see their terminal at the /dev/pts/N they knew.  devpts may be
mounted inside a user namespace, so this works without root too.
"""
from __future__ import annotations

import ctypes

from .libc import syscall
from .x86_64 import NR

CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000


def _mount(source, target: str, fstype, flags: int, data) -> None:
    enc = lambda v: ctypes.c_char_p(v.encode()) if v is not None else None    # noqa: E731
    syscall(NR["mount"], enc(source), enc(target), enc(fstype), flags, enc(data),
            request=f"mount({fstype or 'bind'} on {target})")


def private_devpts() -> None:
    """unshare(CLONE_NEWNS), make every mount private, mount a new devpts instance on /dev/pts
    and bind its ptmx on /dev/ptmx.  For good: the calling process keeps this mount namespace.
    Raises SysError (e.g. EPERM without CAP_SYS_ADMIN over our user namespace)."""
    syscall(NR["unshare"], CLONE_NEWNS, request="unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    _mount("devpts", "/dev/pts", "devpts", 0, "newinstance,ptmxmode=0666,mode=0620")
    _mount("/dev/pts/ptmx", "/dev/ptmx", None, MS_BIND, None)

