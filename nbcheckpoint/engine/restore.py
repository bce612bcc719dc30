"""Restore: bring a dumped process back with the same PID and TIDs.

Phases, in order (why, where it matters):

1. read and verify the image; check that mapped and open files are unchanged
   and that the PID is free -- all before any process exists;
2. open every file, shmem object and directory the process needs *in the
   engine*, at fd numbers above any the process uses, so the stub inherits
   them when it is created and no dup3() can clobber a source;
3. create the stub with clone3(set_tid=[pid]) and seize it;
4. in the stub, by injected syscalls: unregister the inherited rseq, unmap
   the engine's memory, move the vDSO, PR_SET_MM_MAP (after the unmap: EBUSY
   while the old exe is mapped), map every VMA, write the pages;
5. fds into place (dup3), everything else closed; cwd, umask, personality,
   signal handlers, rlimits, pdeathsig;
6. threads by injected clone3(set_tid=[tid]); per-thread state injected into
   each thread; credentials last (clone3 with set_tid needs our privileges);
7. registers and xstate, then detach: the process runs.

Any failure kills the stub: no half-restored process is ever left running.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import resource
import signal
import time
from dataclasses import dataclass

from . import core, files, mm as mmmod, pages, task as taskmod
from .errors import ImageError, RestoreError, SysError
from .images import core_pb2, files_pb2, imagedir, mm_pb2, pstree_pb2
from .inject import Remote, find_syscall_insn
from .options import Options
from .sys import proc, ptrace, x86_64
from .sys.libc import PAGE_SIZE
from .sys.x86_64 import NR

O_CLOEXEC = 0o2000000
CLONE_THREAD_FLAGS = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000  # VM FS FILES SIGHAND THREAD SYSVSEM


@dataclass
class RestoreResult:
    pid: int
    seconds: float
    pages_bytes: int


class CloneArgs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
        "tls", "set_tid", "set_tid_size", "cgroup")]


def restore(images_dir, progress=None, options: Options | None = None) -> RestoreResult:
    t0 = time.monotonic()
    img = _Image(os.fspath(images_dir), options or Options())
    pid = img.pid
    _wait_pid_free(pid)
    engine_fds: list[int] = []
    stub = None
    try:
        prepared = _open_everything(img, engine_fds)
        stub = _create_stub(pid)
        npages = _rebuild(stub, img, prepared, progress)
        stub = None
    except BaseException:
        if stub is not None:
            _kill_stub(stub)
        raise
    finally:
        for fd in engine_fds:
            os.close(fd)
        img.files.close()
    return RestoreResult(pid=pid, seconds=time.monotonic() - t0, pages_bytes=npages)


class _Image:
    """Everything restore needs from the image, read and checked up front."""

    def __init__(self, path: str, options: Options):
        self.reader = rd = imagedir.ImageReader(path)
        inv = rd.inventory
        if inv.arch != "x86_64" or inv.page_size != PAGE_SIZE:
            raise ImageError(f"image {rd.dir} is for {inv.arch} with {inv.page_size}-byte pages; "
                             f"this machine is x86_64 with {PAGE_SIZE}-byte pages")
        if inv.xstate_size != x86_64.xstate_size():
            raise ImageError(f"image {rd.dir} was taken on a CPU with a {inv.xstate_size}-byte XSAVE area; "
                             f"this CPU's is {x86_64.xstate_size()} bytes: restore on a CPU like the original")
        rd.verify_all_metadata()
        procs = rd.messages("pstree.img", pstree_pb2.Process)
        if len(procs) != 1:
            raise ImageError(f"image {rd.dir} holds {len(procs)} processes; this version restores one")
        self.process = procs[0]
        self.pid = pid = self.process.pid
        self.task = _one(rd.messages(f"task-{pid}.img", core_pb2.TaskCore), f"task-{pid}.img")
        self.threads = rd.messages(f"core-{pid}.img", core_pb2.ThreadCore)
        if [t.tid for t in self.threads] != list(self.process.tids) or self.threads[0].tid != pid:
            raise ImageError(f"image {rd.dir}: core-{pid}.img does not match the process's thread list")
        for t in self.threads:
            if len(t.regs) != x86_64.REGS_SIZE or len(t.xstate) != inv.xstate_size:
                raise ImageError(f"image {rd.dir}: registers of thread {t.tid} are damaged")
        self.mm = _one(rd.messages(f"mm-{pid}.img", mm_pb2.Mm), f"mm-{pid}.img")
        self.fds = rd.messages(f"fds-{pid}.img", files_pb2.FdEntry)
        self.files = files.RestoreContext(rd, rd.messages("files.img", files_pb2.FileEntry), options)
        mmmod.check_files_unchanged(self.mm, pid)
        self.files.check(pid, self.fds)


def _one(msgs, name):
    if len(msgs) != 1:
        raise ImageError(f"{name} holds {len(msgs)} messages, expected 1")
    return msgs[0]


def _wait_pid_free(pid: int, timeout: float = 3.0) -> None:
    """A killed process may stay a zombie until its parent reaps it: give that a moment."""
    deadline = time.monotonic() + timeout
    while proc.exists(pid):
        state = proc.pid_state(pid)
        if state not in ("Z", "X", "") or time.monotonic() > deadline:
            who = _describe(pid)
            raise RestoreError(f"PID {pid} is taken by another process ({who}); the image needs that "
                               "exact PID. Stop that process, or restore where the PID is free")
        time.sleep(0.01)


def _describe(pid: int) -> str:
    try:
        return f"{proc.comm(pid, pid)!r}, state {proc.pid_state(pid)}"
    except Exception:
        return "unknown"


class _Prepared:
    def __init__(self):
        self.ofd: dict[int, int] = {}       # FileEntry id -> fd
        self.maps: dict[str, int] = {}      # mapped file path -> fd
        self.shmem: dict[int, int] = {}     # shmem id -> fd
        self.exe = -1
        self.fs: dict[str, int] = {}


def _open_everything(img: _Image, engine_fds: list[int]) -> _Prepared:
    p = _Prepared()
    target_max = max([e.fd for e in img.fds], default=2)
    need = target_max + 64 + len(img.fds) + len(img.mm.vmas)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need + 1024:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, need + 1024)), hard))
    base = max(target_max + 1, 3)

    def high(fd: int, owned: bool = True) -> int:
        # Above every fd the target uses, so dup3() into place never hits a source.
        try:
            new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base)
        finally:
            if owned:
                os.close(fd)
        engine_fds.append(new)
        return new

    for e in img.fds:
        if e.id not in p.ofd:
            p.ofd[e.id] = high(img.files.open(e.id), owned=False)
    img.files.close()     # the stub inherits the high copies
    for path, flags in mmmod.mapped_files(img.mm).items():
        try:
            p.maps[path] = high(os.open(path, flags | os.O_CLOEXEC))
        except OSError as e:
            raise RestoreError(f"cannot open mapped file {path}: {e.strerror}") from None
    for v in img.mm.vmas:
        if v.shmem_id and v.shmem_id not in p.shmem:
            p.shmem[v.shmem_id] = high(pages.restore_shmem(img.reader, v))
    p.exe = high(os.open(img.mm.exe.path, os.O_RDONLY | os.O_CLOEXEC))
    p.fs = {k: high(fd) for k, fd in taskmod.fs_fds(img.task).items()}
    return p


# --- the stub -----------------------------------------------------------------
# PyDLL keeps the GIL across the call, so the child starts holding it, as after
# os.fork(); a CDLL call would release it and the child could block forever on
# a GIL owned by a thread that does not exist in the child.
_pysyscall = ctypes.PyDLL(None, use_errno=True).syscall
_pysyscall.restype = ctypes.c_long


def _create_stub(pid: int) -> int:
    tids = (ctypes.c_int32 * 1)(pid)
    args = CloneArgs(exit_signal=signal.SIGCHLD, set_tid=ctypes.addressof(tids), set_tid_size=1)
    # The child must run no Python code that could act (signal handlers
    # raising into the engine's frames): it inherits a fully blocked mask.
    old = signal.pthread_sigmask(signal.SIG_SETMASK, set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP})
    try:
        r = _pysyscall(ctypes.c_long(NR["clone3"]), ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
        if r == 0:
            _pysyscall(ctypes.c_long(NR["prctl"]), ctypes.c_long(1), ctypes.c_long(signal.SIGKILL))
            while True:
                _pysyscall(ctypes.c_long(NR["pause"]))
        err = ctypes.get_errno()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    if r < 0:
        if err == errno.EEXIST:
            raise RestoreError(f"PID {pid} is taken ({_describe(pid)}); the image needs that exact PID")
        raise SysError(err, "clone3(set_tid)", pid,
                       "creating a process with a chosen PID needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE")
    try:
        ptrace.seize(r, ptrace.PTRACE_O_TRACECLONE | ptrace.PTRACE_O_EXITKILL)
        ptrace.interrupt(r)
        _wait_event_stop(r)
    except BaseException:
        _kill_stub(r)
        raise
    return r


def _wait_event_stop(tid: int) -> None:
    while True:
        _, status = ptrace.wait(tid)
        if (status & 0xFF) != 0x7F:
            raise RestoreError(f"restored thread {tid} died during restore (status {status:#x})")
        if ptrace.stop_event(status) == ptrace.PTRACE_EVENT_STOP:
            return
        ptrace.cont(tid, 0)    # any signal-stop before ours: drop it, wait for the interrupt


def _kill_stub(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _specials(pid: int) -> dict[int, tuple[int, int]]:
    return {mmmod.SPECIAL[m.path]: (m.start, m.end) for m in proc.maps(pid)
            if m.path in mmmod.SPECIAL and mmmod.SPECIAL[m.path] in mmmod.VDSO_KINDS}


def _rebuild(pid: int, img: _Image, p: _Prepared, progress) -> int:
    mm, t, threads = img.mm, img.task, img.threads
    current = _specials(pid)
    vdso = current[mm_pb2.VDSO]
    tids = [pid]
    with Remote(pid, pid, find_syscall_insn(pid, *vdso)) as r:
        # 4. the address space
        core.unregister_rseq(r, pid)
        mmmod.teardown(r, list(current.values()))
        mmmod.move_vdso(r, mm, current)
        r.map_scratch(addr=mmmod.free_hole(mm, PAGE_SIZE))
        mmmod.set_mm_map(r, mm, p.exe)
        mmmod.map_vmas(r, mm, p.maps, p.shmem)
        npages = pages.restore_private(pid, img.reader, str(pid), mmmod.VmaIndex(mm.vmas), progress)
        mmmod.apply_advice(r, mm)
        # 5. files and process state
        taskmod.restore_fs(r, t, p.fs)
        _place_fds(r, img.fds, p.ofd)
        img.files.after_place(r, pid, img.fds)
        if img.process.sid == pid:
            r.syscall("setsid")
        elif img.process.pgid == pid:
            r.syscall("setpgid", 0, 0)
        taskmod.restore_sigactions(r, t)
        taskmod.restore_misc(r, t)
        taskmod.restore_rlimits(pid, t)
        # 6. threads
        for th in threads[1:]:
            tids.append(_clone_thread(r, th.tid))
        for th in threads[1:]:
            with Remote(pid, th.tid, r.syscall_addr, scratch=r.scratch) as tr:
                core.restore_thread_state(tr, th, taskmod.queue_signal)
                taskmod.restore_creds(tr, t)
                tr.set_final_state(core.final_regs(th), th.sigmask)
        core.restore_thread_state(r, threads[0], taskmod.queue_signal)
        for info in t.shared_pending:
            taskmod.queue_signal(r, info, None)
        taskmod.restore_creds(r, t)
        r.syscall("munmap", r.scratch, PAGE_SIZE)
        r.set_final_state(core.final_regs(threads[0]), threads[0].sigmask)
    # 7. FPU/vector state last: nothing injected may disturb it afterwards.
    for th in threads:
        ptrace.setregset(th.tid, ptrace.NT_X86_XSTATE, th.xstate)
        core.restore_sched(th)
    for tid in tids:
        ptrace.detach(tid)
    return npages


def _place_fds(r: Remote, entries, ofd: dict[int, int]) -> None:
    wanted = sorted(e.fd for e in entries)
    for e in entries:
        r.syscall("dup3", ofd[e.id], e.fd, O_CLOEXEC if e.cloexec else 0)
    # Close everything else the stub inherited from the engine.
    lo = 0
    for fd in wanted + [1 << 31]:
        if fd > lo:
            r.syscall("close_range", lo, min(fd - 1, 0x7FFFFFFF), 0)
        lo = fd + 1


def _clone_thread(r: Remote, tid: int) -> int:
    s = r.scratch
    r.write(s + 256, tid.to_bytes(4, "little", signed=True))
    args = CloneArgs(flags=CLONE_THREAD_FLAGS, set_tid=s + 256, set_tid_size=1)
    r.write(s, bytes(args))
    r.clone_tids.clear()
    new = r.syscall("clone3", s, ctypes.sizeof(args))
    if new != tid:
        raise RestoreError(f"thread {tid} came back as {new}")
    _wait_event_stop(tid)
    return tid
