"""The system calls that make and set anonymous-inode files (files/anon.py): eventfd, epoll,
timerfd, signalfd, inotify, and the two lookups their dump needs (kcmp KCMP_EPOLL_TFD,
open_by_handle_at).  Every fd returned is O_CLOEXEC; failures raise SysError."""
from __future__ import annotations

import os
import struct

from .ioctl import ioctl_buf
from .libc import syscall
from .x86_64 import NR

O_CLOEXEC = 0o2000000
KCMP_EPOLL_TFD = 7
TFD_IOC_SET_TICKS = 0x40085400          # _IOW('T', 0, u64)


def same_epoll_file(pid: int, efd: int, tfd: int, toff: int, cand: int) -> bool:
    """Is process pid's fd `cand` the file of its epoll efd's registration (tfd, toff)?"""
    slot = struct.pack("III", efd, tfd, toff)       # struct kcmp_epoll_slot
    return syscall(NR["kcmp"], pid, pid, KCMP_EPOLL_TFD, cand, slot, request="kcmp(KCMP_EPOLL_TFD)", pid=pid) == 0


def open_by_handle_at(mount_fd: int, handle_type: int, handle: bytes, flags: int, pid: int | None = None) -> int:
    raw = struct.pack("<Ii", len(handle), handle_type) + handle       # struct file_handle
    return syscall(NR["open_by_handle_at"], mount_fd, raw, flags | O_CLOEXEC, request="open_by_handle_at", pid=pid)


def eventfd(flags: int) -> int:
    return syscall(NR["eventfd2"], 0, flags | O_CLOEXEC, request="eventfd2")


def epoll_create() -> int:
    return syscall(NR["epoll_create1"], O_CLOEXEC, request="epoll_create1")


def timerfd_create(clockid: int) -> int:
    return syscall(NR["timerfd_create"], clockid, O_CLOEXEC, request=f"timerfd_create(clock {clockid})")


def timerfd_settime(fd: int, flags: int, interval: tuple[int, int], value: tuple[int, int]) -> None:
    its = struct.pack("4q", *interval, *value)     # struct itimerspec
    syscall(NR["timerfd_settime"], fd, flags, its, None, request="timerfd_settime")


def timerfd_set_ticks(fd: int, ticks: int) -> None:
    """TFD_IOC_SET_TICKS (CONFIG_CHECKPOINT_RESTORE; ENOTTY without it)."""
    ioctl_buf(fd, TFD_IOC_SET_TICKS, "TFD_IOC_SET_TICKS", struct.pack("Q", ticks))


def signalfd(sigmask: int) -> int:
    return syscall(NR["signalfd4"], -1, struct.pack("Q", sigmask), 8, O_CLOEXEC, request="signalfd4")


def inotify_init(flags: int) -> int:
    return syscall(NR["inotify_init1"], flags | O_CLOEXEC, request="inotify_init1")


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    return syscall(NR["inotify_add_watch"], fd, os.fsencode(path), mask, request=f"inotify_add_watch({path})")


def inotify_rm_watch(fd: int, wd: int) -> None:
    syscall(NR["inotify_rm_watch"], fd, wd, request="inotify_rm_watch")
