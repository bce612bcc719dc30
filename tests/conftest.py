"""Shared pytest machinery: the ZDTM-style targets in tests/targets and a ``Target`` helper.

A target sets up some state, prints ``READY``, waits for SIGUSR1, verifies its state and
prints ``PASS`` (exit 0) or ``FAIL: why`` (exit 1).  Targets run with stdin on /dev/null,
stdout+stderr on a regular log file opened O_APPEND, in a new session with no tty, and
inherit no other fds -- so the engine sees only fd kinds it supports.

Typical engine test::

    t = launch("counter")                  # started, READY seen
    t.checkpoint(images)                   # engine.dump(); the original is killed and reaped
    t.restore(images)                      # engine.restore(); same pid, now our child
    t.expect_pass()                        # SIGUSR1, then PASS and exit status 0
"""
from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Images are sealed with the user's key (engine/images/key.py): the suite uses a key of its
# own, so the real one is never created nor read; every process it starts inherits it.
if "NBCHECKPOINT_KEY_FILE" not in os.environ:
    _KEY_DIR = tempfile.mkdtemp(prefix="nbck-test-key-")
    os.environ["NBCHECKPOINT_KEY_FILE"] = os.path.join(_KEY_DIR, "image.key")
    atexit.register(shutil.rmtree, _KEY_DIR, True)

TESTS_DIR = Path(__file__).resolve().parent
TARGETS_DIR = TESTS_DIR / "targets"
BIN_DIR = TARGETS_DIR / "bin"
CFLAGS = ["-O1", "-g", "-pthread"]

C_TARGETS = sorted(p.stem for p in TARGETS_DIR.glob("*.c"))
PY_TARGETS = sorted(p.stem for p in TARGETS_DIR.glob("*.py"))
ALL_TARGETS = C_TARGETS + PY_TARGETS
# targets an ordinary user cannot dump, by design: tcp.c fills a TCP window, and unsent bytes
# can be read only with TCP_REPAIR (files/inet_plain.py refuses them by name: test_inet_sockets);
# inotify.c's watches name inodes, whose paths only open_by_handle_at finds, with
# CAP_DAC_READ_SEARCH (files/anon.py refuses them by name: test_anon_files)
ROOT_ONLY_TARGETS = {"tcp", "inotify"}


def target_params(names) -> list:
    """`names` for pytest.mark.parametrize, marked root_only where the target needs root."""
    return [pytest.param(n, marks=pytest.mark.root_only) if n in ROOT_ONLY_TARGETS else n for n in names]


# targets that take a scratch directory as argv[1]
NEEDS_DIR = {"deleted_file", "mappings", "pipes", "inotify", "unix_sockets", "scm_rights", "locks", "leave_running"}

READY_TIMEOUT = 20.0
RESULT_TIMEOUT = 60.0
EXIT_TIMEOUT = 10.0


# ----------------------------------------------------------------------------- building

def build_c(src: Path, out_name: str) -> Path:
    """Compile one C program into tests/targets/bin/OUT_NAME; fail loudly on any error."""
    BIN_DIR.mkdir(exist_ok=True)
    out = BIN_DIR / out_name
    deps = [src, TARGETS_DIR / "zdtm.h", Path(__file__)]
    if out.exists() and out.stat().st_mtime >= max(d.stat().st_mtime for d in deps if d.exists()):
        return out     # up to date: rebuilding would change a file that a live image maps
    tmp = BIN_DIR / f".{out_name}.{os.getpid()}.tmp"
    cmd = ["gcc", *CFLAGS, "-Wall", "-o", str(tmp), str(src)]
    r = subprocess.run(cmd, cwd=src.parent, capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        pytest.fail(f"compiling {src.name} failed:\n$ {' '.join(cmd)}\n{r.stderr}", pytrace=False)
    os.replace(tmp, out)   # atomic: parallel sessions never see half a binary
    return out


def compile_targets() -> None:
    """Compile every tests/targets/*.c into tests/targets/bin."""
    for name in C_TARGETS:
        build_c(TARGETS_DIR / f"{name}.c", name)


@pytest.fixture(scope="session")
def target_bins() -> Path:
    compile_targets()
    return BIN_DIR


# ----------------------------------------------------------------------------- processes

def _proc_state(pid: int) -> str | None:
    """State letter from /proc/PID/stat, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(")") + 2]


def wait_pid_free(pid: int, timeout: float = 15.0) -> None:
    """Wait until nothing (not even a zombie) holds pid: restore needs it free."""
    deadline = time.monotonic() + timeout
    while _proc_state(pid) is not None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"pid {pid} still taken (state {_proc_state(pid)})\n"
                               f"{thread_report(pid)}")
        time.sleep(0.01)


_WALL = 0x40000000   # __WALL: also wait for (traced) non-leader threads


def thread_report(pid: int) -> str:
    """One line per thread of pid: tid, state, tracer -- for diagnosing stuck processes."""
    lines = []
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return f"(pid {pid}: no /proc entry)"
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                st = dict(line.split(":", 1) for line in f if ":" in line)
            lines.append(f"  tid {tid}: {st.get('State', '?').strip()}, "
                         f"tracer {st.get('TracerPid', '?').strip()}")
        except OSError:
            lines.append(f"  tid {tid}: gone")
    return "\n".join(lines)


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def nspids(pid: int) -> list[int]:
    """pid in each PID namespace it is in, ours first (/proc/PID/status NSpid)."""
    return [int(x) for x in _status(pid)["NSpid"].split()]


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the comm: state, ppid, pgrp, session, ... ([] if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return []
    return data[data.rindex(")") + 2:].split()


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def kill_sessions(sids) -> None:
    """SIGKILL every process of the sessions SIDS: a target's children outlive it, re-parented
    to init, in its session (targets start one; a restored tree keeps it). A session id is
    not reused while any process is in that session."""
    for pid in _pids():
        f = _stat_fields(pid)
        if f and int(f[3]) in sids and f[0] not in "ZX":
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):    # gone, or another user's (pid reused)
                pass


# the pids_seen of every Target made: each started a session of its own (start_new_session)
_TARGET_PIDS: list[set] = []


def started_processes(roots) -> dict[int, str]:
    """Live processes started by this run's tests: in the session of a Target (its children
    too, re-parented or not), or whose binary, cwd or command line is under one of ROOTS (the
    session's temp dir); never another run's (other sessions, other temp dirs): {pid: command}."""
    sids = set().union(*_TARGET_PIDS)
    marks = [str(r) for r in roots]
    mine = {os.getpid(), os.getppid()}
    out = {}
    for pid in _pids():
        f = _stat_fields(pid)
        if not f or f[0] in "ZX" or pid in mine:
            continue
        in_target_session = int(f[3]) in sids
        if not in_target_session and not marks:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
            where = [os.readlink(f"/proc/{pid}/exe"), os.readlink(f"/proc/{pid}/cwd"), cmd]
        except OSError:
            continue                                    # gone, or a kernel thread
        if in_target_session or any(m in w for m in marks for w in where):
            out[pid] = cmd
    return out


def strays(roots, before: dict | None = None, grace: float = 5.0) -> dict[int, str]:
    """started_processes(ROOTS) not in BEFORE still alive after GRACE seconds; killed, and returned."""
    deadline = time.monotonic() + grace
    while True:
        left = {p: c for p, c in started_processes(roots).items() if before is None or p not in before}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):       # gone, or another user's (pid reused)
            pass
    return left


def force_reap(pid: int, timeout: float = EXIT_TIMEOUT) -> bool:
    """SIGKILL pid (which must be our child) and reap it without ever blocking: also reaps
    zombie threads still ptrace-attached to us, which would otherwise keep the leader
    unreapable forever.  Returns False if it could not be reaped in time."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while True:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
        except OSError:
            tids = []
        for tid in tids:
            try:
                os.waitpid(tid, os.WNOHANG | _WALL)
            except ChildProcessError:
                pass
        try:
            r, _ = os.waitpid(pid, os.WNOHANG | _WALL)
        except ChildProcessError:
            return True
        if r:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


class Result:
    def __init__(self, verdict: str | None, status: int | None, log: str):
        self.verdict = verdict    # "PASS", "FAIL: ...", or None (died or hung without one)
        self.status = status      # exit code, -signal, or None when not our child
        self.log = log            # the log text written since SIGUSR1

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS" and self.status in (0, None)

    def __repr__(self) -> str:
        return f"Result(verdict={self.verdict!r}, status={self.status!r})"


class Target:
    """One target process across its lives: the original (a Popen child of ours), then
    each restored incarnation (same pid; our child when restored through the Python API,
    someone else's -- polled through /proc -- when restored by a detached CLI)."""

    def __init__(self, name: str, workdir: Path, env: dict | None = None,
                 extra_args: tuple = ()):
        if name not in ALL_TARGETS:
            raise ValueError(f"unknown target {name!r}; have {ALL_TARGETS}")
        self.name = name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{name}.log"
        self.env = env or {}
        self.argv = self._argv(extra_args)
        self.popen: subprocess.Popen | None = None
        self.pid: int | None = None
        self.vpid: int | None = None    # the pid it sees itself as (kept by every restore)
        self.init_pid: int | None = None    # a restored incarnation's namespace init, if any
        self.lazy_thread = None
        self.restored = False     # current incarnation came from restore()
        self.is_child = True      # current incarnation is our child
        self.status: int | None = None    # exit status of the current incarnation, once reaped
        self._mark = 0            # log offset where the current run's output starts
        self.pids_seen: set[int] = set()
        _TARGET_PIDS.append(self.pids_seen)

    def _argv(self, extra_args) -> list[str]:
        if self.name in PY_TARGETS:
            argv = [sys.executable, str(TARGETS_DIR / f"{self.name}.py")]
        else:
            argv = [str(BIN_DIR / self.name)]
        if self.name in NEEDS_DIR:
            data = self.workdir / "data"
            data.mkdir(exist_ok=True)
            argv.append(str(data))
        return argv + [str(a) for a in extra_args]

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> "Target":
        env = {k: v for k, v in os.environ.items() if k != "ZDTM_CORRUPT"}
        env.update(self.env)
        with open(self.log_path, "ab") as log:     # O_APPEND, shared by stdout and stderr
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                cwd=self.workdir, env=env, close_fds=True, start_new_session=True)
        self.pid = self.vpid = self.popen.pid
        self.pids_seen.add(self.pid)
        return self

    def alive(self) -> bool:
        """Is the current incarnation still running?  Reaps it if it is our child."""
        if self.status is not None:
            return False
        if not self.restored:
            rc = self.popen.poll()
            if rc is None:
                return not self._stuck_zombie()
            self.status = rc
            return False
        if self.init_pid and self.is_child is False and self._reap_init():
            return False
        if self.is_child:
            try:
                pid, st = os.waitpid(self.pid, os.WNOHANG | _WALL)
            except ChildProcessError:
                self.is_child = False      # someone else reaped it (or it is not ours)
            else:
                if pid == 0:
                    return not self._stuck_zombie()
                self.status = os.waitstatus_to_exitcode(st)
                return False
        state = _proc_state(self.pid)
        return state is not None and state not in "ZX"

    def _reap_init(self) -> bool:
        """The incarnation's namespace init, if it is our child (an in-process restore), exits
        with the root's status once the root is gone: reap it (True), else it stays a zombie."""
        try:
            pid, st = os.waitpid(self.init_pid, os.WNOHANG)
        except ChildProcessError:
            return False                    # not ours (a CLI restored it)
        if pid == 0:
            return False
        code = os.waitstatus_to_exitcode(st)
        # the init exits with the root's status, a death by signal N as 128 + N (spawn.py)
        self.status = -(code - 128) if code > 128 else code
        self.init_pid = None
        return True

    def _stuck_zombie(self) -> bool:
        """A zombie leader that waitpid cannot reap for over a second (its other threads
        are zombies still ptrace-attached, e.g. after an engine failure) counts as dead,
        with an unknown status."""
        if _proc_state(self.pid) != "Z":
            self._zombie_since = None
            return False
        if getattr(self, "_zombie_since", None) is None:
            self._zombie_since = time.monotonic()
        return time.monotonic() - self._zombie_since > 1.0

    def reap(self, timeout: float = EXIT_TIMEOUT) -> int | None:
        """Wait for the current incarnation to exit (e.g. killed by dump); returns its
        status (None if it was not our child), and waits until its pid is free."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} (pid {self.pid}) did not exit\n"
                                   f"{thread_report(self.pid)}\n--- log ---\n{self.log()}")
            time.sleep(0.01)
        if self.status is None and self.is_child and _proc_state(self.pid) == "Z":
            raise TimeoutError(f"{self.name} (pid {self.pid}) is a zombie that cannot be "
                               f"reaped (threads still ptrace-attached?)\n"
                               f"{thread_report(self.pid)}")
        wait_pid_free(self.pid)
        return self.status

    def adopt_restored(self, res, is_child: bool = True) -> None:
        """The image was restored (`res`: a RestoreResult, or the pid a CLI wrote): track that
        incarnation from now on.  In a PID namespace of its own (always without root) it has
        its old pid inside, another one as we see it, and the namespace's init as parent."""
        pid = getattr(res, "pid", res)
        inner = nspids(pid)[-1]
        assert inner == self.vpid, f"restored as pid {inner} (ours: {pid}), expected the original {self.vpid}"
        if len(nspids(pid)) > len(nspids(os.getpid())):
            self.init_pid = getattr(res, "init_pid", None) or int(_status(pid)["PPid"])
            is_child = False
        else:
            self.init_pid = None
        self.pid = pid
        self.restored = True
        self.is_child = is_child
        self.status = None
        self.pids_seen.add(pid)

    def kill(self) -> None:
        """Teardown: SIGKILL and reap whatever incarnation is still ours and alive, then every
        process left in its session (children it did not kill before it exited)."""
        if self.pid is None:
            return
        try:
            self._kill()
        finally:
            kill_sessions(self.pids_seen)

    def _kill(self) -> None:
        if self.init_pid:                 # in a PID namespace of its own: it goes with its init
            force_reap(self.init_pid)
            if self.lazy_thread is not None:
                self.lazy_thread.join(10)
            return
        if not self.restored:
            if self.popen.poll() is None:
                if not force_reap(self.pid):
                    print(f"teardown: could not reap {self.name} pid {self.pid}\n"
                          f"{thread_report(self.pid)}", file=sys.stderr)
                self.popen.poll()
            return
        if self.is_child:
            if self.alive() and not force_reap(self.pid):
                print(f"teardown: could not reap restored {self.name} pid {self.pid}\n"
                      f"{thread_report(self.pid)}", file=sys.stderr)
            return
        # not our child: only kill it if that pid still runs our target
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            return
        if self.argv[-1].encode() in cmd or self.name.encode() in cmd:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # -- protocol ----------------------------------------------------------------------

    def log(self, since_mark: bool = False) -> str:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        return data[self._mark if since_mark else 0:].decode(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> "Target":
        deadline = time.monotonic() + timeout
        while "READY\n" not in self.log():
            if not self.alive():
                raise AssertionError(f"{self.name} died before READY (status {self.status})"
                                     f"\n--- log ---\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no READY within {timeout}s"
                                     f"\n--- log ---\n{self.log()}")
            time.sleep(0.02)
        return self

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def go(self) -> None:
        """Send SIGUSR1; output from here on is this run's verdict."""
        self._mark = self.log_path.stat().st_size
        self.signal(signal.SIGUSR1)

    @staticmethod
    def _verdict(text: str) -> str | None:
        for line in text.splitlines():
            if line == "PASS" or line.startswith("FAIL"):
                return line
        return None

    def wait_result(self, timeout: float = RESULT_TIMEOUT) -> Result:
        """Wait for PASS/FAIL after go(), then for the exit; or for death without one."""
        deadline = time.monotonic() + timeout
        verdict = None
        while time.monotonic() < deadline:
            verdict = self._verdict(self.log(since_mark=True))
            if verdict is not None or not self.alive():
                break
            time.sleep(0.02)
        exit_deadline = time.monotonic() + EXIT_TIMEOUT
        while self.alive() and time.monotonic() < exit_deadline:
            time.sleep(0.01)
        if verdict is None:                 # it may have written it just before exiting
            verdict = self._verdict(self.log(since_mark=True))
        return Result(verdict, self.status, self.log(since_mark=True))

    def run_to_result(self, delay: float = 0.0) -> Result:
        if delay:
            time.sleep(delay)
        self.go()
        return self.wait_result()

    def describe(self, res: Result) -> str:
        return (f"{self.name} (pid {self.pid}, restored={self.restored}): {res!r}"
                f"\n--- full log ---\n{self.log()}")

    def expect_pass(self, delay: float = 0.0) -> Result:
        res = self.run_to_result(delay)
        assert res.verdict == "PASS", self.describe(res)
        if self.is_child:
            assert res.status == 0, self.describe(res)
        return res

    # -- engine ------------------------------------------------------------------------

    def checkpoint(self, images: Path, leave_running: bool = False):
        """engine.dump() the current incarnation; unless leave_running, reap it (the
        engine killed it) so that its pid is free for restore."""
        from nbcheckpoint.engine import dump
        stats = dump(self.pid, str(images), leave_running=leave_running)
        if not leave_running:
            status = self.reap()
            assert status in (-signal.SIGKILL, 0, None), \
                f"dumped {self.name} exited with {status}\n{self.log()}"
        return stats

    def restore_lazy(self, images: Path, stream_after: float = 0.0):
        """engine.restore() with --pidns --lazy-pages; the page server runs in a thread of
        ours (self.lazy_error: what it raised).  The process lives in a new PID namespace:
        self.pid becomes its pid as we see it; its init (self.init_pid) is our child."""
        import threading
        from nbcheckpoint.engine import Options, restore
        res = restore(str(images), options=Options(pidns=True, lazy_pages=True))
        self.pid, self.init_pid = res.pid, res.init_pid
        self.restored, self.is_child, self.status = True, False, None
        self.pids_seen.add(res.pid)
        self.lazy, self.lazy_error, self.lazy_thread = res.lazy, None, None
        if res.lazy is not None:
            def serve():
                try:
                    res.lazy.serve(stream_after=stream_after)
                except BaseException as e:     # noqa: BLE001 - handed to the test
                    self.lazy_error = e
            self.lazy_thread = threading.Thread(target=serve, name="page-server", daemon=True)
            self.lazy_thread.start()
        return res

    def restore(self, images: Path):
        """engine.restore() (pid must be free): the restored process is our child -- or, without
        root, our grandchild in a new PID namespace (adopt_restored)."""
        from nbcheckpoint.engine import restore
        from nbcheckpoint.engine.sys import userns
        if userns.privileged():
            wait_pid_free(self.pid)
        res = restore(str(images))
        self.adopt_restored(res, is_child=True)
        return res


# ----------------------------------------------------------------------------- fixtures

@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Without root, the engine's in-process restores (Target.restore, engine.restore in tests)
    # enter a user namespace of their own, for good, the first time -- which only a
    # single-threaded process can do.  Enter it now, before any test starts a thread, so that
    # every test runs alike; what the suite launches still runs as the user without
    # capabilities (exec drops them), as after `nbcheckpoint restore`.
    # A mount namespace of the suite's own, there, lets tests mount small filesystems (mount()).
    if os.getuid() != 0:
        from nbcheckpoint.engine.sys import userns
        userns.ensure()
        if _libc.unshare(0x00020000) != 0 or _libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None) != 0:
            raise OSError(ctypes.get_errno(), "a mount namespace for the suite")   # CLONE_NEWNS; MS_REC|MS_PRIVATE


_libc = ctypes.CDLL(None, use_errno=True)


def mount(fstype: str, target, options: str = "") -> None:
    """mount -t FSTYPE -o OPTIONS FSTYPE TARGET, for a test's own small filesystem: as root on
    the host, as an ordinary user in the suite's own user + mount namespace (pytest_configure)."""
    if _libc.mount(fstype.encode(), os.fsencode(target), fstype.encode(), 0, options.encode() or None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t {fstype} -o {options} {target}: {os.strerror(err)}")


def bind(source, target) -> None:
    """mount --bind SOURCE TARGET (as mount())."""
    if _libc.mount(os.fsencode(source), os.fsencode(target), None, 0x1000, None) != 0:     # MS_BIND
        err = ctypes.get_errno()
        raise OSError(err, f"mount --bind {source} {target}: {os.strerror(err)}")


def umount(target) -> None:
    """umount -l TARGET (MNT_DETACH)."""
    if _libc.umount2(os.fsencode(target), 2) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture(autouse=True)
def no_stray_targets(request):
    """Fails a test that leaves a target process running (after its fixtures' teardown): the
    strays are named and killed. The session's end checks the temp dirs too (below)."""
    before = started_processes(())
    yield
    left = strays((), before)               # the targets' sessions only: module fixtures live on
    if left:
        pytest.fail(f"{request.node.nodeid} left target processes running (killed now): {left}", pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    """No process started by the tests may outlive the run: a target, or anything running
    from the session's temp dir."""
    left = strays([session.config._tmp_path_factory.getbasetemp()])
    if left:
        print(f"\nthe tests left processes running (killed now): {left}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def launch(target_bins, tmp_path):
    """launch(name, env=None, args=(), ready=True, tag=None) -> Target, started (and READY
    unless ready=False).  Everything launched is killed and reaped at teardown."""
    started: list[Target] = []

    def _launch(name: str, env: dict | None = None, args: tuple = (), ready: bool = True,
                tag: str | None = None) -> Target:
        t = Target(name, tmp_path / (tag or name), env=env, extra_args=args)
        started.append(t)
        t.start()
        if ready:
            t.wait_ready()
        return t

    yield _launch
    for t in started:
        t.kill()


@pytest.fixture
def images(tmp_path, request):
    """images(tag="img") -> a fresh, not yet existing image directory path.  Removed at
    teardown when the test passed (images can be hundreds of MB); kept when it failed."""
    made: list[Path] = []

    def _images(tag: str = "img") -> Path:
        p = tmp_path / f"{tag}-{len(made)}"
        made.append(p)
        return p

    yield _images
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.passed:
        for p in made:
            shutil.rmtree(p, ignore_errors=True)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty checkpoint store, also the default one ($NBCHECKPOINT_DIR) of what the test starts."""
    from nbcheckpoint.store import Store
    root = tmp_path / "store"
    monkeypatch.setenv("NBCHECKPOINT_DIR", str(root))
    return Store(root)


def output_hook(out: list, results: bool = True):
    """An execute_interactive output_hook: appends to OUT what the cell prints, its tracebacks
    and, with RESULTS, its execute_result's text."""
    def hook(msg):
        t, content = msg["msg_type"], msg["content"]
        if t == "stream":
            out.append(content["text"])
        elif t == "error":
            out.append("\n".join(content["traceback"]))
        elif t == "execute_result" and results:
            out.append(content["data"].get("text/plain", ""))
    return hook


# ----------------------------------------------------------------------------- who runs the suite

# CI runs the suite twice, as root and as an ordinary user (.ci/run): a test of a feature only
# root has, or of what only an ordinary user sees, is deselected in the other pass -- never skipped
# (the markers root_only / ordinary_user_only are described in pyproject.toml).
_DESELECTED = pytest.StashKey[str]()       # the summary line of pytest_collection_modifyitems


def _privileged() -> bool:
    from nbcheckpoint.engine.sys.userns import privileged   # what the engine itself decides by
    return privileged()


def pytest_collection_modifyitems(config, items):
    privileged = _privileged()
    other = "ordinary_user_only" if privileged else "root_only"
    both = [i.nodeid for i in items if i.get_closest_marker("root_only") and i.get_closest_marker("ordinary_user_only")]
    if both:
        raise pytest.UsageError(f"marked both root_only and ordinary_user_only: {both}")
    dropped = [i for i in items if i.get_closest_marker(other)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if not i.get_closest_marker(other)]
    who = ("as root (privileged in the initial user namespace)" if privileged
           else f"as uid {os.geteuid()} (an ordinary user, unprivileged)")
    config.stash[_DESELECTED] = f"suite run {who}: {len(dropped)} test(s) marked {other} deselected"


def pytest_terminal_summary(terminalreporter, config):
    line = config.stash.get(_DESELECTED, None)
    if line:
        terminalreporter.write_line(line)
