"""ptrace(2) requests, all through one chokepoint (:func:`_ptrace`).

The raw call is python-ptrace's binding; what it lacks (SEIZE, INTERRUPT,
GETREGSET with xstate, SIG(GET|SET)MASK, PEEKSIGINFO, rseq configuration) is
spelled here.  Every failure becomes ``SysError(errno, "PTRACE_X", pid)``.

All requests must come from the thread that attached (ptrace(2): "the tracer
is a thread"), which is why the engine is synchronous.
"""
from __future__ import annotations

import ctypes
import os
import time

from ptrace.binding.func import ptrace as _raw_ptrace
from ptrace.error import PtraceError

from ..errors import SysError
from . import waitstatus, x86_64

PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_SYSCALL = 24
PTRACE_DETACH = 17
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F

_NAMES = {v: k for k, v in dict(globals()).items() if k.startswith("PTRACE_")}

PTRACE_O_TRACESYSGOOD = 0x1
PTRACE_O_TRACECLONE = 0x8
PTRACE_O_EXITKILL = 0x100000
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_STOP = 128
PTRACE_PEEKSIGINFO_SHARED = 1

NT_PRSTATUS = 1
NT_X86_XSTATE = 0x202

__WALL = 0x40000000
SIGINFO_SIZE = 128


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class RseqConfig(ctypes.Structure):
    _fields_ = [("rseq_abi_pointer", ctypes.c_uint64), ("rseq_abi_size", ctypes.c_uint32),
                ("signature", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class PeekSiginfoArgs(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("nr", ctypes.c_int32)]


def _addr(arg) -> int:
    if arg is None:
        return 0
    if isinstance(arg, int):
        return arg
    return ctypes.addressof(arg)


def _ptrace(request: int, tid: int, addr=0, data=0) -> int:
    try:
        return _raw_ptrace(request, tid, _addr(addr), _addr(data))
    except PtraceError as e:
        raise SysError(e.errno or 0, _NAMES.get(request, hex(request)), tid) from None


def seize(tid: int, options: int = 0) -> None:
    _ptrace(PTRACE_SEIZE, tid, 0, options)


def interrupt(tid: int) -> None:
    _ptrace(PTRACE_INTERRUPT, tid)


def detach(tid: int, sig: int = 0) -> None:
    _ptrace(PTRACE_DETACH, tid, 0, sig)


def cont(tid: int, sig: int = 0) -> None:
    _ptrace(PTRACE_CONT, tid, 0, sig)


def singlestep(tid: int, sig: int = 0) -> None:
    _ptrace(PTRACE_SINGLESTEP, tid, 0, sig)


def syscall(tid: int, sig: int = 0) -> None:
    """Resume until the next syscall entry or exit (PTRACE_SYSCALL)."""
    _ptrace(PTRACE_SYSCALL, tid, 0, sig)


def setoptions(tid: int, options: int) -> None:
    _ptrace(PTRACE_SETOPTIONS, tid, 0, options)


def geteventmsg(tid: int) -> int:
    v = ctypes.c_ulong()
    _ptrace(PTRACE_GETEVENTMSG, tid, 0, v)
    return v.value


def getregset(tid: int, nt: int, size: int) -> bytes:
    buf = ctypes.create_string_buffer(size)
    iov = iovec(ctypes.addressof(buf), size)
    _ptrace(PTRACE_GETREGSET, tid, nt, iov)
    return buf.raw[: iov.iov_len]


def setregset(tid: int, nt: int, data: bytes) -> None:
    buf = ctypes.create_string_buffer(data, len(data))
    iov = iovec(ctypes.addressof(buf), len(data))
    _ptrace(PTRACE_SETREGSET, tid, nt, iov)


def getregs(tid: int) -> x86_64.Regs:
    return x86_64.regs_from_bytes(getregset(tid, NT_PRSTATUS, x86_64.REGS_SIZE))


def setregs(tid: int, regs: x86_64.Regs) -> None:
    setregset(tid, NT_PRSTATUS, bytes(regs))


def getsigmask(tid: int) -> int:
    v = ctypes.c_uint64()
    _ptrace(PTRACE_GETSIGMASK, tid, 8, v)
    return v.value


def setsigmask(tid: int, mask: int) -> None:
    v = ctypes.c_uint64(mask)
    _ptrace(PTRACE_SETSIGMASK, tid, 8, v)


def get_rseq_configuration(tid: int) -> RseqConfig:
    conf = RseqConfig()
    _ptrace(PTRACE_GET_RSEQ_CONFIGURATION, tid, ctypes.sizeof(conf), conf)
    return conf


def peek_pending(tid: int, shared: bool) -> list[bytes]:
    """Queued siginfos, without dequeuing them (PTRACE_PEEKSIGINFO)."""
    out = []
    batch = 32
    buf = ctypes.create_string_buffer(SIGINFO_SIZE * batch)
    while True:
        args = PeekSiginfoArgs(len(out), PTRACE_PEEKSIGINFO_SHARED if shared else 0, batch)
        n = _ptrace(PTRACE_PEEKSIGINFO, tid, args, buf)
        for i in range(n):
            out.append(buf.raw[i * SIGINFO_SIZE:(i + 1) * SIGINFO_SIZE])
        if n < batch:
            return out


def wait(tid: int, nohang: bool = False) -> tuple[int, int]:
    """waitpid(tid, __WALL); returns (tid, status).  EINTR is retried."""
    while True:
        try:
            return os.waitpid(tid, __WALL | (os.WNOHANG if nohang else 0))
        except InterruptedError:
            continue
        except ChildProcessError as e:
            raise SysError(e.errno, "waitpid", tid) from None


def reap(tids, timeout: float) -> set[int]:
    """Reap killed tasks, our children or tracees, with __WALL; polls, for at most `timeout`
    seconds.  Returns the tids still there.  One neither ours nor traced (ECHILD) counts
    as reaped; a stop reported before the kill does not."""
    left, deadline = set(tids), time.monotonic() + timeout
    while left:
        for tid in list(left):
            try:
                got, status = os.waitpid(tid, __WALL | os.WNOHANG)
            except ChildProcessError:
                got, status = tid, 0
            except InterruptedError:
                continue
            if got and not waitstatus.stopped(status):
                left.discard(tid)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.001)
    return left
