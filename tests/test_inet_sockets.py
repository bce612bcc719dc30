"""TCP and UDP sockets through the engine (files/inet.py).

- tests/targets/tcp.c (a loopback connection with data unread both ways and in flight, a
  half-closed connection, a connection still in a listener's accept queue, an IPv6 listener
  with a thread blocked in accept(), bound and connected UDP sockets with queued datagrams):
  dump -> restore -> PASS; twice in a row; leave-running (the peeks and repair-mode reads
  leave the live process's connections as they were; the image restores once the original
  is gone: its ports are taken until then); a damaged stream is noticed.
- Connections to a TCP server the test runs (tests/targets/external/tcp_peer.c):
  * without options the dump is refused, naming the pid, the fd, both addresses and the
    options, and the target goes on talking on its connection;
  * --tcp-established: the dump kills the original without the server noticing (no FIN/RST),
    and the restored process goes on with the same connection (same port, bytes the server
    sent before the dump come first), IPv4 and IPv6;
  * --tcp-close: the restored process finds the connection closed at once (epoll/poll report
    HUP/ERR, recv returns ECONNRESET or 0); with a repair image, the server gets a reset too;
  * a --leave-running image cannot bring such a connection back live (the original went on
    with it): restore refuses it, and --tcp-close restores it closed.
- --tcp-established with an outside peer and its network lock need root (TCP_REPAIR over the
  host's network namespace, nftables): those tests are root_only.
- Without TCP_REPAIR (files/inet_plain.py: an ordinary user; as root the hidden knob
  NBCHECKPOINT_NO_TCP_REPAIR=1 forces it, so that every run tests both ways):
  tests/targets/tcp_pair.c (loopback connections with both ends in the process, queues not
  full) comes back as fresh pairs with its queues, also twice and from a --leave-running image;
  tcp.c (a full window: bytes unsent) is refused by name and goes on intact; --tcp-close
  restores a real reset; --tcp-established is refused at dump, and a repair image's live
  outside connection at restore, before any process exists.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import build_c, Target, TARGETS_DIR, wait_pid_free

PEER_SRC = TARGETS_DIR / "external" / "tcp_peer.c"
PEER_FD = 11


@pytest.fixture(scope="module")
def engine():
    import nbcheckpoint.engine as engine
    return engine


@pytest.fixture
def no_repair(monkeypatch):
    """The engine (in this process) does without TCP_REPAIR, as an ordinary user must."""
    from nbcheckpoint.engine.sys import tcprepair
    monkeypatch.setenv(tcprepair.FORCE_PLAIN_ENV, "1")
    assert not tcprepair.allowed()


@pytest.fixture(params=["repair", "plain"])
def way(request, monkeypatch):
    """Each test twice: with TCP_REPAIR where this process may use it, and without."""
    if request.param == "plain":
        from nbcheckpoint.engine.sys import tcprepair
        monkeypatch.setenv(tcprepair.FORCE_PLAIN_ENV, "1")
    return request.param


def _plain_image(img) -> bool:
    from nbcheckpoint.engine.show import show
    return "plain: true" in show(str(img))


# ----------------------------------------------------------------------------- the full target

@pytest.mark.root_only
def test_damaged_state_is_noticed(engine, launch, images):
    """With one byte of the stream lost, the target's checker reports FAIL."""
    _damage_noticed(launch("tcp", env={"ZDTM_CORRUPT": "1"}), images())


def _damage_noticed(t, img) -> None:
    t.checkpoint(img)
    t.restore(img)
    res = t.run_to_result()
    assert res.verdict and res.verdict.startswith("FAIL") and "cli->srv" in res.verdict, t.describe(res)


# ----------------------------------------------------------------------------- without TCP_REPAIR

def test_pairs_without_repair(engine, launch, images, no_repair):
    """tcp_pair.c's connections come back as fresh pairs with their queued bytes, twice in a row."""
    t = launch("tcp_pair")
    img1 = images("first")
    t.checkpoint(img1)
    assert _plain_image(img1), "the image was not dumped without TCP_REPAIR"
    t.restore(img1)
    time.sleep(0.2)
    img2 = images("second")
    t.checkpoint(img2)
    t.restore(img2)
    t.expect_pass()


def test_pairs_without_repair_leave_running(engine, launch, images, no_repair):
    """The peeks leave the live process's queues as they were (it passes on); the image restores."""
    t = launch("tcp_pair")
    img = images()
    t.checkpoint(img, leave_running=True)
    assert _plain_image(img)
    t.expect_pass()
    t.reap()
    t.restore(img)
    t.expect_pass()


def test_pairs_without_repair_damaged(engine, launch, images, no_repair):
    """With one byte of a re-sent queue lost, the target's checker reports FAIL."""
    _damage_noticed(launch("tcp_pair", env={"ZDTM_CORRUPT": "1"}), images())


def test_unsent_bytes_refused_without_repair(engine, launch, images, no_repair):
    """tcp.c fills a window: bytes wait in a send queue, which only TCP_REPAIR can read. The
    dump is refused by name, and the target, which lost nothing to the peeks, goes on intact."""
    t = launch("tcp")
    img = images()
    with pytest.raises(engine.UnsupportedError) as ei:
        engine.dump(t.pid, str(img))
    msg = str(ei.value)
    assert f"process {t.pid}: fd " in msg and re.search(r"127\.0\.0\.1:\d+ -> 127\.0\.0\.1:\d+", msg), msg
    assert re.search(r"\d+ byte\(s\) it sent are not yet acknowledged", msg), msg
    assert "CAP_NET_ADMIN" in msg and "run as root" in msg and "retry when the peer has read them" in msg, msg
    assert not img.exists()
    time.sleep(0.1)
    assert t.alive() and not _traced(t.pid), t.log()
    t.expect_pass()


def test_tcp_established_refused_without_repair(engine, launch_peer, server, images, no_repair):
    """--tcp-established needs TCP repair: refused at dump, naming the connection and the ways out."""
    srv = server()
    t = launch_peer(srv.addr, srv.port, "live")
    srv.wait(lambda: len(srv.conns) == 1)
    img = images()
    with pytest.raises(engine.UnsupportedError) as ei:
        engine.dump(t.pid, str(img), options=engine.Options(tcp_established=True))
    msg = str(ei.value)
    assert str(t.pid) in msg and re.search(rf"\bfd {PEER_FD}\b", msg), msg
    assert f"127.0.0.1:{t.port} -> 127.0.0.1:{srv.port}" in msg, msg
    assert "CAP_NET_ADMIN" in msg and "run as root" in msg and "--tcp-close" in msg, msg
    assert not img.exists()
    time.sleep(0.1)
    assert t.alive() and not _traced(t.pid), t.log()
    t.expect_pass()                   # still talking to the server on its connection
    assert len(srv.conns) == 1 and srv.resets == 0


@pytest.mark.root_only
def test_repair_image_refused_without_repair(engine, launch_peer, server, images, monkeypatch):
    """A connection to an outside peer dumped with its repair state (root) cannot come back live
    without TCP_REPAIR: refused before any process exists; with --tcp-close it comes back reset.
    Root only: an ordinary user cannot make such an image."""
    from nbcheckpoint.engine.sys import tcprepair
    srv = server()
    t = launch_peer(srv.addr, srv.port, "closed")
    srv.wait(lambda: len(srv.conns) == 1)
    img = images()
    engine.dump(t.pid, str(img), options=engine.Options(tcp_established=True))
    t.reap()
    monkeypatch.setenv(tcprepair.FORCE_PLAIN_ENV, "1")
    wait_pid_free(t.pid)
    with pytest.raises(engine.RestoreError) as ei:
        engine.restore(str(img), options=engine.Options(tcp_established=True))
    msg = str(ei.value)
    assert f"fd {PEER_FD}" in msg and f"127.0.0.1:{t.port} -> 127.0.0.1:{srv.port}" in msg, msg
    assert "CAP_NET_ADMIN" in msg and "restore as root" in msg and "--tcp-close" in msg, msg
    assert not os.path.exists(f"/proc/{t.pid}"), "a failed restore left a process"
    _restore(engine, t, img, engine.Options(tcp_close=True))
    t.expect_pass()


# ----------------------------------------------------------------------------- outside peers

def _build_peer() -> Path:
    return build_c(PEER_SRC, "external-tcp_peer")


class PeerTarget(Target):
    def __init__(self, workdir: Path, argv: list):
        super().__init__("counter", workdir)      # a known name; argv and log replaced
        self.name = "tcp_peer"
        self.argv = [str(a) for a in argv]
        self.log_path = self.workdir / "tcp_peer.log"

    @property
    def port(self) -> int:
        return int(re.search(r"^PORT (\d+)$", self.log(), re.M).group(1))


@pytest.fixture
def launch_peer(target_bins, tmp_path):
    exe = _build_peer()
    started: list[PeerTarget] = []

    def _launch(addr: str, port: int, mode: str) -> PeerTarget:
        t = PeerTarget(tmp_path / f"peer{len(started)}", [exe, addr, port, PEER_FD, mode])
        started.append(t)
        t.start()
        t.wait_ready()
        return t

    yield _launch
    for t in started:
        t.kill()


class PingServer:
    """A TCP server outside the dumped tree: answers "ping N" with "pong N"; counts
    connections, EOFs and resets."""

    def __init__(self, addr: str):
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self.addr = addr
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.bind((addr, 0))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.eofs = self.resets = 0
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
            th = threading.Thread(target=self._serve, args=(c,), daemon=True)
            th.start()
            self._threads.append(th)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        buf = b""
        while not self.stop.is_set():
            try:
                data = conn.recv(4096)
            except socket.timeout:
                continue
            except ConnectionResetError:
                with self._lock:
                    self.resets += 1
                return
            except OSError:
                return
            if not data:
                with self._lock:
                    self.eofs += 1
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.startswith(b"ping "):
                    conn.sendall(b"pong " + line[5:] + b"\n")

    def wait(self, what, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, \
                f"server: timed out ({len(self.conns)} connections, {self.eofs} EOFs, {self.resets} resets)"
            time.sleep(0.02)

    def close(self) -> None:
        self.stop.set()
        for th in self._threads:
            th.join(2)
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def server():
    made: list[PingServer] = []

    def _server(addr: str = "127.0.0.1") -> PingServer:
        s = PingServer(addr)
        made.append(s)
        return s

    yield _server
    for s in made:
        s.close()


def _traced(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        return any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in f)


def _restore(engine, t: Target, img, options=None):
    wait_pid_free(t.pid)
    res = engine.restore(str(img), options=options)
    t.adopt_restored(res, is_child=True)
    return res


def test_outside_peer_refused(engine, launch_peer, server, images):
    srv = server()
    t = launch_peer(srv.addr, srv.port, "live")
    srv.wait(lambda: len(srv.conns) == 1)
    img = images()
    with pytest.raises(engine.UnsupportedError) as ei:
        engine.dump(t.pid, str(img))
    msg = str(ei.value)
    assert "established TCP connection to an outside peer" in msg, msg
    assert str(t.pid) in msg and re.search(rf"\bfd {PEER_FD}\b", msg), msg
    assert f"127.0.0.1:{t.port}" in msg and f"127.0.0.1:{srv.port}" in msg, msg
    assert "--tcp-established" in msg and "--tcp-close" in msg, msg
    assert not img.exists()
    time.sleep(0.1)
    assert t.alive() and not _traced(t.pid), t.log()
    t.expect_pass()                   # still talking to the server on its connection
    assert len(srv.conns) == 1


@pytest.mark.root_only
@pytest.mark.parametrize("addr", ["127.0.0.1", "::1"])
def test_tcp_established(engine, launch_peer, server, images, addr):
    srv = server(addr)
    t = launch_peer(srv.addr, srv.port, "queued")
    srv.wait(lambda: len(srv.conns) == 1)
    srv.conns[0].sendall(b"queued\n")     # unread by the target when it is dumped
    time.sleep(0.1)
    img = images()
    engine.dump(t.pid, str(img), options=engine.Options(tcp_established=True))
    t.reap()
    time.sleep(0.3)
    assert srv.eofs == 0 and srv.resets == 0, "the server saw the dumped connection end"
    _restore(engine, t, img, engine.Options(tcp_established=True))
    t.expect_pass()                   # the queued bytes, then ping/pong on the same connection
    assert len(srv.conns) == 1, "the restored process made a new connection"
    srv.wait(lambda: srv.eofs + srv.resets >= 1)  # it exited after PASS...
    assert srv.eofs == 1 and srv.resets == 0      # ...with a clean close


def test_tcp_close_at_dump_and_restore(engine, launch_peer, server, images, way):
    srv = server()
    t = launch_peer(srv.addr, srv.port, "closed")
    srv.wait(lambda: len(srv.conns) == 1)
    img = images()
    engine.dump(t.pid, str(img), options=engine.Options(tcp_close=True))
    t.reap()
    srv.wait(lambda: srv.eofs + srv.resets == 1)     # no repair state: the connection ended with the dump
    _restore(engine, t, img, engine.Options(tcp_close=True))
    t.expect_pass()                   # closed at once: epoll/poll HUP|ERR, recv ECONNRESET/0


@pytest.mark.root_only
def test_tcp_established_restored_closed(engine, launch_peer, server, images):
    """Dumped with its repair state, restored with --tcp-close: the process finds it closed,
    and the server, whose end was kept open, gets a reset."""
    srv = server()
    t = launch_peer(srv.addr, srv.port, "closed")
    srv.wait(lambda: len(srv.conns) == 1)
    img = images()
    engine.dump(t.pid, str(img), options=engine.Options(tcp_established=True))
    t.reap()
    time.sleep(0.2)
    assert srv.eofs == 0 and srv.resets == 0
    _restore(engine, t, img, engine.Options(tcp_close=True))
    srv.wait(lambda: srv.resets == 1)
    t.expect_pass()


def test_leave_running_outside_peer(engine, launch_peer, server, images, way):
    """The original goes on using its connection after a --leave-running dump: the image cannot
    bring that connection back live (restore refuses it before any process exists), only
    closed (--tcp-close)."""
    srv = server()
    t = launch_peer(srv.addr, srv.port, "closed")
    srv.wait(lambda: len(srv.conns) == 1)
    img = images()
    engine.dump(t.pid, str(img), leave_running=True, options=engine.Options(tcp_established=True))
    assert t.alive() and not _traced(t.pid), t.log()
    t.signal(9)
    t.reap()
    with pytest.raises(engine.RestoreError) as ei:
        engine.restore(str(img), options=engine.Options(tcp_established=True))
    msg = str(ei.value)
    assert "--leave-running" in msg and "--tcp-close" in msg and f"fd {PEER_FD}" in msg, msg
    assert not os.path.exists(f"/proc/{t.pid}"), "a failed restore left a process"
    _restore(engine, t, img, engine.Options(tcp_close=True))
    t.expect_pass()


def _lock_tables() -> set[str]:
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.startswith("table inet nbck_")}


def _locked_dump(engine, launch_peer, server, images, mode: str):
    """A peer talking to a server, dumped (killed) with --tcp-established: (server, target,
    image, the lock tables before the dump, the name of the one it left)."""
    srv = server()
    t = launch_peer(srv.addr, srv.port, mode)
    srv.wait(lambda: len(srv.conns) == 1)
    before = _lock_tables()
    img = images()
    engine.dump(t.pid, str(img), options=engine.Options(tcp_established=True))
    t.reap()
    held = _lock_tables() - before
    assert len(held) == 1 and not any(n.startswith("nbck_dump_") for n in held), held
    return srv, t, img, before, held.pop()


@pytest.mark.root_only
def test_network_lock(engine, launch_peer, server, images):
    """A kill-mode dump with --tcp-established locks the outside connection (nftables, as CRIU's
    network lock): what the server sends while the process is gone is neither acknowledged and
    lost nor answered with a reset; the server's TCP retransmits it, and once the restore has
    removed the lock the restored process reads it on the same connection."""
    srv, t, img, before, _name = _locked_dump(engine, launch_peer, server, images, "queued")
    srv.conns[0].sendall(b"queued\n")   # sent while the process is dead: the lock drops it
    time.sleep(0.5)
    assert srv.resets == 0 and srv.eofs == 0, "the server's connection ended while it was locked"
    _restore(engine, t, img, engine.Options(tcp_established=True))
    assert _lock_tables() == before, "the restore left the lock in place"
    t.expect_pass()                     # "queued\n" arrives (retransmitted), then ping/pong
    assert len(srv.conns) == 1 and srv.resets == 0


@pytest.mark.root_only
def test_no_lock_left_by_leave_running_or_failed_dump(engine, launch_peer, server, images):
    """A leave-running dump takes no lock (the original keeps its connection); a dump that fails
    after locking leaves none behind (the table is owned by the engine's netlink socket)."""
    srv = server()
    t = launch_peer(srv.addr, srv.port, "live")
    srv.wait(lambda: len(srv.conns) == 1)
    before = _lock_tables()
    engine.dump(t.pid, str(images("lr")), leave_running=True, options=engine.Options(tcp_established=True))
    assert _lock_tables() == before
    locked = []

    def fail_after_files(phase, done, total):
        if phase == "pages":             # the connection is read (and locked) by now
            locked.append(_lock_tables() - before)
            raise engine.DumpError("stopped by the test after the files were dumped")
    with pytest.raises(engine.DumpError):
        engine.dump(t.pid, str(images("bad")), options=engine.Options(tcp_established=True),
                    progress=fail_after_files)
    assert locked and len(locked[0]) == 1 and locked[0].pop().startswith("nbck_dump_"), locked
    assert _lock_tables() == before, "a failed dump left its lock"
    time.sleep(0.1)
    t.expect_pass()                     # the connection still works


@pytest.mark.root_only
def test_unlock_without_restore(engine, launch_peer, server, images):
    """`nbcheckpoint show` names an image's network lock and `nbcheckpoint unlock` removes it
    (the peer then meets the dead socket: a reset)."""
    srv, t, img, before, name = _locked_dump(engine, launch_peer, server, images, "live")
    cli = [sys.executable, "-m", "nbcheckpoint"]
    shown = subprocess.run(cli + ["show", str(img)], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and f"table inet {name}" in shown.stdout, shown.stdout + shown.stderr
    r = subprocess.run(cli + ["unlock", str(img)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and f"removed the network lock {name}" in r.stdout, r.stdout + r.stderr
    assert _lock_tables() == before
    r = subprocess.run(cli + ["unlock", "-D", str(img)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "no network lock" in r.stdout, r.stdout + r.stderr
    srv.conns[0].sendall(b"anyone?\n")
    srv.wait(lambda: srv.resets == 1)


KILLED_DUMP = r"""
import sys, time
import nbcheckpoint.engine as engine
def stall(phase, done, total):
    if phase == "pages":                 # the connection is read and locked by now
        print("LOCKED", flush=True)
        time.sleep(60)
engine.dump(int(sys.argv[1]), sys.argv[2], options=engine.Options(tcp_established=True), progress=stall)
"""


@pytest.mark.root_only
def test_engine_killed_while_locked(engine, launch_peer, server, images):
    """SIGKILL the engine while it holds the lock: the kernel drops the engine's owned table
    with its netlink socket, and the thawed process talks to its server again."""
    srv = server()
    t = launch_peer(srv.addr, srv.port, "live")
    srv.wait(lambda: len(srv.conns) == 1)
    before = _lock_tables()
    p = subprocess.Popen([sys.executable, "-c", KILLED_DUMP, str(t.pid), str(images())],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "LOCKED"
        assert any(n.startswith("nbck_dump_") for n in _lock_tables() - before)
    finally:
        p.kill()
        p.wait()
    deadline = time.monotonic() + 5
    while _lock_tables() != before:
        assert time.monotonic() < deadline, "the killed engine's lock stayed"
        time.sleep(0.05)
    t.expect_pass()
    assert srv.resets == 0
