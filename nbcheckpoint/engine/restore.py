"""Restore: bring a dumped process tree back with the same PIDs and TIDs.

Phases, in order (why, where it matters):

1. read and verify the image; check that mapped and open files are unchanged
   and that every PID is free -- all before any process exists;
2. open every file, shmem object and directory the tree needs *in the
   engine*, at fd numbers above any the processes use, so the stubs inherit
   them and no dup3() can clobber a source;
3. create the stubs, parents before children (pstree.py): the root by
   clone3(set_tid=[pid]) in the engine, the others by the same call injected
   into their parent; session leaders setsid() at once; then process groups;
4. per process, by injected syscalls: unregister the inherited rseq, unmap
   the engine's memory, move the vDSO, PR_SET_MM_MAP (after the unmap: EBUSY
   while the old exe is mapped), THP disable (the stub has the engine's; before
   any page is written), map every VMA, write the pages (with
   --lazy-pages, not those of the big anonymous VMAs: lazy.py);
5. fds into place (dup3), everything else closed; cwd, umask, personality,
   signal handlers, pdeathsig, child subreaper;
6. threads by injected clone3(set_tid=[tid]), then rlimits (RLIMIT_NPROC may
   leave no room for the threads); per-thread state injected into
   each thread; with --lazy-pages, the userfaultfd registered (after every
   step that may touch the process's memory, before the credentials);
   credentials last (clone3 with set_tid needs our privileges); zombies exit
   with their dumped status (their parents are still stubs);
7. registers and xstate of every thread, then detach them all: the tree runs,
   and no process runs before every process is whole (or, lazily, before
   every page still to come is registered with the page server).

Any failure kills every stub and reaps it, every thread with __WALL (pstree.kill, bounded): no
half-restored process is ever left running, and the image's PIDs are free again.
"""
from __future__ import annotations

import logging
import dataclasses
import errno
import fcntl
import os
import struct
import resource
import signal
import stat
import time
from dataclasses import dataclass

from . import core, files, lazy, mm as mmmod, netlock, pages, pstree, task as taskmod, timers
from .errors import EngineError, ImageError, RestoreError, SysError
from .files import locks, tty
from .images import core_pb2, files_pb2, imagedir, mm_pb2, names, pstree_pb2
from .inject import BATCH_AREA, Remote
from .options import Options
from .sys import mountns, proc, ptrace, spawn, userns, x86_64
from .sys.libc import PAGE_SIZE

log = logging.getLogger(__name__)

O_CLOEXEC = 0o2000000


@dataclass
class RestoreResult:
    pid: int                    # the root, as the caller sees it
    seconds: float
    pages_bytes: int
    pids: list[int] = None      # every live process, as the caller sees them
    vpid: int = 0               # the root as it sees itself (differs with --pidns)
    init_pid: int | None = None  # --pidns: the namespace's init, the caller's child
    # --lazy-pages: the page server; call lazy.serve() at once (None: nothing was left lazy)
    lazy: "lazy.PageServer | None" = None
    init: "pstree.Stub | None" = None   # --pidns: the init, holder of the lifeline (Options.lifeline)

    def release(self) -> None:
        """Options.lifeline: let the namespace outlive us from now on."""
        if self.init is not None:
            pstree.init_release(self.init)

    def end(self) -> None:
        """Options.lifeline: end the lifeline now -- the init exits and the namespace dies."""
        if self.init is not None:
            self.init.release_fd.close()


class _Proc:
    """One process of the image."""

    def __init__(self, rd, p: pstree_pb2.Process, xstate_size: int):
        self.p = p
        self.pid = pid = p.pid
        if p.zombie:
            return
        self.task = _one(rd.messages(names.task(pid), core_pb2.TaskCore), names.task(pid))
        taskmod.check_task(self.task, f"image {rd.dir}: {names.task(pid)}")
        self.threads = rd.messages(names.core(pid), core_pb2.ThreadCore)
        if [t.tid for t in self.threads] != list(p.tids) or not self.threads or self.threads[0].tid != pid:
            raise ImageError(f"image {rd.dir}: {names.core(pid)} does not match the process's thread list")
        for t in self.threads:
            if len(t.regs) != x86_64.REGS_SIZE or len(t.xstate) != xstate_size:
                raise ImageError(f"image {rd.dir}: registers of thread {t.tid} are damaged")
            core.check_thread(t, f"image {rd.dir}: {names.core(pid)}")
        self.mm = _one(rd.messages(names.mm(pid), mm_pb2.Mm), names.mm(pid))
        mmmod.check_vmas(self.mm, f"image {rd.dir}: {names.mm(pid)}")
        self.fds = rd.messages(names.fds(pid), files_pb2.FdEntry)


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
        procs = rd.messages(names.PSTREE, pstree_pb2.Process)
        if not procs or procs[0].pid != inv.root_pid or procs[0].zombie:
            raise ImageError(f"image {rd.dir}: {names.PSTREE} does not start with the root process {inv.root_pid}")
        self.procs = [_Proc(rd, p, inv.xstate_size) for p in procs]
        pids = [p.pid for p in self.procs]
        if len(set(pids)) != len(pids):
            raise ImageError(f"image {rd.dir}: {names.PSTREE} lists a PID twice")
        known = set()
        for p in self.procs:
            if p is not self.procs[0] and p.p.ppid not in known:
                raise ImageError(f"image {rd.dir}: process {p.pid}'s parent {p.p.ppid} comes after it or is missing")
            known.add(p.pid)
        for p in self.procs:
            if p.p.zombie and not pstree.ends_a_process(p.p.exit_status):
                raise ImageError(f"image {rd.dir}: zombie {p.pid}'s wait status {p.p.exit_status:#x} is not a death")
        self.live = [p for p in self.procs if not p.p.zombie]
        self.files = files.RestoreContext(rd, rd.messages(names.FILES, files_pb2.FileEntry), options)
        for p in self.live:
            mmmod.check_files_unchanged(p.mm, p.pid, inv.leave_running)
            self.files.check(p.pid, p.fds)
            locks.check_locks(self.files, p.pid, p.fds)


def _one(msgs, name):
    if len(msgs) != 1:
        raise ImageError(f"{name} holds {len(msgs)} messages, expected 1")
    return msgs[0]


def verify(images_dir, options: Options | None = None, progress=None) -> tuple[int, int]:
    """Every check restore makes before it creates a process (metadata, the files behind
    mappings, external objects against `options`), plus the checksums of the page data,
    which restore itself checks only as the pages stream into the new processes.

    For a caller that must destroy something to make room for the restore -- the Jupyter
    shim replacing a live kernel in place: a damaged image fails here, with nothing
    touched -- and for `nbcheckpoint show --verify`.  `progress(phase, done, total)` sees
    `verify` (bytes of page data checked).  Returns (files, bytes of page data) checked.
    Raises ImageError / RestoreError."""
    options = options or Options()
    img = _Image(os.fspath(images_dir), options)
    try:
        sums = img.reader.sums
        pages = [name for name in sums if name.startswith("pages-")]
        total, done = sum(sums[name].size for name in pages), 0
        for name in pages:
            src = img.reader.open_pages(name)
            try:
                src.verify(progress and (lambda n: progress("verify", done + n, total)))
            finally:
                src.close()
            done += src.size
    finally:
        img.files.close()
    return len(sums), total


def restore(images_dir, progress=None, options: Options | None = None) -> RestoreResult:
    """Bring the image back (phases above).  Without root, the calling process first enters a
    user namespace of its own, for good (sys/userns.py: it must be single-threaded), and the
    tree is restored into a new PID namespace there."""
    t0 = time.monotonic()
    options = options or Options()
    img = _Image(os.fspath(images_dir), options)
    try:
        options = _privileges(img, options)
    except BaseException:
        img.files.close()
        raise
    if options.lazy_pages and not options.pidns:
        raise RestoreError("--lazy-pages needs --pidns: the restored tree must live in a PID namespace "
                           "that dies with the engine, should it die while pages are still to come")
    if img.procs[0].pid == 1:
        raise RestoreError("the image's root is PID 1 of its namespace (an init); restoring an init "
                           "is not supported yet: dump its child instead")
    if not options.pidns:
        for p in img.procs:
            _wait_pid_free(p.pid)
    engine_fds: list[int] = []
    stubs: dict[int, pstree.Stub] = {}     # image pid -> stub
    init = None
    server = None
    done = False
    lock = img.reader.inventory.network_lock
    if options.tcp_close:
        # outside connections come back reset: their RSTs must reach the peers
        _unlock(lock)
        lock = ""
    try:
        if options.pidns and tty.wants_private_devpts(img.files):
            _private_devpts()
        prepared = _open_everything(img, engine_fds)
        if options.pidns:
            init = pstree.create_init(img.procs[0].pid)
        if options.lazy_pages:
            server = lazy.PageServer(init, release=not options.lifeline)
        stubs = _create_tree(img, init)
        npages = 0
        host_tids: dict[int, int] = {}     # image tid -> tid as we see it
        for p in img.live:
            n, tids = _rebuild(stubs[p.pid], p, img, prepared, progress, server)
            npages += n
            host_tids.update(tids)
        for p in img.live:
            if p.p.stopped:
                os.kill(stubs[p.pid].pid, signal.SIGSTOP)     # takes effect once detached
        # 7. the FPU/vector state last: nothing injected may disturb it afterwards
        for p in img.live:
            for th in p.threads:
                ptrace.setregset(host_tids[th.tid], ptrace.NT_X86_XSTATE, th.xstate)
                core.restore_sched(th, host_tids[th.tid], p.pid)
        if server is not None and not server.spaces:
            server.close()
            server = None                   # nothing was big enough to leave lazy
        for tid in host_tids.values():
            ptrace.detach(tid)
        if init is not None:
            ptrace.detach(init.pid)
            # the init may start reaping; while pages are to come, on a lifeline to us
            pstree.init_go(init, lifeline=server is not None or options.lifeline)
        done = True
        _unlock(lock)               # the connections are back: the peers' next retransmission lands
        for p in img.live:                  # return once stopped ones are stopped again
            deadline = time.monotonic() + 2
            while p.p.stopped and proc.pid_state(stubs[p.pid].pid) not in ("T", "") \
                    and time.monotonic() < deadline:
                time.sleep(0.001)
    finally:
        if not done:
            for st in reversed(list(stubs.values())):
                pstree.kill(st.pid)
            if server is not None:
                server.close()
            if init is not None:
                init.release_fd.close()
                init.ready_fd.close()
                pstree.kill(init.pid)
        for fd in engine_fds:
            os.close(fd)
        img.files.close()
    root = stubs[img.procs[0].pid]
    return RestoreResult(pid=root.pid, seconds=time.monotonic() - t0, pages_bytes=npages,
                         pids=[stubs[p.pid].pid for p in img.live], vpid=root.vpid,
                         init_pid=init.pid if init else None, lazy=server, init=init)


def _privileges(img: _Image, options: Options) -> Options:
    """Before any process exists: may we restore this image, and where.  Without root: only
    for who took it, and into a new user + PID namespace (sys/userns.py), entered now."""
    privileged = userns.privileged()
    taskmod.check_identity([p.task for p in img.live], img.reader.inventory, privileged, f"image {img.reader.dir}")
    if img.reader.inventory.in_pidns and not options.pidns or not privileged:
        # its PIDs mean something only in a namespace of its own; without root, a PID namespace
        # (owned by our user namespace) is the only place we may choose PIDs
        options = dataclasses.replace(options, pidns=True)
    if not privileged:
        userns.ensure()
    if options.lazy_pages:
        lazy.require()
    return options


def _private_devpts() -> None:
    """Before the files are opened and the init copies our mount namespace (sys/mountns.py)."""
    try:
        mountns.private_devpts()
    except SysError as e:
        log.warning("no devpts instance of the restore's own (%s): ptys are made on the host's, "
                    "where their old numbers may be taken", e)


def _unlock(name: str) -> None:
    """The tree runs with its connections rebuilt: let their peers through again (netlock.py)."""
    if not name:
        return
    try:
        netlock.unlock(name)
    except EngineError as e:
        log.warning("could not remove the network lock %s: %s (nbcheckpoint unlock DIR does)", name, e)


def _wait_pid_free(pid: int, timeout: float = 5.0) -> None:
    """A killed process may stay a zombie until its parent reaps it: give that a moment."""
    deadline = time.monotonic() + timeout
    while proc.exists(pid):
        state = proc.pid_state(pid)
        if state not in ("Z", "X", "") or time.monotonic() > deadline:
            raise RestoreError(f"PID {pid} is taken by another process ({pstree.describe(pid)}); the image "
                               "needs that exact PID. Stop that process, or restore where the PID is free")
        time.sleep(0.01)


class _Prepared:
    def __init__(self):
        self.ofd: dict[int, int] = {}       # FileEntry id -> fd
        self.maps: dict[str, int] = {}      # mapped file path -> fd
        self.shmem: dict[int, int] = {}     # shmem id -> fd
        self.exe: dict[str, int] = {}       # executable path -> fd
        self.fs: dict[int, dict[str, int]] = {}   # pid -> {"cwd": fd, "root": fd}


def _open_everything(img: _Image, engine_fds: list[int]) -> _Prepared:
    p = _Prepared()
    target_max = max([e.fd for pr in img.live for e in pr.fds], default=2)
    need = target_max + 64 + sum(len(pr.fds) + len(pr.mm.vmas) for pr in img.live)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need + 1024:
        try:        # the stubs inherit it: above our hard limit too, if we may (CAP_SYS_RESOURCE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (need + 1024, max(hard, need + 1024)))
        except (OSError, ValueError):       # we may not, or beyond fs.nr_open: as far as we may
            if target_max >= hard:
                raise RestoreError(f"the image's processes use fd numbers up to {target_max}, beyond this "
                                   f"engine's RLIMIT_NOFILE hard limit {hard}, which it may not raise") from None
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    base = max(target_max + 1, 3)

    def high(fd: int, owned: bool = True) -> int:
        # Above every fd the tree uses, so dup3() into place never hits a source.
        try:
            new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base)
        finally:
            if owned:
                os.close(fd)
        engine_fds.append(new)
        return new

    for pr in img.live:     # first: an fd on one of them opens it again (files/regfile.py)
        for v in pr.mm.vmas:
            if v.shmem_id and v.shmem_id not in p.shmem:
                p.shmem[v.shmem_id] = img.files.shmem[v.shmem_id] = high(pages.restore_shmem(img.reader, v))
    for pr in img.live:
        for e in pr.fds:
            if e.id not in p.ofd:
                p.ofd[e.id] = high(img.files.open(e.id), owned=False)
    img.files.close()     # the stubs inherit the high copies
    for pr in img.live:
        for path, flags in mmmod.mapped_files(pr.mm).items():
            if path in p.maps:
                continue
            p.maps[path] = high(_open_regular(path, flags, "mapped file"))
        if pr.mm.exe.path not in p.exe:
            p.exe[pr.mm.exe.path] = high(_open_regular(pr.mm.exe.path, os.O_RDONLY, "executable"))
        p.fs[pr.pid] = {k: high(fd) for k, fd in taskmod.fs_fds(pr.task).items()}
    return p


def _open_regular(path: str, flags: int, what: str) -> int:
    """O_NONBLOCK: a FIFO put where the image names a file must not block the open (only mmap
    uses these fds, and it ignores the flag)."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise RestoreError(f"cannot open {what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RestoreError(f"{what} {path} is not a regular file")
    return fd


def _create_tree(img: _Image, init) -> dict[int, pstree.Stub]:
    """3. Stubs with the right PIDs and parents; sessions, then process groups."""
    stubs: dict[int, pstree.Stub] = {}
    try:
        root = img.procs[0]
        stubs[root.pid] = init.fork(root.pid) if init else pstree.Stub(pstree.create_root(root.pid))
        # a session leader takes its terminal before forking the rest of its session
        pstree.make_sessions(stubs[root.pid], root.p)
        tty.after_setsid(img.files, stubs[root.pid], root.p)
        for pr in img.procs[1:]:
            stubs[pr.pid] = stubs[pr.p.ppid].fork(pr.pid)
            pstree.make_sessions(stubs[pr.pid], pr.p)
            tty.after_setsid(img.files, stubs[pr.pid], pr.p)
        pstree.join_groups(stubs, [pr.p for pr in img.live])
        for z in img.procs:
            if z.p.zombie:      # while its parent is still a stub (it has scratch memory)
                pstree.make_zombie(stubs[z.pid], stubs[z.p.ppid], z.p.exit_status, z.p.comm)
    except BaseException:
        for st in reversed(list(stubs.values())):
            pstree.kill(st.pid)
        raise
    return stubs


def _specials(pid: int) -> dict[int, tuple[int, int]]:
    return {mmmod.SPECIAL[m.path]: (m.start, m.end) for m in proc.maps(pid)
            if m.path in mmmod.SPECIAL and mmmod.SPECIAL[m.path] in mmmod.VDSO_KINDS}


def _rebuild(stub: pstree.Stub, pr: _Proc, img: _Image, p: _Prepared, progress, server):
    """4-6 for one process; its threads stay stopped with their final registers.

    `pid` is the engine's view of the process (ptrace, /proc); the image's
    numbers (pr.pid, thread tids) are what the process itself sees.
    Returns (bytes of pages, {image tid: engine tid}).
    """
    pid, mm, t, threads = stub.pid, pr.mm, pr.task, pr.threads
    tids = {pr.pid: pid}
    current = _specials(pid)
    with Remote(pid, pid, stub.syscall_addr, vpid=pr.pid) as r:
        # 4. the address space
        core.unregister_rseq(r, pid)
        mmmod.teardown(r, list(current.values()))
        mmmod.move_vdso(r, mm, current)
        # scratch page + the batch area (inject.Batch), executable: the batch code runs there
        r.map_scratch(PAGE_SIZE + BATCH_AREA, addr=mmmod.free_hole(mm, PAGE_SIZE + BATCH_AREA), prot=7)
        r.batch_area = r.scratch + PAGE_SIZE
        mmmod.set_mm_map(r, mm, p.exe[mm.exe.path])
        taskmod.restore_thp_disable(r, t)   # before the pages are written: they fault in by it
        mmmod.map_vmas(r, mm, p.maps, p.shmem)
        npages, later = pages.restore_private(pid, img.reader, str(pr.pid), mmmod.VmaIndex(mm.vmas), progress,
                                              lazy=server is not None)
        if later:
            server.hold(later)
        mmmod.apply_advice(r, mm)
        # 5. files and process state
        taskmod.restore_fs(r, t, p.fs[pr.pid])
        _place_fds(r, pr.fds, p.ofd)
        img.files.after_place(r, pr.pid, pr.fds)
        # after after_place: its fd shuffling (epoll) would drop POSIX locks taken earlier
        locks.restore_locks(img.files, r, pr.pid, pr.fds)
        taskmod.restore_sigactions(r, t)
        taskmod.restore_misc(r, t)
        # 6. threads
        for th in threads[1:]:
            tids[th.tid] = _clone_thread(r, th.tid)
        # once its threads exist (as CRIU does): its RLIMIT_NPROC may leave no room for them
        taskmod.restore_rlimits(pid, t)
        for th in threads[1:]:
            with Remote(pid, tids[th.tid], r.syscall_addr, scratch=r.scratch, vpid=pr.pid, vtid=th.tid) as tr:
                tr.batch_area = r.batch_area
                core.restore_thread_state(tr, th, taskmod.queue_signal)
                taskmod.restore_creds(tr, t)
                tr.set_final_state(core.final_regs(th), th.sigmask)
        core.restore_thread_state(r, threads[0], taskmod.queue_signal)
        timers.restore(r, timers.read(img.reader, pr.pid))     # after the threads: a timer may name one
        for info in t.shared_pending:
            taskmod.queue_signal(r, info, None)
        if later:
            server.add(r, pid, pr.pid, later)
        taskmod.restore_creds(r, t)
        r.syscall("munmap", r.scratch, PAGE_SIZE + BATCH_AREA)
        r.set_final_state(core.final_regs(threads[0]), threads[0].sigmask)
    return npages, tids


def _place_fds(r: Remote, entries, ofd: dict[int, int]) -> None:
    wanted = sorted(e.fd for e in entries)
    with r.batch() as b:
        for e in entries:
            b.syscall("dup3", ofd[e.id], e.fd, O_CLOEXEC if e.cloexec else 0)
        # Close everything else the stub inherited from the engine.
        lo = 0
        for fd in wanted + [1 << 31]:
            if fd > lo:
                b.syscall("close_range", lo, min(fd - 1, 0x7FFFFFFF), 0)
            lo = fd + 1


def _clone_thread(r: Remote, vtid: int) -> int:
    """A thread with TID `vtid` (as the process sees it); returns its TID as we see it."""
    s = r.scratch
    r.write(s + 256, struct.pack("<i", vtid))
    args = spawn.clone_args(flags=pstree.CLONE_THREAD_FLAGS, set_tid=s + 256, set_tid_size=1)
    r.write(s, args)
    try:
        new = r.syscall("clone3", s, len(args))
    except SysError as e:
        hint = f"; {spawn.NO_ROOM}" if e.errno == errno.EAGAIN else ""
        raise RestoreError(f"process {r.vpid}: cannot create its thread {vtid}: {e}{hint}") from None
    if new != vtid:
        raise RestoreError(f"thread {vtid} came back as {new}")
    host = r.clone_tids[-1]
    pstree.wait_event_stop(host)
    return host
