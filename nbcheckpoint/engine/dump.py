"""Dump: freeze a process tree, save everything, then kill it or let it go on.

Phases, in order:

1. validate the images dir (before touching the target);
2. freeze every thread of every process of the tree (seize.py);
3. per process: collect what needs no injection: VMAs (mm.py), fds (files/);
4. inject into the process (a scratch page, brk(0), handlers, per-thread
   state) and put every register back: after this phase the process is as
   it was, so a failure later only needs a thaw; save its shmem objects;
5. leave-running: once every process is done with 3-4 (a snapshot child
   shares its parent's fds, and must not be there while fds are classified),
   fork each process by an injected clone into a copy-on-write snapshot
   (snapshot.py);
6. stream private pages: kill mode, or a process without a snapshot, all of
   them now; with a snapshot only the VMAs a fork does not copy (MADV_DONTFORK,
   MADV_WIPEONFORK);
7. leave-running: thaw now (progress "thawed"), then read the remaining pages
   out of the snapshots while the tree runs, and release them;
8. fsync everything, write the inventory, rename: the image appears whole;
9. otherwise kill the still-frozen process only now that the image is safe.

Any failure before 9 thaws the process, releases the snapshots and removes
the partial image.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import time
from dataclasses import dataclass, field

from .core import dump_thread
from .._version import __version__
from .errors import DumpError, EngineError
from .files import DumpContext, locks
from .options import Options
from .images import core_pb2, files_pb2, imagedir, inventory_pb2, names, pstree_pb2
from . import sigframe, snapshot
from .inject import Remote, find_syscall_insn, libc_guard
from .mapped import MappedObjects
from .mm import dump_mm, private_dirty_vmas
from .images import mm_pb2
from . import pages, timers
from .seize import FrozenTree
from .sys import proc, userns, x86_64
from .sys.libc import PAGE_SIZE
from .task import dump_task

log = logging.getLogger(__name__)


@dataclass
class DumpStats:
    pid: int
    images_dir: str
    threads: int
    vmas: int
    pages_bytes: int
    image_bytes: int
    copy_seconds: float      # freeze to image data written (page cache), not yet durable
    frozen_seconds: float    # how long the process could not run: freeze to thaw (or kill)
    total_seconds: float     # until the image is durable and renamed into place
    snapshot: bool = False   # leave-running: every process's pages came from a CoW snapshot

    @property
    def frozen_s(self) -> float:
        return self.frozen_seconds


def dump(pid: int, images_dir, leave_running: bool = False, progress=None, options: Options | None = None) -> DumpStats:
    """Checkpoint the process tree rooted at `pid` into `images_dir`."""
    t0 = time.monotonic()
    options = options or Options()
    leave_running = leave_running or options.leave_running
    options = dataclasses.replace(options, leave_running=leave_running)     # the caller's stays as it was
    img = imagedir.ImageWriter(os.fspath(images_dir))
    frozen = None
    files = DumpContext(img, options)
    snaps: list[snapshot.Snapshot] = []
    try:
        frozen = FrozenTree(pid).freeze()
        if progress:
            progress("frozen", len(frozen.all_tids()), 0)
        ns = PidView(pid, frozen)
        objects = MappedObjects(frozen.order)
        files.prepare(frozen.order)
        tree = img.messages(names.PSTREE, pstree_pb2.Process)
        nthreads = nvmas = pages_bytes = 0
        shmem_done: set[int] = set()
        procs: list[_Proc] = []
        for p in frozen.order:
            tree.add(ns.process(p, tids=[ns.v(t, p) for t in frozen.tids[p]], stopped=p in frozen.stopped))
            leftovers = [ns.v(z) for z, parent in frozen.leftovers.items() if parent == p]
            d = _dump_process(p, frozen.tids[p], img, files, shmem_done, ns, objects, leftovers)
            procs.append(d)
            nthreads, nvmas, pages_bytes = nthreads + d.nthreads, nvmas + len(d.mm.vmas), pages_bytes + d.nbytes
        for shmem_id, where in objects.pending():     # now that every process told where it maps them
            pages_bytes += pages.dump_shmem_mapped(shmem_id, where, img)
        for z, status in frozen.zombies.items():
            tree.add(ns.process(z, zombie=True, exit_status=status, comm=proc.stat(z)[2]))
        files.dump_done()
        fw = img.messages(names.FILES, files_pb2.FileEntry)
        for f in files.files:
            fw.add(f)

        if leave_running and options.snapshot:
            for d in procs:
                d.snapshot = _take_snapshot(d, snaps, progress)
        for d in procs:
            pages_bytes += d.pages.dump(d.pid, d.frozen_vmas(), progress)

        copy_s = frozen_s = time.monotonic() - t0
        if leave_running:
            frozen.thaw()
            frozen = None
            frozen_s = time.monotonic() - t0
            if progress:
                progress("thawed", 0, 0)
            snapshot.debug_kill("thawed")
            for d in procs:
                if d.snapshot is not None:
                    pages_bytes += d.pages.dump(d.snapshot.child, d.forked_vmas(), progress, shared_cow=True)
                    d.snapshot.release()
            copy_s = time.monotonic() - t0
        if progress:
            progress("sync", 0, 0)
        img.finish_files()
        image_bytes = sum(s.size for s in img._sums)
        inv = inventory_pb2.Inventory(
            engine_version=__version__, root_pid=ns.v(pid), in_pidns=ns.separate, kernel_release=platform.release(),
            arch=platform.machine(), page_size=PAGE_SIZE, xstate_size=x86_64.xstate_size(),
            xfeatures=x86_64.xfeatures(), created=time.time(), leave_running=leave_running,
            hostname=platform.node(), frozen_seconds=frozen_s, owner_uid=userns.outer_id("uid", os.getuid()),
            network_lock=files.netlock.new_name() or "")     # kill mode only (files/inet.py)
        final = img.commit(inv)
        if frozen is not None:
            frozen.kill()
            frozen = None
            frozen_s = time.monotonic() - t0
            try:
                files.netlock.persist()         # before the dump's own (owned) lock goes
            except EngineError as e:
                log.warning("the network lock could not be kept after the dump (%s): outside peers of %s "
                            "may reset their connections before the restore", e, final)
        return DumpStats(pid=pid, images_dir=final, threads=nthreads, vmas=nvmas,
                         pages_bytes=pages_bytes, image_bytes=image_bytes, copy_seconds=copy_s,
                         frozen_seconds=frozen_s, total_seconds=time.monotonic() - t0,
                         snapshot=leave_running and options.snapshot and all(
                             d.snapshot is not None or not d.forked_vmas() for d in procs))
    except BaseException:
        img.abort()
        if frozen is not None:
            frozen.thaw()
        raise
    finally:
        for s in snaps:             # after the thaw: each release interrupts its process briefly
            s.release()
        files.close()


@dataclass
class _Proc:
    """One process of the tree between the phases of the dump (see the module docstring)."""
    pid: int                    # the engine's view
    vpid: int                   # the process's view (the image's)
    mm: mm_pb2.Mm
    syscall_addr: int
    pages: pages.PrivatePages
    nthreads: int
    nbytes: int                 # shmem bytes saved so far
    snapshot: snapshot.Snapshot | None = None
    private: list = field(default_factory=list)
    not_in_child: list = field(default_factory=list)    # VMAs the fork unexpectedly lacks

    def frozen_vmas(self) -> list:
        """The private VMAs to read out of the frozen process."""
        if self.snapshot is None:
            return self.private
        return [v for v in self.private if not snapshot.forked_intact(v) or v in self.not_in_child]

    def forked_vmas(self) -> list:
        """The private VMAs a snapshot child holds as they were."""
        return [v for v in self.private if snapshot.forked_intact(v) and v not in self.not_in_child]


class PidView:
    """PIDs as the dumped processes see them.

    The engine works with PIDs of its own namespace (ptrace, /proc); the image
    records what the processes themselves see (NSpid's last field), which is
    what their memory holds (glibc caches TIDs) and what restore recreates.
    """

    def __init__(self, root: int, frozen: FrozenTree):
        ns = proc.link(root, "ns/pid")
        self.separate = ns != proc.link("self", "ns/pid")
        self.tree = set(frozen.order) | set(frozen.zombies)
        self.map: dict[int, int] = {}
        if self.separate:
            for p in self.tree:
                if proc.link(p, "ns/pid") != ns:
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


def _dump_process(pid: int, tids: list[int], img, files: DumpContext, shmem_done: set, ns: PidView,
                  objects: MappedObjects, leftovers: list[int] = ()) -> _Proc:
    """One live process: address space, fds, per-process and per-thread state, shmem.

    `pid` and `tids` are the engine's view; files and records use ns.v().
    Its private pages come later (dump() phases 5-7).  `leftovers`: zombie
    snapshot children of an earlier dump whose engine died (seize.py), which
    the process is made to reap (their pids as it sees them).
    """
    mm = dump_mm(pid, objects)
    fds = files.dump_fds(pid)
    locks.dump_locks(files, pid, fds, vpid=ns.v(pid))
    vdso = next((v for v in mm.vmas if v.kind == mm_pb2.VDSO), None)
    if vdso is None:
        raise DumpError(f"process {pid} has no [vdso] mapping; the engine needs one to run syscalls in it")
    syscall_addr = find_syscall_insn(pid, vdso.start, vdso.end)
    task, threads, task_timers = _inject_phase(pid, tids, mm, syscall_addr, objects, leftovers)
    vpid = ns.v(pid)
    task.pid = vpid
    for t in threads:
        t.tid = ns.v(t.tid, pid)
    for pt in task_timers.posix:      # a SIGEV_THREAD_ID timer's thread, as /proc told the engine
        if pt.notify_tid:
            pt.notify_tid = ns.v(pt.notify_tid, pid)
    nbytes = 0
    for v in mm.vmas:
        if v.shmem_id and v.shmem_id not in shmem_done:
            shmem_done.add(v.shmem_id)
            source = objects.shmem_source(pid, v)
            if source is not None:          # (else objects.pending(), once every process is probed)
                nbytes += pages.dump_shmem(source, v, img)
    img.messages(names.task(vpid), core_pb2.TaskCore).add(task)
    cores = img.messages(names.core(vpid), core_pb2.ThreadCore)
    for t in threads:
        cores.add(t)
    img.messages(names.mm(vpid), mm_pb2.Mm).add(mm)
    timers.write(img, vpid, task_timers)
    fw = img.messages(names.fds(vpid), files_pb2.FdEntry)
    for e in fds:
        fw.add(e)
    return _Proc(pid=pid, vpid=vpid, mm=mm, syscall_addr=syscall_addr, pages=pages.PrivatePages(img, str(vpid)),
                 nthreads=len(threads), nbytes=nbytes, private=list(private_dirty_vmas(mm)))


@contextlib.contextmanager
def _gadget_page(pid: int, mm, syscall_addr: int):
    """Map the page of sigframe.CODE and a signal frame in `pid` (frozen) for a while.

    Yields (page address, the Guard of GADGET).  Mapping and unmapping that
    page are guarded by libc's own gadgets and a frame on the stack when the
    process has them (glibc does), else not.
    """
    xsize = x86_64.xstate_size()
    size = PAGE_SIZE + ((sigframe.frame_size(xsize) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
    boot_guard = _stack_guard(pid, mm)
    with Remote(pid, pid, syscall_addr, per_call=True, guard=boot_guard) as boot:
        base = boot.map_scratch(size, prot=7)     # rwx, for a few milliseconds
    try:
        boot.write(base, sigframe.CODE)
        yield base, sigframe.Guard(base, base + PAGE_SIZE, base + PAGE_SIZE + 8, 0, xsize, x86_64.xfeatures())
    finally:
        with Remote(pid, pid, syscall_addr, per_call=True, guard=boot_guard) as boot:
            boot.syscall("munmap", base, size)


def _inject_phase(pid: int, tids: list[int], mm, syscall_addr: int, objects: MappedObjects,
                  leftovers: list[int] = ()):
    """State only the process itself can tell us, read by injected syscalls.

    Every call runs at the gadget page (sigframe.py), so that if the engine
    dies mid-call the thread returns to its own state.
    """
    xsize = x86_64.xstate_size()
    with _gadget_page(pid, mm, syscall_addr) as (base, guard):
        data = base + 256
        with Remote(pid, pid, syscall_addr, scratch=data, guard=guard) as main:
            brk = main.syscall("brk", 0)
            task = dump_task(pid, main)
            task_timers = timers.dump(pid, main)
            threads = [dump_thread(pid, pid, main, xsize)]
            for z in leftovers:
                main.syscall("wait4", z, 0, snapshot.WALL | snapshot.WNOHANG, 0, check=False)
            objects.probe(main, pid)
        for tid in tids[1:]:
            with Remote(pid, tid, syscall_addr, scratch=data, guard=guard) as r:
                threads.append(dump_thread(pid, tid, r, xsize))
    mm.brk = brk
    return task, threads, task_timers


def _take_snapshot(d: _Proc, snaps: list, progress) -> snapshot.Snapshot | None:
    """Fork process d (frozen) into a CoW snapshot; None (and a warning) if it cannot be."""
    if not d.forked_vmas():
        return None                 # nothing a snapshot would hold
    why = snapshot.unsuitable(d.pid)
    if why is None:
        try:
            with _gadget_page(d.pid, d.mm, d.syscall_addr) as (base, guard):
                snap = snapshot.take(d.pid, d.syscall_addr, base, guard, base + 256)
                snaps.append(snap)
                snap.attach()
            d.not_in_child = snap.missing(d.forked_vmas())
            if d.not_in_child:
                log.warning("process %d: its snapshot lacks %s; they are copied while the tree is frozen", d.pid,
                            ", ".join(f"{v.start:#x}-{v.end:#x}" for v in d.not_in_child))
            return snap
        except snapshot.CloneFailed as e:
            why = str(e)
    log.warning("process %d: no copy-on-write snapshot (%s); its memory is copied while the tree is frozen",
                d.pid, why)
    if progress:
        progress("no-snapshot", d.vpid, 0)
    return None


def _stack_guard(pid: int, mm):
    """A guard for the main thread made of libc's gadgets and a frame on its stack, or None."""
    return libc_guard(pid, pid, ((v.start, v.end, v.prot, v.file.path if v.HasField("file") else v.name,
                                  v.kind == mm_pb2.ANON_PRIVATE) for v in mm.vmas))
