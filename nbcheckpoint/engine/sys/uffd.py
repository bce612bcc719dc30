"""userfaultfd(2): the calls lazy restore makes on another process's memory.

A userfaultfd belongs to the mm of the process that created it (restore
injects the userfaultfd() call into the stub, then takes a copy of the fd
with pidfd_getfd); every ioctl below acts on that mm, whoever makes it
(fs/userfaultfd.c uses ctx->mm, not current->mm).  Layouts are those of
include/uapi/linux/userfaultfd.h.

Errors of UFFDIO_COPY / UFFDIO_ZEROPAGE that the page server handles
(userfaultfd(2), ioctl_userfaultfd(2)):
  EEXIST  a page of the range is already there (someone populated it);
  EAGAIN  the layout is changing (fork, mremap, madvise, munmap in progress):
          read the pending events first, then retry;
  ENOENT  the range is no longer registered (unmapped, or a new mapping);
  ESRCH   the mm is gone (the process exited or exec'd).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct

from ..errors import SysError
from .libc import check, syscall
from .x86_64 import NR

UFFD_API = 0xAA
# features (UFFDIO_API)
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
LAZY_FEATURES = (UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE
                 | UFFD_FEATURE_EVENT_UNMAP)
UFFDIO_REGISTER_MODE_MISSING = 1
UFFDIO_COPY_MODE_DONTWAKE = 1
# events (struct uffd_msg.event)
EVENT_PAGEFAULT, EVENT_FORK, EVENT_REMAP, EVENT_REMOVE, EVENT_UNMAP = 0x12, 0x13, 0x14, 0x15, 0x16


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (UFFD_API << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (UFFD_API << 8) | nr


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class _Copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class _Zeropage(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("zeropage", ctypes.c_int64)]


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


UFFDIO_API = _iowr(0x3F, ctypes.sizeof(_Api))
UFFDIO_REGISTER = _iowr(0x00, ctypes.sizeof(_Register))
UFFDIO_WAKE = _ior(0x02, ctypes.sizeof(_Range))
UFFDIO_COPY = _iowr(0x03, ctypes.sizeof(_Copy))
UFFDIO_ZEROPAGE = _iowr(0x04, ctypes.sizeof(_Zeropage))

MSG_SIZE = 32       # struct uffd_msg, packed
_MSG = struct.Struct("<B3x4x24s")

# Our own prototype of ioctl (a handle of our own: argtypes are per handle).  ctypes
# releases the GIL around the call: a copy into fresh memory takes a while.
_ioctl_fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).ioctl
_ioctl_fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl_fn.restype = ctypes.c_int


def _ioctl(fd: int, req: int, arg, what: str, pid: int | None) -> None:
    check(_ioctl_fn(fd, req, ctypes.addressof(arg)), what, pid)


def api(fd: int, pid: int | None, features: int = LAZY_FEATURES) -> None:
    """UFFDIO_API handshake, asking for the events the page server must see."""
    a = _Api(UFFD_API, features, 0)
    _ioctl(fd, UFFDIO_API, a, "ioctl UFFDIO_API", pid)
    if a.features & features != features:
        raise SysError(errno.EINVAL, "ioctl UFFDIO_API", pid,
                       f"this kernel lacks userfaultfd features {features & ~a.features:#x}")


def check_lazy() -> None:
    """Can this process (and restore's stubs, which have its credentials) make the
    userfaultfds a lazy restore needs?  Tries one: userfaultfd(2), then the UFFDIO_API
    handshake with LAZY_FEATURES.  Raises AccessDenied saying why not.

    The fork events are the crux: a process that forks while pages are still to come must
    pass them to its child (whose copy of the memory would read zeros there otherwise), and
    the kernel gives UFFD_FEATURE_EVENT_FORK only to CAP_SYS_PTRACE in the initial user
    namespace (fs/userfaultfd.c) -- however the userfaultfd was made: neither
    vm.unprivileged_userfaultfd=1 nor access to /dev/userfaultfd (Linux >= 6.1) grant it,
    and UFFD_USER_MODE_ONLY would make the kernel's own reads of a page still to come fail."""
    why = ("lazy restore needs CAP_SYS_PTRACE in the initial user namespace (root): the kernel "
           "gives the userfaultfd fork events it relies on (a process that forks while its memory "
           "is still coming in must pass the pages still to come to its child) to no one else -- "
           "neither vm.unprivileged_userfaultfd=1 nor access to /dev/userfaultfd allow them")
    try:
        fd = syscall(NR["userfaultfd"], os.O_CLOEXEC, request="userfaultfd")
    except SysError as e:
        if e.errno == errno.EPERM:
            raise SysError(errno.EPERM, "userfaultfd", None, why) from None
        raise
    try:
        api(fd, None)
    except SysError as e:
        if e.errno == errno.EPERM:
            raise SysError(errno.EPERM, "ioctl UFFDIO_API (UFFD_FEATURE_EVENT_FORK)", None, why) from None
        raise
    finally:
        os.close(fd)


def register_missing(fd: int, start: int, length: int, pid: int | None) -> None:
    r = _Register(start, length, UFFDIO_REGISTER_MODE_MISSING, 0)
    _ioctl(fd, UFFDIO_REGISTER, r, f"ioctl UFFDIO_REGISTER {start:#x}+{length:#x}", pid)


def copy(fd: int, dst: int, src: int, length: int, pid: int | None, wake: bool = True) -> int:
    """Fill `length` bytes of missing pages at dst from our memory at src.

    Returns the bytes copied; raises SysError (see the module docstring)."""
    c = _Copy(dst, src, length, 0 if wake else UFFDIO_COPY_MODE_DONTWAKE, 0)
    try:
        _ioctl(fd, UFFDIO_COPY, c, f"ioctl UFFDIO_COPY {dst:#x}+{length:#x}", pid)
    except SysError:
        if c.copy > 0:        # partial: the caller goes on from there
            return c.copy
        raise
    return c.copy


def zeropage(fd: int, start: int, length: int, pid: int | None) -> int:
    z = _Zeropage(start, length, 0, 0)
    try:
        _ioctl(fd, UFFDIO_ZEROPAGE, z, f"ioctl UFFDIO_ZEROPAGE {start:#x}+{length:#x}", pid)
    except SysError:
        if z.zeropage > 0:
            return z.zeropage
        raise
    return z.zeropage


def wake(fd: int, start: int, length: int, pid: int | None) -> None:
    _ioctl(fd, UFFDIO_WAKE, _Range(start, length), "ioctl UFFDIO_WAKE", pid)


def read_msgs(fd: int, max_msgs: int = 64) -> list[tuple[int, bytes]]:
    """Pending messages of a non-blocking userfaultfd, as (event, 24-byte argument)."""
    try:
        data = os.read(fd, MSG_SIZE * max_msgs)
    except BlockingIOError:
        return []
    return [_MSG.unpack_from(data, i) for i in range(0, len(data) - len(data) % MSG_SIZE, MSG_SIZE)]


def pagefault_arg(arg: bytes) -> tuple[int, int]:
    """(flags, address) of a pagefault message."""
    return struct.unpack_from("<QQ", arg)


def fork_arg(arg: bytes) -> int:
    """The new userfaultfd (an fd in *our* table) of a fork message."""
    return struct.unpack_from("<I", arg)[0]


def remap_arg(arg: bytes) -> tuple[int, int, int]:
    """(from, to, len) of a remap message."""
    return struct.unpack_from("<QQQ", arg)


def range_arg(arg: bytes) -> tuple[int, int]:
    """(start, end) of a remove or unmap message."""
    return struct.unpack_from("<QQ", arg)
