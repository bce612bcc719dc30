"""Dump: freeze a process tree, save everything, then kill it or let it go on.

Phases, in order:

1. validate the images dir (before touching the target);
2. freeze every thread of every process of the tree (seize.py);
3. per process: collect what needs no injection: VMAs (mm.py), fds (files/);
4. inject into the process (a scratch page, brk(0), handlers, per-thread
   state) and put every register back: after this phase the process is as
   it was, so a failure later only needs a thaw;
5. stream its private pages and the shmem objects it maps (pages.py);
6. leave-running: thaw now, so the process is frozen only while we copy;
7. fsync everything, write the inventory, rename: the image appears whole;
8. otherwise kill the still-frozen process only now that the image is safe.

Any failure before 8 thaws the process and removes the partial image.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

from .core import dump_thread
from .errors import DumpError
from .files import DumpContext, locks
from .options import Options
from .images import imagedir, inventory_pb2, pstree_pb2
from . import sigframe
from .inject import Remote, find_syscall_insn
from .sys import ptrace
from .sys.memory import ProcMem
from .mm import dump_mm, private_dirty_vmas
from .images import mm_pb2
from . import pages, timers
from .seize import FrozenTree
from .sys import proc, x86_64
from .sys.libc import PAGE_SIZE
from .task import dump_task


@dataclass
class DumpStats:
    pid: int
    images_dir: str
    threads: int
    vmas: int
    pages_bytes: int
    image_bytes: int
    copy_seconds: float      # freeze to image data written (page cache), not yet durable
    frozen_seconds: float    # how long the process could not run
    total_seconds: float     # until the image is durable and renamed into place


def dump(pid: int, images_dir, leave_running: bool = False, progress=None, options: Options | None = None) -> DumpStats:
    """Checkpoint the process tree rooted at `pid` into `images_dir`."""
    t0 = time.monotonic()
    options = options or Options()
    leave_running = options.leave_running = leave_running or options.leave_running
    img = imagedir.ImageWriter(os.fspath(images_dir))
    frozen = None
    files = DumpContext(img, options)
    try:
        frozen = FrozenTree(pid).freeze()
        if progress:
            progress("frozen", len(frozen.all_tids()), 0)
        ns = PidView(pid, frozen)
        tree = img.messages("pstree.img", "nbcheckpoint.images.Process")
        nthreads = nvmas = pages_bytes = 0
        shmem_done: set[int] = set()
        for p in frozen.order:
            tree.add(ns.process(p, tids=[ns.v(t, p) for t in frozen.tids[p]], stopped=p in frozen.stopped))
            n, v, b = _dump_process(p, frozen.tids[p], img, files, shmem_done, progress, ns)
            nthreads, nvmas, pages_bytes = nthreads + n, nvmas + v, pages_bytes + b
        for z, status in frozen.zombies.items():
            tree.add(ns.process(z, zombie=True, exit_status=status, comm=proc.stat(z)[2]))
        fw = img.messages("files.img", "nbcheckpoint.images.FileEntry")
        for f in files.files:
            fw.add(f)

        copy_s = frozen_s = time.monotonic() - t0
        if leave_running:
            frozen.thaw()
            frozen = None
        if progress:
            progress("sync", 0, 0)
        img.finish_files()
        image_bytes = sum(s.size for s in img._sums)
        inv = inventory_pb2.Inventory(
            engine_version=_version(), root_pid=ns.v(pid), in_pidns=ns.separate, kernel_release=platform.release(),
            arch=platform.machine(), page_size=PAGE_SIZE, xstate_size=x86_64.xstate_size(),
            xfeatures=_xfeatures(), created=time.time(), leave_running=leave_running,
            hostname=platform.node(), frozen_seconds=frozen_s)
        final = img.commit(inv)
        if frozen is not None:
            frozen.kill()
            frozen = None
            frozen_s = time.monotonic() - t0
        return DumpStats(pid=pid, images_dir=final, threads=nthreads, vmas=nvmas,
                         pages_bytes=pages_bytes, image_bytes=image_bytes, copy_seconds=copy_s,
                         frozen_seconds=frozen_s, total_seconds=time.monotonic() - t0)
    except BaseException:
        img.abort()
        if frozen is not None:
            frozen.thaw()
        raise
    finally:
        files.close()


class PidView:
    """PIDs as the dumped processes see them.

    The engine works with PIDs of its own namespace (ptrace, /proc); the image
    records what the processes themselves see (NSpid's last field), which is
    what their memory holds (glibc caches TIDs) and what restore recreates.
    """

    def __init__(self, root: int, frozen: FrozenTree):
        self.separate = os.readlink(f"/proc/{root}/ns/pid") != os.readlink("/proc/self/ns/pid")
        self.tree = set(frozen.order) | set(frozen.zombies)
        self.map: dict[int, int] = {}
        if self.separate:
            ns = os.readlink(f"/proc/{root}/ns/pid")
            for p in self.tree:
                if os.readlink(f"/proc/{p}/ns/pid") != ns:
                    raise DumpError(f"process {p} lives in another PID namespace than the root {root}: "
                                    "nested PID namespaces are not supported")

    def v(self, tid: int, pid: int | None = None) -> int:
        if not self.separate:
            return tid
        if tid not in self.map:
            st = proc.status(pid or tid, tid if pid else None)
            self.map[tid] = int(st["NSpid"].split()[-1])
        return self.map[tid]

    def process(self, p: int, **kw) -> pstree_pb2.Process:
        st = proc.status(p)
        ppid = int(st["PPid"])
        parent = self.v(ppid) if ppid in self.tree else (0 if self.separate else ppid)
        pgid, sid = (int(st["NSpgid"].split()[-1]), int(st["NSsid"].split()[-1])) if self.separate else \
            (int(proc.stat(p)[5]), int(proc.stat(p)[6]))
        return pstree_pb2.Process(pid=self.v(p), ppid=parent, pgid=pgid, sid=sid, **kw)


def _dump_process(pid: int, tids: list[int], img, files: DumpContext, shmem_done: set, progress, ns: PidView):
    """One live process: address space, fds, per-process and per-thread state, pages.

    `pid` and `tids` are the engine's view; files and records use ns.v().
    """
    mm = dump_mm(pid)
    fds = files.dump_fds(pid)
    locks.dump_locks(files, pid, fds, vpid=ns.v(pid))
    vdso = next((v for v in mm.vmas if v.kind == mm_pb2.VDSO), None)
    if vdso is None:
        raise DumpError(f"process {pid} has no [vdso] mapping; the engine needs one to run syscalls in it")
    task, threads, task_timers = _inject_phase(pid, tids, mm, find_syscall_insn(pid, vdso.start, vdso.end))
    vpid = ns.v(pid)
    task.pid = vpid
    for t in threads:
        t.tid = ns.v(t.tid, pid)
    nbytes = pages.dump_private(pid, list(private_dirty_vmas(mm)), img, str(vpid), progress)
    for v in mm.vmas:
        if v.shmem_id and v.shmem_id not in shmem_done:
            shmem_done.add(v.shmem_id)
            nbytes += pages.dump_shmem(pid, v, img)
    img.messages(f"task-{vpid}.img", "nbcheckpoint.images.TaskCore").add(task)
    cores = img.messages(f"core-{vpid}.img", "nbcheckpoint.images.ThreadCore")
    for t in threads:
        cores.add(t)
    img.messages(f"mm-{vpid}.img", "nbcheckpoint.images.Mm").add(mm)
    timers.write(img, vpid, task_timers)
    fw = img.messages(f"fds-{vpid}.img", "nbcheckpoint.images.FdEntry")
    for e in fds:
        fw.add(e)
    return len(threads), len(mm.vmas), nbytes


def _inject_phase(pid: int, tids: list[int], mm, syscall_addr: int):
    """State only the process itself can tell us, read by injected syscalls.

    One page holds the sigreturn gadget and a signal frame (sigframe.py), so
    that if the engine dies mid-call the thread returns to its own state.
    Mapping and unmapping that page are guarded by libc's own gadgets and a
    frame on the stack when the process has them (glibc does), else not.
    """
    xsize = x86_64.xstate_size()
    size = PAGE_SIZE + ((sigframe.frame_size(xsize) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
    boot_guard = _stack_guard(pid, mm, xsize)
    with Remote(pid, pid, syscall_addr, per_call=True, guard=boot_guard) as boot:
        base = boot.map_scratch(size, prot=7)     # rwx, for a few milliseconds
    try:
        boot.write(base, sigframe.GADGET)
        guard = sigframe.Guard(base, base + PAGE_SIZE, base + PAGE_SIZE + 8, 0, xsize, _xfeatures())
        data = base + 256
        with Remote(pid, pid, syscall_addr, scratch=data, guard=guard) as main:
            brk = main.syscall("brk", 0)
            task = dump_task(pid, main)
            task_timers = timers.dump(pid, main)
            threads = [dump_thread(pid, pid, main, xsize)]
        for tid in tids[1:]:
            with Remote(pid, tid, syscall_addr, scratch=data, guard=guard) as r:
                threads.append(dump_thread(pid, tid, r, xsize))
    finally:
        with Remote(pid, pid, syscall_addr, per_call=True, guard=boot_guard) as boot:
            boot.syscall("munmap", base, size)
    mm.brk = brk
    return task, threads, task_timers


def _stack_guard(pid: int, mm, xsize: int):
    """A guard for the main thread made of libc's gadgets and a frame on its stack, or None."""
    regs = ptrace.getregs(pid)
    frame = (regs.rsp - 128 - sigframe.frame_size(xsize) - 64) & ~63      # below the red zone
    stack = next((v for v in mm.vmas if v.start <= regs.rsp - 1 < v.end and v.prot & 2
                  and v.kind == mm_pb2.ANON_PRIVATE), None)
    if stack is None or frame < stack.start:
        return None
    syscall_ret = restore_rt = None
    with ProcMem(pid) as mem:
        for v in mm.vmas:
            if not (v.prot & 4 and v.HasField("file") and "/libc.so" in v.file.path):
                continue
            code = mem.pread(v.end - v.start, v.start)
            i, j = code.find(sigframe.LIBC_SYSCALL_RET), code.find(sigframe.LIBC_RESTORE_RT)
            if i >= 0 and j >= 0:
                syscall_ret, restore_rt = v.start + i, v.start + j
                break
    if syscall_ret is None:
        return None
    return sigframe.Guard(syscall_ret, frame, frame, restore_rt, xsize, _xfeatures())


def _xfeatures() -> int:
    eax, _, _, edx = x86_64.cpuid(0xD, 0)
    return eax | (edx << 32)


def _version() -> str:
    from .. import __version__
    return __version__
