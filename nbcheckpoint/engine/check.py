"""``nbcheckpoint check``: are the kernel features the engine relies on present?

Each probe *uses* the feature the way the engine does (on a forked child or
on ourselves) instead of reading kernel config, because what matters is
whether the call works here, with these privileges.  Children forked for
probes are always killed and reaped, whatever happens.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import signal
import struct
from dataclasses import dataclass

from . import errors
from .sys import memory, proc, ptrace, spawn, userns, waitstatus, x86_64
from .sys.fd import Fd
from .sys.libc import PAGE_SIZE, address_of, syscall
from .sys.x86_64 import NR


@dataclass
class Feature:
    name: str
    ok: bool
    required: bool
    detail: str       # what was measured, or why it failed
    purpose: str      # what the engine needs it for


# --- constants not in the sys layer (uapi headers) ----------------------------
PR_SET_MM, PR_SET_MM_MAP_SIZE = 35, 15
KCMP_FILE = 0
UFFDIO_API = (3 << 30) | (24 << 16) | (0xAA << 8) | 0x3F   # _IOWR(0xAA, 0x3F, uffdio_api)
UFFD_API = 0xAA
UFFD_FEATURE_WP_ASYNC = 1 << 15
PM_SOFT_DIRTY = 1 << 55
PROT_READ, MAP_PRIVATE, MAP_ANONYMOUS = 1, 0x02, 0x20


def _sleeper() -> int:
    """Fork a child that only waits to be killed."""
    pid = os.fork()
    if pid == 0:
        try:       # never return into the caller's code in the child
            while True:
                signal.pause()
        finally:
            os._exit(0)
    return pid


def _kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while True:  # a traced child reports stops before its death: reap until gone
        try:
            _, status = ptrace.wait(pid)
        except errors.SysError:
            return
        if not waitstatus.stopped(status):
            return


class _Child:
    """A forked child that just sleeps, with memory and fds we know.

    Before forking we allocate a read-write buffer, a read-only page and a
    pipe; fork copies them to the same addresses and fd numbers in the child.
    """

    def __enter__(self):
        self.seized = False
        self.rw = bytearray(b"P" * PAGE_SIZE)
        self.ro = syscall(NR["mmap"], 0, PAGE_SIZE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0,
                          request="mmap")
        self.pipe_r, self.pipe_w = os.pipe()
        try:
            self.pid = _sleeper()
        except BaseException:
            self.pid = 0
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        if self.pid:
            _kill_and_reap(self.pid)
        os.close(self.pipe_r)
        os.close(self.pipe_w)
        syscall(NR["munmap"], self.ro, PAGE_SIZE, request="munmap")

    def need_seized(self) -> None:
        if not self.seized:
            raise RuntimeError("no ptrace-stopped child to probe (PTRACE_SEIZE failed)")


# --- probes: each returns the detail string, or raises --------------------------
def _seize(c: _Child) -> str:
    ptrace.seize(c.pid)
    ptrace.interrupt(c.pid)
    _, status = ptrace.wait(c.pid)
    if not (waitstatus.stopped(status) and waitstatus.stop_event(status) == ptrace.PTRACE_EVENT_STOP):
        raise RuntimeError(f"child did not enter a PTRACE_EVENT_STOP (status {status:#x})")
    c.seized = True
    regs = ptrace.getregs(c.pid)
    return f"child stopped by INTERRUPT, registers read (rip {regs.rip:#x})"


def _xstate(c: _Child) -> str:
    c.need_seized()
    want = x86_64.xstate_size()
    # Ask for more than any CPU needs: the kernel trims iov_len to its own size.
    got = len(ptrace.getregset(c.pid, ptrace.NT_X86_XSTATE, 1 << 16))
    if got != want:
        raise RuntimeError(f"kernel regset is {got} bytes but CPUID leaf 0xD says {want}")
    return f"{got} bytes, as CPUID leaf 0xD says"


def _rseq(c: _Child) -> str:
    c.need_seized()
    conf = ptrace.get_rseq_configuration(c.pid)
    if not conf.rseq_abi_pointer:
        return "works; the probe child has no rseq area registered"
    return f"rseq area {conf.rseq_abi_size} bytes, signature {conf.signature:#x}"


def _pidfd(c: _Child) -> str:
    with Fd(memory.pidfd_open(c.pid)) as pidfd:
        fd = Fd(memory.pidfd_getfd(pidfd.fileno(), c.pipe_r, c.pid))
    with fd:
        if os.fstat(fd.fileno()).st_ino != os.fstat(c.pipe_r).st_ino:
            raise RuntimeError("pidfd_getfd returned a different file")
    return "took a pipe fd out of a child"


def _vm_rw(c: _Child) -> str:
    addr = address_of(c.rw)
    src = b"W" * PAGE_SIZE
    memory.write_bytes(c.pid, addr, src)
    if memory.read_bytes(c.pid, addr, PAGE_SIZE) != src or c.rw != b"P" * PAGE_SIZE:
        raise RuntimeError("data read back differs from data written")
    return "wrote and read back a page of a child"


def _proc_mem(c: _Child) -> str:
    data = b"M" * PAGE_SIZE
    with memory.ProcMem(c.pid, write=True) as m:
        m.pwrite(data, c.ro)           # a read-only page: needs FOLL_FORCE
        if m.pread(PAGE_SIZE, c.ro) != data:
            raise RuntimeError("data read back differs from data written")
    return "wrote a read-only page of a child"


def _in_helper(probe) -> str:
    """Run `probe()` in a forked helper and return its answer; an exception in it is raised
    here with its message.  Without root the helper first enters a user namespace of its own,
    as an unprivileged restore does (sys/userns.py), so what is probed is what a restore gets.
    The answer comes back through a pipe (an exit code would mix errnos with our own codes)."""
    r, w = os.pipe()
    helper = os.fork()
    if helper == 0:
        try:                            # the helper must never return into the caller's code
            os.close(r)
            try:
                if not userns.privileged():
                    userns.ensure()
                msg = "ok:" + probe()
            except BaseException as e:
                msg = "err:" + (str(e) or type(e).__name__)
            os.write(w, msg.encode()[:4000])
        finally:
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            out = f.read().decode()
        os.waitpid(helper, 0)
    except BaseException:
        _kill_and_reap(helper)
        raise
    if out.startswith("ok:"):
        return out[3:]
    raise RuntimeError(out[4:] or "the probe's helper died without an answer")


def _new_pidns_then(probe):
    """Without root, chosen PIDs exist only in a PID namespace of ours: probe from its init."""
    if userns.privileged():
        return probe()
    syscall(NR["unshare"], spawn.CLONE_NEWPID, request="unshare(CLONE_NEWPID)")
    return _in_helper(probe)            # the helper is PID 1 of the new namespace


def _clone3_set_tid() -> str:
    """clone3(set_tid) of a free pid.  A raw clone3 returns into Python without glibc's fork
    handlers; that is only safe from a single-threaded process, hence the helper."""
    def probe() -> str:
        last = proc.sysctl_int("kernel/ns_last_pid")
        pid_max = proc.sysctl_int("kernel/pid_max")
        candidates = [p for p in ((last + d) % pid_max for d in range(200, 1200, 97))
                      if p > 300 and not proc.exists(p)][:5]
        for want in candidates:
            try:
                got = spawn.fork_with_pid(want)
            except errors.SysError as e:
                if e.errno == errno.EEXIST:    # taken meanwhile, try the next one
                    continue
                raise
            if got == 0:
                os._exit(0)                     # the new process: leave at once
            os.waitpid(got, 0)
            if got != want:
                raise RuntimeError("clone3 ignored set_tid")
            where = "" if userns.privileged() else " in a PID namespace of a user namespace of yours"
            return f"created a process with a chosen pid{where}"
        raise RuntimeError(f"no free pid among {candidates} (all taken)")
    return _in_helper(lambda: _new_pidns_then(probe))


def _pagemap_scan() -> str:
    buf = mmap.mmap(-1, 4 * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: anonymous pages
    buf[0:1] = b"x"                    # touch pages 0 and 2 only
    buf[2 * PAGE_SIZE:2 * PAGE_SIZE + 1] = b"x"
    addr = address_of(buf)
    try:
        with memory.PagemapScanner(os.getpid()) as scanner:
            runs = scanner.data_runs(addr, addr + 4 * PAGE_SIZE, anon_only=True)
    finally:
        buf.close()
    want = [(addr, PAGE_SIZE), (addr + 2 * PAGE_SIZE, PAGE_SIZE)]
    if runs != want:
        raise RuntimeError(f"found runs {runs}, expected {want}")
    return "found exactly the touched pages"


def _mm_map() -> str:
    def probe() -> str:
        size = bytearray(4)
        syscall(NR["prctl"], PR_SET_MM, PR_SET_MM_MAP_SIZE, address_of(size), 0, 0,
                request="prctl(PR_SET_MM_MAP_SIZE)")
        if not userns.owns_namespaces():
            raise RuntimeError("present, but setting it needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN")
        where = "" if userns.privileged() else ", settable in a user namespace of yours"
        return f"struct prctl_mm_map is {int.from_bytes(size, 'little')} bytes{where}"
    return _in_helper(probe)


def _userns() -> str:
    return _in_helper(lambda: "a process of yours may create one and map its uid in it")


def _ptrace_scope() -> str:
    """Yama (kernel.yama.ptrace_scope) decides which processes a user may trace."""
    try:
        scope = proc.sysctl_int("kernel/yama/ptrace_scope")
    except OSError:
        return "no Yama here: a user may trace any process of their own"
    if scope == 0 or userns.privileged():
        return f"kernel.yama.ptrace_scope={scope}: you may trace your own processes"
    if scope == 1:
        return ("kernel.yama.ptrace_scope=1: only your own descendants (Jupyter kernels are: their shim traces "
                "them); `nbcheckpoint dump -t PID` of another process of yours needs "
                "kernel.yama.ptrace_scope=0 (sysctl, by an administrator)")
    raise RuntimeError(f"kernel.yama.ptrace_scope={scope}: {'only root' if scope == 2 else 'nobody'} may use "
                       "ptrace: an administrator must set kernel.yama.ptrace_scope to 0 or 1")


def _userfaultfd() -> str:
    fd = syscall(NR["userfaultfd"], os.O_CLOEXEC | os.O_NONBLOCK, request="userfaultfd")
    try:
        api = bytearray(struct.pack("QQQ", UFFD_API, 0, 0))
        fcntl.ioctl(fd, UFFDIO_API, api)
        features = struct.unpack("QQQ", api)[1]
    finally:
        os.close(fd)
    wp = "with" if features & UFFD_FEATURE_WP_ASYNC else "without"
    return f"{wp} async write-protect (features {features:#x})"


def _kcmp() -> str:
    me = os.getpid()
    r, w = os.pipe()
    d = os.dup(r)
    try:
        same = syscall(NR["kcmp"], me, me, KCMP_FILE, r, d, request="kcmp")
        diff = syscall(NR["kcmp"], me, me, KCMP_FILE, r, w, request="kcmp")
    finally:
        for fd in (r, w, d):
            os.close(fd)
    if same != 0 or diff == 0:
        raise RuntimeError(f"unexpected answers (dup: {same}, other file: {diff})")
    return "tells shared open files apart"


def _soft_dirty() -> str:
    buf = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = address_of(buf)
    try:
        buf[0:1] = b"a"
        proc.clear_soft_dirty()
        buf[0:1] = b"b"                 # ... so this write must set ours again
        entry = proc.pagemap_entry(addr, PAGE_SIZE)
    finally:
        buf.close()
    if not entry & PM_SOFT_DIRTY:
        raise RuntimeError("no soft-dirty bit after a write (CONFIG_MEM_SOFT_DIRTY off); "
                           "not needed: the engine uses PAGEMAP_SCAN")
    return "soft-dirty bit set by a write after clear_refs"


def _cap_sys_resource() -> str:
    if not userns.has_cap(userns.CAP_SYS_RESOURCE):
        raise RuntimeError("not in the effective set; the engine uses PR_SET_MM_MAP instead")
    return "in the effective set"


def _nftables() -> str:
    from . import netlock
    if not (userns.in_initial() and userns.has_cap(userns.CAP_NET_ADMIN)):
        raise RuntimeError("needs root (CAP_NET_ADMIN over the host's network namespace): "
                           "--tcp-established dumps with outside peers are for root only")
    from .sys import nftables
    why = nftables.available()
    if why:
        raise RuntimeError(why)
    with nftables.Nft() as nft:     # an owned table: gone with the context
        nft.run(f"add table inet {netlock.PREFIX}check_{os.getpid()} {{ flags owner; }}\n")
    return "libnftables made an owned table"


def _run(name: str, required: bool, purpose: str, fn, *args) -> Feature:
    try:
        return Feature(name, True, required, fn(*args), purpose)
    except Exception as e:  # a probe must never abort the whole check
        return Feature(name, False, required, str(e) or type(e).__name__, purpose)


def identity() -> str:
    """Who the checks ran as, and what follows for restores."""
    who = userns.who(os.getuid())
    if userns.privileged():
        return f"{who}, privileged: restores recreate PIDs where asked (the host's PID namespace too)"
    return (f"{who}, without root: every restore goes into a new user + PID namespace of yours "
            "(same PIDs inside)")


def check() -> list[Feature]:
    """Probe every feature; never raises for a missing one."""
    out = []
    with _Child() as c:
        # Order matters: the seize probe stops the child the next two need.
        out += [
            _run("PTRACE_SEIZE + INTERRUPT", True, "freezing every thread of the target", _seize, c),
            _run("PTRACE_GETREGSET NT_X86_XSTATE", True, "saving FPU/AVX state of each thread", _xstate, c),
            _run("PTRACE_GET_RSEQ_CONFIGURATION", True, "re-registering glibc's rseq area", _rseq, c),
            _run("pidfd_open + pidfd_getfd", True, "copying the target's file descriptors", _pidfd, c),
            _run("process_vm_readv/writev", True, "fast copying of memory pages", _vm_rw, c),
            _run("/proc/PID/mem write", True, "writing read-only and PROT_NONE pages", _proc_mem, c),
        ]
    priv = userns.privileged()
    out += [
        _run("unprivileged user namespaces", not priv, "restoring without root (a user namespace of your own)",
             _userns),
        _run("ptrace of your processes", True, "dumping a process tree (kernel.yama.ptrace_scope)", _ptrace_scope),
        _run("clone3 with set_tid", True, "recreating the exact PIDs and TIDs", _clone3_set_tid),
        _run("PAGEMAP_SCAN ioctl", True, "skipping never-touched and zero pages", _pagemap_scan),
        _run("PR_SET_MM_MAP", True, "restoring mm fields and /proc/PID/exe", _mm_map),
        _run("kcmp", True, "finding fds that share an open file", _kcmp),
        _run("userfaultfd", False, "lazy restore (--lazy-pages)", _userfaultfd),
        _run("nftables", False, "the network lock of --tcp-established dumps", _nftables),
        _run("soft-dirty pages", False, "CRIU-style incremental dumps", _soft_dirty),
        _run("CAP_SYS_RESOURCE", False, "single-field PR_SET_MM options", _cap_sys_resource),
    ]
    return out
