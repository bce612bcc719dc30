"""The file or shared memory object behind a mapping, with or without /proc/PID/map_files.

/proc/PID/map_files (readlink, stat, open) needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE in
the initial user namespace, which an ordinary user never has; userns.map_files_allowed()
decides, once per dump.  Without it:

- a mapped file is the path /proc/PID/maps shows if that path still names the inode the VMA
  maps (maps gives its device and inode); else an fd of the tree open on that inode (stat
  of /proc/PID/fd/N); else the dump fails by name;
- a shared memory object (shared anonymous memory, a memfd, a file deleted from a tmpfs) is
  read through an fd of the tree on it when there is one (/proc/PID/fd/N opens it again);
  else through the tree's own mappings of it: the pages its page cache holds (mincore(2),
  injected into each process that maps it; every page of a mapping with some of it in swap)
  read through /proc/PID/mem; its size is the furthest byte any of them maps (the rest of
  it no process can reach without an fd).
"""
from __future__ import annotations

import os

from .errors import UnsupportedError
from .sys import proc, userns
from .sys.libc import PAGE_SIZE
from .sys.memory import PagemapScanner

MINCORE_PAGES = 2048        # pages per injected mincore(2): its vector lives in the dump's scratch area


class MappedObjects:
    """Where the dump of one tree finds what its mappings map (see the module docstring)."""

    def __init__(self, pids):
        self.direct = userns.map_files_allowed()
        self.pids = list(pids)
        self._fds: dict[tuple[int, int], str] | None = None
        self._extent: dict[tuple[int, int], int] | None = None
        # without map_files, per shmem object with no fd in the tree:
        self.source: dict[int, str] = {}                         # shmem id -> /proc/PID/fd/N
        self.mapped: dict[int, list[proc.MapLine]] = {}          # pid -> its VMAs on such objects
        self.pages: dict[tuple[int, int], dict[int, tuple[int, int]]] = {}  # object -> {offset: (pid, addr)}

    def _fd_index(self) -> dict[tuple[int, int], str]:
        if self._fds is None:
            self._fds = {}
            for p in self.pids:
                for fd, s in proc.fd_stats(p):
                    self._fds.setdefault((s.st_dev, s.st_ino), f"/proc/{p}/fd/{fd}")
        return self._fds

    def file_stat(self, pid: int, m: proc.MapLine, where: str) -> os.stat_result:
        """The stat of the file a VMA maps (not a shmem object), without map_files."""
        key = (m.device, m.inode)
        if not m.deleted:
            try:
                s = os.stat(m.path)
                if (s.st_dev, s.st_ino) == key:
                    return s
            except OSError:
                pass
        fd = self._fd_index().get(key)
        if fd is not None:
            try:
                return os.stat(fd)
            except OSError:
                pass
        raise UnsupportedError(
            f"{where}: the mapped file was deleted or replaced since it was mapped (the path now names "
            f"{'nothing' if m.deleted else 'another file'}), and no process of the tree has it open; only "
            "/proc/PID/map_files would reach it, which needs root (CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN). "
            "Dump as root, or keep the file open (or in place) in the process")

    def shmem(self, pid: int, m: proc.MapLine) -> tuple[int, int]:
        """(id, size) of the shmem object a VMA maps, without map_files."""
        key = (m.device, m.inode)
        fd = self._fd_index().get(key)
        if fd is not None:
            try:
                size = os.stat(fd).st_size
                self.source[m.inode] = fd
                return m.inode, size
            except OSError:
                pass
        self.mapped.setdefault(pid, []).append(m)
        self.pages.setdefault(key, {})
        return m.inode, self._extents()[key]

    def _extents(self) -> dict[tuple[int, int], int]:
        """Per mapped inode, the furthest byte of it any process of the tree maps."""
        if self._extent is None:
            self._extent = {}
            for p in self.pids:
                for m in proc.maps(p, vmflags=False):
                    if m.inode:
                        key = (m.device, m.inode)
                        self._extent[key] = max(self._extent.get(key, 0), m.offset + m.end - m.start)
        return self._extent

    def shmem_source(self, pid: int, v) -> str | None:
        """A path that opens the shmem object behind VMA v for reading, or None: its pages
        come through the tree's mappings (probe(), then pending())."""
        if self.direct:
            return proc.map_file(pid, v.start, v.end)
        return self.source.get(v.shmem_id)

    def probe(self, remote, pid: int) -> None:
        """In process `pid` (frozen, `remote` at hand with a scratch area): which pages of the
        fd-less shmem objects it maps are in their page cache, and where it maps them."""
        for m in self.mapped.get(pid, ()):
            where = self.pages[(m.device, m.inode)]
            npages = (m.end - m.start) // PAGE_SIZE
            if m.swap_kb:
                resident = bytes([1]) * npages      # mincore(2) does not see shmem pages in swap
            else:
                resident = b""
                for i in range(0, npages, MINCORE_PAGES):
                    n = min(MINCORE_PAGES, npages - i)
                    remote.syscall("mincore", m.start + i * PAGE_SIZE, n * PAGE_SIZE, remote.scratch)
                    resident += remote.read(remote.scratch, n)
            cow = set()
            if not m.shared:            # its copied-on-write pages are its own, not the object's
                with PagemapScanner(pid) as scanner:
                    for a, n in scanner.data_runs(m.start, m.end, anon_only=True):
                        cow.update(range((a - m.start) // PAGE_SIZE, (a + n - m.start) // PAGE_SIZE))
            for i, r in enumerate(resident):
                if r & 1 and i not in cow:
                    where.setdefault(m.offset + i * PAGE_SIZE, (pid, m.start + i * PAGE_SIZE))

    def pending(self):
        """(shmem id, {offset: (pid, addr)}) of every object to read through the tree's mappings."""
        for (_, ino), where in self.pages.items():
            yield ino, where
