"""Lazy restore (--lazy-pages): the tree runs before its memory is all in place.

Copying 1 GiB into fresh memory takes about a second on this machine, and a
restored kernel needs almost none of it to answer its first request.  So the
big private anonymous VMAs are left empty at restore and registered with a
userfaultfd (missing mode) created in each process; once the tree runs, the
engine's page server (PageServer.serve) fills them:

- a fault: the faulting thread waits until the server copies in the image's
  block around the address (UFFDIO_COPY), or the zero page where the image
  has nothing (never touched, or since removed);
- in between, the rest streams in, in address order, 4 MiB per call;
- when nothing is left to copy, the server closes the userfaultfds (the
  kernel unregisters the VMAs) and the restored tree is an ordinary one.

What the restored processes do meanwhile changes what is still to come, and
the kernel tells the server (UFFD_FEATURE_EVENT_*; the process waits until the
message is read, and UFFDIO_COPY fails with EAGAIN while one is unread):
  REMOVE (MADV_DONTNEED/REMOVE), UNMAP: those pages are no longer to come: a
      later fault there reads zeros, as without lazy restore;
  REMAP (mremap): pages still to come move with the mapping;
  FORK: the child's copy of the mm has the same pages still to come (fork
      copies only present pages): the server serves the child's new
      userfaultfd from the same image.  (Pages copied after the fork are no
      longer shared copy-on-write between parent and child.)

If the server dies, the kernel would resolve every pending fault with a
zero page: silent corruption.  So lazy restore is only done into a PID
namespace whose init watches a pipe to the engine and kills the namespace
when it ends early (pstree.init_go).  A block whose checksum fails kills the
tree the same way: the restored processes never see a wrong page.

Which VMAs: private, anonymous, writable, at least LAZY_MIN of saved data;
not stacks (they grow), not mlocked (mlock would fault every page in while
the engine, which must serve those faults, waits for it), not DONTFORK or
WIPEONFORK (a child's view of them is not the parent's).
"""
from __future__ import annotations

import bisect
import errno
import mmap
import os
import select
import time

from .errors import AccessDenied, ImageError, LazyError, ProcessGone, RestoreError, SysError
from .images import mm_pb2
from .images.imagedir import BLOCK
from .mm import PROT_WRITE
from .sys import uffd
from .sys.fd import Fd
from .sys.libc import PAGE_SIZE, address_of
from .sys.memory import PagemapScanner, ProcMem, pidfd_getfd, pidfd_open

LAZY_MIN = 1 << 20          # VMAs with less saved data are written at restore
STREAM = 1 << 20            # bytes per UFFDIO_COPY while streaming
_NOT_LAZY = {"gd", "lo", "dc", "wf"}    # growsdown, mlocked, DONTFORK, WIPEONFORK


def unavailable() -> str | None:
    """Why this process cannot restore lazily (sys/uffd.py check_lazy()), or None.
    Cheap: callers check it before they stop anything."""
    try:
        uffd.check_lazy()
    except AccessDenied as e:
        return str(e)
    return None


def require() -> None:
    """RestoreError, naming why, if this process cannot restore lazily."""
    why = unavailable()
    if why:
        raise RestoreError(f"lazy restore (--lazy-pages) is not possible here: {why}. "
                           "Restore without --lazy-pages, or as root")


def choose(runs) -> set[int]:
    """ids of the VMAs whose pages are left for the page server.

    runs: (addr, length, writable, offset, vma) of every saved page run."""
    data: dict[int, int] = {}
    for _, n, _, _, v in runs:
        if v.kind == mm_pb2.ANON_PRIVATE and not v.shmem_id and v.prot & PROT_WRITE \
                and not _NOT_LAZY.intersection(v.vmflags):
            data[id(v)] = data.get(id(v), 0) + n
    return {k for k, n in data.items() if n >= LAZY_MIN}


class Pages:
    """One process's pages left for the page server: its VMAs, runs and image file."""

    def __init__(self, src, vmas, runs):
        self.src = src          # imagedir.PagesReader
        self.vmas = vmas
        self.runs = runs        # (addr, length, offset in src)


class _Pending:
    """Pages of one address space still to come: disjoint [start, end, offset] runs sorted
    by address; offset: where start's bytes are in the image file."""

    def __init__(self, runs=()):
        self.runs = sorted([a, a + n, o] for a, n, o in runs)
        self.starts = [r[0] for r in self.runs]

    def copy(self) -> "_Pending":
        p = _Pending()
        p.runs = [list(r) for r in self.runs]
        p.starts = list(self.starts)
        return p

    def bytes(self) -> int:
        return sum(e - s for s, e, _ in self.runs)

    def find(self, addr: int):
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0 and addr < self.runs[i][1]:
            return self.runs[i]
        return None

    def cut(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """Take [start, end) out; returns the pieces that were pending there."""
        i = max(bisect.bisect_right(self.starts, start) - 1, 0)
        taken, keep = [], []
        j = i
        while j < len(self.runs) and self.runs[j][0] < end:
            s, e, o = self.runs[j]
            if e <= start:
                keep.append([s, e, o])
            else:
                if s < start:
                    keep.append([s, start, o])
                lo, hi = max(s, start), min(e, end)
                taken.append((lo, hi, o + (lo - s)))
                if e > end:
                    keep.append([end, e, o + (end - s)])
            j += 1
        if taken:
            self.runs[i:j] = keep
            self.starts[i:j] = [r[0] for r in keep]
        return taken

    def move(self, frm: int, to: int, length: int) -> None:
        for s, e, o in self.cut(frm, frm + length):
            k = bisect.bisect_left(self.starts, s - frm + to)
            self.runs.insert(k, [s - frm + to, e - frm + to, o])
            self.starts.insert(k, s - frm + to)


_EVENT_NAMES = {uffd.EVENT_FORK: "fork", uffd.EVENT_REMAP: "remap", uffd.EVENT_REMOVE: "remove",
                uffd.EVENT_UNMAP: "unmap"}


class _Space:
    """One address space being filled: its userfaultfd (ours), pages to come, image file."""

    def __init__(self, fd: int, pid: int | None, label: str, src, pending: _Pending):
        self.fd = fd
        self.pid = pid          # for error messages; None for a child forked while lazy
        self.label = label
        self.src = src
        self.pending = pending


class PageServer:
    """Serves the lazy pages of a restored tree (see the module docstring).

    restore() builds it (add() per process, while the tree is stopped) and returns it
    in RestoreResult.lazy; the caller must call serve() at once: until it returns, the
    restored processes wait for it whenever they touch a page still to come."""

    def __init__(self, init, release: bool = True):
        require()
        self.init = init                    # pstree.Stub of the namespace's init (the lifeline)
        self.release = release              # cut the lifeline once every page is in
        self.spaces: list[_Space] = []
        self.total = 0
        self.done = 0
        self.faults = 0
        self.events = {"fork": 0, "remap": 0, "remove": 0, "unmap": 0}
        self.waiting: list[tuple[_Space, int]] = []   # faults read but not served yet
        self._buf = mmap.mmap(-1, STREAM + 2 * BLOCK)
        self._view = memoryview(self._buf)
        self._addr = address_of(self._buf)
        self._srcs = []

    # --- restore side: one process at a time, while it is stopped ---------------------
    def hold(self, pages: Pages) -> None:
        """Own pages.src from now on (closed with the server, also if restore fails)."""
        self._srcs.append(pages.src)

    def add(self, r, pid: int, vpid: int, pages: Pages) -> None:
        """Register process `pid`'s lazy VMAs with a userfaultfd made in it (Remote r,
        before its credentials drop: creating one that also sees faults the kernel takes
        on the process's behalf needs privilege)."""
        pending = _Pending(pages.runs)
        # Restore itself may have touched a page of these VMAs (the kernel writes rseq's
        # cpu_id into a thread's TLS, say): such a page is there already, so a fault will
        # never ask for it: write its saved bytes now.
        scanner = PagemapScanner(pid)
        mem = None
        try:
            for v in pages.vmas:
                for a, n in scanner.present_runs(v.start, v.end):
                    for s, e, o in pending.cut(a, a + n):
                        mem = mem or ProcMem(pid, write=True)
                        pages.src.read_at(o, self._view[:e - s])
                        mem.pwrite(self._view[:e - s], s)
        finally:
            scanner.close()
            if mem:
                mem.close()
        tfd = r.syscall("userfaultfd", os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            with Fd(pidfd_open(pid)) as pidfd:
                fd = pidfd_getfd(pidfd.fileno(), tfd, pid)
        finally:
            r.syscall("close", tfd)
        try:
            uffd.api(fd, pid)
            for v in pages.vmas:
                uffd.register_missing(fd, v.start, v.end - v.start, pid)
        except BaseException:
            os.close(fd)
            raise
        self.spaces.append(_Space(fd, pid, f"process {vpid}", pages.src, pending))
        self.total += pending.bytes()

    # --- after the tree runs ------------------------------------------------------------
    def serve(self, progress=None, stream_after: float = 0.0) -> None:
        """Fill every lazy page, serving faults first; returns when none is left.

        stream_after: seconds during which only faults are served, before the rest
        streams in (the restored tree has the machine to itself for its first steps).
        Raises LazyError (the tree is killed) if a page cannot be served."""
        stream_at = time.monotonic() + stream_after
        try:
            again = False
            while any(sp.pending.runs for sp in self.spaces):
                # after an EAGAIN, give the layout change a moment to post its message
                hold = stream_at - time.monotonic()
                wait = 1 if again else (min(100, int(hold * 1000) + 1) if hold > 0 else 0)
                again = not self._messages(wait)
                if hold > 0:
                    # A process that exits says nothing to its userfaultfd: only a copy
                    # finds it gone (ESRCH).  So one page per space now and then.
                    for sp in list(self.spaces):
                        if sp.pending.runs and not again:
                            s, _, o = sp.pending.runs[0]
                            again = not self._fill(sp, s, s + PAGE_SIZE, o)
                    continue
                sp = next((s for s in self.spaces if s.pending.runs), None)
                if sp is None:
                    break
                s, e, o = sp.pending.runs[0]
                again = again or not self._fill(sp, s, min(e, s + STREAM), o)
                if progress:
                    progress("lazy pages", self.done, self.total)
        except BaseException as e:
            self._kill_tree()
            self.close()
            if isinstance(e, ImageError):
                raise LazyError(f"lazy restore stopped: {e}; the restored tree was killed "
                                "(no process saw a wrong page)") from None
            if isinstance(e, SysError):
                raise LazyError(f"lazy restore stopped: {e}; the restored tree was killed") from None
            raise
        self.close()
        if self.release:
            from . import pstree
            pstree.init_release(self.init)

    def _kill_tree(self) -> None:
        from . import pstree
        self.init.release_fd.close()            # the lifeline ends: the init exits...
        pstree.kill(self.init.pid)              # ...or is killed, and the namespace with it

    def close(self) -> None:
        """Close the userfaultfds (the kernel unregisters the VMAs) and the image files."""
        for sp in self.spaces:
            os.close(sp.fd)
        self.spaces = []
        for src in self._srcs:
            src.close()
        self._srcs = []

    def _messages(self, timeout_ms: int) -> bool:
        """Read and act on every pending message; faults are served after the layout
        changes read with them.  False if a fault is still waiting (EAGAIN: the layout is
        changing and its message is not there yet)."""
        p = select.poll()
        for sp in self.spaces:
            p.register(sp.fd, select.POLLIN)
        while True:
            events = p.poll(timeout_ms)
            timeout_ms = 0
            live = {sp.fd for sp in self.spaces}
            for fd in {fd for fd, _ in events} - live:
                p.unregister(fd)            # a space dropped meanwhile (closed: POLLNVAL)
            ready = {fd for fd, ev in events if ev & select.POLLIN and fd in live}
            if not ready:
                break
            for sp in list(self.spaces):
                if sp.fd not in ready:
                    continue
                for event, arg in uffd.read_msgs(sp.fd):
                    if event == uffd.EVENT_PAGEFAULT:
                        self.waiting.append((sp, uffd.pagefault_arg(arg)[1]))
                    else:
                        self._layout(sp, event, arg, p)
            while self.waiting:
                sp, addr = self.waiting[0]
                if sp in self.spaces and not self._fault(sp, addr):
                    break
                self.waiting.pop(0)
        return not self.waiting

    def _layout(self, sp: _Space, event: int, arg: bytes, poll) -> None:
        self.events[_EVENT_NAMES[event]] += 1
        if event == uffd.EVENT_FORK:
            fd = uffd.fork_arg(arg)
            child = _Space(fd, None, f"a child of {sp.label}", sp.src, sp.pending.copy())
            self.spaces.append(child)
            poll.register(fd, select.POLLIN)
            self.total += child.pending.bytes()
        elif event == uffd.EVENT_REMAP:
            frm, to, length = uffd.remap_arg(arg)
            sp.pending.move(frm, to, length)
        elif event in (uffd.EVENT_REMOVE, uffd.EVENT_UNMAP):
            start, end = uffd.range_arg(arg)
            self.total -= sum(e - s for s, e, _ in sp.pending.cut(start, end))

    def _fault(self, sp: _Space, addr: int) -> bool:
        """Serve a fault: the pending part of the image block that holds addr, or a zero
        page.  False if the layout is changing (EAGAIN): retry after reading messages."""
        self.faults += 1
        page = addr & ~(PAGE_SIZE - 1)
        run = sp.pending.find(page)
        try:
            if run is not None:
                s, e, o = run
                at = o + (page - s)
                lo = max(o, at - at % BLOCK)
                hi = min(o + (e - s), at - at % BLOCK + BLOCK)
                if not self._fill(sp, s + (lo - o), s + (hi - o), lo):
                    return False
            else:
                try:
                    uffd.zeropage(sp.fd, page, PAGE_SIZE, sp.pid)
                except SysError as err:
                    if err.errno == errno.EAGAIN:
                        return False
                    if err.errno not in (errno.EEXIST, errno.ENOENT):
                        raise                               # ProcessGone too: see below
            if sp in self.spaces:
                uffd.wake(sp.fd, page, PAGE_SIZE, sp.pid)
        except ProcessGone:
            self._drop(sp)
        return True

    def _fill(self, sp: _Space, start: int, end: int, off: int) -> bool:
        """Copy the image's bytes for [start, end) (all pending, from offset off) into sp.
        False on EAGAIN (nothing lost: what was not copied is still pending)."""
        sp.src.read_at(off, self._view[:end - start])
        pos = start
        step = end - start
        while pos < end:
            try:
                n = uffd.copy(sp.fd, pos, self._addr + (pos - start), min(step, end - pos), sp.pid)
            except ProcessGone:
                self._drop(sp)
                return True
            except SysError as err:
                if err.errno == errno.EAGAIN:
                    return False
                if err.errno == errno.ENOENT and step > PAGE_SIZE:
                    step = PAGE_SIZE                  # a VMA ends inside (mprotect split it): by page
                    continue
                if err.errno not in (errno.EEXIST, errno.ENOENT):
                    raise
                # EEXIST: populated already -- only we populate, so it came another way;
                # ENOENT: this page is no longer registered.  Either way, not ours to fill.
                n = PAGE_SIZE
            else:
                self.done += n
            sp.pending.cut(pos, pos + n)
            pos += n
        return True

    def _drop(self, sp: _Space) -> None:
        if sp in self.spaces:
            self.total -= sp.pending.bytes()
            self.spaces.remove(sp)
            os.close(sp.fd)
