"""The checkpointable kernel: provisioner + shim, against real ipykernels started by jupyter_client.

Every kernel here comes from the "Python 3 (checkpointable)" kernelspec that `pip install`
puts in place, so these tests also check that the installed spec selects our provisioner.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import time
from pathlib import Path

import pytest
from jupyter_client import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from conftest import output_hook
from nbcheckpoint.control import Busy
from nbcheckpoint.engine import RestoreError
from nbcheckpoint.engine.sys import userns
from nbcheckpoint.jupyter.provisioner import ShimError
from nbcheckpoint.store import BadName, NoSuchCheckpoint, StoreError

SPEC = "python3-checkpointable"


class K:
    """One kernel: manager, client, and the shim's log."""

    def __init__(self, tmp: Path, restore: str | None = None, curve: tuple[bytes, bytes] | None = None):
        self.tmp = tmp
        self.log_path = tmp / f"shim-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "wb")
        self.km = AsyncKernelManager(kernel_name=SPEC)
        self.km.cache_ports = False
        if curve:                           # CurveZMQ transport encryption (jupyter_client >= 8.10)
            self.km.curve_publickey, self.km.curve_secretkey = curve
        self.restore = restore
        self.kc: AsyncKernelClient | None = None

    async def start(self):
        kw = {"nbcheckpoint_restore": self.restore} if self.restore else {}
        await self.km.start_kernel(stdout=self.log, stderr=self.log, cwd=str(self.tmp), **kw)
        self.kc = self.km.client()
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=60)
        return self

    async def run(self, code: str, timeout: float = 60, kc=None) -> tuple[str, dict]:
        out = []
        reply = await (kc or self.kc).execute_interactive(code, timeout=timeout, output_hook=output_hook(out))
        return "".join(out), reply["content"]

    async def ok(self, code: str, **kw) -> str:
        out, reply = await self.run(code, **kw)
        assert reply["status"] == "ok", out
        return out

    async def stop(self):
        try:
            if self.kc:
                self.kc.stop_channels()
            if self.km.has_kernel:
                await self.km.shutdown_kernel(now=True)
        finally:
            self.log.close()

    def shim_log(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")


def arun(coro):
    return asyncio.run(asyncio.wait_for(coro, 600))


def test_kernelspec_selects_provisioner():
    spec = KernelSpecManager().get_kernel_spec(SPEC)
    assert spec.display_name == "Python 3 (checkpointable)"
    assert spec.metadata["kernel_provisioner"]["provisioner_name"] == "nbcheckpoint-provisioner"


STATE = """
import os, threading, time, sys
x = 41
def gen():
    for i in range(100):
        yield i
g = gen(); next(g); next(g)
f = open("notes.txt", "w"); f.write("before,"); f.flush()
ticks = [0]
def tick():
    while True:
        ticks[0] += 1; time.sleep(0.01)
threading.Thread(target=tick, daemon=True).start()
print("pid", os.getpid(), "ppid", os.getppid())
"""

CHECK = """
t0 = ticks[0]; time.sleep(0.1); assert ticks[0] > t0
f.write("after"); f.flush()
print(x, next(g), open("notes.txt").read())
"""


def test_launch_checkpoint_restore_in_place(tmp_path, store):
    async def main():
        k = await K(tmp_path).start()
        try:
            out = await k.ok(STATE)
            assert out.split()[:4] == ["pid", "2", "ppid", "1"], out     # its own PID namespace
            # stdio is a pty forwarded to the shim's log (fd 0 is the slave, opened read-write)
            await k.ok("os.write(0, b'through-the-pty\\n')")
            meta = await k.km.provisioner.checkpoint(name="first", notebook="nb.ipynb", execution_count=3)
            assert meta["name"] == "first" and meta["notebook"] == "nb.ipynb" and meta["execution_count"] == 3
            assert meta["kernel_name"] == SPEC and meta["kernel_id"] == k.km.kernel_id
            assert meta["size_bytes"] > 10 << 20 and 0 < meta["frozen_s"] <= meta["total_s"]
            assert "key" not in meta["connection"]                        # secrets stay in meta.json
            assert set(meta["listeners"]) == {"shell", "iopub", "stdin", "control", "hb"}
            ck = store.get("first")
            assert ck.meta["connection"]["key"] == k.km.session.key.decode()
            assert stat.S_IMODE(os.stat(store.root).st_mode) == 0o700
            assert stat.S_IMODE(os.stat(ck.path / "meta.json").st_mode) == 0o600
            assert [c.name for c in store.list()] == ["first"]
            # the kernel goes on; change everything
            await k.ok("x = 99; next(g); next(g); f.write('lost,'); f.flush()")
            ports = json.loads(Path(k.km.connection_file).read_text())
            meta2 = await k.km.provisioner.restore_in_place("first")
            assert meta2["name"] == "first"
            # the same client, the same kernel id and ports: the state of the checkpoint
            out = await k.ok(CHECK)
            assert out.strip() == "41 2 before,after", out      # and no IPython history-database complaint
            assert json.loads(Path(k.km.connection_file).read_text()) == ports
            st = await k.km.provisioner.status()
            assert st["restored_from"] == "first" and not st["busy"]
            # a checkpoint of the restored kernel descends from the first one
            meta3 = await k.km.provisioner.checkpoint(name="second")
            assert meta3["parent"] == "first" and meta3["lineage"] == meta["lineage"]
            assert "through-the-pty" in k.shim_log()
        finally:
            await k.stop()
    arun(main())


def test_restore_into_new_kernel(tmp_path, store):
    async def main():
        k = await K(tmp_path).start()
        try:
            await k.ok(STATE)
            await k.km.provisioner.checkpoint(name="ck")
        finally:
            await k.stop()                  # the kernel is gone
        old = store.get("ck").meta["connection"]          # with the key (meta.json, 0600)
        # one old port is taken by someone else: the restored kernel gets a new one there
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)    # the old port has TIME_WAITs
        deadline = time.monotonic() + 15
        while True:          # the manager waits for the shim only: the namespace dies just after
            try:
                squatter.bind((old["ip"], old["shell_port"]))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        squatter.listen()
        k2 = K(tmp_path, restore="ck")
        try:
            t0 = time.monotonic()
            await k2.start()
            first = time.monotonic() - t0
            info = json.loads(Path(k2.km.connection_file).read_text())
            assert info["key"] == old["key"] and info["signature_scheme"] == old["signature_scheme"]
            assert info["shell_port"] != old["shell_port"]
            assert info["iopub_port"] == old["iopub_port"]          # free: the old port again
            out = await k2.ok(CHECK)
            assert out.strip() == "41 2 before,after", out
            # IOPub reaches a second, fresh client too
            kc = AsyncKernelClient(connection_file=k2.km.connection_file)
            kc.load_connection_file()
            kc.start_channels()
            await kc.wait_for_ready(timeout=30)
            out, reply = await k2.run("print('hello', x)", kc=kc)
            kc.stop_channels()
            assert reply["status"] == "ok" and out.strip() == "hello 41"
            print(f"restore to first reply: {first:.2f} s")
            # "Restart kernel" gives a fresh kernel, not the checkpoint again
            await k2.km.restart_kernel(now=True)
            await k2.kc.wait_for_ready(timeout=60)
            out, reply = await k2.run("print('x' in dir())")
            assert out.strip() == "False", out
        finally:
            squatter.close()
            await k2.stop()
    arun(main())


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1]
    except OSError:
        return None


def test_restored_kernel_dies_with_its_shim(tmp_path, store):
    """A shim SIGKILLed alone (no killpg by a manager) takes its restored kernel along:
    the namespace's init is on a lifeline to the shim.  As root the restore is lazy, and the
    shim dies once all memory is in; an ordinary user's shim restores in full (lazy restore
    is root's) and says why."""
    async def main():
        k = await K(tmp_path).start()
        try:
            await k.ok(STATE)
            await k.km.provisioner.checkpoint(name="ck")
        finally:
            await k.stop()
        k2 = K(tmp_path, restore="ck")
        try:
            await k2.start()
            assert (await k2.ok("print(x)")).strip() == "41"
            st = await k2.km.provisioner.status()
            kernel, init = st["kernel_pid"], st["init_pid"]
            assert not st["busy"] or "lazily" in k2.shim_log()
            for _ in range(200):                        # the memory is in: the shim is idle
                if not (await k2.km.provisioner.status())["busy"]:
                    break
                await asyncio.sleep(0.05)
            if userns.privileged():
                assert "memory of the restored kernel in" in k2.shim_log(), k2.shim_log()
            else:
                assert "restoring with all memory in place, not lazily: " in k2.shim_log(), k2.shim_log()
            os.kill(k2.km.provisioner.process.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _state(kernel) not in (None, "Z") or _state(init) not in (None, "Z"):
                assert time.monotonic() < deadline, "the restored kernel outlived its shim"
                await asyncio.sleep(0.05)
        finally:
            await k2.stop()
    arun(main())


def test_errors_leave_the_kernel_untouched(tmp_path, store):
    async def main():
        k = await K(tmp_path).start()
        try:
            await k.ok("x = 1")
            with pytest.raises(NoSuchCheckpoint, match="no checkpoint named 'nope'"):
                await k.km.provisioner.restore_in_place("nope")
            with pytest.raises(BadName, match="bad checkpoint name"):
                await k.km.provisioner.checkpoint(name="../x")
            await k.km.provisioner.checkpoint(name="a")
            with pytest.raises(StoreError, match="already exists"):
                await k.km.provisioner.checkpoint(name="a")
            # damaged: its metadata of files is cut short
            ck = store.get("a")
            files_img = ck.image / "files.img"
            os.chmod(files_img, 0o600)
            data = files_img.read_bytes()
            files_img.write_bytes(data[: len(data) // 2])
            with pytest.raises(ShimError, match="files.img"):
                await k.km.provisioner.restore_in_place("a")
            # damaged page data (checked only as pages stream in, by restore itself): found
            # before the running kernel is stopped
            await k.km.provisioner.checkpoint(name="p")
            pages = max((store.get("p").image).glob("pages-*.img"), key=lambda f: f.stat().st_size)
            os.chmod(pages, 0o600)
            with open(pages, "r+b") as fh:
                fh.seek(pages.stat().st_size // 2)
                b = fh.read(1)
                fh.seek(-1, 1)
                fh.write(bytes([b[0] ^ 0xFF]))
            with pytest.raises(ShimError, match="checksum mismatch"):
                await k.km.provisioner.restore_in_place("p")
            assert (await k.km.provisioner.status())["restored_from"] is None
            # two at once: the second is refused, the first completes
            r = await asyncio.gather(k.km.provisioner.checkpoint(name="b"), k.km.provisioner.checkpoint(name="c"),
                                     return_exceptions=True)
            errs = [e for e in r if isinstance(e, Exception)]
            assert len(errs) == 1 and isinstance(errs[0], Busy) and "already running" in str(errs[0]), r
            assert {c.name for c in store.list()} >= {"a", "p"} and len([c for c in store.list() if c.name in "bc"]) == 1
            assert not [p for p in store.root.iterdir() if p.name.startswith(".")]   # no partial left
            out = await k.ok("x += 1; print(x)")
            assert out.strip() == "2"
        finally:
            await k.stop()
    arun(main())


def test_failed_restore_raises(tmp_path, store):
    """A restore that fails in the shim fails start_kernel, with the reason; no empty kernel
    passes for the restored one.  Here: the original still runs and holds the loopback
    port of its own internal listener, which the copy needs."""
    async def main():
        k = await K(tmp_path).start()
        try:
            await k.ok("x = 1")
            await k.km.provisioner.checkpoint(name="ck")
            k2 = K(tmp_path, restore="ck")
            try:
                with pytest.raises(RestoreError, match="restoring checkpoint 'ck' failed: .*(address|Address)"):
                    await k2.start()
            finally:
                await k2.stop()
            out = await k.ok("print(x)")                  # the original is unharmed
            assert out.strip() == "1"
        finally:
            await k.stop()
    arun(main())


# Starts a kernel where no user namespace can be made: in one of our own whose limit of user
# namespaces is 0 (user.max_user_namespaces is per user namespace), and, after the exec, with no
# capability left (the bounding set is emptied; an ordinary user has none anyway), as an
# ordinary user on a machine where an administrator turned them off.
NO_USERNS = """
import ctypes, os, sys
from nbcheckpoint.engine.sys import userns
userns.enter()
with open("/proc/sys/user/max_user_namespaces", "w") as f:
    f.write("0")
prctl = ctypes.CDLL(None, use_errno=True).prctl
for cap in range(64):
    prctl(24, cap, 0, 0, 0)                                 # PR_CAPBSET_DROP
os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
"""
START = """
import asyncio, time
from jupyter_client.manager import AsyncKernelManager
async def main():
    km = AsyncKernelManager(kernel_name="python3-checkpointable")
    t0 = time.monotonic()
    try:
        await km.start_kernel()
    except Exception as e:
        print(f"REFUSED after {time.monotonic() - t0:.1f} s: {type(e).__name__}: {e}")
    else:
        print("STARTED")
        await km.shutdown_kernel(now=True)
asyncio.run(main())
"""


def test_no_user_namespace_fails_the_start_clearly(tmp_path, store):
    """The shim of an ordinary user's kernel needs a user namespace of its own: where none
    can be made, start_kernel fails at once with the reason and the administrator's fix
    (not a kernel that never answers), and the server log (the shim's stderr) says it too."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", NO_USERNS, START], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    out = r.stdout.strip().splitlines()
    assert out and out[-1].startswith("REFUSED after "), (r.stdout, r.stderr)
    assert float(out[-1].split()[2]) < 30, out
    assert "ShimError: starting the kernel failed: cannot start the checkpointable kernel: " \
           "cannot create a user namespace" in out[-1], out
    assert "user.max_user_namespaces=0" in out[-1] and "sysctl user.max_user_namespaces=" in out[-1], out
    assert "cannot create a user namespace" in r.stderr, r.stderr     # the shim's log


def test_interrupt_shutdown_and_death(tmp_path, store):
    async def main():
        k = await K(tmp_path).start()
        try:
            mid = k.kc.execute("import time; time.sleep(60)")
            await asyncio.sleep(1.0)
            await k.km.interrupt_kernel()
            reply = await k.kc.get_shell_msg(timeout=20)
            while reply["parent_header"].get("msg_id") != mid:
                reply = await k.kc.get_shell_msg(timeout=20)
            assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
            # a graceful shutdown ends kernel and shim
            await k.km.shutdown_kernel()
            assert not await k.km.is_alive()
        finally:
            await k.stop()
        # the kernel killed from outside: the shim exits, so the manager sees it die
        k2 = await K(tmp_path).start()
        try:
            st = await k2.km.provisioner.status()
            os.kill(st["kernel_pid"], signal.SIGKILL)
            for _ in range(100):
                if not await k2.km.is_alive():
                    break
                await asyncio.sleep(0.05)
            assert not await k2.km.is_alive()
            assert "kernel exited with status 137" in k2.shim_log()
        finally:
            await k2.stop()
    arun(main())


def test_gib_kernel_round_trip(tmp_path, store):
    """1 GiB of numpy through checkpoint, in-place restore and a new kernel."""
    async def main():
        k = await K(tmp_path).start()
        try:
            await k.ok("import numpy as np; a = np.arange((1 << 30) // 8, dtype=np.float64); s = float(a[::512].sum())")
            meta = await k.km.provisioner.checkpoint(name="big")
            assert meta["pages_bytes"] >= 1 << 30
            await k.ok("a[:] = 0")
            await k.km.provisioner.restore_in_place("big")
            out = await k.ok("print(float(a[::512].sum()) == s)")
            assert out.strip() == "True"
        finally:
            await k.stop()
    arun(main())


def test_jupyter_console(tmp_path, store):
    """`jupyter console` drives the checkpointable kernel too (a terminal frontend)."""
    import subprocess
    import sys
    script = 'import os\nprint("pid-in-ns", os.getpid(), 6*7)\n%checkpoint --wait from-console\nexit\n'
    r = subprocess.run([sys.executable, "-m", "jupyter_console", "--kernel", SPEC, "--simple-prompt"],
                       input=script, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert "pid-in-ns 2 42" in r.stdout, r.stdout + r.stderr
    assert "saved 'from-console'" in r.stdout, r.stdout + r.stderr
    assert store.get("from-console").meta["kernel_name"] == SPEC


def test_curve_encrypted_kernel(tmp_path, store):
    """A kernel whose manager gave it CurveZMQ keys: its checkpoint keeps the keypair in
    meta.json only, a restore into a new kernel writes it into the connection file (the
    restored sockets hold it), and an in-place restore into a kernel without the same keys
    is refused before anything is stopped."""
    import zmq
    keys = zmq.curve_keypair()

    async def main():
        k = await K(tmp_path, curve=keys).start()
        try:
            await k.ok(STATE)
            # ipykernel warns of a TCP transport without encryption; not here
            assert json.loads(Path(k.km.connection_file).read_text())["curve_secretkey"] == keys[1].decode()
            assert "without encryption" not in k.shim_log(), k.shim_log()[-2000:]
            meta = await k.km.provisioner.checkpoint(name="enc")
            assert "curve_secretkey" not in meta["connection"] and "key" not in meta["connection"]
            assert meta["connection"]["curve_publickey"] == keys[0].decode()
            assert store.get("enc").meta["connection"]["curve_secretkey"] == keys[1].decode()
        finally:
            await k.stop()
        plain = await K(tmp_path).start()
        try:
            with pytest.raises(Exception) as ei:
                await plain.km.provisioner.restore_in_place("enc")
            assert "CurveZMQ" in str(ei.value) and "new kernel" in str(ei.value), str(ei.value)
            assert (await plain.ok("print('still', 1)")).strip() == "still 1"
        finally:
            await plain.stop()
        k2 = K(tmp_path, restore="enc")
        try:
            await k2.start()
            info = json.loads(Path(k2.km.connection_file).read_text())
            assert (info["curve_publickey"], info["curve_secretkey"]) == (keys[0].decode(), keys[1].decode())
            out = await k2.ok(CHECK)
            assert out.strip() == "41 2 before,after", out
        finally:
            await k2.stop()
    arun(main())
