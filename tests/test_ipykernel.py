"""The point of it all: a live ipykernel checkpointed and restored, with a new client.

The kernel is started by jupyter_client (independent=True), builds state that pickling
tools cannot save, is checkpointed with the CLI (which kills it), and comes back as a new
manager would bring it back: five fresh listening sockets on other ports, handed to the
restored kernel in place of its old listeners (--inherit-fd), a connection file with the
image's key, and --tcp-close for the connections of the old client.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jupyter_client import BlockingKernelClient, KernelManager

from conftest import nspids, output_hook
from nbcheckpoint.control import CHANNELS
from nbcheckpoint.engine.images import files_pb2, imagedir

NBCK = [sys.executable, "-m", "nbcheckpoint"]


class Kernel:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.log = open(workdir / "kernel.log", "ab")
        self.km = KernelManager(kernel_name="python3", connection_file=str(workdir / "kernel-1.json"))
        self.km.cache_ports = False
        self.km.start_kernel(independent=True, stdout=self.log, stderr=self.log, cwd=str(workdir))
        self.pid = self.km.provisioner.process.pid
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.info = json.loads(Path(self.km.connection_file).read_text())
        self.restored_pid = None

    def run(self, code: str, timeout: float = 120, client=None) -> tuple[str, dict]:
        """Execute code; return (stdout text seen on IOPub, execute_reply content)."""
        out = []
        reply = (client or self.kc).execute_interactive(code, timeout=timeout,
                                                        output_hook=output_hook(out, results=False))
        return "".join(out), reply["content"]

    def checkpoint(self, images: Path) -> None:
        from nbcheckpoint.engine.sys import tcprepair     # --tcp-established needs TCP_REPAIR (root)
        outside = "--tcp-established" if tcprepair.allowed() else "--tcp-close"
        r = subprocess.run(NBCK + ["dump", "-t", str(self.pid), "-D", str(images), outside,
                                   "--file-locks"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        self.km.provisioner.process.wait(timeout=30)      # the engine killed it; reap it
        self.kc.stop_channels()

    def restore(self, images: Path) -> BlockingKernelClient:
        """As a new manager: fresh listeners, a connection file, --inherit-fd, --tcp-close."""
        old_ports = {self.info[f"{c}_port"]: c for c in CHANNELS}
        listeners, inherit, pass_fds = {}, [], []
        for ino, port in _listeners_in_image(images).items():
            if port not in old_ports:
                continue                       # the kernel's own internal listener: recreated
            sk = socket.socket()
            sk.bind(("127.0.0.1", 0))
            sk.listen(128)
            listeners[old_ports[port]] = sk
            inherit += ["--inherit-fd", f"fd[{sk.fileno()}]:socket:[{ino}]"]
            pass_fds.append(sk.fileno())
        assert sorted(listeners) == sorted(CHANNELS), f"listeners in the image: {listeners}"
        info = dict(self.info)
        for c, sk in listeners.items():
            info[f"{c}_port"] = sk.getsockname()[1]
        cf = self.workdir / "kernel-restored.json"
        cf.write_text(json.dumps(info))
        pidfile = self.workdir / "restored.pid"
        r = subprocess.run(NBCK + ["restore", "-D", str(images), "-d", "--pidfile", str(pidfile),
                                   "--tcp-close", "--file-locks"] + inherit,
                           pass_fds=pass_fds, capture_output=True, text=True, timeout=300)
        for sk in listeners.values():
            sk.close()                         # the kernel has its own copies now
        assert r.returncode == 0, r.stderr
        self.restored_pid = int(pidfile.read_text())
        # the pid it sees itself as: without root it lives in a new PID namespace, under another pid for us
        assert nspids(self.restored_pid)[-1] == self.pid
        kc = BlockingKernelClient(connection_file=str(cf))
        kc.load_connection_file()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        self.kc = kc
        return kc

    def kill(self) -> None:
        try:      # the restored kernel, once there is one (without root, the original's pid is not its pid)
            os.kill(self.restored_pid or self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.km.provisioner.process.wait(timeout=5)
        except Exception:
            pass
        try:
            self.kc.stop_channels()
        except Exception:
            pass


def _listeners_in_image(images: Path) -> dict[int, int]:
    """socket inode -> port of every listening TCP socket in the image."""
    rd = imagedir.ImageReader(str(images))
    out = {}
    for f in rd.messages("files.img", files_pb2.FileEntry):
        if f.kind == files_pb2.INET and f.inet.state == 10:      # TCP_LISTEN
            out[f.inet.ino] = f.inet.src_port
    return out


@pytest.fixture
def kernel(tmp_path):
    k = Kernel(tmp_path)
    yield k
    k.kill()


STATE = r'''
import numpy as np, threading, time, subprocess, socket, fcntl, os, hashlib
big = np.arange({n}, dtype=np.float64)          # touched memory
big_sum = float(big[::4096].sum())
def gen():
    for i in range(10):
        yield i * i
g = gen(); [next(g) for _ in range(4)]          # half consumed: next is 16
f = open("written.txt", "w"); f.write("first half,"); f.flush()
ticks = [0]
def tick():
    while True:
        ticks[0] += 1; time.sleep(0.01)
th = threading.Thread(target=tick, daemon=True); th.start()
sleeper = subprocess.Popen(["sleep", "600"])
a, b = socket.socketpair(); a.sendall(b"queued in a socket")
lockf = open("locked", "w"); fcntl.flock(lockf, fcntl.LOCK_EX)
print("state built")
'''

CHECK = r'''
assert float(big[::4096].sum()) == big_sum, "array changed"
assert next(g) == 16, "generator"
f.write("second half"); f.close()
assert open("written.txt").read() == "first half,second half"
t0 = ticks[0]; time.sleep(0.2); assert ticks[0] > t0 and th.is_alive(), "thread"
assert sleeper.poll() is None, "subprocess alive"
assert b.recv(100) == b"queued in a socket"
try:
    fcntl.flock(open("locked"), fcntl.LOCK_EX | fcntl.LOCK_NB); raise AssertionError("lock lost")
except BlockingIOError:
    pass
print("all intact", os.getpid())
'''


def _round_trip(kernel: Kernel, tmp_path: Path, n: int, tag: str) -> None:
    out, reply = kernel.run(STATE.format(n=n))
    assert reply["status"] == "ok" and "state built" in out, out
    img = tmp_path / f"img-{tag}"
    kernel.checkpoint(img)
    kernel.restore(img)
    out, reply = kernel.run(CHECK)
    assert reply["status"] == "ok", out
    assert f"all intact {kernel.pid}" in out            # IOPub output reaches the new client
    kernel.run("sleeper.kill(); sleeper.wait()")


def test_ipykernel_round_trip_1gib(kernel, tmp_path):
    _round_trip(kernel, tmp_path, n=(1 << 30) // 8, tag="big")


def test_ipykernel_round_trip_repeated(tmp_path):
    """Five kernels in a row, each checkpointed and restored, without a failure."""
    for i in range(5):
        d = tmp_path / f"k{i}"
        d.mkdir()
        k = Kernel(d)
        try:
            _round_trip(k, d, n=(64 << 20) // 8, tag=str(i))
        finally:
            k.kill()


def test_checkpoint_mid_cell(kernel, tmp_path):
    """Checkpoint while a cell runs a loop: the restored kernel finishes it."""
    kernel.kc.execute("import time\ndone = []\nfor i in range(40):\n    time.sleep(0.05)\n    done.append(i)\n")
    time.sleep(0.6)
    img = tmp_path / "img"
    kernel.checkpoint(img)
    kernel.restore(img)
    out, reply = kernel.run("print(len(done), done[-1])")
    assert reply["status"] == "ok" and out.strip() == "40 39", out
