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

import errno
import logging
import os
import signal
import struct
import time

from .errors import RestoreError, SysError
from .inject import Remote, find_syscall_insn
from .sys import proc, ptrace, spawn, waitstatus
from .sys.fd import Fd
from .sys.x86_64 import NR

CLONE_THREAD_FLAGS = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000  # VM FS FILES SIGHAND THREAD SYSVSEM
TRACE_OPTIONS = (ptrace.PTRACE_O_TRACESYSGOOD | ptrace.PTRACE_O_TRACECLONE | 0x2 | 0x4   # TRACEFORK, TRACEVFORK
                 | ptrace.PTRACE_O_EXITKILL)

log = logging.getLogger(__name__)


def describe(pid: int) -> str:
    try:
        return f"{proc.comm(pid, pid)!r}, state {proc.pid_state(pid)}"
    except SysError:
        return "unknown"


def create_root(pid: int) -> int:
    """The root stub, a child of the engine, with PID `pid`, traced and stopped."""
    try:
        r = spawn.stub(pid)
    except SysError as e:
        if e.errno == errno.EEXIST:
            raise RestoreError(f"PID {pid} is taken ({describe(pid)}); the image needs that exact PID") from None
        raise
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
        if not waitstatus.stopped(status):
            raise RestoreError(f"restored thread {tid} died during restore (status {status:#x})")
        if waitstatus.stop_event(status) == ptrace.PTRACE_EVENT_STOP:
            return
        ptrace.cont(tid, 0)    # any signal-stop before ours: drop it, wait for the interrupt


def kill(pid: int, timeout: float = 10.0) -> None:
    """SIGKILL a stub (or an init) and its children, and reap every thread of theirs that
    is ours: a killed leader can be reaped only once its other threads are, and those we
    trace wait for our __WALL wait.  A stub's child not reaped by us is its parent's or
    the init's to reap.  Bounded: what is left after `timeout` is logged, not waited for."""
    pids, tasks = [pid] + proc.all_children(pid), {pid}
    for p in pids:
        try:
            tasks.update(proc.tids(p))
            os.kill(p, signal.SIGKILL)
        except (SysError, ProcessLookupError):
            pass                        # gone already
    if left := ptrace.reap(tasks, timeout):
        log.warning("threads %s of process %d not reaped %.0f s after SIGKILL; "
                    "its PID stays taken until they are", sorted(left), pid, timeout)


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
            args = spawn.clone_args(exit_signal=signal.SIGCHLD, set_tid=s + 256, set_tid_size=1)
            r.write(s, args)
            try:
                new = r.syscall("clone3", s, len(args))
            except SysError as e:
                if e.errno == errno.EEXIST:
                    raise RestoreError(f"PID {child_vpid} is taken ({describe(child_vpid)}); "
                                       "the image needs that exact PID") from None
                if e.errno == errno.EAGAIN:
                    raise RestoreError(f"process {child_vpid}: cannot create it: {e}; {spawn.NO_ROOM}") from None
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
    rfd, wfd = os.pipe()
    ready_r, ready_w = os.pipe()
    try:
        r = spawn.namespace_init(rfd, wfd, root_vpid, ready_w)
    except BaseException:
        os.close(wfd)
        os.close(ready_r)
        raise
    finally:
        os.close(rfd)
        os.close(ready_w)
    ready = Fd(ready_r)
    try:
        # its /proc first: traced before, the init would mount it only once the tree runs
        answer = os.read(ready.fileno(), 1)
        if answer != b"\0":
            err = answer[0] if answer else 0
            raise RestoreError("cannot mount /proc for the new PID namespace: " + (
                f"{errno.errorcode.get(err, err)} ({os.strerror(err)}); a /proc with parts hidden by "
                "mounts over them (as in some containers) cannot be mounted again without root"
                if err else "its init died"))
        ptrace.seize(r, TRACE_OPTIONS)
        ptrace.interrupt(r)
        wait_event_stop(r)
    except BaseException:
        os.close(wfd)
        ready.close()
        kill(r)
        raise
    stub = Stub(r, 1)
    stub.release_fd = Fd(wfd)
    stub.ready_fd = ready
    return stub


def init_go(init: "Stub", lifeline: bool) -> None:
    """Let create_init's init start reaping; `lifeline`: it dies with us until init_release.
    Returns once the init no longer dies with our thread (PR_SET_PDEATHSIG): a CLI that
    exits right after a restore (-d) killed the namespace it had just restored if it
    exited before the init had read the word."""
    os.write(init.release_fd.fileno(), b"g" if lifeline else b"r")
    if not lifeline:
        init.release_fd.close()
    with init.ready_fd:
        os.read(init.ready_fd.fileno(), 1)      # b"" if the init is gone: nothing to wait for


def init_release(init: "Stub") -> None:
    """Cut the lifeline: the namespace outlives the engine from now on."""
    if not init.release_fd.closed:
        try:
            os.write(init.release_fd.fileno(), b"r")
        except BrokenPipeError:
            pass                    # the init is gone already (its root exited): nothing to release
        init.release_fd.close()


def spawn_init(argv: list[str], env: dict[str, str], fds: dict[int, int]) -> tuple[int, int]:
    """Start `argv` as PID 2 of a new PID + mount namespace, under an init like create_init's.

    How a kernel is launched so that a later restore can recreate its PIDs anywhere
    (restore puts it back under create_init's init, with the same PIDs).  The init
    mounts a fresh /proc, dies with the calling thread (PR_SET_PDEATHSIG), reaps, and
    exits with PID 2's status.  PID 2 starts a session of its own, gets ``fds``
    (``{target: source}``, e.g. 0/1/2 on a pty slave) and nothing else, default
    SIGPIPE/SIGXFSZ (Python ignores them) and an empty mask, then execs.  Only raw
    syscalls run in the children (sys/spawn.py).  Returns (init pid, PID 2's pid as
    we see it).  Raises SysError if the namespace or the exec fails.
    """
    import shutil
    path = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=env.get("PATH"))
    if not path:
        raise SysError(errno.ENOENT, f"execve({argv[0]!r})", None, "not found in PATH")
    errr, errw = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            r = spawn.exec_init(path, argv, env, fds, errw)
        finally:
            os.close(errw)
        data = os.read(errr, 8)                   # EOF once PID 2 has exec'd (its copy is O_CLOEXEC)
    finally:
        os.close(errr)
    if data:
        os.waitpid(r, 0)
        what, code = struct.unpack("ii", data)
        raise SysError(code, ("execve", "setup", "mount /proc")[what] + f"({path!r})", None,
                       "starting the program in its new PID namespace failed")
    for _ in range(2000):
        if kids := proc.children(r):
            return r, kids[0]
        time.sleep(0.001)
    raise SysError(errno.ESRCH, "spawn_init", r, "the program exited at once")


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


# by default ignored or stopping: raised in a stub, they would not end it
_NOT_FATAL = {signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH,
              signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}


def ends_a_process(status: int) -> bool:
    """Is `status` (a zombie's, from an image) one make_zombie can reproduce: an exit, or a
    death by a signal whose default action kills?"""
    sig = waitstatus.term_signal(status)
    return 0 <= status <= 0xFFFF and not waitstatus.stopped(status) and sig not in _NOT_FATAL \
        and sig <= signal.SIGRTMAX and (not sig or status >> 8 == 0)


def make_zombie(stub: Stub, parent: Stub, status: int, comm: str) -> None:
    """End `stub` with the dumped wait status, leaving it unreaped for `parent`."""
    sig = waitstatus.term_signal(status)
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
            r.saved_regs.rdi = waitstatus.exit_status(status)
            r.saved_regs.rip = stub.syscall_addr
    # Let it run: straight into exit_group, or into the pending fatal signal.
    ptrace.cont(stub.pid, 0)
    while True:
        _, st = ptrace.wait(stub.pid)
        if not waitstatus.stopped(st):
            break                                          # dead: the parent now sees a zombie
        ptrace.cont(stub.pid, waitstatus.stop_signal(st) if waitstatus.stop_event(st) == 0 else 0)
    # Its death queued a SIGCHLD in the parent that the dumped parent never had.
    with parent.remote() as r:
        parent.ensure_scratch(r)
        r.write(parent.scratch, struct.pack("<Q", 1 << (signal.SIGCHLD - 1)) + bytes(16))
        r.syscall("rt_sigtimedwait", parent.scratch, 0, parent.scratch + 8, 8, check=False)
