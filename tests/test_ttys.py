"""Pseudo-terminals through the engine (files/tty.py).

* pty pairs inside the tree (tests/targets/pty.c): index, termios (raw, odd speed), window
  size, lock, packet mode, queued data both ways, a dead peer, a session leader's controlling
  terminal and the foreground group of a grandchild, /dev/tty, a devpts mounted elsewhere;
  an index taken at restore; a slave held outside the tree is refused.
* shell jobs (tests/targets/external/ttyjob.c run by a tiny shell: the session leader and
  the pty master are outside): refused without --shell-job, naming it; with it, restored
  into a new session on a terminal the test provides (--inherit-fd fd[N]:tty[RDEV:DEV]),
  or, through the CLI, on the restoring process's own terminal (taken over from it).
"""
import logging
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import build_c, mount, nspids, TARGETS_DIR, umount, wait_pid_free
from nbcheckpoint.engine.sys import userns

RUN_BEFORE_DUMP = 0.3
JOB_SRC = TARGETS_DIR / "external" / "ttyjob.c"


@pytest.fixture(scope="module")
def engine():
    import nbcheckpoint.engine as engine
    return engine


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return ["", "", ""] + data[data.rindex(")") + 2:].split()     # 1-based like proc(5)


def _restored_job(cli: int, vpid: int) -> int | None:
    """The process restored by the CLI `cli` as `vpid`: its child, or its namespace init's."""
    kids = _children(cli)
    for k in kids + [g for k in kids for g in _children(k)]:
        try:
            if nspids(k)[-1] == vpid:
                return k
        except OSError:
            pass
    return None


def _image_ttys(img):
    from nbcheckpoint.engine.images import files_pb2, imagedir
    rd = imagedir.ImageReader(str(img))
    return [f for f in rd.messages("files.img", files_pb2.FileEntry) if f.kind == files_pb2.TTY]


# ----------------------------------------------------------------------------- pairs in the tree

def test_image_contents(engine, launch, images):
    from nbcheckpoint.engine.images import tty_pb2
    t = launch("pty")
    img = images()
    t.checkpoint(img, leave_running=True)
    ttys = _image_ttys(img)
    masters = {f.tty.index: f for f in ttys if f.tty.type == tty_pb2.PTY_MASTER}
    assert len(masters) == 4, ttys                     # A, B (dead), L (locked), P (packet)
    a = next(f for f in masters.values() if f.tty.state.session)
    s = a.tty.state
    child = _children(t.pid)[0]
    grandchild = _children(child)[0]
    assert s.session == child and s.fg_pgrp == grandchild
    assert s.in_data == b"queued-in" and s.out_data == b"queued-out"
    assert (s.rows, s.cols, s.xpixel, s.ypixel) == (37, 123, 777, 555)
    assert a.tty.ptmx_path == "/dev/ptmx" and a.tty.pts_dir == "/dev/pts"
    a_entries = [f for f in ttys if f.tty.index == a.tty.index]
    # master, the parent's slave, the child's slave (shared with the grandchild), /dev/tty
    assert sorted(f.tty.type for f in a_entries) == [tty_pb2.PTY_MASTER, tty_pb2.PTY_SLAVE,
                                                     tty_pb2.PTY_SLAVE, tty_pb2.CTTY]
    assert all(f.tty.path == f"/dev/pts/{a.tty.index}" for f in a_entries if f.tty.type == tty_pb2.PTY_SLAVE)
    others = sorted(masters.values(), key=lambda f: f.tty.index)
    others.remove(a)
    dead, locked, packet = others
    assert dead.tty.state.slave_closed and dead.flags & os.O_NONBLOCK and dead.tty.state.out_data == b"dead-data"
    assert locked.tty.state.locked and not locked.tty.state.slave_closed
    assert packet.tty.state.packet and packet.tty.state.out_data == b"pkt-data"
    assert not any(f.tty.external for f in ttys)
    t.expect_pass()


@pytest.mark.root_only
def test_index_taken(engine, launch, images, caplog):
    """The pair's index is held by someone else at restore: another one is used, and said.
    (Root only: an ordinary user's restore, always into a PID namespace, gets a devpts
    instance of its own, where the index is free: test_pidns.)"""
    t = launch("pty", env={"ZDTM_PTY_ANY_INDEX": "1"})
    img = images()
    t.checkpoint(img)
    a = next(f for f in _image_ttys(img) if f.tty.state.session and f.tty.master)
    held = []
    keep = None
    try:
        for _ in range(64):
            m = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY)
            idx = int(open(f"/proc/self/fdinfo/{m}").read().split("tty-index:")[1].split()[0])
            if idx == a.tty.index:
                keep = m
                break
            held.append(m)
        assert keep is not None, f"could not get pty {a.tty.index} to hold"
        for m in held:
            os.close(m)
        held = []
        with caplog.at_level(logging.WARNING, logger="nbcheckpoint.engine.files.tty"):
            t.restore(img)
        assert f"/dev/pts/{a.tty.index} is taken" in caplog.text
        t.expect_pass()
    finally:
        for m in held + ([keep] if keep is not None else []):
            os.close(m)


@pytest.fixture
def devpts(tmp_path):
    """A devpts instance of its own, mounted under tmp_path."""
    d = tmp_path / "pts"
    d.mkdir()
    mount("devpts", d, "newinstance,ptmxmode=0666,mode=620")
    yield d
    umount(d)


def test_devpts_elsewhere(engine, launch, images, devpts):
    """Master opened as DIR/ptmx of another devpts instance: paths are recorded and used."""
    t = launch("pty", env={"PTY_PTMX": str(devpts / "ptmx")})
    time.sleep(RUN_BEFORE_DUMP)
    img = images()
    t.checkpoint(img)
    ttys = _image_ttys(img)
    assert {f.tty.pts_dir for f in ttys} == {str(devpts)}
    assert {f.tty.ptmx_path for f in ttys} == {str(devpts / "ptmx")}
    assert {f.tty.devpts_dev for f in ttys} == {os.stat(devpts).st_dev}
    assert sorted({f.tty.index for f in ttys}) == [0, 1, 2, 3]
    t.restore(img)
    assert any(os.readlink(f"/proc/{t.pid}/fd/{fd}").startswith(str(devpts))
               for fd in os.listdir(f"/proc/{t.pid}/fd"))
    t.expect_pass()


def test_slave_held_outside(engine, launch, images):
    """A slave of the tree's pty open in a process outside the tree: refused, by name."""
    t = launch("pty")
    child = _children(t.pid)[0]
    fd = os.open(f"/proc/{child}/fd/100", os.O_RDWR | os.O_NOCTTY)
    outside = subprocess.Popen(["sleep", "60"], stdin=fd, stdout=subprocess.DEVNULL, start_new_session=True)
    os.close(fd)
    try:
        with pytest.raises(engine.UnsupportedError, match=rf"slave is open in process {outside.pid}.*outside"):
            engine.dump(t.pid, str(images()))
    finally:
        outside.kill()
        outside.wait()
    assert t.alive()
    t.expect_pass()


def test_ctty_outside_without_tty_fd(engine, images):
    """A session leader whose controlling terminal is outside the tree, and which holds no
    terminal fd: refused without --shell-job, naming it; dumped with it."""
    master, slave = os.openpty()
    path = os.ttyname(slave)
    os.close(slave)

    def acquire():                      # a session leader's first terminal becomes its own
        os.close(os.open(path, os.O_RDWR))
    p = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=acquire)
    try:
        assert int(_stat(p.pid)[7]) == os.stat(path).st_rdev
        deadline = time.monotonic() + 10
        while sorted(os.listdir(f"/proc/{p.pid}/fd")) != ["0", "1", "2"]:     # /dev/null, once started
            assert time.monotonic() < deadline, os.listdir(f"/proc/{p.pid}/fd")
            time.sleep(0.01)
        with pytest.raises(engine.UnsupportedError, match="controlling terminal.*outside.*--shell-job"):
            engine.dump(p.pid, str(images()))
        assert p.poll() is None and _stat(p.pid)[3] in "RS", "the process was not thawed"
        engine.dump(p.pid, str(images("shell-job")), options=engine.Options(shell_job=True))
        p.wait(timeout=10)                  # (the engine, its tracer, may have reaped it)
        assert not os.path.exists(f"/proc/{p.pid}")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)


def _pidns_cleanup(res):
    for p in (res.pid, res.init_pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.waitpid(res.init_pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _pidns_pass(t, res, before: int) -> None:
    os.kill(res.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while t.log().count("PASS") < before + 1 and "FAIL" not in t.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert t.log().count("PASS") == before + 1, t.log()
    _, status = os.waitpid(res.init_pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_pidns(engine, launch, images):
    """Restored into a new PID namespace while the original runs on (its pids and its ptys'
    numbers are taken on the host): sessions and groups are set with the namespace's numbers,
    and the ptys get their old numbers in a devpts instance of the namespace's own
    (sys/mountns.py; the target checks its pty's name)."""
    t = launch("pty")
    img = images()
    t.checkpoint(img, leave_running=True)
    t.expect_pass()                                      # the original, unharmed
    res = engine.restore(str(img), options=engine.Options(pidns=True))
    try:
        assert res.vpid == t.pid and res.pid != t.pid
        _pidns_pass(t, res, t.log().count("PASS"))
    finally:
        _pidns_cleanup(res)


def test_pidns_dump_in_namespace(engine, launch, images):
    """A tree living in a PID namespace is dumped with its own view of sessions and groups."""
    t = launch("pty", env={"ZDTM_PTY_ANY_INDEX": "1"})
    img = images()
    t.checkpoint(img)
    session = next(f for f in _image_ttys(img) if f.tty.state.session).tty.state.session
    res = engine.restore(str(img), options=engine.Options(pidns=True))
    try:
        img2 = images("in-ns")
        engine.dump(res.pid, str(img2))
        os.waitpid(res.init_pid, 0)
        assert next(f for f in _image_ttys(img2) if f.tty.state.session).tty.state.session == session
        res = engine.restore(str(img2))
        assert res.vpid == t.pid
        _pidns_pass(t, res, t.log().count("PASS"))
    finally:
        _pidns_cleanup(res)

# ----------------------------------------------------------------------------- shell jobs

def _build_job() -> Path:
    return build_c(JOB_SRC, "external-ttyjob")


# A shell, as far as a job can tell: session leader with the terminal as its controlling
# tty, runs the job in a process group of its own and makes it the foreground one.
SHELL = r"""
import os, signal, sys
os.setsid()
fd = os.open(sys.argv[1], os.O_RDWR)
for i in range(3):
    os.dup2(fd, i)
os.close(fd)
signal.signal(signal.SIGTTOU, signal.SIG_IGN)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(w)
    os.setpgid(0, 0)
    os.read(r, 1)
    signal.signal(signal.SIGTTOU, signal.SIG_DFL)
    os.execv(sys.argv[2], sys.argv[2:])
os.close(r)
try:
    os.setpgid(pid, pid)
except OSError:
    pass
os.tcsetpgrp(0, pid)
os.write(w, b"x")
os.waitpid(pid, 0)
signal.pause()
"""


def _read_until(fd: int, pattern: bytes, timeout: float = 20.0) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while pattern not in buf:
        left = deadline - time.monotonic()
        r, _, _ = select.select([fd], [], [], max(left, 0))
        if not r:
            raise AssertionError(f"no {pattern!r} on the terminal within {timeout}s; got {buf!r}")
        try:
            data = os.read(fd, 4096)
        except OSError as e:
            raise AssertionError(f"terminal closed ({e}) before {pattern!r}; got {buf!r}") from None
        buf += data
        if b"FAIL" in buf and pattern != b"FAIL":
            time.sleep(0.1)
            buf += os.read(fd, 4096) if select.select([fd], [], [], 0)[0] else b""
            raise AssertionError(f"the job failed: {buf!r}")
    return buf


class ShellJob:
    """ttyjob on a pty whose master the test holds: run by SHELL (the session leader is
    outside too), or (leader=True) as a session leader itself, the terminal its own."""

    def __init__(self, binary: Path, leader: bool = False):
        import fcntl
        import termios
        self.master, slave = os.openpty()
        self.slave_path = os.ttyname(slave)
        self.slave_st = os.stat(self.slave_path)
        if leader:
            self.shell = subprocess.Popen([str(binary)], stdin=slave, stdout=slave, stderr=slave,
                                          start_new_session=True,
                                          preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        else:
            self.shell = subprocess.Popen([sys.executable, "-c", SHELL, self.slave_path, str(binary)],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, close_fds=True)
        try:
            _read_until(self.master, b"READY")
        finally:
            os.close(slave)      # (closed before the shell opens it, reads would say EIO)
        if leader:
            self.pid = self.vpid = self.shell.pid
        else:
            kids = _children(self.shell.pid)
            assert len(kids) == 1, kids
            self.pid = self.vpid = kids[0]

    def dumped(self):
        """The job was killed by the dump: its pid must be free for the restore."""
        if self.pid == self.shell.pid:
            self.shell.wait(timeout=10)
        wait_pid_free(self.pid)

    def key(self) -> str:
        return f"tty[{self.slave_st.st_rdev:x}:{self.slave_st.st_dev:x}]"

    def close(self):
        self.shell.kill()
        self.shell.wait()
        os.close(self.master)


@pytest.fixture
def shell_job(target_bins):
    binary = _build_job()
    made = []

    def _make(leader: bool = False):
        j = ShellJob(binary, leader)
        made.append(j)
        return j
    yield _make
    for j in made:
        for p in [j.pid]:
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if b"ttyjob" in f.read():
                        os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        j.close()


def _talk(master: int, pid: int) -> bytes:
    """SIGUSR1, answer the job's question, collect its verdict."""
    os.kill(pid, signal.SIGUSR1)
    out = _read_until(master, b"ASK")
    os.write(master, b"ping 42\n")
    out += _read_until(master, b"PASS")
    return out


def _wait_exit(res, timeout: float = 10.0) -> int:
    """The restored job's exit status: it is our child, or its namespace's init is (whose
    status is the job's)."""
    pid = res.init_pid or res.pid
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p, status = os.waitpid(pid, os.WNOHANG)
        if p:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    raise AssertionError(f"restored job {res.pid} did not exit")


def test_shell_job_refused_without_option(engine, shell_job, images):
    j = shell_job()
    with pytest.raises(engine.UnsupportedError) as e:
        engine.dump(j.pid, str(images()))
    msg = str(e.value)
    assert "--shell-job" in msg and "outside" in msg and f"session leader {j.shell.pid}" in msg, msg
    assert _stat(j.pid)[3] in "RS", "the job was not thawed"
    out = _talk(j.master, j.pid)                    # the original goes on, unharmed
    assert b"pong ping 42" in out


@pytest.mark.parametrize("leader", ["shell", "self"])
def test_shell_job_inherit_fd(engine, shell_job, images, leader):
    """--shell-job: restored into a new session on a new pty handed in by --inherit-fd.
    leader=self: the job is its own session leader, only the pty master is outside (a
    kernel whose terminal a manager holds)."""
    from nbcheckpoint.engine.files import tty
    j = shell_job(leader == "self")
    img = images()
    if leader == "self":
        with pytest.raises(engine.UnsupportedError, match="pty master is outside.*--shell-job"):
            engine.dump(j.pid, str(images()))
    engine.dump(j.pid, str(img), options=engine.Options(shell_job=True))
    j.dumped()
    ext = [f for f in _image_ttys(img) if f.tty.external]
    assert ext and {tty.external_key(f) for f in ext} == {j.key()}
    with pytest.raises(engine.RestoreError, match="--shell-job"):
        engine.restore(str(img))
    assert not os.path.exists(f"/proc/{j.pid}")
    master, slave = os.openpty()
    try:
        res = engine.restore(str(img), options=engine.Options(shell_job=True, inherit_fd={j.key(): slave}))
        os.close(slave)
        slave = None
        assert res.vpid == j.pid                   # (res.pid: as we see it; differs in a PID namespace)
        st = _stat(res.pid)
        new_rdev = os.stat(os.readlink(f"/proc/{res.pid}/fd/0")).st_rdev
        assert int(st[7]) == new_rdev, "the job's controlling tty is not the new terminal"
        assert int(st[6]) == res.pid and int(st[5]) == res.pid, "not a new session and group"
        assert int(st[8]) == res.pid, "not the foreground job"
        out = _talk(master, res.pid)
        assert b"pong ping 42" in out, out
        assert _wait_exit(res) == 0
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)


def test_shell_job_cli_own_terminal(engine, shell_job, images):
    """`nbcheckpoint restore --shell-job` run on a terminal (its controlling tty): the job is
    restored onto that terminal, takes it over, and the CLI waits for it."""
    import fcntl
    import termios
    j = shell_job()
    img = images()
    dump = subprocess.run([sys.executable, "-m", "nbcheckpoint", "dump", "-t", str(j.pid), "-D", str(img),
                           "--shell-job"], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    j.dumped()
    master, slave = os.openpty()
    try:
        cli = subprocess.Popen([sys.executable, "-m", "nbcheckpoint", "restore", "--shell-job", "-D", str(img)],
                               stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                               preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        slave = None
        deadline = time.monotonic() + 30
        while (pid := _restored_job(cli.pid, j.pid)) is None:
            assert cli.poll() is None, (cli.returncode, os.read(master, 4096))
            assert time.monotonic() < deadline, "no restored job"
            time.sleep(0.02)
        time.sleep(0.3)
        st = _stat(pid)
        new_rdev = os.stat(os.readlink(f"/proc/{pid}/fd/0")).st_rdev
        # root: a session of its own that took the terminal over; an ordinary user may not take
        # it from the CLI's session (TIOCSCTTY's steal): the job joins that session instead
        session = pid if userns.privileged() else cli.pid
        assert int(st[7]) == new_rdev and int(st[6]) == session and int(st[5]) == pid and int(st[8]) == pid, st
        out = _talk(master, pid)
        assert b"pong ping 42" in out, out
        assert cli.wait(timeout=10) == 0
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
