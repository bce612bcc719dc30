"""ioctl(2) from the engine itself, through the chokepoint (failures raise SysError)."""
from __future__ import annotations

import ctypes
import struct

from .libc import syscall
from .x86_64 import NR


def ioctl_buf(fd: int, req: int, name: str, data: bytes | int, pid: int | None = None) -> bytes:
    """ioctl with a pointer argument: `data` in (an int: that many zero bytes), the buffer's contents out."""
    raw = bytes(data) if isinstance(data, int) else data
    buf = ctypes.create_string_buffer(raw, len(raw))
    syscall(NR["ioctl"], fd, req, buf, request=f"ioctl({name})", pid=pid)
    return buf.raw


def get_int(fd: int, req: int, name: str, pid: int | None = None) -> int:
    return struct.unpack("i", ioctl_buf(fd, req, name, 4, pid))[0]


def set_int(fd: int, req: int, name: str, value: int, pid: int | None = None) -> None:
    ioctl_buf(fd, req, name, struct.pack("i", value), pid)


def ioctl(fd: int, req: int, name: str, value: int = 0, pid: int | None = None) -> int:
    """ioctl with an integer argument; its result."""
    return syscall(NR["ioctl"], fd, req, value, request=f"ioctl({name})", pid=pid)
