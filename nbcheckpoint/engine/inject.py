"""Running system calls inside a stopped thread of another process.

We point the thread at a ``syscall`` instruction of its own vDSO, load the
arguments, single-step over it and read rax.  While a :class:`Remote` is open
the thread's registers and signal mask are saved and every signal is blocked
(else a pending signal would be delivered instead of our syscall); closing it
puts both back, so a thread stopped inside a syscall still restarts it.
"""
from __future__ import annotations

import ctypes
import signal

from .errors import SysError
from . import sigframe
from .sys import ptrace, x86_64
from .sys.memory import ProcMem, vm_read, vm_write

ALL_SIGNALS = (1 << 64) - 1
_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")


def find_syscall_insn(pid: int, vdso_start: int, vdso_end: int) -> int:
    """Address of a `syscall` instruction inside the [vdso] mapping."""
    with ProcMem(pid) as mem:
        code = mem.pread(vdso_end - vdso_start, vdso_start)
    off = code.find(x86_64.SYSCALL_INSN)
    if off < 0:
        raise SysError(0, "find syscall instruction in [vdso]", pid)
    return vdso_start + off


class Remote:
    """Syscalls run in thread `tid`, which must be in a ptrace stop."""

    def __init__(self, pid: int, tid: int, syscall_addr: int, scratch: int = 0, guard=None,
                 settle: bool = False, vpid: int | None = None, vtid: int | None = None):
        self.pid = pid                  # as the engine sees them (ptrace, /proc)
        self.tid = tid
        # as the process sees itself: differs when it lives in another PID namespace;
        # syscalls injected into it that name a pid take these
        self.vpid = pid if vpid is None else vpid
        self.vtid = tid if vtid is None else vtid
        self.syscall_addr = syscall_addr
        self.scratch = scratch          # a RW page in the target, if any
        self.saved_regs = None
        self.saved_mask = 0
        self.clone_tids: list[int] = []  # threads created by an injected clone
        # guard = (gadget address, frame address, xstate size, xfeatures): see
        # sigframe.py.  Guarded calls leave the thread's own registers and
        # mask in place between calls, so at most one call is ever exposed;
        # the frame is written before each call (threads share the slot).
        self.guard = guard
        self._frame = b""
        # settle: after each call, trade the single-step's SIGTRAP
        # signal-delivery-stop for a PTRACE_EVENT_STOP.  Were the engine to
        # die in the former, the kernel would deliver that SIGTRAP and kill
        # the process; from the latter the thread simply resumes.
        self.settle = settle or guard is not None

    def __enter__(self) -> "Remote":
        self.saved_regs = ptrace.getregs(self.tid)
        self.saved_mask = ptrace.getsigmask(self.tid)
        if self.guard:
            _, frame, xsize, xfeatures = self.guard
            xstate = ptrace.getregset(self.tid, ptrace.NT_X86_XSTATE, xsize)
            self._frame = sigframe.build(frame, self.saved_regs, self.saved_mask, xstate, xfeatures)
        else:
            ptrace.setsigmask(self.tid, ALL_SIGNALS)
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        if self.saved_regs is not None:
            ptrace.setregs(self.tid, self.saved_regs)
            ptrace.setsigmask(self.tid, self.saved_mask)
            self.saved_regs = None

    def set_final_state(self, regs: x86_64.Regs, sigmask: int) -> None:
        """Leave the thread with these registers and mask instead of the saved ones."""
        self.saved_regs = regs
        self.saved_mask = sigmask

    def syscall(self, name: str, *args: int, check: bool = True, rsp: int | None = None) -> int:
        nr = x86_64.NR[name]
        regs = x86_64.Regs.from_buffer_copy(self.saved_regs)
        regs.rax = nr
        regs.orig_rax = (1 << 64) - 1   # no syscall-restart processing on resume
        regs.rip = self.syscall_addr
        regs.eflags &= ~0x100           # TF is set by the kernel for singlestep
        if rsp is not None:
            regs.rsp = rsp
        # Unused argument registers are zeroed: some calls check them (prctl's arg5).
        for i, reg in enumerate(_ARG_REGS):
            setattr(regs, reg, (args[i] if i < len(args) else 0) & ((1 << 64) - 1))
        if self.guard:
            self.write(self.guard[1], self._frame)
            regs.rip, regs.rsp = self.guard[0], self.guard[1] + 8
            ptrace.setsigmask(self.tid, ALL_SIGNALS)
        ptrace.setregs(self.tid, regs)
        self._step(regs.rip)
        res = x86_64.to_signed(ptrace.getregs(self.tid).rax)
        if self.guard:
            ptrace.setregs(self.tid, self.saved_regs)
            ptrace.setsigmask(self.tid, self.saved_mask)
        if check and -4096 < res < 0:
            raise SysError(-res, f"injected {name}({', '.join(hex(a) for a in args)})", self.pid)
        return res

    def _step(self, at: int) -> None:
        ptrace.singlestep(self.tid)
        while True:
            _, status = ptrace.wait(self.tid)
            if not _is_stopped(status):
                raise SysError(3, "injected syscall", self.pid, f"thread {self.tid} died (status {status:#x})")
            sig = (status >> 8) & 0xFF
            event = ptrace.stop_event(status)
            if event in (1, 2, ptrace.PTRACE_EVENT_CLONE):     # FORK, VFORK, CLONE
                self.clone_tids.append(ptrace.geteventmsg(self.tid))
                ptrace.singlestep(self.tid)
                continue
            if event == 0 and sig == signal.SIGTRAP:
                rip = ptrace.getregs(self.tid).rip
                if rip == at + x86_64.SYSCALL_INSN_LEN:
                    if self.settle:
                        self._settle()
                    return
            # Some other stop (an unblockable SIGSTOP, a group stop): the
            # instruction has not run yet; step again, dropping the signal.
            ptrace.singlestep(self.tid)

    def _settle(self) -> None:
        # INTERRUPT queues a trap; CONT with no signal leaves the SIGTRAP
        # stop, and get_signal() takes the queued trap before any user code runs.
        ptrace.interrupt(self.tid)
        ptrace.cont(self.tid, 0)
        while True:
            _, status = ptrace.wait(self.tid)
            if not _is_stopped(status):
                raise SysError(3, "injected syscall", self.pid, f"thread {self.tid} died (status {status:#x})")
            if ptrace.stop_event(status) == ptrace.PTRACE_EVENT_STOP:
                return
            ptrace.cont(self.tid, 0)

    # --- scratch memory helpers ---
    def write(self, addr: int, data: bytes) -> None:
        buf = ctypes.create_string_buffer(bytes(data), len(data))
        vm_write(self.pid, ctypes.addressof(buf), [(addr, len(data))])

    def read(self, addr: int, size: int) -> bytes:
        buf = ctypes.create_string_buffer(size)
        vm_read(self.pid, ctypes.addressof(buf), [(addr, size)])
        return buf.raw

    def map_scratch(self, size: int = 4096, addr: int = 0, prot: int = 3) -> int:
        MAP_PRIVATE, MAP_ANON, MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000
        flags = MAP_PRIVATE | MAP_ANON | (MAP_FIXED_NOREPLACE if addr else 0)
        self.scratch = self.syscall("mmap", addr, size, prot, flags, -1, 0)
        return self.scratch


def _is_stopped(status: int) -> bool:
    return (status & 0xFF) == 0x7F
