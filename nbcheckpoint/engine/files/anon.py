"""Anonymous-inode files: eventfd, epoll, timerfd, signalfd, inotify (docs/engine.md,
"Anonymous-inode files", says what is kept of each and why).

Everything is read from fdinfo (parsed in sys/proc.py) and recreated in the engine, whose
fd the restored process inherits; one module for the five kinds, dispatching on
``FileEntry.kind`` (``_DUMP``, ``_OPEN``).  Epoll registrations name the process's fd
numbers, so they are re-added by epoll_ctl injected into it (``after_place``).  A
TFD_TIMER_ABSTIME timer stays absolute (a CLOCK_REALTIME deadline holds across the
checkpoint; one already past fires at once); an expired periodic timer not read yet
(it_value 0) is armed one interval ahead.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct
import time

from ..errors import RestoreError, SysError, UnsupportedError
from ..images import anon_pb2, files_pb2
from ..sys import anonfd, proc
from .kind import FileKind

EFD_SEMAPHORE = 1
EPOLL_CTL_ADD, EPOLL_CTL_DEL = 1, 2
EPOLLONESHOT = 1 << 30
EP_PRIVATE_BITS = (1 << 28) | (1 << 29) | (1 << 30) | (1 << 31)   # EXCLUSIVE WAKEUP ONESHOT ET
EPOLL_ANY_READY = 0x27C7    # IN PRI OUT RDNORM RDBAND WRNORM WRBAND MSG RDHUP
_EVENTS_PER_PAGE = 4096 // 12
F_DUPFD_CLOEXEC = 1030
TFD_TIMER_ABSTIME = 1
IN_DONT_FOLLOW = 0x02000000
IN_MASK_CREATE = 0x10000000
IN_DELETE_SELF = 0x400
MAX_WD_GAP = 1 << 20                    # watches burned to close one gap, at most
NSEC = 10 ** 9


# ---------------------------------------------------------------------------- dump

def _dump_eventfd(pid, fd, info, entry) -> None:
    entry.eventfd.CopyFrom(anon_pb2.EventfdFile(count=int(info["eventfd-count"], 16),
                                                semaphore=info.get("eventfd-semaphore", "0") == "1"))


def _dump_epoll(pid, fd, info, entry) -> None:
    # the owner as it sees itself (NSpid's last field), which is what restore compares
    # with: in a PID namespace the engine's pid differs
    ep = anon_pb2.EpollFile(owner_pid=int(proc.status(pid)["NSpid"].split()[-1]))
    nth: dict[int, int] = {}
    for t in proc.epoll_targets(info):
        toff = nth.get(t["tfd"], 0)       # the kernel's index among registrations with this fd number
        nth[t["tfd"]] = toff + 1
        tgt = ep.targets.add(tfd=t["tfd"], events=t["events"], data=t["data"])
        slot = (fd, t["tfd"], toff)
        if _same_epoll_file(pid, t["tfd"], slot):
            continue
        via = next((c for c in _fds_on(pid, t["ino"], t["sdev"]) if _same_epoll_file(pid, c, slot)), None)
        if via is None:
            raise UnsupportedError(
                f"process {pid}: epoll fd {fd} watches a file registered as fd {t['tfd']}, which the "
                "process has since closed and holds through no other fd; this cannot be restored")
        tgt.via_fd = via
    entry.epoll.CopyFrom(ep)


def _same_epoll_file(pid: int, cand: int, slot: tuple[int, int, int]) -> bool:
    """Is the process's fd `cand` the file behind the epoll registration `slot` (efd, tfd, toff)?"""
    try:
        return anonfd.same_epoll_file(pid, *slot, cand)
    except SysError as e:
        if e.errno in (errno.EBADF, errno.ENOENT):
            return False
        raise


def _fds_on(pid: int, ino: int, kdev: int) -> list[int]:
    dev = proc.kernel_dev(kdev)
    return [fd for fd, s in proc.fd_stats(pid) if s.st_ino == ino and s.st_dev == dev]


def _dump_timerfd(pid, fd, info, entry) -> None:
    s = proc.timerfd_state(info)
    value = s["value_sec"] * NSEC + s["value_nsec"]
    interval = s["interval_sec"] * NSEC + s["interval_nsec"]
    if value == 0 and interval:
        value = interval                  # expired, waiting for the read that re-arms it
    if value and s["settime_flags"] & TFD_TIMER_ABSTIME:
        value += time.clock_gettime_ns(s["clockid"])
    entry.timerfd.CopyFrom(anon_pb2.TimerfdFile(
        clockid=s["clockid"], ticks=s["ticks"], settime_flags=s["settime_flags"],
        value_sec=value // NSEC, value_nsec=value % NSEC,
        interval_sec=s["interval_sec"], interval_nsec=s["interval_nsec"]))


def _dump_signalfd(pid, fd, info, entry) -> None:
    entry.signalfd.CopyFrom(anon_pb2.SignalfdFile(sigmask=int(info["sigmask"], 16)))


def _dump_inotify(pid, fd, info, entry) -> None:
    out = anon_pb2.InotifyFile()
    mounts: dict[int, int] = {}
    try:
        for w in sorted(proc.inotify_watches(info), key=lambda w: w["wd"]):
            path, dev = _watch_path(pid, fd, w, mounts)
            out.watches.add(wd=w["wd"], path=path, mask=w["mask"], ino=w["ino"], dev=dev)
    finally:
        for m in mounts.values():
            os.close(m)
    entry.inotify.CopyFrom(out)


def _watch_path(pid: int, fd: int, w: dict, mounts: dict[int, int]) -> tuple[str, int]:
    dev = proc.kernel_dev(w["sdev"])
    what = (f"process {pid}: inotify fd {fd} watch {w['wd']} (inode {w['ino']} on device "
            f"{os.major(dev)}:{os.minor(dev)})")
    if not w["handle"]:
        raise UnsupportedError(f"{what}: the kernel shows no file handle for it (its filesystem "
                               "cannot export handles), so its path cannot be found")
    if dev not in mounts:
        mnt = proc.mount_for_dev(dev)
        if mnt is None:
            raise UnsupportedError(f"{what}: that filesystem is not mounted where the engine runs")
        mounts[dev] = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        hfd = anonfd.open_by_handle_at(mounts[dev], w["handle_type"], w["handle"], os.O_PATH, pid)
    except SysError as e:
        if e.errno == errno.ESTALE:
            raise UnsupportedError(f"{what}: the watched file or directory was deleted") from None
        if e.errno == errno.EPERM:
            # the kernel keeps a watch by inode, not by path: nothing else a user may read names it
            raise UnsupportedError(
                f"{what}: finding the watched file's path needs CAP_DAC_READ_SEARCH in the initial user "
                "namespace (open_by_handle_at): root only. Dump as root, or have the process remove "
                "that watch (or close the inotify fd) before the checkpoint") from None
        raise
    try:
        path = os.readlink(f"/proc/self/fd/{hfd}")
        s = os.fstat(hfd)
    finally:
        os.close(hfd)
    try:
        ps = os.stat(path, follow_symlinks=False)
    except OSError:
        ps = None
    if ps is None or (ps.st_ino, ps.st_dev) != (s.st_ino, s.st_dev) or not path.startswith("/"):
        raise UnsupportedError(f"{what}: resolves to {path!r}, which is not reachable by that path "
                               "(deleted, or outside the engine's mount namespace)")
    return path, dev


_DUMP = {files_pb2.EVENTFD: _dump_eventfd, files_pb2.EPOLL: _dump_epoll, files_pb2.TIMERFD: _dump_timerfd,
         files_pb2.SIGNALFD: _dump_signalfd, files_pb2.INOTIFY: _dump_inotify}


# ---------------------------------------------------------------------------- restore

def _open_eventfd(f) -> int:
    e = f.eventfd
    fd = anonfd.eventfd(EFD_SEMAPHORE if e.semaphore else 0)
    if e.count:
        os.write(fd, e.count.to_bytes(8, "little"))
    return fd


def _open_timerfd(f) -> int:
    t = f.timerfd
    fd = anonfd.timerfd_create(t.clockid)
    interval = (t.interval_sec, t.interval_nsec)
    try:
        if t.value_sec or t.value_nsec:
            anonfd.timerfd_settime(fd, t.settime_flags, interval, (t.value_sec, t.value_nsec))
        if t.ticks:
            try:
                anonfd.timerfd_set_ticks(fd, t.ticks)
            except SysError as e:
                if e.errno != errno.ENOTTY:
                    raise
                anonfd.timerfd_settime(fd, 0, interval, (0, 1))     # no CONFIG_CHECKPOINT_RESTORE: fire at once
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_inotify(f) -> int:
    fd = anonfd.inotify_init(os.O_NONBLOCK)
    try:
        watches = sorted(f.inotify.watches, key=lambda w: w.wd)
        dummy = None
        burned = False
        expect = 1                          # the kernel's first wd
        for w in watches:
            if w.wd < expect:
                raise RestoreError(f"inotify watches in the image are not in wd order (wd {w.wd})")
            if w.wd - expect > MAX_WD_GAP:
                raise RestoreError(f"inotify watch {w.path} had wd {w.wd}; recreating it would take "
                                   f"{w.wd - expect} throw-away watches")
            while expect < w.wd:            # a removed watch left a gap: burn its number
                dummy = dummy or _dummy_watch_path(watches)
                got = _add_watch(fd, dummy, IN_DELETE_SELF)
                anonfd.inotify_rm_watch(fd, got)
                burned = True
                if got != expect:
                    break
                expect += 1
            got = _add_watch(fd, w.path, w.mask)
            if got != w.wd:
                raise RestoreError(f"inotify watch on {w.path} came back as wd {got}, not {w.wd}: the "
                                   "process knows it by its number, which the kernel cannot be told")
            expect = got + 1
        if burned:
            _drain(fd)                      # the IN_IGNORED events of the throw-away watches
    except BaseException:
        os.close(fd)
        raise
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def _add_watch(fd: int, path: str, mask: int) -> int:
    # The path is the watched inode itself (resolved at dump): never follow a symlink;
    # IN_MASK_CREATE: an inode already watched here would silently share its wd.
    try:
        return anonfd.inotify_add_watch(fd, path, mask | IN_DONT_FOLLOW | IN_MASK_CREATE)
    except SysError as e:
        raise RestoreError(f"cannot watch {path} again: {os.strerror(e.errno)}") from None


def _dummy_watch_path(watches) -> str:
    taken = set()
    for w in watches:
        try:
            s = os.stat(w.path, follow_symlinks=False)
            taken.add((s.st_dev, s.st_ino))
        except OSError:
            pass
    for p in ("/", "/proc", "/dev", "/sys", "/etc", "/usr"):
        s = os.stat(p)
        if (s.st_dev, s.st_ino) not in taken:
            return p
    raise RestoreError("inotify: found no unwatched directory to burn unused watch numbers with")


def _drain(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 65536):
                return
        except BlockingIOError:
            return


_OPEN = {files_pb2.EVENTFD: _open_eventfd, files_pb2.EPOLL: lambda f: anonfd.epoll_create(),
         files_pb2.TIMERFD: _open_timerfd, files_pb2.SIGNALFD: lambda f: anonfd.signalfd(f.signalfd.sigmask),
         files_pb2.INOTIFY: _open_inotify}


def _after_place(ctx, remote, pid: int, fds, f: files_pb2.FileEntry) -> None:
    """epoll: re-add every registration by injected epoll_ctl, with the process's fd numbers."""
    if f.kind != files_pb2.EPOLL or (f.epoll.owner_pid and f.epoll.owner_pid != pid):
        return
    placed = {e.fd: e for e in fds}
    efd = min(e.fd for e in fds if e.id == f.id)
    for t in f.epoll.targets:
        if t.tfd not in placed and not t.HasField("via_fd"):
            raise RestoreError(f"process {pid}: epoll fd {efd} watches fd {t.tfd}, which the image "
                               "does not have")
    # A fired EPOLLONESHOT shows only its flag bits.  ADD always arms EPOLLERR|EPOLLHUP,
    # so such a registration is added first, armed for any readiness, and fired by an
    # epoll_wait while nothing else is registered (so no other event is consumed).  One
    # whose file is not ready stays armed: it is added again with its bare mask (armed
    # for EPOLLERR|EPOLLHUP only, the closest the kernel allows).
    fired = [t for t in f.epoll.targets if t.events & EPOLLONESHOT and not t.events & ~EP_PRIVATE_BITS]
    for t in fired:
        _epoll_ctl(remote, efd, EPOLL_CTL_ADD, t, placed, t.events | EPOLL_ANY_READY)
    if fired:
        for _ in range(0, len(fired), _EVENTS_PER_PAGE):
            remote.syscall("epoll_wait", efd, remote.scratch, _EVENTS_PER_PAGE, 0)
        # remote.pid: the engine's view of the process (`pid` is its own, the image's)
        now = {(x["tfd"], x["data"]): x["events"] for x in proc.epoll_targets(proc.fdinfo(remote.pid, efd))}
        for t in fired:
            if now.get((t.tfd, t.data), 0) & ~EP_PRIVATE_BITS:
                _epoll_ctl(remote, efd, EPOLL_CTL_DEL, t, placed, 0)
                _epoll_ctl(remote, efd, EPOLL_CTL_ADD, t, placed, t.events)
    for t in f.epoll.targets:
        if t not in fired:
            _epoll_ctl(remote, efd, EPOLL_CTL_ADD, t, placed, t.events)


def _epoll_ctl(remote, efd: int, op: int, t, placed: dict, events: int) -> None:
    if not t.HasField("via_fd"):
        return _epoll_ctl_raw(remote, efd, op, t.tfd, events, t.data)
    # The registration was made through fd number tfd, which now holds another
    # file or none: put the registered file there for the call, then put back.
    saved = None
    if t.tfd in placed:
        saved = remote.syscall("fcntl", t.tfd, F_DUPFD_CLOEXEC, max(placed) + 1)
    remote.syscall("dup3", t.via_fd, t.tfd, 0)
    _epoll_ctl_raw(remote, efd, op, t.tfd, events, t.data)
    if saved is None:
        remote.syscall("close", t.tfd)
    else:
        remote.syscall("dup3", saved, t.tfd, os.O_CLOEXEC if placed[t.tfd].cloexec else 0)
        remote.syscall("close", saved)


def _epoll_ctl_raw(remote, efd: int, op: int, tfd: int, events: int, data: int) -> None:
    # struct epoll_event is packed on x86_64: u32 events, u64 data (12 bytes).
    remote.write(remote.scratch, struct.pack("<IQ", events, data))
    remote.syscall("epoll_ctl", efd, op, tfd, remote.scratch)


class Anon(FileKind):
    """EVENTFD, EPOLL, TIMERFD, SIGNALFD, INOTIFY: each method dispatches on the entry's kind."""

    def dump(self, ctx, pid, fd, s, link, info, entry) -> None:
        _DUMP[entry.kind](pid, fd, info, entry)

    def check(self, ctx, pid, fde, f) -> None:
        if f.kind == files_pb2.INOTIFY:
            for w in f.inotify.watches:
                if not os.path.lexists(w.path):
                    raise RestoreError(f"process {pid}: inotify fd {fde.fd} watched {w.path} (wd {w.wd}), "
                                       "which no longer exists; put it back to restore")

    def open(self, ctx, f) -> int:
        fd = _OPEN[f.kind](f)
        try:
            if f.flags & os.O_NONBLOCK:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        except BaseException:
            os.close(fd)
            raise
        return fd

    after_place = staticmethod(_after_place)


KIND = Anon()
