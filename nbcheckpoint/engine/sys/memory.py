"""Reading and writing another process's memory; finding its pages.

- process_vm_readv/writev: fastest (5+ GB/s here) but refuses pages the
  target cannot access with its own protections (read-only, PROT_NONE);
- /proc/PID/mem: slower, but writes through any protection (FOLL_FORCE), and
  takes page references (FOLL_GET) where process_vm_readv pins them (FOLL_PIN):
  pinning an anonymous page that is shared copy-on-write makes the kernel copy
  it first ("unshare", mm/gup.c gup_must_unshare), so reading a fork's memory
  through process_vm_readv would duplicate all of it;
- PAGEMAP_SCAN (Linux 6.7, fs.h): the present/swapped, non-zero-page runs of a
  range in one ioctl, which is how we skip never-touched and zero pages.
"""
from __future__ import annotations

import ctypes
import fcntl
import os

from ..errors import SysError
from .fd import Fd
from .libc import check, libc, syscall
from .ptrace import iovec
from .x86_64 import NR

libc.process_vm_readv.restype = ctypes.c_ssize_t
libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(iovec), ctypes.c_ulong,
                                  ctypes.POINTER(iovec), ctypes.c_ulong, ctypes.c_ulong]
libc.process_vm_writev.restype = ctypes.c_ssize_t
libc.process_vm_writev.argtypes = libc.process_vm_readv.argtypes

IOV_MAX = 1024


def _vm_rw(fn, name: str, pid: int, local_addr: int, remote: list[tuple[int, int]]) -> int:
    """One call moving len(remote) ranges to/from a contiguous local buffer."""
    total = 0
    for i in range(0, len(remote), IOV_MAX):
        chunk = remote[i:i + IOV_MAX]
        n = sum(ln for _, ln in chunk)
        riov = (iovec * len(chunk))(*[iovec(a, ln) for a, ln in chunk])
        done = 0
        while done < n:
            # Partial transfers happen at a page the target cannot access;
            # retry the rest so the caller sees the exact failing address.
            r = check(fn(pid, ctypes.byref(iovec(local_addr + total + done, n - done)), 1,
                         _advance(riov, done), len(chunk), 0), name, pid)
            if r == 0:
                raise SysError(14, name, pid, f"no progress at offset {done} of {n} bytes")
            done += r
        total += n
    return total


def _advance(riov, skip: int):
    """An iovec array starting `skip` bytes into riov."""
    if skip == 0:
        return riov
    out = []
    for v in riov:
        if skip >= v.iov_len:
            skip -= v.iov_len
            continue
        out.append(iovec(v.iov_base + skip, v.iov_len - skip))
        skip = 0
    return (iovec * len(out))(*out)


def vm_read(pid: int, local_addr: int, remote: list[tuple[int, int]]) -> int:
    return _vm_rw(libc.process_vm_readv, "process_vm_readv", pid, local_addr, remote)


def vm_write(pid: int, local_addr: int, remote: list[tuple[int, int]]) -> int:
    return _vm_rw(libc.process_vm_writev, "process_vm_writev", pid, local_addr, remote)


def read_bytes(pid: int, addr: int, size: int) -> bytes:
    buf = ctypes.create_string_buffer(size)
    vm_read(pid, ctypes.addressof(buf), [(addr, size)])
    return buf.raw


def write_bytes(pid: int, addr: int, data) -> None:
    buf = ctypes.create_string_buffer(bytes(data), len(data))
    vm_write(pid, ctypes.addressof(buf), [(addr, len(data))])


class ProcMem(Fd):
    """/proc/PID/mem, for pages that process_vm_* cannot reach."""

    def __init__(self, pid: int, write: bool = False):
        self.pid = pid
        try:
            super().__init__(os.open(f"/proc/{pid}/mem", os.O_RDWR if write else os.O_RDONLY))
        except OSError as e:
            raise SysError(e.errno or 0, f"open /proc/{pid}/mem", pid) from None

    def pwrite(self, data, addr: int) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.pwrite(self.fileno(), view, addr)
            except OSError as e:
                raise SysError(e.errno or 0, f"write /proc/{self.pid}/mem", self.pid, f"at {addr:#x}") from None
            view = view[n:]
            addr += n

    def pread(self, size: int, addr: int) -> bytes:
        try:
            data = os.pread(self.fileno(), size, addr)
        except OSError as e:
            raise SysError(e.errno or 0, f"read /proc/{self.pid}/mem", self.pid, f"at {addr:#x}") from None
        if len(data) != size:
            raise SysError(14, f"read /proc/{self.pid}/mem", self.pid, f"short read at {addr:#x}")
        return data

    def readinto(self, buf, addr: int) -> None:
        """Fill the writable buffer `buf` from `addr`, with no copy in between."""
        view = memoryview(buf).cast("B")
        while view:
            try:
                n = os.preadv(self.fileno(), [view], addr)
            except OSError as e:
                raise SysError(e.errno or 0, f"read /proc/{self.pid}/mem", self.pid, f"at {addr:#x}") from None
            if n == 0:
                raise SysError(14, f"read /proc/{self.pid}/mem", self.pid, f"short read at {addr:#x}")
            view = view[n:]
            addr += n


# --- PAGEMAP_SCAN ----------------------------------------------------------
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5


class _PageRegion(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


class _PmScanArg(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


PAGEMAP_SCAN = (3 << 30) | (ctypes.sizeof(_PmScanArg) << 16) | (ord("f") << 8) | 16


class PagemapScanner(Fd):
    """Finds the runs of pages worth saving in a range of another process."""

    VEC = 4096

    def __init__(self, pid: int):
        self.pid = pid
        try:
            super().__init__(os.open(f"/proc/{pid}/pagemap", os.O_RDONLY))
        except OSError as e:
            raise SysError(e.errno or 0, f"open /proc/{pid}/pagemap", pid) from None
        self._vec = (_PageRegion * self.VEC)()

    def data_runs(self, start: int, end: int, anon_only: bool) -> list[tuple[int, int]]:
        """[(addr, length)] of present or swapped pages that are not the zero page.

        With anon_only, page-cache pages are skipped too: in a private file
        mapping only the copied-on-write pages differ from the file.
        """
        return self._scan(start, end, PAGE_IS_PFNZERO | (PAGE_IS_FILE if anon_only else 0))

    def present_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        """[(addr, length)] of every page with a page table entry (the zero page too)."""
        return self._scan(start, end, 0)

    def _scan(self, start: int, end: int, excl: int) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        pos = start
        while pos < end:
            arg = _PmScanArg(size=ctypes.sizeof(_PmScanArg), start=pos, end=end,
                             vec=ctypes.addressof(self._vec), vec_len=self.VEC,
                             category_inverted=excl, category_mask=excl,
                             category_anyof_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                             return_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED)
            try:
                n = fcntl.ioctl(self.fileno(), PAGEMAP_SCAN, arg)  # type: ignore[arg-type]
            except OSError as e:
                raise SysError(e.errno or 0, "ioctl PAGEMAP_SCAN", self.pid, f"range {pos:#x}-{end:#x}") from None
            for i in range(n):
                r = self._vec[i]
                if runs and runs[-1][0] + runs[-1][1] == r.start:
                    runs[-1] = (runs[-1][0], r.end - runs[-1][0])
                else:
                    runs.append((r.start, r.end - r.start))
            if arg.walk_end <= pos:
                break
            pos = arg.walk_end
        return runs


# --- pidfd ---------------------------------------------------------------------
def pidfd_open(pid: int) -> int:
    return syscall(NR["pidfd_open"], pid, 0, request="pidfd_open", pid=pid)


def pidfd_getfd(pidfd: int, fd: int, pid: int) -> int:
    """A duplicate, in the engine, of fd `fd` of the process behind pidfd."""
    return syscall(NR["pidfd_getfd"], pidfd, fd, 0, request=f"pidfd_getfd(fd {fd})", pid=pid)
