"""Creating the restored process tree: stubs with the exact PIDs, sessions,
process groups and zombies.

Every process starts as a *stub*: a copy of the engine that does nothing but
wait, traced by us.  The root stub comes from clone3(set_tid=[pid]) in the
engine; each child from the same call injected into its parent's stub, so
parent links are right by construction.  All stubs exist before any is
rebuilt, so each inherits every fd the engine opened for the tree.

Order matters:
1. a session leader calls setsid() right after it is created, before it forks
   the children that must inherit its session;
2. process groups are joined once every process exists (leaders first);
3. zombies exit last, with their dumped status, and the SIGCHLD this sends
   their parents is taken back.
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct
import time

from .errors import RestoreError, SysError
from .inject import Remote, find_syscall_insn
from .sys import proc, ptrace
from .sys.x86_64 import NR

CLONE_THREAD_FLAGS = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000  # VM FS FILES SIGHAND THREAD SYSVSEM
TRACE_OPTIONS = (ptrace.PTRACE_O_TRACESYSGOOD | ptrace.PTRACE_O_TRACECLONE | 0x2 | 0x4   # TRACEFORK, TRACEVFORK
                 | ptrace.PTRACE_O_EXITKILL)


class CloneArgs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
        "tls", "set_tid", "set_tid_size", "cgroup")]


# PyDLL keeps the GIL across the call, so the child starts holding it, as after
# os.fork(); a CDLL call would release it and the child could block forever on
# a GIL owned by a thread that does not exist in the child.
_pysyscall = ctypes.PyDLL(None, use_errno=True).syscall
_pysyscall.restype = ctypes.c_long


def describe(pid: int) -> str:
    try:
        return f"{proc.comm(pid, pid)!r}, state {proc.pid_state(pid)}"
    except Exception:
        return "unknown"


def create_root(pid: int) -> int:
    """The root stub, a child of the engine, with PID `pid`, traced and stopped."""
    tids = (ctypes.c_int32 * 1)(pid)
    args = CloneArgs(exit_signal=signal.SIGCHLD, set_tid=ctypes.addressof(tids), set_tid_size=1)
    # The child must run no Python code that could act (signal handlers
    # raising into the engine's frames): it inherits a fully blocked mask.
    old = signal.pthread_sigmask(signal.SIG_SETMASK, set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP})
    try:
        r = _pysyscall(ctypes.c_long(NR["clone3"]), ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
        if r == 0:
            _pysyscall(ctypes.c_long(NR["prctl"]), ctypes.c_long(1), ctypes.c_long(signal.SIGKILL))
            while True:
                _pysyscall(ctypes.c_long(NR["pause"]))
        err = ctypes.get_errno()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    if r < 0:
        if err == errno.EEXIST:
            raise RestoreError(f"PID {pid} is taken ({describe(pid)}); the image needs that exact PID")
        raise SysError(err, "clone3(set_tid)", pid,
                       "creating a process with a chosen PID needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE")
    try:
        ptrace.seize(r, TRACE_OPTIONS)
        ptrace.interrupt(r)
        wait_event_stop(r)
    except BaseException:
        kill(r)
        raise
    return r


def wait_event_stop(tid: int) -> None:
    while True:
        _, status = ptrace.wait(tid)
        if (status & 0xFF) != 0x7F:
            raise RestoreError(f"restored thread {tid} died during restore (status {status:#x})")
        if ptrace.stop_event(status) == ptrace.PTRACE_EVENT_STOP:
            return
        ptrace.cont(tid, 0)    # any signal-stop before ours: drop it, wait for the interrupt


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        os.waitpid(pid, 0)          # our child (the root stub, an init): reap it, so its PID is free
    except ChildProcessError:
        pass                        # a grandchild: its stub parent dies too, init reaps it


class Stub:
    """A stub not yet rebuilt: an engine copy we can run syscalls in.

    `pid` is how the engine sees it; `vpid` how it sees itself (the image's
    number), which differs inside a new PID namespace.
    """

    def __init__(self, pid: int, vpid: int | None = None):
        self.pid = pid
        self.vpid = pid if vpid is None else vpid
        vdso = next((m for m in proc.maps(pid) if m.path == "[vdso]"))
        self.syscall_addr = find_syscall_insn(pid, vdso.start, vdso.end)
        self.scratch = 0

    def remote(self) -> Remote:
        return Remote(self.pid, self.pid, self.syscall_addr, scratch=self.scratch, vpid=self.vpid)

    def ensure_scratch(self, r: Remote) -> None:
        if not self.scratch:
            self.scratch = r.map_scratch()      # anywhere: teardown removes it later

    def fork(self, child_vpid: int) -> "Stub":
        """Inject clone3(set_tid=[child_vpid]) (a fork) into this stub; the child starts stopped.

        set_tid names the PID in the innermost namespace, the one the stub lives in.
        """
        with self.remote() as r:
            self.ensure_scratch(r)
            s = self.scratch
            r.write(s + 256, struct.pack("<i", child_vpid))
            args = CloneArgs(exit_signal=signal.SIGCHLD, set_tid=s + 256, set_tid_size=1)
            r.write(s, bytes(args))
            try:
                new = r.syscall("clone3", s, ctypes.sizeof(args))
            except SysError as e:
                if e.errno == errno.EEXIST:
                    raise RestoreError(f"PID {child_vpid} is taken ({describe(child_vpid)}); "
                                       "the image needs that exact PID") from None
                raise
            host = r.clone_tids[-1]            # the fork event tells its PID in our namespace
        if new != child_vpid:
            raise RestoreError(f"process {child_vpid} came back as {new}")
        wait_event_stop(host)
        child = Stub(host, child_vpid)
        child.scratch = self.scratch          # inherited mapping
        return child

    def syscall(self, name: str, *args: int) -> int:
        with self.remote() as r:
            return r.syscall(name, *args)


def create_init(root_vpid: int) -> "Stub":
    """PID 1 of a new PID namespace (with its own mount namespace and /proc).

    It is a copy of the engine that mounts a fresh /proc, blocks until the
    engine has restored the tree, then reaps children as an init must, and
    exits with the root's status when the root exits -- taking the namespace
    down with it, like a container.  Returned traced.

    The engine talks to it over a pipe (``stub.release_fd``, see init_go):
    ``r`` -- released: the init outlives the engine from now on;
    ``g`` -- go, but on a lifeline: the tree runs while the engine still
    serves its memory (lazy restore); when the pipe then ends without an
    ``r`` (the engine died), the init exits and the kernel kills every
    process of the namespace, rather than let them read zeros where their
    memory was still to come.  EOF before either means restore failed.
    """
    CLONE_NEWNS, CLONE_NEWPID = 0x00020000, 0x20000000
    rfd, wfd = os.pipe()
    args = CloneArgs(flags=CLONE_NEWNS | CLONE_NEWPID, exit_signal=signal.SIGCHLD)
    old = signal.pthread_sigmask(signal.SIG_SETMASK, set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP})
    try:
        r = _pysyscall(ctypes.c_long(NR["clone3"]), ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
        if r == 0:
            _init_main(rfd, wfd, root_vpid)
        err = ctypes.get_errno()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    os.close(rfd)
    if r < 0:
        os.close(wfd)
        raise SysError(err, "clone3(CLONE_NEWPID|CLONE_NEWNS)", None, "a new PID namespace needs CAP_SYS_ADMIN")
    try:
        ptrace.seize(r, TRACE_OPTIONS)
        ptrace.interrupt(r)
        wait_event_stop(r)
    except BaseException:
        os.close(wfd)
        kill(r)
        raise
    stub = Stub(r, 1)
    stub.release_fd = wfd
    return stub


def init_go(init: "Stub", lifeline: bool) -> None:
    """Let create_init's init start reaping; `lifeline`: it dies with us until init_release."""
    os.write(init.release_fd, b"g" if lifeline else b"r")
    if not lifeline:
        os.close(init.release_fd)
        init.release_fd = -1


def init_release(init: "Stub") -> None:
    """Cut the lifeline: the namespace outlives the engine from now on."""
    if init.release_fd >= 0:
        try:
            os.write(init.release_fd, b"r")
        except BrokenPipeError:
            pass                    # the init is gone already (its root exited): nothing to release
        os.close(init.release_fd)
        init.release_fd = -1


def _init_main(rfd: int, wfd: int, root_vpid: int) -> None:
    """The namespace's init (runs in the child; never returns).  Only raw syscalls.

    All signals are blocked here (create_init masks them around the clone)."""
    def sc(name, *a):
        return _pysyscall(ctypes.c_long(NR[name]), *[ctypes.c_long(x) if isinstance(x, int) else x for x in a])
    MS_REC, MS_PRIVATE = 0x4000, 0x40000
    sc("prctl", 1, signal.SIGKILL)                              # die with the engine until released
    sc("close", wfd)
    sc("mount", ctypes.c_char_p(b"none"), ctypes.c_char_p(b"/"), None, MS_REC | MS_PRIVATE, None)
    sc("mount", ctypes.c_char_p(b"proc"), ctypes.c_char_p(b"/proc"), ctypes.c_char_p(b"proc"), 0, None)
    buf = ctypes.create_string_buffer(1)
    while (n := sc("read", rfd, buf, 1)) < 0 and ctypes.get_errno() == errno.EINTR:
        pass
    if n != 1:
        sc("exit_group", 1)                                     # restore failed: the engine kills us
    sc("prctl", 1, 0)                                           # outlive the engine's thread...
    if buf.raw == b"g":
        # ...but not the engine itself: reap while watching the lifeline
        sc("close_range", 0, rfd - 1, 0) if rfd > 0 else None
        sc("close_range", rfd + 1, 0x7FFFFFFF, 0)
        _reap_on_lifeline(sc, rfd, root_vpid)
    # the engine's files are the tree's now; and a shell pipeline reading our stdout
    # must not wait for the namespace to end
    sc("close_range", 0, 0x7FFFFFFF, 0)
    _reap_then_exit(sc, root_vpid)


def _reap_on_lifeline(sc, rfd: int, root: int) -> None:
    """Reap children (as _reap_then_exit) until the engine writes ``r`` on rfd; exit when
    the root exits, and also when rfd ends (the engine died: the namespace dies with us)."""
    SFD_NONBLOCK, POLLIN, WNOHANG = 0o4000, 1, 1
    chld = ctypes.c_uint64(1 << (signal.SIGCHLD - 1))
    sfd = sc("signalfd4", -1, ctypes.byref(chld), 8, SFD_NONBLOCK)   # SIGCHLD is blocked here
    fds = (ctypes.c_int32 * 4)(rfd, POLLIN, sfd, POLLIN)            # struct pollfd[2] (events, revents: s16)
    status = ctypes.c_int(0)
    scratch = ctypes.create_string_buffer(128)
    while True:
        while (pid := sc("wait4", -1, ctypes.byref(status), WNOHANG | 0x40000000, None)) > 0:   # __WALL
            if pid == root:
                _exit_like(sc, status.value)
        sc("ppoll", fds, 2, None, None, 8)
        if fds[1] >> 16:                                            # revents of rfd
            n = sc("read", rfd, scratch, 1)
            if n == 1 and scratch.raw[:1] == b"r":
                sc("close", sfd)
                return
            if n == 0 or (n < 0 and ctypes.get_errno() != errno.EINTR):
                sc("exit_group", 128 + signal.SIGKILL)
        sc("read", sfd, scratch, 128)                               # drain (non-blocking)


def _exit_like(sc, status: int) -> None:
    code = (status >> 8) & 0xFF if (status & 0x7F) == 0 else 128 + (status & 0x7F)
    sc("exit_group", code)


def spawn_init(argv: list[str], env: dict[str, str], fds: dict[int, int]) -> tuple[int, int]:
    """Start `argv` as PID 2 of a new PID + mount namespace, under an init like create_init's.

    How a kernel is launched so that a later restore can recreate its PIDs anywhere
    (restore puts it back under create_init's init, with the same PIDs).  The init
    mounts a fresh /proc, dies with the calling thread (PR_SET_PDEATHSIG), reaps, and
    exits with PID 2's status.  PID 2 starts a session of its own, gets ``fds``
    (``{target: source}``, e.g. 0/1/2 on a pty slave) and nothing else, default
    SIGPIPE/SIGXFSZ (Python ignores them) and an empty mask, then execs.  Only raw
    syscalls run in the children (see _pysyscall).  Returns (init pid, PID 2's pid as
    we see it).  Raises SysError if the namespace or the exec fails.
    """
    import shutil
    CLONE_NEWNS, CLONE_NEWPID = 0x00020000, 0x20000000
    path = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=env.get("PATH"))
    if not path:
        raise SysError(errno.ENOENT, f"execve({argv[0]!r})", None, "not found in PATH")
    c_argv = (ctypes.c_char_p * (len(argv) + 1))(*[os.fsencode(a) for a in argv], None)
    c_env = (ctypes.c_char_p * (len(env) + 1))(*[os.fsencode(f"{k}={v}") for k, v in env.items()], None)
    c_path = ctypes.c_char_p(os.fsencode(path))
    srcs, tgts = list(fds.values()), list(fds.keys())
    top = max(tgts + [2]) + 1
    errr, errw = os.pipe2(os.O_CLOEXEC)
    args = CloneArgs(flags=CLONE_NEWNS | CLONE_NEWPID, exit_signal=signal.SIGCHLD)
    old = signal.pthread_sigmask(signal.SIG_SETMASK, set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP})
    try:
        r = _pysyscall(ctypes.c_long(NR["clone3"]), ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
        if r == 0:
            try:
                _spawned_init(c_path, c_argv, c_env, srcs, tgts, top, errw)
            finally:
                os._exit(127)
        err = ctypes.get_errno()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    os.close(errw)
    try:
        if r < 0:
            raise SysError(err, "clone3(CLONE_NEWPID|CLONE_NEWNS)", None, "a new PID namespace needs CAP_SYS_ADMIN")
        data = os.read(errr, 8)                   # EOF once PID 2 has exec'd (its copy is O_CLOEXEC)
    finally:
        os.close(errr)
    if data:
        os.waitpid(r, 0)
        what, code = struct.unpack("ii", data)
        raise SysError(code, ("execve", "setup")[what] + f"({path!r})", None, "starting the program failed")
    for _ in range(2000):
        try:
            kids = open(f"/proc/{r}/task/{r}/children").read().split()
        except OSError:
            kids = []
        if kids:
            return r, int(kids[0])
        time.sleep(0.001)
    raise SysError(errno.ESRCH, "spawn_init", r, "the program exited at once")


def _spawned_init(c_path, c_argv, c_env, srcs, tgts, top, errw) -> None:
    """spawn_init's children (never returns).  Only raw syscalls."""
    def sc(name, *a):
        return _pysyscall(ctypes.c_long(NR[name]), *[ctypes.c_long(x) if isinstance(x, int) else x for x in a])

    def fail(what):
        sc("write", errw, struct.pack("ii", what, ctypes.get_errno()), 8)
        sc("exit_group", 127)
    MS_REC, MS_PRIVATE = 0x4000, 0x40000
    sc("prctl", 1, signal.SIGKILL)                              # PR_SET_PDEATHSIG: die with the launcher
    sc("mount", ctypes.c_char_p(b"none"), ctypes.c_char_p(b"/"), None, MS_REC | MS_PRIVATE, None)
    sc("mount", ctypes.c_char_p(b"proc"), ctypes.c_char_p(b"/proc"), ctypes.c_char_p(b"proc"), 0, None)
    child = sc("fork")
    if child == 0:
        sc("setsid")
        high = []
        for i, s in enumerate(srcs):                            # two passes: a source may be another's target
            h = sc("fcntl", s, 0, 1024 + i)                     # F_DUPFD
            if h < 0:
                fail(1)
            high.append(h)
        for h, t in zip(high, tgts):
            if sc("dup3", h, t, 0) < 0:
                fail(1)
        for fd in range(3, top):
            if fd not in tgts:
                sc("close", fd)
        sc("close_range", top, 0x7FFFFFFF, 4)                   # CLOSE_RANGE_CLOEXEC: errw must survive
        dfl = (ctypes.c_ulong * 4)(0, 0, 0, 0)                  # struct kernel_sigaction {SIG_DFL}
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            sc("rt_sigaction", sig, dfl, None, 8)
        empty = ctypes.c_ulong(0)
        sc("rt_sigprocmask", 2, ctypes.byref(empty), None, 8)  # SIG_SETMASK
        sc("execve", c_path, c_argv, c_env)
        fail(0)
    sc("close_range", 0, 0x7FFFFFFF, 0)                         # the init holds nothing open
    _reap_then_exit(sc, child)


def _reap_then_exit(sc, root: int) -> None:
    """An init's life: reap every child (as PID 1 must) until `root` exits, then exit with
    its status, taking the namespace down with it.  Raw syscalls through `sc`."""
    status = ctypes.c_int(0)
    while True:
        pid = sc("wait4", -1, ctypes.byref(status), 0x40000000, None)     # __WALL
        if pid == root or (pid < 0 and ctypes.get_errno() == errno.ECHILD):
            break
    _exit_like(sc, status.value)


def make_sessions(stub: Stub, process) -> None:
    """Right after creation: become a session leader if the process was one."""
    if process.sid == process.pid:
        stub.syscall("setsid")


def join_groups(stubs: dict[int, Stub], processes) -> None:
    """Once all exist: process groups, leaders before members."""
    live = {p.pid for p in processes}
    for leaders_pass in (True, False):
        for p in processes:
            if (p.pgid == p.pid) != leaders_pass or p.pid not in stubs or p.sid == p.pid:
                continue
            if p.pgid == p.pid:
                stubs[p.pid].syscall("setpgid", 0, 0)
            elif p.pgid in live:
                stubs[p.pid].syscall("setpgid", 0, p.pgid)
            # else: the group's leader was outside the tree; the process stays
            # in the group it inherited (the engine's, for the root).


def make_zombie(stub: Stub, parent: Stub, status: int, comm: str) -> None:
    """End `stub` with the dumped wait status, leaving it unreaped for `parent`."""
    sig = status & 0x7F
    with stub.remote() as r:
        stub.ensure_scratch(r)
        r.write(stub.scratch, comm.encode()[:15] + b"\0")
        r.syscall("prctl", 15, stub.scratch)               # PR_SET_NAME
        if sig:
            r.syscall("prctl", 4, 0)                       # PR_SET_DUMPABLE 0: no core file
            stub.ensure_scratch(r)
            r.write(stub.scratch, bytes(32))               # SIG_DFL
            if sig not in (signal.SIGKILL, signal.SIGSTOP):  # (theirs cannot change: EINVAL)
                r.syscall("rt_sigaction", sig, stub.scratch, 0, 8)
            r.syscall("tgkill", stub.vpid, stub.vpid, sig)
        r.saved_mask = 0 if sig else r.saved_mask
        if not sig:
            r.saved_regs.rax = NR["exit_group"]
            r.saved_regs.orig_rax = (1 << 64) - 1
            r.saved_regs.rdi = (status >> 8) & 0xFF
            r.saved_regs.rip = stub.syscall_addr
    # Let it run: straight into exit_group, or into the pending fatal signal.
    ptrace.cont(stub.pid, 0)
    while True:
        _, st = ptrace.wait(stub.pid)
        if (st & 0xFF) != 0x7F:
            break                                          # dead: the parent now sees a zombie
        ptrace.cont(stub.pid, (st >> 8) & 0xFF if ptrace.stop_event(st) == 0 else 0)
    # Its death queued a SIGCHLD in the parent that the dumped parent never had.
    with parent.remote() as r:
        parent.ensure_scratch(r)
        r.write(parent.scratch, struct.pack("<Q", 1 << (signal.SIGCHLD - 1)) + bytes(16))
        r.syscall("rt_sigtimedwait", parent.scratch, 0, parent.scratch + 8, 8, check=False)
