"""Processes the engine creates with a raw clone3(2): restore's stubs and the inits of new
PID namespaces (pstree.py says what each is for).  The children run raw syscalls only.
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct

from ..errors import SysError
from . import waitstatus
from .libc import syscall
from .x86_64 import NR

CLONE_NEWNS, CLONE_NEWPID, CLONE_PIDFD = 0x00020000, 0x20000000, 0x00001000
MS_REC, MS_PRIVATE = 0x4000, 0x40000
__WALL = 0x40000000


class _CloneArgs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
        "tls", "set_tid", "set_tid_size", "cgroup")]


def clone_args(**fields: int) -> bytes:
    """struct clone_args, for a clone3 injected into another process."""
    return bytes(_CloneArgs(**fields))


# PyDLL keeps the GIL across the call, so the child starts holding it, as after
# os.fork(); a CDLL call would release it and the child could block forever on
# a GIL owned by a thread that does not exist in the child.
_pysyscall = ctypes.PyDLL(None, use_errno=True).syscall
_pysyscall.restype = ctypes.c_long


def _sc(name, *a):
    """A raw syscall for the children: no errno check, no Python exception."""
    return _pysyscall(ctypes.c_long(NR[name]), *[ctypes.c_long(x) if isinstance(x, int) else x for x in a])


# why a clone fails with EAGAIN (the kernel's limits on tasks: for root, the pids cgroup; for
# anyone else RLIMIT_NPROC too, counted per user in the restore's user namespace)
NO_ROOM = "a pids cgroup or RLIMIT_NPROC leaves no room for it"


def _clone3(child, request: str, detail: str, flags: int = 0, set_tid: int = 0, pidfd=None) -> int:
    """clone3 from the engine itself; the child runs `child()`, which never returns.
    With `pidfd` (a ctypes.c_int32), CLONE_PIDFD: the kernel puts the child's pidfd there.

    The child must run no Python code that could act (signal handlers raising into
    the engine's frames): it inherits a fully blocked mask."""
    tids = (ctypes.c_int32 * 1)(set_tid)
    args = _CloneArgs(flags=flags | (CLONE_PIDFD if pidfd is not None else 0), exit_signal=signal.SIGCHLD,
                      pidfd=ctypes.addressof(pidfd) if pidfd is not None else 0,
                      set_tid=ctypes.addressof(tids) if set_tid else 0, set_tid_size=1 if set_tid else 0)
    old = signal.pthread_sigmask(signal.SIG_SETMASK, set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP})
    try:
        r = _pysyscall(ctypes.c_long(NR["clone3"]), ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
        if r == 0:
            try:
                child()
            finally:
                os._exit(127)
        err = ctypes.get_errno()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    if r < 0:
        raise SysError(err, request, set_tid or None, NO_ROOM if err == errno.EAGAIN else detail)
    return r


def stub(pid: int) -> int:
    """A child with PID `pid` that waits forever and dies with the calling thread."""
    parent = os.getpid()

    def main():
        _sc("prctl", 1, signal.SIGKILL)
        if _sc("getppid") != parent:    # the engine died before PDEATHSIG was set: it never comes
            _sc("exit_group", 1)
        while True:
            _sc("pause")
    return _clone3(main, "clone3(set_tid)", "creating a process with a chosen PID needs CAP_SYS_ADMIN "
                   "or CAP_CHECKPOINT_RESTORE", set_tid=pid)


def reaped_pidfd() -> int:
    """A pidfd (close-on-exec) of a child that has exited and been reaped: what a pidfd is once
    its process is gone (readable, waitid ECHILD, pidfd_send_signal ESRCH)."""
    fd = ctypes.c_int32(-1)
    _clone3(lambda: _sc("exit_group", 0), "clone3(CLONE_PIDFD)", "", pidfd=fd)
    try:
        os.waitid(os.P_PIDFD, fd.value, os.WEXITED)
    except ChildProcessError:
        pass                            # reaped by someone else: just as good
    except BaseException:
        os.close(fd.value)
        raise
    return fd.value


def fork_with_pid(pid: int) -> int:
    """clone3(set_tid=[pid]) as a plain fork, 0 in the child.  No fork handlers run (nor
    Python's after-fork hooks): only safe in a single-threaded process; the child must leave."""
    tids = (ctypes.c_int32 * 1)(pid)
    args = _CloneArgs(exit_signal=signal.SIGCHLD, set_tid=ctypes.addressof(tids), set_tid_size=1)
    return syscall(NR["clone3"], ctypes.byref(args), ctypes.sizeof(args), request="clone3", pid=pid)


def namespace_init(rfd: int, wfd: int, root_vpid: int, ready: int) -> int:
    """pstree.create_init's init: PID 1 of a new PID + mount namespace, told by the engine
    over the pipe rfd/wfd when to go (see there).  Once its /proc is mounted it writes one byte
    to `ready`: 0, or the errno of the mount that failed; once told to go and no longer bound
    to die with the engine's thread, one more (0)."""
    return _clone3(lambda: _init_main(rfd, wfd, root_vpid, ready), "clone3(CLONE_NEWPID|CLONE_NEWNS)",
                   "a new PID namespace needs CAP_SYS_ADMIN", flags=CLONE_NEWNS | CLONE_NEWPID)


def _mount_proc() -> int:
    """A private mount tree and a /proc of the new PID namespace; 0 or the errno."""
    for args in ((ctypes.c_char_p(b"none"), ctypes.c_char_p(b"/"), None, MS_REC | MS_PRIVATE, None),
                 (ctypes.c_char_p(b"proc"), ctypes.c_char_p(b"/proc"), ctypes.c_char_p(b"proc"), 0, None)):
        if _sc("mount", *args) < 0:
            return ctypes.get_errno() or errno.EIO
    return 0


def _init_main(rfd: int, wfd: int, root_vpid: int, ready: int) -> None:
    """The namespace's init (runs in the child; never returns).  Only raw syscalls.

    All signals are blocked here (_clone3 masks them around the clone)."""
    _sc("prctl", 1, signal.SIGKILL)                             # die with the engine until released
    _sc("close", wfd)
    _sc("write", ready, ctypes.c_char_p(bytes([min(_mount_proc(), 255)])), 1)
    buf = ctypes.create_string_buffer(1)
    while (n := _sc("read", rfd, buf, 1)) < 0 and ctypes.get_errno() == errno.EINTR:
        pass
    if n != 1:
        _sc("exit_group", 1)                                    # restore failed: the engine kills us
    _sc("prctl", 1, 0)                                          # outlive the engine's thread...
    _sc("write", ready, ctypes.c_char_p(b"\0"), 1)              # ...from now on: it may exit
    _sc("close", ready)
    if buf.raw == b"g":
        # ...but not the engine itself: reap while watching the lifeline
        _sc("close_range", 0, rfd - 1, 0) if rfd > 0 else None
        _sc("close_range", rfd + 1, 0x7FFFFFFF, 0)
        _reap_on_lifeline(rfd, root_vpid)
    # the engine's files are the tree's now; and a shell pipeline reading our stdout
    # must not wait for the namespace to end
    _sc("close_range", 0, 0x7FFFFFFF, 0)
    _reap_then_exit(root_vpid)


def _reap_on_lifeline(rfd: int, root: int) -> None:
    """Reap children (as _reap_then_exit) until the engine writes ``r`` on rfd; exit when
    the root exits, and also when rfd ends (the engine died: the namespace dies with us)."""
    SFD_NONBLOCK, POLLIN, WNOHANG = 0o4000, 1, 1
    chld = ctypes.c_uint64(1 << (signal.SIGCHLD - 1))
    sfd = _sc("signalfd4", -1, ctypes.byref(chld), 8, SFD_NONBLOCK)  # SIGCHLD is blocked here
    fds = (ctypes.c_int32 * 4)(rfd, POLLIN, sfd, POLLIN)            # struct pollfd[2] (events, revents: s16)
    status = ctypes.c_int(0)
    scratch = ctypes.create_string_buffer(128)
    while True:
        while (pid := _sc("wait4", -1, ctypes.byref(status), WNOHANG | __WALL, None)) > 0:
            if pid == root:
                _sc("exit_group", waitstatus.exit_code(status.value))
        _sc("ppoll", fds, 2, None, None, 8)
        if fds[1] >> 16:                                            # revents of rfd
            n = _sc("read", rfd, scratch, 1)
            if n == 1 and scratch.raw[:1] == b"r":
                _sc("close", sfd)
                return
            if n == 0 or (n < 0 and ctypes.get_errno() != errno.EINTR):
                _sc("exit_group", 128 + signal.SIGKILL)
        _sc("read", sfd, scratch, 128)                              # drain (non-blocking)


def _reap_then_exit(root: int) -> None:
    """An init's life: reap every child (as PID 1 must) until `root` exits, then exit with
    its status, taking the namespace down with it."""
    status = ctypes.c_int(0)
    while True:
        pid = _sc("wait4", -1, ctypes.byref(status), __WALL, None)
        if pid == root or (pid < 0 and ctypes.get_errno() == errno.ECHILD):
            break
    _sc("exit_group", waitstatus.exit_code(status.value))


def exec_init(path: str, argv: list[str], env: dict[str, str], fds: dict[int, int], errw: int) -> int:
    """pstree.spawn_init's init, PID 1 of a new PID + mount namespace, and its child PID 2,
    which execs `path`; a failure before the exec is written to `errw` as struct (what, errno),
    what 0: execve, 1: setup, 2: mounting /proc."""
    c_argv = (ctypes.c_char_p * (len(argv) + 1))(*[os.fsencode(a) for a in argv], None)
    c_env = (ctypes.c_char_p * (len(env) + 1))(*[os.fsencode(f"{k}={v}") for k, v in env.items()], None)
    c_path = ctypes.c_char_p(os.fsencode(path))
    srcs, tgts = list(fds.values()), list(fds.keys())
    top = max(tgts + [2]) + 1
    return _clone3(lambda: _spawned_init(c_path, c_argv, c_env, srcs, tgts, top, max(srcs + [top]) + 1, errw),
                   "clone3(CLONE_NEWPID|CLONE_NEWNS)", "a new PID namespace needs CAP_SYS_ADMIN",
                   flags=CLONE_NEWNS | CLONE_NEWPID)


def _spawned_init(c_path, c_argv, c_env, srcs, tgts, top, free, errw) -> None:
    """exec_init's children (never returns).  Only raw syscalls.  `free`: above every fd of
    `srcs` and `tgts` (and within RLIMIT_NOFILE, 1024 for an ordinary user)."""
    def fail(what):
        _sc("write", errw, struct.pack("ii", what, ctypes.get_errno()), 8)
        _sc("exit_group", 127)
    _sc("prctl", 1, signal.SIGKILL)                             # PR_SET_PDEATHSIG: die with the launcher
    if _mount_proc():
        fail(2)
    child = _sc("fork")
    if child == 0:
        _sc("setsid")
        high = []
        for i, s in enumerate(srcs):                            # two passes: a source may be another's target
            h = _sc("fcntl", s, 0, free)                        # F_DUPFD
            if h < 0:
                fail(1)
            high.append(h)
        for h, t in zip(high, tgts):
            if _sc("dup3", h, t, 0) < 0:
                fail(1)
        for fd in range(3, top):
            if fd not in tgts:
                _sc("close", fd)
        _sc("close_range", top, 0x7FFFFFFF, 4)                  # CLOSE_RANGE_CLOEXEC: errw must survive
        dfl = (ctypes.c_ulong * 4)(0, 0, 0, 0)                  # struct kernel_sigaction {SIG_DFL}
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            _sc("rt_sigaction", sig, dfl, None, 8)
        empty = ctypes.c_ulong(0)
        _sc("rt_sigprocmask", 2, ctypes.byref(empty), None, 8)  # SIG_SETMASK
        _sc("execve", c_path, c_argv, c_env)
        fail(0)
    _sc("close_range", 0, 0x7FFFFFFF, 0)                        # the init holds nothing open
    _reap_then_exit(child)
