"""The magics and hooks, in real kernels.

Checkpointable kernels come from the installed "Python 3 (checkpointable)" kernelspec
(provisioner + shim, kernel_name="python3-checkpointable"); helper mode runs in a plain
"python3" kernel.  Every kernel is driven by a jupyter_client client, as a notebook is.
"""
from __future__ import annotations

import json
import queue
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jupyter_client import BlockingKernelClient, KernelManager

from conftest import nspids, output_hook
from nbcheckpoint import control

SPEC = "python3-checkpointable"
NBCK = [sys.executable, "-m", "nbcheckpoint"]


class Kernel:
    """A kernel started by jupyter_client's KernelManager, and one client."""

    def __init__(self, tmp: Path, kernel_name: str = SPEC, restore: str | None = None,
                 independent: bool = False, wait: bool = True):
        self.tmp = tmp
        self.log_path = tmp / f"kernel-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "wb")
        self.km = KernelManager(kernel_name=kernel_name)
        self.km.cache_ports = False
        kw = {"nbcheckpoint_restore": restore} if restore else {}
        self.km.start_kernel(stdout=self.log, stderr=self.log, cwd=str(tmp), independent=independent, **kw)
        self.kc = self.km.client()
        self.kc.start_channels()
        if wait:
            self.kc.wait_for_ready(timeout=90)

    def run(self, code: str, timeout: float = 120, kc=None) -> tuple[str, dict]:
        """Execute code; (stdout+stderr+errors seen on IOPub, execute_reply content)."""
        out = []
        reply = (kc or self.kc).execute_interactive(code, timeout=timeout, output_hook=output_hook(out))
        return "".join(out), reply["content"]

    def ok(self, code: str, **kw) -> str:
        out, reply = self.run(code, **kw)
        assert reply["status"] == "ok", out + self.tail()
        return out

    def error(self, code: str, **kw) -> str:
        out, reply = self.run(code, **kw)
        assert reply["status"] == "error", out
        return out

    def stream_until(self, text: str, timeout: float = 60) -> str:
        """Read IOPub until a stream message containing `text`; all stream text seen."""
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.kc.get_iopub_msg(timeout=1)
            except Exception:
                continue
            if msg["msg_type"] == "stream":
                seen.append(msg["content"]["text"])
                if text in msg["content"]["text"]:
                    return "".join(seen)
        raise AssertionError(f"no {text!r} on IOPub within {timeout} s; saw {''.join(seen)!r}" + self.tail())

    def reply_of(self, msg_id: str, timeout: float = 60) -> tuple[dict | None, list[str]]:
        """The shell reply to msg_id (None after `timeout`) and the stream text seen
        meanwhile.  IOPub is read all along, as a frontend does: a blocking client
        resubscribes to a restored kernel's IOPub only when it reads it."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                while True:
                    m = self.kc.get_iopub_msg(timeout=0.05)
                    if m["msg_type"] == "stream":
                        seen.append(m["content"]["text"])
            except queue.Empty:
                pass
            try:
                m = self.kc.get_shell_msg(timeout=0.05)
            except queue.Empty:
                continue
            if m["parent_header"].get("msg_id") == msg_id:
                return m, seen
        return None, seen

    def wait_answering(self, timeout: float = 60) -> None:
        """Until the kernel (perhaps replaced meanwhile) answers kernel_info on this client."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg_id = self.kc.kernel_info()
            t_end = time.monotonic() + 2
            while time.monotonic() < t_end:
                try:
                    reply = self.kc.get_shell_msg(timeout=0.5)
                except Exception:
                    continue
                if reply["parent_header"].get("msg_id") == msg_id:
                    return
        raise AssertionError("the kernel does not answer" + self.tail())

    def admin(self, msg: dict, timeout: float = 120) -> dict:
        ch = control.Channel.connect(self.km.provisioner._admin_path)
        try:
            return ch.request(msg, timeout=timeout)
        finally:
            ch.close()

    def tail(self) -> str:
        self.log.flush()
        return "\n--- kernel log ---\n" + self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        try:
            self.kc.stop_channels()
            if self.km.has_kernel:
                self.km.shutdown_kernel(now=True)
        finally:
            self.log.close()


@pytest.fixture
def kernels(tmp_path):
    started: list[Kernel] = []

    def start(**kw) -> Kernel:
        k = Kernel(tmp_path, **kw)
        started.append(k)
        return k
    yield start
    for k in started:
        try:
            k.stop()
        except Exception:
            pass


HOOKS = r'''
import nbcheckpoint
events = []
x = 41

@nbcheckpoint.on_checkpoint
def before(info):
    events.append(("checkpoint", info["name"]))

@nbcheckpoint.on_restore
def after(meta):
    events.append(("restore", meta["name"]))
    print("on_restore hook ran")

@nbcheckpoint.on_checkpoint
def broken():
    raise RuntimeError("this hook is broken")
'''


def test_checkpoint_returns_saved_then_restored_in_a_new_kernel(kernels, store):
    k = kernels()
    k.ok(HOOKS)
    out = k.ok("%checkpoint --wait first")
    assert "saved 'first'" in out and "MiB" in out and "kernel paused" in out, out
    assert "on_checkpoint hook broken failed" in out and "this hook is broken" in out, out  # reported, not fatal
    meta = store.get("first").meta
    assert meta["execution_count"] == 2 and meta["size_bytes"] > 0
    assert k.ok("print(events)").strip() == "[('checkpoint', 'first')]"
    k.ok("x = 0")
    k.stop()

    # a new kernel from the checkpoint: the %checkpoint --wait pending in the image returns again
    k2 = kernels(restore="first", wait=False)
    seen = k2.stream_until("restored from 'first'")
    assert "on_restore hook ran" in seen, seen
    assert "taken at" in seen and "after cell [2]" in seen, seen
    k2.kc.wait_for_ready(timeout=60)
    assert k2.ok("print(x, events)").strip() == "41 [('checkpoint', 'first'), ('restore', 'first')]"
    # the kernel goes on as itself: it can checkpoint again, and its history works
    assert "saved 'second'" in k2.ok("%checkpoint --wait second")
    assert "ERROR" not in k2.ok("y = 1\nprint(y)")
    assert store.get("second").meta["parent"] == "first"


def test_restore_in_place(kernels, store):
    k = kernels()
    k.ok(HOOKS)
    k.ok("import os, threading\nticks = [0]\n"
         "def tick():\n    while True:\n        ticks[0] += 1; threading.Event().wait(0.01)\n"
         "threading.Thread(target=tick, daemon=True).start()\n"
         "pid0 = os.getpid(); before = open('/proc/self/stat').read().split()[21]")
    assert "saved 'here'" in k.ok("%checkpoint --wait here")
    k.ok("x = 0; events.clear(); del ticks")
    shim = k.km.provisioner.process.pid
    mid = k.kc.execute("%restore here")    # the process it runs in ends; the restored one ends the cell
    t0 = time.monotonic()
    reply, seen = k.reply_of(mid)
    assert reply is not None and reply["content"]["status"] == "ok", (reply, seen)
    assert time.monotonic() - t0 < 10, "the %restore cell took more than 10 s to end"
    k.wait_answering()
    out = k.ok("import time; t0 = ticks[0]; time.sleep(0.2)\n"
               "print(x, events, ticks[0] > t0, os.getpid() == pid0,\n"
               "      open('/proc/self/stat').read().split()[21] != before)")
    assert out.strip() == "41 [('checkpoint', 'here'), ('restore', 'here')] True True True", out
    assert k.km.provisioner.process.pid == shim and k.km.is_alive()      # same kernel, same manager
    assert k.admin({"op": "status"})["restored_from"] == "here"
    # the restored kernel takes checkpoints and restores in place again
    assert "saved 'again'" in k.ok("%checkpoint --wait again")
    k.ok("x = -1")
    k.kc.execute("%restore again")
    k.wait_answering()
    assert k.ok("print(x)").strip() == "41"


def test_restore_errors_leave_the_kernel_untouched(kernels, store):
    k = kernels()
    k.ok("import os; x = 1; pid0 = os.getpid(); start0 = open('/proc/self/stat').read().split()[21]")
    out = k.error("%restore nope")
    assert "no checkpoint named 'nope'" in out and "Traceback" not in out, out
    out = k.error("%restore ../etc")
    assert "bad checkpoint name" in out, out
    out = k.error("%restore")
    assert "no checkpoint to go back to" in out, out
    # damaged: its metadata is gone
    k.ok("%checkpoint --wait dmg")
    (store.get("dmg").path / "meta.json").unlink()
    out = k.error("%restore dmg")
    assert "damaged" in out and "meta.json" in out, out
    out = k.ok("x += 1; print(x, os.getpid() == pid0, open('/proc/self/stat').read().split()[21] == start0)")
    assert out.strip() == "2 True True", out
    assert k.admin({"op": "status"})["restored_from"] is None


def test_checkpoint_refused_when_the_history_cannot_be_written(kernels, store, tmp_path, monkeypatch):
    """IPython's history database locked by someone else: its pending lines cannot be written,
    and an image taken now could hold the database mid-write.  %checkpoint says so and names
    the file; it does not report "saved"."""
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))      # a history file of our own
    k = kernels()
    hist = k.ok("hm = get_ipython().history_manager; hm.db_cache_size = 1000; print(hm.hist_file)").strip()
    assert hist.startswith(str(tmp_path)), hist
    k.ok("import sqlite3; lock = sqlite3.connect(hm.hist_file, isolation_level=None)\n"
         "lock.execute('BEGIN EXCLUSIVE')")
    out = k.error("%checkpoint --wait h")
    assert "could not write its history" in out and hist in out and "Traceback" not in out, out
    assert "saved" not in out and not store.list(), out
    k.ok("lock.execute('ROLLBACK')")
    assert "saved 'h'" in k.ok("%checkpoint --wait h")


def test_concurrent_checkpoints_are_refused(kernels, store):
    k = kernels()
    k.ok("import numpy as np; big = np.ones((512 << 20) // 8)")
    # a second %checkpoint --wait while one runs in this kernel (here: from a thread of it)
    out = k.ok(r'''
import threading, time
from nbcheckpoint.kernel import core
side = core.get()
res = {}
def bg():
    try:
        res["bg"] = side.checkpoint("one", quiet=True)["event"]
    except Exception as e:
        res["bg"] = repr(e)
t = threading.Thread(target=bg); t.start()
while not side.lock.locked() and t.is_alive():
    time.sleep(0.001)
try:
    get_ipython().run_line_magic("checkpoint", "two")
except Exception as e:
    print("refused:", e)
t.join()
print(res)
''')
    assert "refused: a checkpoint of this kernel is already running" in out, out
    assert "{'bg': 'saved'}" in out, out
    assert [c.name for c in store.list()] == ["one"]
    # the shim refuses a request from outside while the kernel's own runs
    k.kc.execute("%checkpoint --wait three")
    deadline = time.monotonic() + 60
    while not k.admin({"op": "status"})["busy"]:
        assert time.monotonic() < deadline, "the kernel's checkpoint never started"
        time.sleep(0.005)
    ans = k.admin({"op": "checkpoint", "name": "four"})
    assert ans["event"] == "error" and "already running" in ans["message"], ans
    k.wait_answering()
    assert sorted(c.name for c in store.list()) == ["one", "three"]


def test_checkpoints_browser(kernels, store):
    k = kernels()
    k.ok("x = 'w1'")
    k.ok("%checkpoint --wait w1")
    k.ok("x = 'w2'")
    k.ok("%checkpoint --wait w2")
    k.ok("x = 'now'")
    out, reply = k.run("%checkpoints")
    assert reply["status"] == "ok", out
    out = k.ok("from nbcheckpoint.kernel import browser\nb = browser.last\n"
               "print(list(b.rows), b.title.value)")
    assert "['w2', 'w1']" in out and "2 checkpoints" in out, out
    # Delete: the store and the list lose it
    out = k.ok("b.rows['w2'].delete.click()\nprint(list(b.rows), b.message)")
    assert "['w1']" in out and "deleted 'w2'" in out, out
    assert [c.name for c in store.list()] == ["w1"]
    # a failing operation shows in the status line, the kernel stays
    out = k.ok("b.restore('gone'); print(b.message, b.progress.layout.visibility)")
    assert "no checkpoint named 'gone'" in out and "hidden" in out, out
    # Restore: this kernel is replaced by w1
    k.kc.execute("b.rows['w1'].restore.click()")
    k.wait_answering()
    assert k.ok("print(x)").strip() == "w1"


def test_helper_mode_in_a_plain_kernel(kernels, store, tmp_path):
    k = kernels(kernel_name="python3")
    pid = k.km.provisioner.process.pid
    k.ok("%load_ext nbcheckpoint\nimport os, nbcheckpoint\nx = 41\nevents = []\n"
         "nbcheckpoint.on_restore(lambda meta: events.append(meta['name']))")
    out = k.ok("%checkpoint --wait plain")
    assert "saved 'plain'" in out and "Python 3 (checkpointable)" in out and "nbcheckpoint restore" in out, out
    meta = store.get("plain").meta
    assert meta["mode"] == "helper" and meta["pid"] == pid and set(meta["listeners"]) == {
        "shell", "iopub", "stdin", "control", "hb"}
    out = k.error("%restore plain")
    assert "Python 3 (checkpointable)" in out and "nbcheckpoint restore" in out, out
    out = k.error("%checkpoint --wait plain")
    assert "already exists" in out, out
    k.ok("x = 0")

    # the kernel dies; `nbcheckpoint restore` brings the checkpoint back on the same ports
    os.kill(pid, signal.SIGKILL)
    k.km.provisioner.process.wait(timeout=30)
    k.kc.stop_channels()
    pidfile = tmp_path / "restored.pid"
    r = subprocess.run(NBCK + ["restore", "-D", str(store.get("plain").image), "--tcp-close", "--file-locks",
                               "-d", "--pidfile", str(pidfile)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    restored = int(pidfile.read_text())
    try:
        assert nspids(restored)[-1] == pid          # (in a PID namespace of its own without root)
        kc = BlockingKernelClient(connection_file=k.km.connection_file)
        kc.load_connection_file()
        kc.start_channels()
        k.kc = kc
        seen = k.stream_until("restored from 'plain'")
        assert "after cell [2]" in seen, seen
        kc.wait_for_ready(timeout=60)
        time.sleep(1.5)       # its parent changed: ipykernel's parent poller must not stop it
        assert k.ok("print(x, events, os.getpid())").strip() == f"41 ['plain'] {pid}"
    finally:
        try:
            os.kill(restored, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_restore_in_place_from_another_kernel_adopts_the_key(kernels, store):
    a = kernels()
    a.ok("who = 'kernel a'")
    a.ok("%checkpoint --wait from-a")
    key_a = json.loads(Path(a.km.connection_file).read_text())["key"]
    a.stop()
    b = kernels()
    assert json.loads(Path(b.km.connection_file).read_text())["key"] != key_a
    b.ok("who = 'kernel b'")
    b.kc.execute("%restore from-a")
    # the restored kernel signs with b's key (the shim's `restored` event), or b's client
    # would drop everything it says
    b.wait_answering()
    assert b.ok("print(who)").strip() == "kernel a"
    assert b.ok("print(get_ipython().kernel.session.key.decode())").strip() == \
        json.loads(Path(b.km.connection_file).read_text())["key"]


def test_checkpoints_taken_from_outside_idle_and_mid_cell(kernels, store):
    """Checkpoints the kernel did not ask for (server, toolbar): the shim's `prepare` runs
    the on_checkpoint hooks, even while a cell keeps the main thread busy, and the
    restored kernel runs the on_restore hooks on its main thread."""
    k = kernels()
    k.ok(HOOKS)
    k.ok("import threading\nthreads = []\n"
         "@nbcheckpoint.on_restore\ndef where():\n"
         "    threads.append(threading.current_thread() is threading.main_thread())")
    ans = k.admin({"op": "checkpoint", "name": "idle"})        # as the toolbar button does
    assert ans["event"] == "saved", ans
    assert k.ok("print(events)").strip() == "[('checkpoint', 'idle')]"      # `prepare` names it
    # mid-cell: the checkpoint does not wait for the cell
    k.kc.execute("import time\ndone = []\nfor i in range(40):\n    time.sleep(0.1)\n    done.append(i)\n"
                 "print('loop finished', len(done), events)")
    time.sleep(0.5)
    t0 = time.monotonic()
    ans = k.admin({"op": "checkpoint", "name": "mid"})
    assert ans["event"] == "saved" and time.monotonic() - t0 < 5, (ans, time.monotonic() - t0)
    assert "did not answer 'prepare'" not in k.tail()
    k.stop()

    k2 = kernels(restore="mid", wait=False)
    seen = k2.stream_until("loop finished")            # the restored kernel finishes the cell
    assert "loop finished 40 [('checkpoint', 'idle'), ('checkpoint', 'mid')]" in seen, seen
    # the on_restore hooks wait for the main thread: they run once the cell is over
    k2.kc.wait_for_ready(timeout=60)
    assert k2.ok("print(events[2:], threads)").strip() == "[('restore', 'mid')] [True]"
    k2.stop()          # one copy of a kernel at a time: its internal loopback listener keeps its port

    k3 = kernels(restore="idle")
    # no magic was waiting in this image: the listener runs the hooks on the main thread
    deadline = time.monotonic() + 30
    while True:
        out = k3.ok("print(events, threads)")
        if "restore" in out or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert out.strip() == "[('checkpoint', 'idle'), ('restore', 'idle')] [True]", out


def test_restored_kernel_finishes_the_restore_cell_of_the_one_it_replaced(kernels, store, monkeypatch):
    """%restore sends the cell it runs in as `origin`; a `restored` event carrying it back
    makes the restored kernel end that cell for its client: output, execute_reply, idle.
    (The event is made here in the kernel itself, as the shim would send it.)"""
    monkeypatch.setenv("NBCHECKPOINT_CLIENT_WAIT", "1")
    k = kernels()
    code = ("from nbcheckpoint.kernel import core, frontend\n"
            "kernel = get_ipython().kernel\n"
            "origin = frontend.current_origin(kernel)\n"
            "core.get().listener._dispatch({'event': 'restored', 'id': 'none-pending', 'key': "
            "kernel.session.key.decode(), 'origin': origin, 'checkpoint': {'name': 'fake', 'created': 0}})\n")
    msg_id = k.kc.execute(code)
    replies, texts, idle = [], [], 0
    deadline = time.monotonic() + 60
    while (len(replies) < 2 or idle < 2) and time.monotonic() < deadline:
        try:
            m = k.kc.get_shell_msg(timeout=0.2)
            if m["parent_header"].get("msg_id") == msg_id:
                replies.append(m["content"])
        except Exception:
            pass
        try:
            m = k.kc.get_iopub_msg(timeout=0.2)
        except Exception:
            continue
        if m["parent_header"].get("msg_id") == msg_id:
            if m["msg_type"] == "stream":
                texts.append(m["content"]["text"])
            elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                idle += 1
    assert [r["status"] for r in replies] == ["ok", "ok"], replies
    assert idle == 2 and "restored in place from 'fake'" in "".join(texts), texts
    assert k.ok("print('still fine')").strip() == "still fine"


def test_checkpoint_returns_while_the_image_is_written(kernels, store):
    """%checkpoint without --wait returns once the kernel runs again; the shim writes the
    image from the snapshot and takes a %restore that comes meanwhile in turn."""
    k = kernels()
    k.ok("import numpy as np; a = np.ones((256 << 20) // 8); x = 41")
    out = k.ok("%checkpoint bg")
    assert "checkpoint 'bg' taken (kernel paused" in out and "background" in out, out
    k.ok("x = 0")
    mid = k.kc.execute("%restore bg")           # queued behind the write, then in place
    reply, seen = k.reply_of(mid, timeout=120)
    assert reply is not None and reply["content"]["status"] == "ok", (reply, seen)
    k.wait_answering()
    assert k.ok("print(x, float(a.sum()) == (256 << 20) // 8)").strip() == "41 True"
    assert store.get("bg").meta["frozen_s"] < store.get("bg").meta["total_s"]
