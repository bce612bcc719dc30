"""x86_64 specifics: syscall numbers, the register file, CPUID.

The general-purpose register layout is python-ptrace's ``user_regs_struct``
(the kernel's ``struct user_regs_struct``, 216 bytes, NT_PRSTATUS regset).
"""
from __future__ import annotations

import ctypes
import mmap

from ptrace.binding.linux_struct import user_regs_struct

# asm/unistd_64.h
NR = dict(
    read=0, write=1, open=2, close=3, lseek=8, mmap=9, mprotect=10, munmap=11,
    brk=12, rt_sigaction=13, rt_sigprocmask=14, mremap=25, mincore=27, madvise=28, dup=32,
    dup2=33, pause=34, getpid=39, getppid=110, exit=60, kill=62, fcntl=72, ftruncate=77,
    chdir=80, fchdir=81, umask=95, setgroups=116, setresuid=117, setresgid=119,
    capset=126, rt_sigqueueinfo=129, sigaltstack=131, personality=135,
    mlock=149, prctl=157, arch_prctl=158, chroot=161, gettid=186, futex=202,
    set_tid_address=218, exit_group=231, tgkill=234, set_robust_list=273,
    get_robust_list=274, splice=275, tee=276, dup3=292, rt_tgsigqueueinfo=297, prlimit64=302,
    getcpu=309, setpgid=109, setsid=112, getsid=124, process_vm_readv=310, process_vm_writev=311, kcmp=312,
    memfd_create=319, userfaultfd=323, rseq=334, pidfd_open=434, clone3=435,
    close_range=436, pidfd_getfd=438, restart_syscall=219, rt_sigtimedwait=128, mount=165, wait4=61,
    fork=57, execve=59, ppoll=271,  # pstree.spawn_init, the init on a lifeline
    # anon-inode files (files/anon.py) and timers (timers.py)
    ioctl=16, getitimer=36, setitimer=38, timer_create=222, timer_settime=223, timer_gettime=224,
    timer_getoverrun=225, timer_delete=226, epoll_wait=232, epoll_ctl=233, inotify_add_watch=254, inotify_rm_watch=255,
    timerfd_create=283, timerfd_settime=286, timerfd_gettime=287, signalfd4=289, eventfd2=290,
    epoll_create1=291, inotify_init1=294, name_to_handle_at=303, open_by_handle_at=304,
    # file locks (files/locks.py)
    flock=73,
    # the --leave-running snapshot (snapshot.py)
    clone=56,
    # user namespaces (userns.py)
    unshare=272,
)

SYSCALL_INSN = b"\x0f\x05"
SYSCALL_INSN_LEN = 2

# Kernel-internal restart codes seen in rax of a thread stopped inside a
# syscall (include/linux/errno.h).  -516 needs the task's restart_block,
# which a new task does not have: we re-run the original call instead.
ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516
RESTART_CODES = (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK)

TASK_SIZE = 0x7FFFFFFFF000  # 47-bit user address space (no LA57 here)

Regs = user_regs_struct
REGS_SIZE = ctypes.sizeof(Regs)


def regs_from_bytes(data: bytes) -> Regs:
    if len(data) != REGS_SIZE:
        raise ValueError(f"register blob is {len(data)} bytes, want {REGS_SIZE}")
    return Regs.from_buffer_copy(data)


def to_signed(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def rewind_interrupted_syscall(regs: Regs) -> None:
    """Make a thread that was stopped inside a syscall re-issue it on resume.

    At a ptrace stop inside a syscall rax holds -ERESTART* and orig_rax the
    syscall number; the kernel would rewind on signal return, but a restored
    thread is a new task, so we rewind by hand and clear orig_rax (-1) so the
    kernel does not rewind a second time.
    """
    if to_signed(regs.orig_rax) >= 0 and -to_signed(regs.rax) in RESTART_CODES:
        regs.rip -= SYSCALL_INSN_LEN
        regs.rax = regs.orig_rax
    regs.orig_rax = (1 << 64) - 1


# --- CPUID, executed from a tiny code page (there is no Python API for it) ---
_CPUID_CODE = bytes.fromhex(
    "53"            # push rbx
    "89f8"          # mov eax, edi      (leaf)
    "89f1"          # mov ecx, esi      (subleaf)
    "4989d0"        # mov r8, rdx       (out)
    "0fa2"          # cpuid
    "418900"        # mov [r8], eax
    "41895804"      # mov [r8+4], ebx
    "41894808"      # mov [r8+8], ecx
    "4189500c"      # mov [r8+12], edx
    "5b"            # pop rbx
    "c3"            # ret
)
_cpuid_fn = None
_cpuid_page = None


def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    global _cpuid_fn, _cpuid_page
    if _cpuid_fn is None:
        _cpuid_page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        _cpuid_page.write(_CPUID_CODE)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(_cpuid_page))
        proto = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))
        _cpuid_fn = proto(addr)
    out = (ctypes.c_uint32 * 4)()
    _cpuid_fn(leaf, subleaf, out)
    return out[0], out[1], out[2], out[3]


def xstate_size() -> int:
    """Bytes of XSAVE area for the features the OS enabled (CPUID.(0xD,0).EBX)."""
    return cpuid(0xD, 0)[1]


def xfeatures() -> int:
    """The XSAVE feature bits the CPU supports (CPUID.(0xD,0).EDX:EAX)."""
    eax, _, _, edx = cpuid(0xD, 0)
    return eax | (edx << 32)
