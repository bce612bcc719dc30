"""All /proc parsing lives here (proc(5)); callers get plain Python values.

A failure raises SysError; ProcessGone when /proc/PID vanished with its process."""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from ..errors import ProcessGone, SysError


def _error(e: OSError, what: str, pid: int | None) -> SysError:
    err = e.errno or 0
    if pid is not None and err == errno.ENOENT and not exists(pid):
        err = errno.ESRCH           # /proc/PID is gone with the process: ProcessGone
    return SysError(err, what, pid)


def _read(path: str, pid: int | None = None) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise _error(e, f"read {path}", pid) from None


def exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def tids(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError as e:
        raise _error(e, f"list /proc/{pid}/task", pid) from None


@dataclass
class MapLine:
    start: int
    end: int
    perms: str          # e.g. "rw-p"
    offset: int
    dev: str            # "fd:01"
    inode: int
    path: str           # "" for anonymous; "[heap]", "/lib/x (deleted)" ...
    vmflags: set = field(default_factory=set)
    swap_kb: int = 0    # smaps "Swap:" (for a shmem mapping: its object's pages in swap there)

    @property
    def device(self) -> int:
        """The dev column as a userspace st_dev."""
        major, _, minor = self.dev.partition(":")
        return os.makedev(int(major, 16), int(minor, 16))

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def deleted(self) -> bool:
        return self.path.endswith(" (deleted)")


def maps(pid: int, vmflags: bool = True) -> list[MapLine]:
    """/proc/PID/smaps: every VMA with its VmFlags (proc(5), "smaps").

    vmflags=False reads /proc/PID/maps instead: no VmFlags, but no page-table
    walk either (smaps counts every VMA's pages, which takes a while in a big process)."""
    out: list[MapLine] = []
    name = "smaps" if vmflags else "maps"
    for line in _read(f"/proc/{pid}/{name}", pid).decode("utf-8", "surrogateescape").splitlines():
        head = line.split(None, 1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            parts = line.split(None, 5)
            lo, hi = parts[0].split("-")
            out.append(MapLine(int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16), parts[3],
                               int(parts[4]), parts[5] if len(parts) > 5 else ""))
        elif head == "VmFlags:" and out:
            out[-1].vmflags = set(line.split()[1:])
        elif head == "Swap:" and out:
            out[-1].swap_kb = int(line.split()[1])
    return out


def status(pid: int, tid: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/task/{tid}/status" if tid else f"/proc/{pid}/status"
    out = {}
    for line in _read(path, pid).decode().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def stat(pid: int, tid: int | None = None) -> list[str]:
    """Fields of /proc/PID/stat, 1-based like proc(5) (index 0 is unused)."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    raw = _read(path, pid).decode("utf-8", "surrogateescape")
    lpar, rpar = raw.index("("), raw.rindex(")")
    return ["", raw[:lpar].strip(), raw[lpar + 1:rpar]] + raw[rpar + 2:].split()


# proc(5) field numbers of /proc/PID/stat that PR_SET_MM_MAP needs.
MM_STAT_FIELDS = dict(start_code=26, end_code=27, start_stack=28, start_data=45, end_data=46,
                      start_brk=47, arg_start=48, arg_end=49, env_start=50, env_end=51)


def mm_fields(pid: int) -> dict[str, int]:
    st = stat(pid)
    return {k: int(st[i]) for k, i in MM_STAT_FIELDS.items()}


def auxv(pid: int) -> bytes:
    return _read(f"/proc/{pid}/auxv", pid)


def readlink(path: str, pid: int | None = None) -> str:
    try:
        return os.readlink(path)
    except OSError as e:
        raise _error(e, f"readlink {path}", pid) from None


def link(pid: int, name: str) -> str:
    """The target of /proc/PID/NAME: exe, cwd, root, ns/pid ..."""
    return readlink(f"/proc/{pid}/{name}", pid)


def exe(pid: int) -> str:
    return link(pid, "exe")


def exe_stat(pid: int) -> os.stat_result:
    """The executable's own stat (through the link, also when it was deleted)."""
    try:
        return os.stat(f"/proc/{pid}/exe")
    except OSError as e:
        raise _error(e, f"stat /proc/{pid}/exe", pid) from None


def map_file(pid: int, start: int, end: int) -> str:
    """/proc/PID/map_files/START-END: the file behind a mapping, to stat or open
    (only if userns.map_files_allowed())."""
    return f"/proc/{pid}/map_files/{start:x}-{end:x}"


def id_map(kind: str, pid="self") -> list[tuple[int, int, int]]:
    """/proc/PID/{uid,gid}_map: (first id inside, first id outside, count) per line."""
    return [tuple(int(x) for x in line.split())
            for line in _read(f"/proc/{pid}/{kind}_map", None if pid == "self" else pid).decode().splitlines()]


def children(pid: int, tid: int | None = None) -> list[int]:
    """The children of one thread (the leader by default); [] if it is gone."""
    try:
        return [int(c) for c in _read(f"/proc/{pid}/task/{tid or pid}/children", pid).split()]
    except SysError:
        return []


def all_children(pid: int) -> list[int]:
    """The children of every thread of `pid`; [] if it is gone."""
    try:
        return [c for tid in tids(pid) for c in children(pid, tid)]
    except SysError:
        return []


def sysctl_int(name: str) -> int:
    """/proc/sys/NAME as an int, e.g. kernel/pid_max."""
    return int(_read(f"/proc/sys/{name}"))


def clear_soft_dirty() -> None:
    """Clear the soft-dirty bits of this process's pages (clear_refs 4)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("4")


def pagemap_entry(addr: int, page_size: int) -> int:
    """This process's /proc/self/pagemap entry (u64) for the page at `addr`."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // page_size * 8)
        return int.from_bytes(f.read(8), "little")


def comm(pid: int, tid: int) -> str:
    return _read(f"/proc/{pid}/task/{tid}/comm", pid).decode("utf-8", "surrogateescape").rstrip("\n")


def personality(pid: int) -> int:
    return int(_read(f"/proc/{pid}/personality", pid), 16)


def fds(pid: int) -> list[int]:
    try:
        return sorted(int(f) for f in os.listdir(f"/proc/{pid}/fd"))
    except OSError as e:
        raise _error(e, f"list /proc/{pid}/fd", pid) from None


def fd_stats(pid: int) -> list[tuple[int, os.stat_result]]:
    """(fd, stat of the file) of each fd of `pid`, but those closed meanwhile."""
    out = []
    for fd in fds(pid):
        try:
            out.append((fd, os.stat(f"/proc/{pid}/fd/{fd}")))
        except OSError:
            continue
    return out


def fdinfo(pid: int, fd: int) -> dict[str, str]:
    """fdinfo as key -> value; repeated keys (e.g. 'lock') are joined by newlines."""
    out: dict[str, str] = {}
    for line in _read(f"/proc/{pid}/fdinfo/{fd}", pid).decode("utf-8", "surrogateescape").splitlines():
        k, _, v = line.partition(":")
        v = v.strip()
        out[k] = out[k] + "\n" + v if k in out else v
    return out


def fdlink(pid: int, fd: int) -> str:
    return readlink(f"/proc/{pid}/fd/{fd}", pid)


def pid_state(pid: int) -> str:
    """The one-letter state (R, S, D, Z, T, t ...) or '' if the pid is gone."""
    try:
        return stat(pid)[3]
    except ProcessGone:
        return ""


def pid_alive(pid: int) -> bool:
    """Does process PID exist and run (not a zombie)?"""
    return pid_state(pid) not in ("", "Z", "X")


# --- anonymous-inode files (files/anon.py) and POSIX timers (timers.py) ---------------

def _kv_fields(text: str) -> dict[str, str]:
    """'a:1 b: 2 c:3' -> {'a': '1', 'b': '2', 'c': '3'} (fdinfo's 'key:value' runs)."""
    out: dict[str, str] = {}
    key = None
    for tok in text.split():
        if ":" in tok:
            key, _, val = tok.partition(":")
            out[key] = val
        elif key is not None and out[key] == "":
            out[key] = tok
    return out


def epoll_targets(info: dict[str, str]) -> list[dict[str, int]]:
    """The registrations of an epoll fd, in the kernel's (rbtree) order.

    fdinfo: ``tfd: N events: X data: Y  pos:P ino:I sdev:D`` per line; fdinfo()
    keys the line by 'tfd' and joins repeats with newlines.  events, data, ino
    and sdev are hex; sdev is the kernel's dev_t (major << 20 | minor).
    """
    out = []
    for line in filter(None, info.get("tfd", "").split("\n")):
        f = _kv_fields("tfd:" + line)
        out.append(dict(tfd=int(f["tfd"]), events=int(f["events"], 16), data=int(f["data"], 16),
                        ino=int(f["ino"], 16), sdev=int(f["sdev"], 16)))
    return out


def inotify_watches(info: dict[str, str]) -> list[dict]:
    """The watches of an inotify fd: ``inotify wd:.. ino:.. sdev:.. mask:.. ignored_mask:..
    fhandle-bytes:.. fhandle-type:.. f_handle:..`` (all hex but wd); handle as bytes."""
    out = []
    for line in filter(None, info.get("inotify wd", "").split("\n")):
        f = _kv_fields("wd:" + line)
        nbytes = int(f.get("fhandle-bytes", "0"), 16)
        out.append(dict(wd=int(f["wd"]), ino=int(f["ino"], 16), sdev=int(f["sdev"], 16),
                        mask=int(f["mask"], 16), ignored_mask=int(f.get("ignored_mask", "0"), 16),
                        handle_type=int(f.get("fhandle-type", "0"), 16),
                        handle=bytes.fromhex(f.get("f_handle", ""))[:nbytes]))
    return out


def kernel_dev(kdev: int) -> int:
    """The kernel's internal dev_t (fdinfo's sdev) as a userspace st_dev."""
    return os.makedev(kdev >> 20, kdev & 0xFFFFF)


def timerfd_state(info: dict[str, str]) -> dict[str, int]:
    """clockid, ticks, settime flags (octal), it_value/it_interval '(sec, nsec)'."""
    def pair(v: str) -> tuple[int, int]:
        a, b = v.strip("()").split(",")
        return int(a), int(b)
    vs, vn = pair(info["it_value"])
    is_, in_ = pair(info["it_interval"])
    return dict(clockid=int(info["clockid"]), ticks=int(info["ticks"]),
                settime_flags=int(info["settime flags"], 8),
                value_sec=vs, value_nsec=vn, interval_sec=is_, interval_nsec=in_)


@dataclass
class PosixTimer:
    id: int
    signo: int
    sigev_value: int
    notify: int         # SIGEV_SIGNAL 0 / NONE 1 / THREAD 2, | SIGEV_THREAD_ID 4
    notify_pid: int     # the pid (or tid with SIGEV_THREAD_ID) the signal goes to
    clockid: int


_SIGEV = {"signal": 0, "none": 1, "thread": 2}


def posix_timers(pid: int) -> list[PosixTimer]:
    """/proc/PID/timers (proc(5)): ID, signal: SIGNO/VALUE, notify: KIND/pid|tid.N, ClockID."""
    out: list[PosixTimer] = []
    cur: dict[str, str] = {}
    lines = _read(f"/proc/{pid}/timers", pid).decode().splitlines() + ["ID: -"]
    for line in lines:
        k, _, v = line.partition(":")
        v = v.strip()
        if k == "ID" and cur:
            signo, _, val = cur["signal"].partition("/")
            kind, _, who = cur["notify"].partition("/")
            whom, _, n = who.partition(".")
            out.append(PosixTimer(id=int(cur["ID"]), signo=int(signo), sigev_value=int(val or "0", 16),
                                  notify=_SIGEV[kind] | (4 if whom == "tid" else 0),
                                  notify_pid=int(n), clockid=int(cur["ClockID"])))
            cur = {}
        cur[k] = v
    return sorted(out, key=lambda t: t.id)


def mount_for_dev(dev: int) -> str | None:
    """A mount point of the filesystem `dev` (st_dev), from /proc/self/mountinfo:
    preferably one that mounts the filesystem's root, so any inode is reachable."""
    best = None
    for line in _read("/proc/self/mountinfo").decode("utf-8", "surrogateescape").splitlines():
        f = line.split()
        major, _, minor = f[2].partition(":")
        if os.makedev(int(major), int(minor)) != dev:
            continue
        point = f[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
        if f[3] == "/":
            return point
        best = best or point
    return best


def tmpfs_devices() -> set[int]:
    """st_dev of every tmpfs/shmem mount, from /proc/self/mountinfo (proc(5))."""
    out = set()
    for line in _read("/proc/self/mountinfo").decode("utf-8", "surrogateescape").splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] in ("tmpfs", "shmem", "devtmpfs"):
            major, minor = left.split()[2].split(":")
            out.add(os.makedev(int(major), int(minor)))
    return out


# --- file locks (files/locks.py) -----------------------------------------------------

@dataclass
class FileLock:
    """One line of /proc/locks or of an fdinfo ``lock:`` entry (proc(5), "locks")."""
    kind: str           # FLOCK, POSIX, OFDLCK, LEASE, DELEG ...
    mode: str           # ADVISORY (MANDATORY on old kernels; ACTIVE/BREAKING... for leases)
    type: str           # READ, WRITE (UNLCK while a lease breaks)
    pid: int            # owner (POSIX), setter (FLOCK), -1 for OFD locks
    dev: int            # st_dev of the file (userspace dev_t)
    ino: int
    start: int
    end: int | None     # inclusive last byte; None = to EOF
    blocked: bool = False   # a "->" waiter line of /proc/locks, not a granted lock


def _lock_line(text: str) -> FileLock:
    # "1: POSIX  ADVISORY  WRITE 13185 fe:00:2146319 0 9"  /  "2: -> FLOCK ..." (a waiter)
    f = text.split()
    blocked = len(f) > 1 and f[1] == "->"
    if blocked:
        f = f[:1] + f[2:]
    kind, mode, typ, pid, where, start, end = f[1:8]
    major, minor, ino = where.split(":")
    return FileLock(kind=kind, mode=mode, type=typ, pid=int(pid),
                    dev=os.makedev(int(major, 16), int(minor, 16)), ino=int(ino),
                    start=int(start), end=None if end == "EOF" else int(end), blocked=blocked)


def fd_locks(info: dict[str, str]) -> list[FileLock]:
    """The locks an fd's open file description holds, from fdinfo() 'lock' lines.

    The kernel lists a lock there when it was set through this description
    and is owned by it (flock, OFD) or by the reading process's fd table
    (POSIX), so a child sharing the description does not see its parent's
    POSIX locks.
    """
    return [_lock_line(line) for line in filter(None, info.get("lock", "").split("\n"))]


def locks() -> list[FileLock]:
    """Every lock of the system, /proc/locks (pids as this process's namespace sees them)."""
    out = []
    for line in _read("/proc/locks").decode("utf-8", "surrogateescape").splitlines():
        if line.strip():
            out.append(_lock_line(line))
    return out


def tcp_connections_to(port: int, pid: str = "self") -> int:
    """Established TCP connections whose local port is `port`, in the network namespace of
    `pid` (proc(5): /proc/PID/net/tcp and tcp6; state 01 is TCP_ESTABLISHED)."""
    n = 0
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        n += 1
        except (OSError, ValueError, IndexError):
            pass
    return n
