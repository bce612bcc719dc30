"""A signal frame that returns a thread to its saved state: the dump's safety net.

While the dump runs syscalls inside a thread, the thread's registers are not
its own.  If the engine died right then (SIGKILL, OOM), the kernel would
detach and the thread would run on with our registers and crash.  So every
call injected during a dump runs at this gadget, in a page we map for it::

    syscall                 ; the injected call
    mov  $15, %eax
    syscall                 ; rt_sigreturn

with rsp pointing just past an rt_sigframe that holds the thread's saved
registers, signal mask and FPU/vector state.  With the engine alive we stop
the thread after the first syscall (single-step) and put its registers back
ourselves; with the engine dead the thread returns through rt_sigreturn(2)
to exactly where it was.  A thread that was stopped inside a syscall gets
the rewound registers (re-issue the call), as on a normal restart.

Before that page exists (to map it, and to unmap it at the end) the same frame
sits on the thread's own stack, below the red zone, and the call runs at one
of libc's syscall wrappers, ``syscall; cmp $-4095,%rax; jae ..; ret``: the
``ret`` pops the frame's first word, libc's ``__restore_rt`` (``mov $15,%rax;
syscall``), which returns the thread through the frame as above.

The --leave-running snapshot (snapshot.py) forks the process with an injected
``clone(CLONE_FILES)``, exit signal 0.  That call runs at a second gadget, CLONE_OFFSET
bytes into the same page, with the same frame::

    syscall                 ; clone: the parent gets the child's pid (or -errno), the child 0
    test %rax, %rax
    jnz  GADGET+2           ; the parent: rt_sigreturn through the frame, as above
    mov  $231, %eax
    mov  $SNAPSHOT_EXIT, %edi
    syscall                 ; the child: exit_group(SNAPSHOT_EXIT)
    ud2

The child starts traced and stopped (PTRACE_O_TRACECLONE) and the engine never
resumes it; were the engine to die before it sets PTRACE_O_EXITKILL on it, the
kernel would let it go, and its first instructions are these: it exits at once
and never runs the process's own code.

Layouts: arch/x86/include/asm/sigframe.h (rt_sigframe), uapi/asm/sigcontext.h
(sigcontext, _fpx_sw_bytes), kernel/signal_64.c (rt_sigreturn, restore_altstack).
"""
from __future__ import annotations

import struct
from typing import NamedTuple

from .sys import x86_64

GADGET = bytes.fromhex("0f05" "b80f000000" "0f05")
SIGRETURN_OFFSET = 2                  # the `mov $15, %eax; syscall` of GADGET
CLONE_OFFSET = 16
SNAPSHOT_EXIT = 83                    # the exit status of a snapshot child that ran (it never should)
_JNZ_NEXT = CLONE_OFFSET + 2 + 3 + 2  # the address after `jnz rel8`
CLONE_GADGET = (bytes.fromhex("0f05" "4885c0" "75") + struct.pack("<b", SIGRETURN_OFFSET - _JNZ_NEXT)
                + b"\xb8" + struct.pack("<I", 231) + b"\xbf" + struct.pack("<I", SNAPSHOT_EXIT)
                + bytes.fromhex("0f05" "0f0b"))
# What the dump writes at the start of its page: both gadgets, int3 between them.
CODE = GADGET + b"\xcc" * (CLONE_OFFSET - len(GADGET)) + CLONE_GADGET
UC_FP_XSTATE, UC_SIGCONTEXT_SS, UC_STRICT_RESTORE_SS = 0x1, 0x2, 0x4
FP_XSTATE_MAGIC1, FP_XSTATE_MAGIC2 = 0x46505853, 0x46505845
SW_BYTES_OFFSET = 464                 # _fpx_sw_bytes inside the legacy FXSAVE area
UCONTEXT_SIZE = 8 + 8 + 24 + 256 + 8  # flags, link, uc_stack, uc_mcontext, uc_sigmask
SIGINFO_SIZE = 128
# An invalid ss_flags: rt_sigreturn's restore_altstack() then fails with
# EINVAL, which it ignores, so the thread's alternate stack stays as it is.
ALTSTACK_KEEP = 0x7

_GREGS = ("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rdi", "rsi", "rbp",
          "rbx", "rdx", "rax", "rcx", "rsp", "rip", "eflags")


def fp_offset() -> int:
    off = 8 + UCONTEXT_SIZE + SIGINFO_SIZE
    return (off + 63) & ~63            # XRSTOR needs a 64-byte aligned area


def frame_size(xstate_size: int) -> int:
    return fp_offset() + xstate_size + 4


class Guard(NamedTuple):
    """Where a guarded call runs: rip, the frame's address and the rsp to load."""
    rip: int
    frame: int
    rsp: int
    pretcode: int           # what a `ret` before rt_sigreturn pops (libc gadgets)
    xsize: int
    xfeatures: int


def build(frame_addr: int, regs: x86_64.Regs, sigmask: int, xstate: bytes, xfeatures: int,
          pretcode: int = 0) -> bytes:
    """The rt_sigframe to place at frame_addr (64-byte aligned); rt_sigreturn finds it at rsp - 8."""
    assert frame_addr % 64 == 0
    r = x86_64.Regs.from_buffer_copy(regs)
    x86_64.rewind_interrupted_syscall(r)
    fp_addr = frame_addr + fp_offset()
    mcontext = struct.pack("<18Q", *[getattr(r, n) for n in _GREGS])
    mcontext += struct.pack("<4H", r.cs, r.gs, r.fs, r.ss)
    mcontext += struct.pack("<5Q", 0, 0, 0, 0, fp_addr) + bytes(64)    # err trapno oldmask cr2 fpstate reserved
    assert len(mcontext) == 256
    uc = struct.pack("<QQ", UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS, 0)
    uc += struct.pack("<QiiQ", 0, ALTSTACK_KEEP, 0, 0) + mcontext + struct.pack("<Q", sigmask)
    assert len(uc) == UCONTEXT_SIZE
    head = struct.pack("<Q", pretcode) + uc + bytes(SIGINFO_SIZE)
    fp = bytearray(xstate)
    struct.pack_into("<IIQI", fp, SW_BYTES_OFFSET, FP_XSTATE_MAGIC1, len(xstate) + 4, xfeatures, len(xstate))
    return head + bytes(fp_offset() - len(head)) + bytes(fp) + struct.pack("<I", FP_XSTATE_MAGIC2)


LIBC_SYSCALL_RET = bytes.fromhex("0f05" "483d01f0ffff" "7301" "c3")   # syscall; cmp; jae; ret
LIBC_RESTORE_RT = bytes.fromhex("48c7c00f000000" "0f05")           # mov $15,%rax; syscall
