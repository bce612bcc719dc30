"""The address space: VMAs and mm fields, dump and restore.

Dump reads /proc/PID/smaps and classifies each VMA once.  Restore rebuilds the
layout in a stub by injected syscalls, in this order (see restore.py):

1. unmap everything the stub inherited from the engine but the vDSO areas;
2. move [vvar], [vvar_vclock] and [vdso] to their dumped addresses, through a
   temporary spot so that the old and new places may overlap;
3. PR_SET_MM_MAP (mm fields, auxv, exe).  It must come after step 1: it fails
   with EBUSY while the old executable is still mapped;
4. map every VMA at its address (files from fds the engine opened for us).
"""
from __future__ import annotations

import bisect
import os
import stat as st
import struct

from .errors import ImageError, RestoreError, UnsupportedError
from .images import mm_pb2
from .mapped import MappedObjects
from .sys import proc
from .sys.libc import PAGE_SIZE
from .sys.x86_64 import TASK_SIZE

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_GROWSDOWN, MAP_NORESERVE, MAP_FIXED_NOREPLACE = 0x0100, 0x4000, 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2

SPECIAL = {"[vdso]": mm_pb2.VDSO, "[vvar]": mm_pb2.VVAR, "[vvar_vclock]": mm_pb2.VVAR_VCLOCK,
           "[vsyscall]": mm_pb2.VSYSCALL}
VDSO_KINDS = (mm_pb2.VVAR, mm_pb2.VVAR_VCLOCK, mm_pb2.VDSO)
# madvise(2) advice re-applied from smaps VmFlags (proc(5) lists the letters).
MADVISE = {"dd": 16, "dc": 10, "wf": 18, "hg": 14, "nh": 15}  # DONTDUMP DONTFORK WIPEONFORK (NO)HUGEPAGE
SHMEM_PREFIXES = ("/dev/zero", "/memfd:", "[anon_shmem:")


def file_stat(path: str, s: os.stat_result) -> mm_pb2.FileStat:
    return mm_pb2.FileStat(path=path, dev=s.st_dev, ino=s.st_ino, size=s.st_size,
                           mtime_ns=s.st_mtime_ns, mode=s.st_mode)


def _prot(perms: str) -> int:
    return ((PROT_READ if perms[0] == "r" else 0) | (PROT_WRITE if perms[1] == "w" else 0)
            | (PROT_EXEC if perms[2] == "x" else 0))


def is_shmem(v: mm_pb2.Vma) -> bool:
    return v.shmem_id != 0


# --- dump ----------------------------------------------------------------------
def dump_mm(pid: int, objects: MappedObjects | None = None) -> mm_pb2.Mm:
    """objects: how to reach the files and shmem objects behind the mappings (mapped.py)."""
    objects = objects or MappedObjects([pid])
    mm = mm_pb2.Mm(**proc.mm_fields(pid))
    # brk is not in /proc/PID/stat: dump.py asks the process (injected brk(0)).
    maps = proc.maps(pid)
    mm.auxv = proc.auxv(pid)
    exe = proc.exe(pid)
    mm.exe.CopyFrom(file_stat(exe, proc.exe_stat(pid)))
    for m in maps:
        mm.vmas.append(_dump_vma(pid, m, objects))
    return mm


def _dump_vma(pid: int, m: proc.MapLine, objects: MappedObjects) -> mm_pb2.Vma:
    v = mm_pb2.Vma(start=m.start, end=m.end, prot=_prot(m.perms), pgoff=m.offset,
                   vmflags=sorted(m.vmflags), name=m.path)
    where = f"process {pid}: mapping {m.start:#x}-{m.end:#x} {m.perms} {m.path or '(anonymous)'}"
    if "ht" in m.vmflags:
        raise UnsupportedError(f"{where}: hugetlbfs mappings are not supported")
    if "um" in m.vmflags or "ui" in m.vmflags:
        # its missing pages are someone's to fill: PAGEMAP_SCAN would not see them
        raise UnsupportedError(f"{where}: the mapping is registered with a userfaultfd (missing/minor "
                               "mode): its memory is still coming in (a lazy restore in progress?); "
                               "dump it once that is done")
    if m.path in SPECIAL:
        v.kind = SPECIAL[m.path]
        return v
    if m.inode == 0:
        if m.path and not (m.path in ("[heap]", "[stack]") or m.path.startswith("[anon:")):
            raise UnsupportedError(f"{where}: special mapping of kind {m.path!r} is not supported")
        v.kind = mm_pb2.ANON_SHARED if m.shared else mm_pb2.ANON_PRIVATE
        if m.shared:
            raise UnsupportedError(f"{where}: shared anonymous mapping without a shmem inode")
        return v
    s = os.stat(proc.map_file(pid, m.start, m.end)) if objects.direct else None
    if m.path.startswith(SHMEM_PREFIXES) or (m.deleted and (s.st_dev if s else m.device) in proc.tmpfs_devices()):
        # (a file deleted from a tmpfs -- a POSIX semaphore or shm_open object
        # after unlink -- lives only in memory, exactly like a memfd)
        # Shared anonymous memory and memfds are shmem objects: their content
        # is saved once (by inode) and mapped from a new memfd at restore.
        v.kind = mm_pb2.ANON_SHARED if m.shared else mm_pb2.FILE_PRIVATE
        v.shmem_id, v.shmem_size = (s.st_ino, s.st_size) if s else objects.shmem(pid, m)
        return v
    if m.path.startswith("/SYSV"):
        raise UnsupportedError(f"{where}: System V shared memory is not supported")
    s = s or objects.file_stat(pid, m, where)
    if not st.S_ISREG(s.st_mode):
        raise UnsupportedError(f"{where}: mapping of a non-regular file (mode {oct(s.st_mode)}) is not supported")
    if m.deleted:
        raise UnsupportedError(f"{where}: the mapped file was deleted; mappings of deleted files "
                               "are not supported")
    v.kind = mm_pb2.FILE_SHARED if m.shared else mm_pb2.FILE_PRIVATE
    v.file.CopyFrom(file_stat(m.path, s))
    return v


def private_dirty_vmas(mm: mm_pb2.Mm):
    """VMAs whose own pages we save (private memory, not vDSO)."""
    for v in mm.vmas:
        if v.kind in (mm_pb2.ANON_PRIVATE, mm_pb2.FILE_PRIVATE):
            yield v


# --- restore ---------------------------------------------------------------------
class VmaIndex:
    """Find the VMA holding an address (restore uses it to pick a write method)."""

    def __init__(self, vmas):
        self.vmas = sorted(vmas, key=lambda v: v.start)
        self.starts = [v.start for v in self.vmas]

    def find(self, addr: int):
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0 and self.vmas[i].start <= addr < self.vmas[i].end:
            return self.vmas[i]
        return None


def check_vmas(mm: mm_pb2.Mm, where: str) -> None:
    """The VMAs as /proc/PID/maps gave them: known kinds, page-aligned, in order, disjoint,
    in user space (the vsyscall page aside); anything else is refused before any process."""
    last = 0
    for i, v in enumerate(mm.vmas):
        if v.kind not in mm_pb2.VmaKind.values():
            raise ImageError(f"{where}: VMA {i} has an unknown kind {v.kind}: damaged image")
        if v.kind == mm_pb2.VSYSCALL:
            continue
        if not is_shmem(v) and v.kind in (mm_pb2.ANON_SHARED, mm_pb2.FILE_PRIVATE, mm_pb2.FILE_SHARED) \
                and not v.file.path:
            raise ImageError(f"{where}: VMA {i} is {mm_pb2.VmaKind.Name(v.kind)} but names neither a file "
                             "nor a shared memory object: damaged image")
        if v.start % PAGE_SIZE or v.end % PAGE_SIZE or not last <= v.start < v.end <= TASK_SIZE:
            raise ImageError(f"{where}: VMA {i} ({v.start:#x}-{v.end:#x}) is not a page-aligned range "
                             f"in user space after the one before (ending at {last:#x}): damaged image")
        last = v.end


def check_files_unchanged(mm: mm_pb2.Mm, pid: int, leave_running: bool = False) -> None:
    """A privately mapped file that changed since the dump would give the process other code
    or data under its saved pages.  A MAP_SHARED file is the process's memory itself: that it
    changed is what the process (or its peers) did; it only has to exist."""
    seen = set()
    hint = (" The image was taken with --leave-running and the process went on running: "
            "take a new checkpoint." if leave_running else "")
    private = {v.file.path for v in mm.vmas if v.HasField("file") and v.kind != mm_pb2.FILE_SHARED}
    for f in [mm.exe] + [v.file for v in mm.vmas if v.HasField("file")]:
        if f.path in seen:
            continue
        seen.add(f.path)
        try:
            s = os.stat(f.path)
        except FileNotFoundError:
            raise RestoreError(f"process {pid}: mapped file {f.path} is gone since the dump; "
                               f"put it back to restore.{hint}") from None
        except OSError as e:                # e.g. a name too long: from a damaged image
            raise RestoreError(f"process {pid}: mapped file {f.path}: {e.strerror}") from None
        if (f is mm.exe or f.path in private) and (s.st_size != f.size or s.st_mtime_ns != f.mtime_ns):
            raise RestoreError(
                f"process {pid}: mapped file {f.path} changed since the dump (size {f.size} -> {s.st_size}, "
                f"mtime {f.mtime_ns} -> {s.st_mtime_ns}); restoring would mix old memory with new code. "
                f"Put the original file back, or take a new checkpoint.{hint}")


def free_hole(mm: mm_pb2.Mm, size: int, avoid: list[tuple[int, int]] = ()) -> int:
    """A page-aligned address range of `size` bytes used by no dumped VMA nor `avoid`."""
    busy = sorted([(v.start, v.end) for v in mm.vmas] + list(avoid))
    cand = 0x10000000
    for lo, hi in busy:
        if cand + size + PAGE_SIZE <= lo:
            break
        cand = max(cand, hi + PAGE_SIZE)
    if cand + size > TASK_SIZE:
        raise RestoreError("no free address range for the restorer's scratch area")
    return cand


def teardown(remote, keep: list[tuple[int, int]]) -> None:
    """Unmap everything in the stub but `keep` (the vDSO areas)."""
    lo = PAGE_SIZE
    for a, b in sorted(keep):
        if a > lo:
            remote.syscall("munmap", lo, a - lo)
        lo = max(lo, b)
    if lo < TASK_SIZE:
        remote.syscall("munmap", lo, TASK_SIZE - lo)


def move_vdso(remote, mm: mm_pb2.Mm, current: dict[int, tuple[int, int]]) -> int:
    """Move the stub's vDSO areas to the dumped addresses; returns the new syscall address."""
    dumped = {v.kind: (v.start, v.end) for v in mm.vmas if v.kind in VDSO_KINDS}
    if set(dumped) != set(current) or any(dumped[k][1] - dumped[k][0] != current[k][1] - current[k][0]
                                          for k in dumped):
        raise RestoreError("the image's vDSO layout differs from this kernel's "
                           f"(image {dumped}, here {current}): restore on the kernel the image was taken on")
    span_lo = min(a for a, _ in current.values())
    span_hi = max(b for _, b in current.values())
    tmp = free_hole(mm, span_hi - span_lo, [(span_lo, span_hi)])
    old_vdso = current[mm_pb2.VDSO][0]
    insn_off = remote.syscall_addr - old_vdso
    for step in ("tmp", "final"):
        # Moving the vdso moves the instruction we inject through: move it last
        # and take the new address for the next call.
        for kind in sorted(current, key=lambda k: k == mm_pb2.VDSO):
            a, b = current[kind]
            dest = (tmp + (a - span_lo)) if step == "tmp" else dumped[kind][0]
            if dest != a:
                remote.syscall("mremap", a, b - a, b - a, MREMAP_MAYMOVE | MREMAP_FIXED, dest)
            current[kind] = (dest, dest + (b - a))
            if kind == mm_pb2.VDSO:
                remote.syscall_addr = dest + insn_off
        span_lo = tmp
    return remote.syscall_addr


# struct prctl_mm_map: start_code end_code start_data end_data start_brk brk start_stack
# arg_start arg_end env_start env_end auxv (u64 each), auxv_size exe_fd (u32)
PRCTL_MM_MAP = struct.Struct("<12Q2I")


PR_SET_MM, PR_SET_MM_MAP = 35, 14


def set_mm_map(remote, mm: mm_pb2.Mm, exe_fd: int) -> None:
    scratch = remote.scratch
    auxv_addr = scratch + 512
    remote.write(auxv_addr, mm.auxv)
    m = PRCTL_MM_MAP.pack(mm.start_code, mm.end_code, mm.start_data, mm.end_data, mm.start_brk, mm.brk,
                   mm.start_stack, mm.arg_start, mm.arg_end, mm.env_start, mm.env_end,
                   auxv_addr, len(mm.auxv), exe_fd)
    remote.write(scratch, m)
    remote.syscall("prctl", PR_SET_MM, PR_SET_MM_MAP, scratch, len(m))


def map_vmas(remote, mm: mm_pb2.Mm, file_fds: dict[str, int], shmem_fds: dict[int, int]) -> None:
    """mmap every VMA at its dumped address.  Pages are written afterwards."""
    with remote.batch() as b:
        for v in mm.vmas:
            if v.kind in VDSO_KINDS or v.kind == mm_pb2.VSYSCALL:
                continue
            length = v.end - v.start
            flags = MAP_FIXED | (MAP_GROWSDOWN if "gd" in v.vmflags else 0) | (MAP_NORESERVE if "nr" in v.vmflags else 0)
            if is_shmem(v):
                fd = shmem_fds[v.shmem_id]
                flags |= MAP_SHARED if v.kind == mm_pb2.ANON_SHARED else MAP_PRIVATE
                b.syscall("mmap", v.start, length, v.prot, flags, fd, v.pgoff)
            elif v.kind == mm_pb2.ANON_PRIVATE:
                b.syscall("mmap", v.start, length, v.prot, flags | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            else:
                fd = file_fds[v.file.path]
                flags |= MAP_SHARED if v.kind == mm_pb2.FILE_SHARED else MAP_PRIVATE
                b.syscall("mmap", v.start, length, v.prot, flags, fd, v.pgoff)


def apply_advice(remote, mm: mm_pb2.Mm) -> None:
    with remote.batch() as b:
        for v in mm.vmas:
            if v.kind in VDSO_KINDS or v.kind == mm_pb2.VSYSCALL:
                continue
            for flag in v.vmflags:
                if flag in MADVISE:
                    b.syscall("madvise", v.start, v.end - v.start, MADVISE[flag])
            if "lo" in v.vmflags:
                b.syscall("mlock", v.start, v.end - v.start)


def mapped_files(mm: mm_pb2.Mm) -> dict[str, int]:
    """path -> open(2) flags needed to map it (O_RDWR for shared writable mappings)."""
    out: dict[str, int] = {}
    for v in mm.vmas:
        if v.kind in (mm_pb2.FILE_PRIVATE, mm_pb2.FILE_SHARED) and not is_shmem(v):
            rw = v.kind == mm_pb2.FILE_SHARED and "mw" in v.vmflags
            out[v.file.path] = max(out.get(v.file.path, os.O_RDONLY), os.O_RDWR if rw else os.O_RDONLY)
    return out
