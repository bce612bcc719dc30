"""Page contents: dump (stream out of the target) and restore (stream in).

Only pages that hold data are saved: PAGEMAP_SCAN gives the present or
swapped runs, minus the shared zero page and, in private file mappings, the
page-cache pages (those are in the file; only copied-on-write pages differ).

Pages move in batches of up to CHUNK bytes through one reusable buffer: one
process_vm_readv/writev call per batch with an iovec per run.  The engine
never holds more than one chunk, whatever the target's size.
"""
from __future__ import annotations

import ctypes
import mmap
import os

from .errors import ImageError
from .images import pagemap_pb2
from .mm import PROT_READ, PROT_WRITE, VmaIndex
from .sys.libc import PAGE_SIZE
from .sys.memory import PagemapScanner, ProcMem, vm_read, vm_write

CHUNK = 16 << 20


class _Buffer:
    def __init__(self, size: int = CHUNK):
        self.mem = mmap.mmap(-1, size)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        self.view = memoryview(self.mem)
        self.size = size

    def close(self) -> None:
        self.view.release()
        # from_buffer keeps an export alive until collected; the mmap dies with the process anyway.


def _pieces(addr: int, length: int):
    while length > 0:
        n = min(length, CHUNK)
        yield addr, n
        addr += n
        length -= n


class _Batcher:
    """Collects remote runs until a chunk is full, then moves them in one call."""

    def __init__(self, flush):
        self.runs: list[tuple[int, int]] = []
        self.total = 0
        self._flush = flush

    def add(self, addr: int, length: int) -> None:
        for a, n in _pieces(addr, length):
            if self.total + n > CHUNK:
                self.flush()
            self.runs.append((a, n))
            self.total += n

    def flush(self) -> None:
        if self.runs:
            self._flush(self.runs, self.total)
            self.runs, self.total = [], 0


def dump_private(pid: int, vmas, img, name: str, progress=None) -> int:
    """Save the private pages of `vmas`; returns the bytes written."""
    entries = img.messages(f"pagemap-{name}.img", "nbcheckpoint.images.PagemapEntry")
    out = img.raw(f"pages-{name}.img")
    buf = _Buffer()
    scanner = PagemapScanner(pid)
    mem = None
    done = 0

    def flush(runs, total):
        nonlocal done
        vm_read(pid, buf.addr, runs)
        out.write(buf.view[:total])
        done += total
        if progress:
            progress("pages", done, 0)

    batch = _Batcher(flush)
    try:
        for v in vmas:
            runs = scanner.data_runs(v.start, v.end, anon_only=True)
            for a, n in runs:
                entries.add(pagemap_pb2.PagemapEntry(vaddr=a, nr_pages=n // PAGE_SIZE))
                if v.prot & PROT_READ:
                    batch.add(a, n)
                    continue
                # process_vm_readv honours the target's protections; /proc/PID/mem does not.
                batch.flush()
                mem = mem or ProcMem(pid)
                for pa, pn in _pieces(a, n):
                    data = mem.pread(pn, pa)
                    out.write(data)
                    done += pn
        batch.flush()
    finally:
        scanner.close()
        if mem:
            mem.close()
        buf.close()
    return done


def restore_private(pid: int, reader, name: str, index: VmaIndex, progress=None) -> int:
    """Write the saved pages into process `pid`, whose VMAs are already mapped."""
    entries = reader.messages(f"pagemap-{name}.img", pagemap_pb2.PagemapEntry)
    src = reader.open_raw(f"pages-{name}.img")
    buf = _Buffer()
    mem = None
    done = 0

    def flush(runs, total):
        nonlocal done
        src.readinto(buf.view[:total])
        vm_write(pid, buf.addr, runs)
        done += total
        if progress:
            progress("pages", done, 0)

    batch = _Batcher(flush)
    try:
        for e in entries:
            length = e.nr_pages * PAGE_SIZE
            v = index.find(e.vaddr)
            if e.source != pagemap_pb2.LOCAL:
                raise ImageError(f"pagemap-{name}.img: page source {e.source} is not supported by this version")
            if v is None or e.vaddr + length > v.end:
                raise ImageError(f"pagemap-{name}.img: pages at {e.vaddr:#x} (+{length}) lie outside "
                                 "every mapping: the image is inconsistent")
            if v.prot & PROT_WRITE:
                batch.add(e.vaddr, length)
                continue
            batch.flush()
            mem = mem or ProcMem(pid, write=True)
            for pa, pn in _pieces(e.vaddr, length):
                src.readinto(buf.view[:pn])
                mem.pwrite(buf.view[:pn], pa)
                done += pn
        batch.flush()
        src.finish()
    finally:
        src.close()
        if mem:
            mem.close()
        buf.close()
    return done


# --- shared memory objects (shmem: MAP_SHARED|MAP_ANONYMOUS, memfd) -------------
SEEK_DATA, SEEK_HOLE = 3, 4


def dump_shmem(pid: int, vma, img) -> int:
    """Save the content of the shmem object behind `vma` (by SEEK_DATA/SEEK_HOLE)."""
    name = f"shmem-{vma.shmem_id}"
    entries = img.messages(f"pagemap-{name}.img", "nbcheckpoint.images.PagemapEntry")
    out = img.raw(f"pages-{name}.img")
    fd = os.open(f"/proc/{pid}/map_files/{vma.start:x}-{vma.end:x}", os.O_RDONLY)
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


def restore_shmem(reader, vma) -> int:
    """A new shmem object with the saved content; returns an fd in the engine.

    Shared anonymous memory is recreated as such (an anonymous shared mapping
    of the engine's own, reopened through /proc/self/map_files), so the
    restored mapping is again "/dev/zero (deleted)"; memfds come back as
    memfds with their name.
    """
    name = f"shmem-{vma.shmem_id}"
    size = vma.shmem_size
    if vma.name.startswith("/memfd:"):
        label = vma.name[len("/memfd:"):].removesuffix(" (deleted)")
        fd = os.memfd_create(label, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
    else:
        m = mmap.mmap(-1, max(size, PAGE_SIZE), flags=mmap.MAP_SHARED)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        fd = os.open(f"/proc/self/map_files/{addr:x}-{addr + len(m):x}", os.O_RDWR | os.O_CLOEXEC)
        # the object lives on through fd; the engine's mapping is dropped with m
    entries = reader.messages(f"pagemap-{name}.img", pagemap_pb2.PagemapEntry)
    src = reader.open_raw(f"pages-{name}.img")
    buf = _Buffer()
    done = 0
    try:
        for e in entries:
            length = e.nr_pages * PAGE_SIZE
            if e.vaddr + length > max(size, PAGE_SIZE) + PAGE_SIZE:
                raise ImageError(f"pagemap-{name}.img: run at {e.vaddr:#x} beyond the object's size {size}")
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
        buf.close()
    return fd
