"""Unix domain sockets through the engine.

- tests/targets/unix_sockets.c (every kind in one process: pairs of the three types with
  queued data, a listener with an accepted and a pending connection, an abstract datagram
  socket with a connected sender, half-closed and dead-peer sockets, a thread blocked in
  recv): dump -> restore -> PASS; twice in a row; leave-running; a damaged queue is noticed.
- External peers (CRIU wiki: "external socket is used", --ext-unix-sk, --inherit-fd), with
  tests/targets/external/unix_peer.c, which pings its peer before READY and after SIGUSR1:
  * connected to a server the test runs: the dump is refused, naming the fd, the inode and
    the peer, and the target runs on; with --ext-unix-sk it dumps, and restore reconnects
    it to the server by name (the server sees a new connection that answers); restore
    without the option, or with the server gone, fails before any process exists;
  * one end of a socketpair whose other end the test holds: restored with --inherit-fd
    fd[N]:socket:[INO] and a fresh socketpair end, data flows between test and target;
  * the same through the CLI (dump --ext-unix-sk, restore --inherit-fd with pass_fds).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import build_c, Target, TARGETS_DIR, wait_pid_free

PEER_SRC = TARGETS_DIR / "external" / "unix_peer.c"
PEER_FD = 10


@pytest.fixture(scope="module")
def engine():
    import nbcheckpoint.engine as engine
    return engine


# ----------------------------------------------------------------------------- the full target

def test_damaged_state_is_noticed(engine, launch, images):
    """The target's checker can fail: with one queued datagram lost it reports FAIL."""
    t = launch("unix_sockets", env={"ZDTM_CORRUPT": "1"})
    img = images()
    t.checkpoint(img)
    t.restore(img)
    res = t.run_to_result()
    assert res.verdict and res.verdict.startswith("FAIL") and "dg[0]" in res.verdict, t.describe(res)


# ----------------------------------------------------------------------------- external peers

def _build_peer() -> Path:
    return build_c(PEER_SRC, "external-unix_peer")


@pytest.fixture(scope="module")
def peer_bin(target_bins) -> Path:
    return _build_peer()


class PeerTarget(Target):
    """unix_peer, optionally inheriting fds from the test (pass_fds)."""

    def __init__(self, workdir: Path, argv: list, pass_fds=()):
        super().__init__("counter", workdir)      # a known name; argv and log replaced
        self.name = "unix_peer"
        self.argv = [str(a) for a in argv]
        self.log_path = self.workdir / "unix_peer.log"
        self.pass_fds = tuple(pass_fds)

    def start(self) -> "PeerTarget":
        env = {k: v for k, v in os.environ.items() if k != "ZDTM_CORRUPT"}
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.workdir,
                env=env, close_fds=True, pass_fds=self.pass_fds, start_new_session=True)
        self.pid = self.vpid = self.popen.pid
        self.pids_seen.add(self.pid)
        return self

    def fd_inode(self, fd: int = PEER_FD) -> int:
        return os.stat(f"/proc/{self.pid}/fd/{fd}").st_ino


@pytest.fixture
def launch_peer(peer_bin, tmp_path):
    started: list[PeerTarget] = []

    def _launch(args: list, pass_fds=(), tag: str = "peer") -> PeerTarget:
        t = PeerTarget(tmp_path / tag, [peer_bin, *args], pass_fds)
        started.append(t)
        t.start()
        t.wait_ready()
        return t

    yield _launch
    for t in started:
        t.kill()


def _serve(conn: socket.socket, stop: threading.Event, on_eof=None) -> None:
    """Answer every "ping N" line with "pong N" until EOF or stop."""
    conn.settimeout(0.1)
    buf = b""
    while not stop.is_set():
        try:
            data = conn.recv(4096)
        except socket.timeout:
            continue
        except OSError:
            break
        if not data:
            break
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.startswith(b"ping "):
                conn.sendall(b"pong " + line[5:] + b"\n")
    if on_eof:
        on_eof()


class PingServer:
    """A unix stream server outside the dumped tree: a path, or "@name" (abstract)."""

    def __init__(self, addr: str):
        self.addr = addr
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(b"\0" + addr[1:].encode() if addr.startswith("@") else addr)
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.conns: list[socket.socket] = []
        self.eofs = 0
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.conns.append(c)
            th = threading.Thread(target=_serve, args=(c, self.stop, self._eof), daemon=True)
            th.start()
            self._threads.append(th)

    def _eof(self) -> None:
        with self._lock:
            self.eofs += 1

    def wait(self, what, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, f"server: timed out ({len(self.conns)} connections, {self.eofs} EOFs)"
            time.sleep(0.02)

    def close(self) -> None:
        self.stop.set()
        for th in self._threads:
            th.join(2)
        self.sock.close()
        for c in self.conns:
            c.close()
        if not self.addr.startswith("@"):
            try:
                os.unlink(self.addr)
            except FileNotFoundError:
                pass


@pytest.fixture
def server(tmp_path):
    made: list[PingServer] = []

    def _server(kind: str) -> PingServer:
        addr = str(tmp_path / "srv.sock") if kind == "path" else f"@nbck-test-srv-{os.getpid()}-{len(made)}"
        s = PingServer(addr)
        made.append(s)
        return s

    yield _server
    for s in made:
        s.close()


def _traced(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        return any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in f)


def _restore(engine, t: Target, img, options):
    wait_pid_free(t.pid)
    res = engine.restore(str(img), options=options)
    t.adopt_restored(res.pid, is_child=True)
    return res


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_external_server_refused(engine, launch_peer, server, images, kind):
    srv = server(kind)
    t = launch_peer(["connect", srv.addr, PEER_FD])
    srv.wait(lambda: len(srv.conns) == 1)
    ino = t.fd_inode()
    peer_ino = os.fstat(srv.conns[0].fileno()).st_ino
    img = images()
    with pytest.raises(engine.UnsupportedError) as ei:
        engine.dump(t.pid, str(img))
    msg = str(ei.value)
    assert "external socket is used" in msg, msg
    assert str(t.pid) in msg and re.search(rf"\bfd {PEER_FD}\b", msg), msg
    assert f"socket:[{ino}]" in msg and f"socket:[{peer_ino}]" in msg, msg
    assert srv.addr in msg, f"the peer's name is not in the message: {msg}"
    assert "--ext-unix-sk" in msg and "--inherit-fd" in msg, msg
    assert not img.exists()
    time.sleep(0.1)
    assert t.alive() and not _traced(t.pid), t.log()
    t.expect_pass()                   # still talking to the server on its connection
    srv.wait(lambda: srv.eofs == 1)   # it exited after PASS (the server thread sees it soon)
    assert len(srv.conns) == 1


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_external_server_ext_unix_sk(engine, launch_peer, server, images, kind):
    srv = server(kind)
    t = launch_peer(["connect", srv.addr, PEER_FD])
    srv.wait(lambda: len(srv.conns) == 1)
    img = images()
    engine.dump(t.pid, str(img), options=engine.Options(ext_unix_sk=True))
    t.reap()
    srv.wait(lambda: srv.eofs == 1)   # the dumped process is gone, and its connection with it

    # the image says the peer was external: restore needs the option (or --inherit-fd)
    with pytest.raises(engine.RestoreError) as ei:
        engine.restore(str(img))
    assert "--ext-unix-sk" in str(ei.value) and "--inherit-fd" in str(ei.value), str(ei.value)
    assert not os.path.exists(f"/proc/{t.pid}"), "a failed restore left a process"

    _restore(engine, t, img, engine.Options(ext_unix_sk=True))
    srv.wait(lambda: len(srv.conns) == 2)     # reconnected by name: a new connection
    t.expect_pass()                           # ...which answers the restored process


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_external_server_gone(engine, launch_peer, server, images, kind):
    srv = server(kind)
    t = launch_peer(["connect", srv.addr, PEER_FD])
    img = images()
    engine.dump(t.pid, str(img), options=engine.Options(ext_unix_sk=True))
    t.reap()
    srv.close()
    with pytest.raises(engine.RestoreError) as ei:
        engine.restore(str(img), options=engine.Options(ext_unix_sk=True))
    msg = str(ei.value)
    assert srv.addr in msg and f"fd {PEER_FD}" in msg, msg
    assert not os.path.exists(f"/proc/{t.pid}"), "a failed restore left a process"


def test_socketpair_inherit_fd(engine, launch_peer, images):
    mine, theirs = socket.socketpair()
    stop = threading.Event()
    th = threading.Thread(target=_serve, args=(mine, stop), daemon=True)
    th.start()
    try:
        t = launch_peer(["fd", theirs.fileno()], pass_fds=(theirs.fileno(),))
        fd = theirs.fileno()
        theirs.close()
        ino = t.fd_inode(fd)
        img = images()
        with pytest.raises(engine.UnsupportedError) as ei:
            engine.dump(t.pid, str(img))
        msg = str(ei.value)
        assert "external socket is used" in msg and f"socket:[{ino}]" in msg and "--inherit-fd" in msg, msg
        assert t.alive(), t.log()

        engine.dump(t.pid, str(img), options=engine.Options(ext_unix_sk=True))
        t.reap()
        stop.set()
        th.join(2)
        mine.close()

        # a peer with no name cannot be reconnected: only --inherit-fd can stand in for it
        with pytest.raises(engine.RestoreError) as ei:
            engine.restore(str(img), options=engine.Options(ext_unix_sk=True))
        assert f"fd[N]:socket:[{ino}]" in str(ei.value), str(ei.value)

        mine, new = socket.socketpair()
        stop = threading.Event()
        th = threading.Thread(target=_serve, args=(mine, stop), daemon=True)
        th.start()
        _restore(engine, t, img, engine.Options(inherit_fd={f"socket:[{ino}]": new.fileno()}))
        new.close()
        t.expect_pass()               # pings the test through the handed-in socket
    finally:
        stop.set()
        th.join(2)
        mine.close()


def _cli(*args, pass_fds=(), timeout=120):
    exe = shutil.which("nbcheckpoint")
    cmd = [exe] if exe else [sys.executable, "-c",
                             "import sys; from nbcheckpoint.cli import main; sys.exit(main())"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, pass_fds=pass_fds)


def test_cli_ext_unix_sk_and_inherit_fd(engine, launch_peer, images, tmp_path):
    mine, theirs = socket.socketpair()
    stop = threading.Event()
    th = threading.Thread(target=_serve, args=(mine, stop), daemon=True)
    th.start()
    try:
        t = launch_peer(["fd", theirs.fileno()], pass_fds=(theirs.fileno(),))
        ino = t.fd_inode(theirs.fileno())
        theirs.close()
        img = images()
        r = _cli("dump", "--pid", t.pid, "--images", img)
        assert r.returncode != 0 and "external socket is used" in r.stderr + r.stdout, r.stderr
        assert t.alive(), t.log()
        r = _cli("dump", "--pid", t.pid, "--images", img, "--ext-unix-sk")
        assert r.returncode == 0, f"dump failed\n{r.stdout}\n{r.stderr}"
        t.reap()
        stop.set()
        th.join(2)
        mine.close()

        mine, new = socket.socketpair()
        stop = threading.Event()
        th = threading.Thread(target=_serve, args=(mine, stop), daemon=True)
        th.start()
        pidfile = tmp_path / "restored.pid"
        wait_pid_free(t.pid)
        r = _cli("restore", "--images", img, "--detach", "--pidfile", pidfile,
                 "--inherit-fd", f"fd[{new.fileno()}]:socket:[{ino}]", pass_fds=(new.fileno(),))
        assert r.returncode == 0, f"restore failed\n{r.stdout}\n{r.stderr}"
        new.close()
        t.adopt_restored(int(pidfile.read_text().strip()), is_child=False)
        t.expect_pass()
    finally:
        stop.set()
        th.join(2)
        mine.close()


def test_cli_ext_unix_sk_per_socket(engine, launch_peer, server, images, tmp_path):
    """--ext-unix-sk=INO (seed 004): only that socket may have its peer outside; on restore
    --ext-unix-sk=INO=PATH reconnects it to a new path (the old one is gone)."""
    srv = server("path")
    t = launch_peer(["connect", srv.addr, PEER_FD])
    srv.wait(lambda: len(srv.conns) == 1)
    ino = t.fd_inode()
    img = images()
    r = _cli("dump", "-t", t.pid, "-D", img, f"--ext-unix-sk={ino + 1000000}")
    out = r.stderr + r.stdout
    assert r.returncode != 0 and "external socket is used" in out and f"--ext-unix-sk={ino}" in out, out
    assert t.alive(), t.log()
    r = _cli("dump", "-t", t.pid, "-D", img, f"--ext-unix-sk={ino}")
    assert r.returncode == 0, f"dump failed\n{r.stdout}\n{r.stderr}"
    t.reap()
    srv.close()
    moved = PingServer(str(tmp_path / "moved.sock"))
    try:
        wait_pid_free(t.pid)
        r = _cli("restore", "-D", img, "-d", "--ext-unix-sk")
        assert r.returncode != 0 and srv.addr in r.stderr and "gone" in r.stderr, r.stderr
        assert not os.path.exists(f"/proc/{t.pid}"), "a failed restore left a process"
        pidfile = tmp_path / "restored.pid"
        r = _cli("restore", "-D", img, "-d", "--pidfile", pidfile, f"--ext-unix-sk={ino}={moved.addr}")
        assert r.returncode == 0, f"restore failed\n{r.stdout}\n{r.stderr}"
        t.adopt_restored(int(pidfile.read_text().strip()), is_child=False)
        moved.wait(lambda: len(moved.conns) == 1)
        t.expect_pass()                         # it talks to the server at the new path
    finally:
        moved.close()


# ----------------------------------------------------------------------------- files in flight
# (tests/targets/scm_rights.c goes through every engine path with fds in flight; these are
# the refusals and the checks before restore)

IN_FLIGHT = r"""
import os, select, socket, sys, time
a, b = socket.socketpair()
kind, path = sys.argv[1], sys.argv[2]
if kind == "epoll":
    held = select.epoll()
    fd = held.fileno()
elif kind == "tcp":
    held = socket.socket()
    fd = held.fileno()
else:
    fd = os.open(path, os.O_RDONLY)
socket.send_fds(a, [b"x"], [fd])
if kind == "file":
    os.close(fd)                      # only in flight now
print("READY", flush=True)
while True:
    time.sleep(1)
"""


@pytest.fixture
def in_flight(tmp_path):
    started = []

    def _start(kind: str) -> subprocess.Popen:
        data = tmp_path / "in-flight.txt"
        data.write_text("in flight")
        p = subprocess.Popen([sys.executable, "-c", IN_FLIGHT, kind, str(data)], stdout=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        started.append(p)
        assert p.stdout.readline().strip() == "READY"
        return p

    yield _start
    for p in started:
        p.kill()
        p.wait()


@pytest.mark.parametrize("kind,named", [("epoll", "eventpoll"), ("tcp", "socket")])
def test_in_flight_unsupported_kind_refused(engine, in_flight, images, kind, named):
    """A file in flight of a kind the engine cannot save there fails the dump by name, the
    socket named, and the process runs on untouched."""
    p = in_flight(kind)
    img = images()
    with pytest.raises(engine.UnsupportedError) as ei:
        engine.dump(p.pid, str(img))
    msg = str(ei.value)
    assert f"process {p.pid}: fd " in msg and "in flight (SCM_RIGHTS)" in msg and named in msg, msg
    assert not img.exists()
    time.sleep(0.1)
    assert p.poll() is None and not _traced(p.pid)


def test_in_flight_file_deleted_before_restore(engine, in_flight, images, tmp_path):
    """A regular file that only a queued message holds is checked before restore like any
    other: deleted after a leave-running dump, the restore fails before any process exists
    and names the file and where it was in flight."""
    p = in_flight("file")
    img = images()
    engine.dump(p.pid, str(img), leave_running=True)
    p.kill()
    p.wait()
    wait_pid_free(p.pid)
    (tmp_path / "in-flight.txt").unlink()
    with pytest.raises(engine.RestoreError) as ei:
        engine.restore(str(img))
    msg = str(ei.value)
    assert "in-flight.txt" in msg and "in flight on unix socket:[" in msg, msg
    assert not os.path.exists(f"/proc/{p.pid}"), "a failed restore left a process"
