"""Per-thread state: registers, xstate, signal mask, sigaltstack, rseq,
robust list, clear_child_tid, name, pending signals.  Dump and restore.

Some of it has no /proc or ptrace interface and is read by syscalls injected
into the thread itself: sigaltstack(2) and prctl(PR_GET_TID_ADDRESS).
"""
from __future__ import annotations

import logging
import os
import struct

from .errors import ImageError, RestoreError
from .images import core_pb2
from .inject import Remote
from .sys import proc, ptrace, x86_64
from .sys.libc import get_robust_list

PR_GET_TID_ADDRESS = 40
PR_SET_NAME = 15
SS_ONSTACK = 1
RSEQ_FLAG_UNREGISTER = 1
_STACK_T = struct.Struct("<QIiQ")  # ss_sp, ss_flags (SS_AUTODISARM is bit 31), (pad), ss_size

log = logging.getLogger(__name__)


def dump_thread(pid: int, tid: int, remote: Remote, xstate_size: int) -> core_pb2.ThreadCore:
    """`remote` is an open Remote on this very thread, with a scratch page."""
    t = core_pb2.ThreadCore(tid=tid, comm=proc.comm(pid, tid))
    t.regs = bytes(remote.saved_regs)
    t.xstate = ptrace.getregset(tid, ptrace.NT_X86_XSTATE, xstate_size)
    t.sigmask = remote.saved_mask
    rs = ptrace.get_rseq_configuration(tid)
    t.rseq_addr, t.rseq_len, t.rseq_sig = rs.rseq_abi_pointer, rs.rseq_abi_size, rs.signature
    t.robust_head, t.robust_len = get_robust_list(tid)
    scratch = remote.scratch
    remote.syscall("prctl", PR_GET_TID_ADDRESS, scratch)
    (t.clear_child_tid,) = struct.unpack("<Q", remote.read(scratch, 8))
    remote.syscall("sigaltstack", 0, scratch)
    sp, flags, _, size = _STACK_T.unpack(remote.read(scratch, _STACK_T.size))
    t.altstack_sp, t.altstack_flags, t.altstack_size = sp, flags, size
    t.pending.extend(ptrace.peek_pending(tid, shared=False))
    t.cpus.extend(sorted(os.sched_getaffinity(tid)))
    t.sched_policy = os.sched_getscheduler(tid)
    t.sched_priority = os.sched_getparam(tid).sched_priority
    t.nice = os.getpriority(os.PRIO_PROCESS, tid)
    return t


def check_thread(t: core_pb2.ThreadCore, where: str) -> None:
    """Values the kernel takes as C ints, and siginfos of their size: out of range is damage."""
    for name in ("sched_policy", "sched_priority", "nice"):
        if not -2**31 <= getattr(t, name) < 2**31:
            raise ImageError(f"{where}: thread {t.tid}: {name} {getattr(t, name)} is out of range: damaged image")
    if any(len(info) != ptrace.SIGINFO_SIZE for info in t.pending):
        raise ImageError(f"{where}: thread {t.tid}: a pending signal is not a {ptrace.SIGINFO_SIZE}-byte siginfo")


def restore_sched(t: core_pb2.ThreadCore, tid: int, pid: int) -> None:
    """Affinity, policy and nice value of thread `tid` (as we see it) of process `pid`
    (as it sees itself), set from the engine.  The affinity is the dumped one within the
    CPUs allowed to us (our cpuset, a SLURM allocation): restored elsewhere, a process
    runs on what it may use here -- all of it if none of its own CPUs is -- and we say so."""
    allowed = os.sched_getaffinity(0)
    cpus = set(t.cpus) & allowed or allowed
    if cpus != set(t.cpus):
        log.warning("process %d thread %d: CPU affinity %s as dumped, but only CPUs %s are allowed here: "
                    "restored with %s", pid, t.tid, sorted(t.cpus), sorted(allowed), sorted(cpus))
    os.sched_setaffinity(tid, cpus)
    try:
        os.sched_setscheduler(tid, t.sched_policy, os.sched_param(t.sched_priority))
        os.setpriority(os.PRIO_PROCESS, tid, t.nice)
    except OSError as e:        # a policy or priority refused here (range: check_thread)
        raise RestoreError(f"process {pid} thread {t.tid}: cannot set its scheduling policy "
                           f"{t.sched_policy}, priority {t.sched_priority}, nice {t.nice}: {e}") from None


def restore_thread_state(remote: Remote, t: core_pb2.ThreadCore, signal_pending) -> None:
    """Everything but registers, injected into the restored thread itself."""
    with remote.batch() as b:
        b.syscall("set_tid_address", t.clear_child_tid)
        if t.robust_head:
            b.syscall("set_robust_list", t.robust_head, t.robust_len)
        if t.rseq_addr:
            b.syscall("rseq", t.rseq_addr, t.rseq_len, 0, t.rseq_sig)
        # Always set: the main thread's stub inherited the engine's alternate stack.
        # SS_ONSTACK is a status, not a request; the stub is not on that stack.
        ss = b.put(_STACK_T.pack(t.altstack_sp, t.altstack_flags & ~SS_ONSTACK, 0, t.altstack_size))
        b.syscall("sigaltstack", ss, 0)
        # /proc/PID/task/TID/comm is writable only from the thread's own group.
        b.syscall("prctl", PR_SET_NAME, b.put(t.comm.encode()[:15] + b"\0"))
    for info in t.pending:
        signal_pending(remote, info, t.tid)


def final_regs(t: core_pb2.ThreadCore) -> x86_64.Regs:
    regs = x86_64.regs_from_bytes(t.regs)
    x86_64.rewind_interrupted_syscall(regs)
    return regs


def unregister_rseq(remote: Remote, tid: int) -> None:
    """The stub inherited the engine thread's rseq area; drop it before the
    memory behind it is unmapped (else the kernel faults the thread on resume)."""
    rs = ptrace.get_rseq_configuration(tid)
    if rs.rseq_abi_pointer:
        remote.syscall("rseq", rs.rseq_abi_pointer, rs.rseq_abi_size, RSEQ_FLAG_UNREGISTER, rs.signature)
