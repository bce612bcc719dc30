"""Running system calls inside a stopped thread of another process.

We point the thread at a ``syscall`` instruction of its own vDSO, load the
arguments, run it to its syscall-exit stop (PTRACE_SYSCALL) and read rax.  While a :class:`Remote` is open
the thread's registers and signal mask are saved and every signal is blocked
(else a pending signal would be delivered instead of our syscall); closing it
puts both back, so a thread stopped inside a syscall still restarts it.

Restore makes hundreds of calls per process (an mmap per VMA, a sigaction per
signal ...), each a round trip through ptrace.  A :class:`Batch` runs a table of
them in one trip instead: a few bytes of code, written into the stub's scratch
area, loop over the table and stop on int3 (after the last call, or the first
that fails).
"""
from __future__ import annotations

import errno
import signal
import struct

from .errors import SysError
from . import sigframe
from .sys import ptrace, waitstatus, x86_64
from .sys.memory import ProcMem, read_bytes, write_bytes

_FAULTS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE}     # they come back at every resume

ALL_SIGNALS = (1 << 64) - 1
_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")

# The batch loop.  rbx: the table (64-byte entries: nr, six arguments, result), r12: the
# number of entries.
#   loop: mov rax,[rbx]; mov rdi,[rbx+8]; mov rsi,[rbx+16]; mov rdx,[rbx+24]
#         mov r10,[rbx+32]; mov r8,[rbx+40]; mov r9,[rbx+48]; syscall; mov [rbx+56],rax
#         cmp rax,-4095; jae done; add rbx,64; dec r12; jnz loop
#   done: int3
_BATCH_CODE = bytes.fromhex("488b03488b7b08488b7310488b53184c8b53204c8b43284c8b4b300f0548"
                            "894338483d01f0ffff73094883c34049ffcc75cecc")
_ENTRY = struct.Struct("<8q")
BATCH_AREA = 64 << 10       # code, then the table, and argument data from the end down


def find_syscall_insn(pid: int, vdso_start: int, vdso_end: int) -> int:
    """Address of a `syscall` instruction inside the [vdso] mapping."""
    with ProcMem(pid) as mem:
        code = mem.pread(vdso_end - vdso_start, vdso_start)
    off = code.find(x86_64.SYSCALL_INSN)
    if off < 0:
        raise SysError(0, "find syscall instruction in [vdso]", pid)
    return vdso_start + off


def libc_guard(pid: int, tid: int, areas) -> "sigframe.Guard | None":
    """A guard for thread `tid` made of libc's gadgets and a frame on its stack, or None.

    `areas` lists the process's mappings as (start, end, prot, path, anon_private).
    The frame goes below the thread's red zone, in the private anonymous mapping
    that holds its rsp; the call runs at libc's `syscall; cmp; jae; ret`, whose
    `ret` pops libc's __restore_rt (see sigframe.py).  None when the process has
    no such libc code or the stack no room.
    """
    xsize = x86_64.xstate_size()
    areas = list(areas)
    regs = ptrace.getregs(tid)
    frame = (regs.rsp - 128 - sigframe.frame_size(xsize) - 64) & ~63      # below the red zone
    stack = next((a for a in areas if a[0] <= regs.rsp - 1 < a[1] and a[2] & 2 and a[4]), None)
    if stack is None or frame < stack[0]:
        return None
    with ProcMem(pid) as mem:
        for start, end, prot, path, _ in areas:
            if not (prot & 4 and "/libc.so" in path):
                continue
            code = mem.pread(end - start, start)
            i, j = code.find(sigframe.LIBC_SYSCALL_RET), code.find(sigframe.LIBC_RESTORE_RT)
            if i >= 0 and j >= 0:
                return sigframe.Guard(start + i, frame, frame, start + j, xsize, x86_64.xfeatures())
    return None


class Remote:
    """Syscalls run in thread `tid`, which must be in a ptrace stop."""

    def __init__(self, pid: int, tid: int, syscall_addr: int, scratch: int = 0, guard=None,
                 per_call: bool = False, vpid: int | None = None, vtid: int | None = None):
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
        self.batch_area = 0             # an RWX area of BATCH_AREA bytes for Batch, if any
        self._batch_code = False
        # guard: a sigframe.Guard, see sigframe.py.  Guarded calls leave the thread's own registers and
        # mask in place between calls, so at most one call is ever exposed;
        # the frame is written before each call (threads share the slot).
        self.guard = guard
        self._frame = b""
        # per_call: put the thread's own registers and mask back after every
        # call (a dump's target must survive the engine's death at any point);
        # otherwise once, when the Remote closes (a restore's stubs).
        self.per_call = per_call or guard is not None

    def __enter__(self) -> "Remote":
        self.saved_regs = ptrace.getregs(self.tid)
        self.saved_mask = ptrace.getsigmask(self.tid)
        if self.guard:
            g = self.guard
            xstate = ptrace.getregset(self.tid, ptrace.NT_X86_XSTATE, g.xsize)
            self._frame = sigframe.build(g.frame, self.saved_regs, self.saved_mask, xstate, g.xfeatures,
                                         g.pretcode)
        if not self.per_call:
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

    def syscall(self, name: str, *args: int, check: bool = True, rsp: int | None = None,
                at_exit=None) -> int:
        nr = x86_64.NR[name]
        regs = x86_64.Regs.from_buffer_copy(self.saved_regs)
        regs.rax = nr
        regs.orig_rax = (1 << 64) - 1   # no syscall-restart processing on resume
        regs.rip = self.syscall_addr
        if rsp is not None:
            regs.rsp = rsp
        # Unused argument registers are zeroed: some calls check them (prctl's arg5).
        for i, reg in enumerate(_ARG_REGS):
            setattr(regs, reg, (args[i] if i < len(args) else 0) & ((1 << 64) - 1))
        if self.guard:
            self.write(self.guard.frame, self._frame)
            regs.rip, regs.rsp = self.guard.rip, self.guard.rsp
        # Order matters for a dump (per_call): every state in between must be
        # one the thread survives if the engine dies there (see sigframe.py).
        ptrace.setregs(self.tid, regs)
        if self.per_call:
            ptrace.setsigmask(self.tid, ALL_SIGNALS)
        self._run_syscall()
        if at_exit is not None:         # at the syscall-exit stop, registers still ours (tests)
            at_exit()
        res = x86_64.to_signed(ptrace.getregs(self.tid).rax)
        if self.per_call:
            ptrace.setsigmask(self.tid, self.saved_mask)
            ptrace.setregs(self.tid, self.saved_regs)
        if check and -4096 < res < 0:
            raise SysError(-res, f"injected {name}({', '.join(hex(a) for a in args)})", self.pid)
        return res

    def _run_syscall(self) -> None:
        """Run the syscall instruction: in a live process (per_call), resume to the
        syscall-entry stop, then to the syscall-exit stop; in a restore's stub, single-step.

        PTRACE_SYSCALL in a live process: a syscall stop is not a signal-delivery
        stop, so were the engine to die while the thread sits in one, the thread
        would simply go on -- no stray SIGTRAP kills it.  A stub dies with the engine
        anyway (PTRACE_O_EXITKILL), and one single-step is half the round trips
        (restore injects hundreds of calls per process).
        """
        if not self.per_call:
            return self._step_syscall()
        stops = 0
        ptrace.syscall(self.tid)
        while True:
            _, status = ptrace.wait(self.tid)
            if not waitstatus.stopped(status):
                raise SysError(3, "injected syscall", self.pid, f"thread {self.tid} died (status {status:#x})")
            sig = waitstatus.stop_signal(status)
            event = waitstatus.stop_event(status)
            if event in (1, 2, ptrace.PTRACE_EVENT_CLONE):     # FORK, VFORK, CLONE
                self.clone_tids.append(ptrace.geteventmsg(self.tid))
            elif sig == signal.SIGTRAP | 0x80:                 # syscall stop (TRACESYSGOOD)
                stops += 1
                if stops == 2:
                    return
            # else: a signal-delivery stop (an unblockable SIGSTOP) or a group
            # stop: resuming with no signal drops it.
            self._no_fault(status, "injected syscall")
            ptrace.syscall(self.tid)

    def _step_syscall(self) -> None:
        ptrace.singlestep(self.tid)
        while True:
            _, status = ptrace.wait(self.tid)
            if not waitstatus.stopped(status):
                raise SysError(3, "injected syscall", self.pid, f"thread {self.tid} died (status {status:#x})")
            event = waitstatus.stop_event(status)
            if event in (1, 2, ptrace.PTRACE_EVENT_CLONE):     # FORK, VFORK, CLONE: then the step ends
                self.clone_tids.append(ptrace.geteventmsg(self.tid))
            elif event == 0 and waitstatus.stop_signal(status) == signal.SIGTRAP:
                return                                         # the step over the syscall is done
            # else: a signal-delivery or group stop: resuming with no signal drops it
            self._no_fault(status, "injected syscall")
            ptrace.singlestep(self.tid)

    def _no_fault(self, status: int, what: str) -> None:
        """A fault in the injected code would come back at every resume (restore waited for
        ever when an image mapped the batch area read-only): it ends the call."""
        sig = waitstatus.stop_signal(status)
        if waitstatus.stop_event(status) == 0 and sig in _FAULTS:
            raise SysError(errno.EFAULT, what, self.pid, f"thread {self.tid} got {signal.Signals(sig).name} in "
                           "the injected code: its memory is not what it should be there")

    def batch(self) -> "Batch":
        """Collect calls, run them in one trip when the block ends (needs batch_area)."""
        return Batch(self)

    def _run_batch(self, calls: list, data: list) -> None:
        area = self.batch_area
        if not self._batch_code:
            self.write(area, _BATCH_CODE)
            self._batch_code = True
        table = b"".join(_ENTRY.pack(x86_64.NR[name], *[_s64(a) for a in args], *[0] * (6 - len(args)), 0)
                         for name, args in calls)
        self.write(area + 64, table)
        for addr, blob in data:
            self.write(addr, blob)
        regs = x86_64.Regs.from_buffer_copy(self.saved_regs)
        regs.rip, regs.rbx, regs.r12 = area, area + 64, len(calls)
        regs.orig_rax = (1 << 64) - 1
        ptrace.setregs(self.tid, regs)
        ptrace.cont(self.tid)
        while True:
            _, status = ptrace.wait(self.tid)
            if not waitstatus.stopped(status):
                raise SysError(3, "injected syscall batch", self.pid, f"thread {self.tid} died (status {status:#x})")
            if waitstatus.stop_event(status) == 0 and waitstatus.stop_signal(status) == signal.SIGTRAP:
                break                                          # the int3 at the end
            self._no_fault(status, "injected syscall batch")
            ptrace.cont(self.tid)                              # a stop of another kind: drop it
        results = struct.unpack_from("<" + "56xq" * len(calls), self.read(area + 64, len(table)))
        for (name, args), res in zip(calls, results):
            if -4096 < res < 0:
                raise SysError(-res, f"injected {name}({', '.join(hex(a) for a in args)})", self.pid)

    # --- scratch memory helpers ---
    def write(self, addr: int, data: bytes) -> None:
        write_bytes(self.pid, addr, data)

    def read(self, addr: int, size: int) -> bytes:
        return read_bytes(self.pid, addr, size)

    def map_scratch(self, size: int = 4096, addr: int = 0, prot: int = 3) -> int:
        MAP_PRIVATE, MAP_ANON, MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000
        flags = MAP_PRIVATE | MAP_ANON | (MAP_FIXED_NOREPLACE if addr else 0)
        self.scratch = self.syscall("mmap", addr, size, prot, flags, -1, 0)
        return self.scratch


class Batch:
    """Syscalls collected and run in one trip (Remote.batch()); on a failure, SysError names
    the first call that failed, and none after it ran.  Without a batch area in the
    process, calls run one by one."""

    def __init__(self, remote: Remote):
        self.r = remote
        self.calls: list = []
        self.data: list = []
        self.top = remote.batch_area + BATCH_AREA      # argument data grows down from here

    def __enter__(self) -> "Batch":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.flush()

    def _room(self, entries: int, nbytes: int) -> bool:
        table_end = self.r.batch_area + 64 + 64 * (len(self.calls) + entries)
        return table_end <= self.top - nbytes

    def put(self, blob: bytes) -> int:
        """Argument data (a struct the call points to): its address in the process."""
        if not self.r.batch_area:
            addr = self.r.scratch + 2048
            self.r.write(addr, blob)
            return addr
        size = (len(blob) + 15) & ~15
        if not self._room(1, size):
            self.flush()
        self.top -= size
        self.data.append((self.top, bytes(blob)))
        return self.top

    def syscall(self, name: str, *args: int) -> None:
        if not self.r.batch_area:
            self.r.syscall(name, *args)
            return
        if not self._room(1, 0):
            self.flush()
        self.calls.append((name, args))

    def flush(self) -> None:
        if self.calls:
            self.r._run_batch(self.calls, self.data)
        self.calls, self.data = [], []
        self.top = self.r.batch_area + BATCH_AREA


def _s64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v
