"""Page contents: dump (stream out of the target) and restore (stream in).

Only pages that hold data are saved: PAGEMAP_SCAN gives the present or
swapped runs, minus the shared zero page and, in private file mappings, the
page-cache pages (those are in the file; only copied-on-write pages differ).

Pages move in batches of up to CHUNK bytes: one process_vm_readv/writev call
per batch with an iovec per run, through two reusable buffers so that image
I/O overlaps the copy (see _Pipeline).  The engine never holds more than two
chunks, whatever the target's size.
"""
from __future__ import annotations

import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor

from .errors import ImageError
from .images import names, pagemap_pb2
from .mm import PROT_READ, PROT_WRITE, VmaIndex
from .sys import proc, userns
from .sys.libc import PAGE_SIZE, address_of
from .sys.memory import PagemapScanner, ProcMem, vm_read, vm_write

CHUNK = 16 << 20


class _Buffer:
    def __init__(self, size: int = CHUNK):
        self.mem = mmap.mmap(-1, size)
        self.addr = address_of(self.mem)
        self.view = memoryview(self.mem)


def _pieces(addr: int, length: int):
    while length > 0:
        n = min(length, CHUNK)
        yield addr, n
        addr += n
        length -= n


def _batches(runs):
    """Group (addr, length, direct, offset) runs into chunk-sized batches of
    (addr, length, offset) pieces; offset: where the bytes are in the image.

    `direct` runs go through process_vm_readv/writev, one call per batch;
    the others (pages the target itself may not read or write) through
    /proc/PID/mem, and never share a batch with direct ones.
    """
    batch, total, kind = [], 0, None
    for addr, length, direct, off in runs:
        for a, n in _pieces(addr, length):
            if batch and (total + n > CHUNK or kind != direct):
                yield kind, batch, total
                batch, total = [], 0
            batch.append((a, n, off + (a - addr)))
            total += n
            kind = direct
    if batch:
        yield kind, batch, total


def _via_mem(op, view, batch) -> None:
    """op(piece of view, addr) for each piece of a batch, packed one after another in view
    (ProcMem.readinto or .pwrite)."""
    off = 0
    for a, n, _ in batch:
        op(view[off:off + n], a)
        off += n


def _fill(src, view, batch) -> None:
    """Read a batch's bytes from the image into view, one read per contiguous stretch."""
    pos = 0
    start, n = batch[0][2], 0
    for _, ln, off in batch:
        if off != start + n:
            src.read_at(start, view[pos:pos + n])
            pos += n
            start, n = off, 0
        n += ln
    src.read_at(start, view[pos:pos + n])


class _Pipeline:
    """Two buffers and one I/O thread: the image file is read or written for
    one batch while the engine thread moves the other batch to or from the
    target.  Only the engine thread touches the target (ptrace rule); the
    I/O thread only does read(2)/write(2) on the image, which release the GIL."""

    def __init__(self):
        self.bufs = [_Buffer(), _Buffer()]
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nbcheckpoint-io")
        self.pending = [None, None]

    def wait(self, i: int) -> None:
        f, self.pending[i] = self.pending[i], None
        if f is not None:
            f.result()

    def submit(self, i: int, fn, *args) -> None:
        if self.pool is not None:
            try:
                self.pending[i] = self.pool.submit(fn, *args)
                return
            except RuntimeError:        # no thread to be had (a full pids cgroup): the rest runs here
                self.pool.shutdown(wait=False, cancel_futures=True)
                self.pool = None
        self.pending[i] = f = Future()
        try:
            f.set_result(fn(*args))
        except BaseException as e:      # noqa: BLE001 - raised by wait(), as from the thread
            f.set_exception(e)

    def close(self) -> None:
        for i in (0, 1):
            try:
                self.wait(i)
            except BaseException:
                pass
        if self.pool is not None:
            self.pool.shutdown(wait=True)


class PrivatePages:
    """pagemap-NAME.img and pages-NAME.img of one process, filled by one or more passes.

    A --leave-running dump reads some VMAs out of the frozen process and the rest,
    after the thaw, out of its snapshot (snapshot.py): both passes go to the same
    files.  Runs need not be in address order; restore reads them as written.
    """

    def __init__(self, img, name: str):
        self.entries = img.messages(names.pagemap(name), pagemap_pb2.PagemapEntry)
        self.out = img.pages(names.pages(name))

    def dump(self, pid: int, vmas, progress=None, shared_cow: bool = False) -> int:
        """Save the private pages of `vmas` as process `pid` holds them; returns the bytes written.

        shared_cow: the pages are shared copy-on-write with another process (a
        snapshot): read them all through /proc/PID/mem, because process_vm_readv
        would make the kernel copy each one before reading it (sys/memory.py).
        """
        runs = []
        with PagemapScanner(pid) as scanner:
            for v in vmas:
                for a, n in scanner.data_runs(v.start, v.end, anon_only=True):
                    self.entries.add(pagemap_pb2.PagemapEntry(vaddr=a, nr_pages=n // PAGE_SIZE))
                    runs.append((a, n, bool(v.prot & PROT_READ), 0))
        total_bytes = sum(r[1] for r in runs)
        pipe = _Pipeline()
        mem = None
        done = 0
        try:
            for k, (direct, batch, total) in enumerate(_batches(runs)):
                i = k % 2
                pipe.wait(i)                  # this buffer's previous write is done
                buf = pipe.bufs[i]
                if direct and not shared_cow:
                    vm_read(pid, buf.addr, [(a, n) for a, n, _ in batch])
                else:
                    # process_vm_readv honours the target's protections; /proc/PID/mem does not.
                    mem = mem or ProcMem(pid)
                    _via_mem(mem.readinto, buf.view, batch)
                pipe.submit(i, self.out.write, buf.view[:total])
                done += total
                if progress:
                    progress("pages", done, total_bytes)
        finally:
            pipe.close()
            if mem:
                mem.close()
        return done


def restore_private(pid: int, reader, name: str, index: VmaIndex, progress=None, lazy: bool = False):
    """Write the saved pages into process `pid`, whose VMAs are already mapped.

    lazy: leave the pages of the VMAs lazy.choose() picks for the page server.
    Returns (bytes written, lazy.Pages or None)."""
    from . import lazy as lazymod
    runs = []
    off = 0
    for e in reader.messages(names.pagemap(name), pagemap_pb2.PagemapEntry):
        length = e.nr_pages * PAGE_SIZE
        v = index.find(e.vaddr)
        if e.source != pagemap_pb2.LOCAL:
            raise ImageError(f"{names.pagemap(name)}: page source {e.source} is not supported by this version")
        if v is None or e.vaddr + length > v.end:
            raise ImageError(f"{names.pagemap(name)}: pages at {e.vaddr:#x} (+{length}) lie outside "
                             "every mapping: the image is inconsistent")
        runs.append((e.vaddr, length, bool(v.prot & PROT_WRITE), off, v))
        off += length
    ends = sorted((a, a + n) for a, n, *_ in runs)      # (not in address order after a snapshot)
    for (a, end), (b, _) in zip(ends, ends[1:]):
        if b < end:
            raise ImageError(f"{names.pagemap(name)}: the runs at {a:#x} and {b:#x} overlap: the image is inconsistent")
    src = reader.open_pages(names.pages(name))
    try:
        if off != src.size:
            raise ImageError(f"image file {src.path} holds {src.size} bytes, its pagemap {off}: damaged")
        later = lazymod.choose(runs) if lazy else set()
        done = _write_runs(pid, src, [r[:4] for r in runs if id(r[4]) not in later], progress)
    except BaseException:
        src.close()
        raise
    if not later:
        src.close()
        return done, None
    return done, lazymod.Pages(src, [r[4] for r in runs if id(r[4]) in later],
                               [(a, n, o) for a, n, _, o, v in runs if id(v) in later])


def _write_runs(pid: int, src, runs, progress) -> int:
    total_bytes = sum(r[1] for r in runs)
    batches = list(_batches(runs))
    pipe = _Pipeline()
    mem = None
    done = 0
    try:
        for k in range(min(2, len(batches))):          # prefetch
            pipe.submit(k, _fill, src, pipe.bufs[k].view, batches[k][1])
        for k, (direct, batch, total) in enumerate(batches):
            i = k % 2
            pipe.wait(i)
            buf = pipe.bufs[i]
            if direct:
                vm_write(pid, buf.addr, [(a, n) for a, n, _ in batch])
            else:
                mem = mem or ProcMem(pid, write=True)
                _via_mem(mem.pwrite, buf.view, batch)
            if k + 2 < len(batches):
                pipe.submit(i, _fill, src, buf.view, batches[k + 2][1])
            done += total
            if progress:
                progress("pages", done, total_bytes)
    finally:
        pipe.close()
        if mem:
            mem.close()
    return done


# --- shared memory objects (shmem: MAP_SHARED|MAP_ANONYMOUS, memfd) -------------
SEEK_DATA, SEEK_HOLE = 3, 4


def dump_shmem(path: str, vma, img) -> int:
    """Save the content of the shmem object behind `vma`, opened by `path` (its
    /proc/PID/map_files or /proc/PID/fd entry: mapped.py), by SEEK_DATA/SEEK_HOLE."""
    name = f"shmem-{vma.shmem_id}"
    entries = img.messages(names.pagemap(name), pagemap_pb2.PagemapEntry)
    out = img.pages(names.pages(name))
    fd = os.open(path, os.O_RDONLY)
    done = 0
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, SEEK_DATA)
            except OSError:
                break       # ENXIO: no data after pos
            end = os.lseek(fd, start, SEEK_HOLE)
            entries.add(pagemap_pb2.PagemapEntry(vaddr=start, nr_pages=(end - start + PAGE_SIZE - 1) // PAGE_SIZE))
            for a, n in _pieces(start, end - start):
                data = os.pread(fd, n, a)
                out.write(data)
                done += len(data)
            pad = (-(end - start)) % PAGE_SIZE
            if pad:
                out.write(bytes(pad))
            pos = end
    finally:
        os.close(fd)
    return done


def dump_shmem_mapped(shmem_id: int, where: dict[int, tuple[int, int]], img) -> int:
    """Save the content of a shmem object no fd reaches, through the tree's mappings of it:
    `where` maps each page offset worth reading to (pid, address) of a mapping (mapped.py).
    Pages of zeros are left out, as holes would be."""
    name = f"shmem-{shmem_id}"
    entries = img.messages(names.pagemap(name), pagemap_pb2.PagemapEntry)
    out = img.pages(names.pages(name))
    runs: list[list[int]] = []              # [offset, pid, addr, length]: contiguous in both
    for off in sorted(where):
        pid, addr = where[off]
        r = runs[-1] if runs else None
        if r and r[0] + r[3] == off and r[1] == pid and r[2] + r[3] == addr and r[3] < CHUNK:
            r[3] += PAGE_SIZE
        else:
            runs.append([off, pid, addr, PAGE_SIZE])
    mems: dict[int, ProcMem] = {}
    zero = bytes(PAGE_SIZE)
    run = [0, 0]                            # the entry being gathered: offset, pages
    try:
        for off, pid, addr, length in runs:
            mem = mems.get(pid) or mems.setdefault(pid, ProcMem(pid))
            data = memoryview(mem.pread(length, addr))
            for i in range(0, length, PAGE_SIZE):
                page = data[i:i + PAGE_SIZE]
                if page == zero:
                    continue
                if run[1] and run[0] + run[1] * PAGE_SIZE != off + i:
                    entries.add(pagemap_pb2.PagemapEntry(vaddr=run[0], nr_pages=run[1]))
                    run = [off + i, 0]
                elif not run[1]:
                    run[0] = off + i
                run[1] += 1
                out.write(page)
        if run[1]:
            entries.add(pagemap_pb2.PagemapEntry(vaddr=run[0], nr_pages=run[1]))
    finally:
        for mem in mems.values():
            mem.close()
    return out.size


def restore_shmem(reader, vma) -> int:
    """A new shmem object with the saved content; returns an fd in the engine.

    Shared anonymous memory is recreated as such (an anonymous shared mapping
    of the engine's own, reopened through /proc/self/map_files), so the
    restored mapping is again "/dev/zero (deleted)"; memfds come back as
    memfds with their name.  Without map_files (userns.map_files_allowed()) every
    object comes back as a memfd: shared anonymous memory, and a file deleted
    from a tmpfs, named by its old name ("/memfd:/dev/zero (deleted)").
    """
    name = f"shmem-{vma.shmem_id}"
    size = vma.shmem_size
    memfd = vma.name.startswith("/memfd:")
    if memfd or not userns.map_files_allowed():
        label = vma.name[len("/memfd:"):] if memfd else vma.name
        fd = os.memfd_create(label.removesuffix(" (deleted)"), os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
    else:
        m = mmap.mmap(-1, max(size, PAGE_SIZE), flags=mmap.MAP_SHARED)
        addr = address_of(m)
        fd = os.open(proc.map_file("self", addr, addr + len(m)), os.O_RDWR | os.O_CLOEXEC)
        # the object lives on through fd; the engine's mapping is dropped with m
    entries = reader.messages(names.pagemap(name), pagemap_pb2.PagemapEntry)
    src = reader.open_pages(names.pages(name))
    buf = _Buffer(CHUNK)
    done = 0
    try:
        for e in entries:
            length = e.nr_pages * PAGE_SIZE
            if e.vaddr + length > max(size, PAGE_SIZE) + PAGE_SIZE:
                raise ImageError(f"{names.pagemap(name)}: run at {e.vaddr:#x} beyond the object's size {size}")
            for a, n in _pieces(e.vaddr, length):
                src.readinto(buf.view[:n])
                os.pwrite(fd, buf.view[:min(n, max(size - a, 0))], a)
                done += n
        src.finish()
    except BaseException:
        os.close(fd)
        raise
    finally:
        src.close()
    return fd
