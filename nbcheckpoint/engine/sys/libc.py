"""The one chokepoint for raw system calls made by the engine itself.

Every call into libc that can fail goes through :func:`check`, which turns
``-1``/``errno`` into a :class:`SysError` carrying the request name and the pid
it was about.  Nothing else in the engine touches ``ctypes.get_errno``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct

from ..errors import SysError
from .x86_64 import NR

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

_syscall = libc.syscall
_syscall.restype = ctypes.c_long


def check(result: int, request: str, pid: int | None = None) -> int:
    """Raise SysError for a libc-style failure (-1 with errno set)."""
    if result == -1:
        err = ctypes.get_errno()
        raise SysError(err, request, pid)
    return result


def syscall(nr: int, *args, request: str, pid: int | None = None) -> int:
    """Raw syscall(2) from the engine process itself."""
    # ints become longs (ctypes would truncate them to int); pointers pass as they are.
    cargs = [ctypes.c_long(0 if a is None else a) if a is None or isinstance(a, int) else a for a in args]
    return check(_syscall(ctypes.c_long(nr), *cargs), request, pid)


def address_of(buf) -> int:
    """The address of a writable buffer (bytearray, mmap), for calls that take a pointer;
    the caller keeps `buf` alive, and unresized, while the address is in use."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def prlimit(pid: int, res: int, new: tuple[int, int] | None = None) -> tuple[int, int]:
    """prlimit64(2): the (soft, hard) limit `res` of `pid`, setting `new` if given."""
    old = bytearray(16)                                 # struct rlimit64
    syscall(NR["prlimit64"], pid, res, struct.pack("<QQ", *new) if new else None, address_of(old),
            request=f"prlimit64(resource {res})", pid=pid)
    return struct.unpack("<QQ", old)


def get_robust_list(tid: int) -> tuple[int, int]:
    """get_robust_list(2): the (head, len) of thread `tid`'s robust futex list."""
    head, ln = bytearray(8), bytearray(8)
    syscall(NR["get_robust_list"], tid, address_of(head), address_of(ln), request="get_robust_list", pid=tid)
    return int.from_bytes(head, "little"), int.from_bytes(ln, "little")


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
