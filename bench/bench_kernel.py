#!/usr/bin/env python3
"""Benchmark of a live ipykernel: nbcheckpoint checkpoint/restore vs dill sessions.

    python bench/bench_kernel.py [--size-mib 1024] [--runs 5] [--images-dir DIR]

Run as root from the repository root (see docs/bench.md, "Kernel benchmark").  An
ipykernel is started by jupyter_client (independent=True) and made to hold --size-mib
MiB of numpy data (np.random.default_rng().random(...): every page touched and
incompressible).  Every run then, on that kernel:

 1. `nbcheckpoint dump --leave-running` through the CLI, images on disk, then on tmpfs:
    wall time of the command, the time the kernel was frozen and the engine's total
    (the CLI's summary line); the kernel must still answer.  The same with
    --no-snapshot (frozen while its memory is copied), for comparison (second
    in even runs, first in odd ones);
 2. `dill.dump_session(file)` in the kernel (file next to the disk images): time in the
    kernel, time of the cell as the client sees it, file size;
 3. `nbcheckpoint dump` (kills the kernel) to disk; image size vs the kernel's private
    dirty memory (smaps_rollup, read just before);
 4. restores it as a new manager would (tests/test_ipykernel.py): fresh listening
    sockets handed in with --inherit-fd, a connection file with the image's key,
    `nbcheckpoint restore -d --tcp-close`, then a new BlockingKernelClient sends `1+1`:
    time from the start (listeners) until its execute_reply arrives.  Once with the
    image evicted from the page cache (cold), once warm; after each, the kernel's data
    is checked (sum of the array, not timed);
 5. dumps that restored kernel to tmpfs (kill) and restores it from there, same way;
 6. a fresh kernel (launch -> ready timed) runs `dill.load_session(file)`, then `1+1`.

Once, in a small kernel, a generator, a running thread, an open file and a socket are
each offered to dill.dump_session alone (dill's error recorded; the one it saves is
loaded back in a fresh kernel and used), then the kernel holding all four goes through
nbcheckpoint and each object is used after the restore.

Medians over --runs (after --warmup discarded runs), min and max, are printed as a table
and written to bench/results/kernel-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# imported here, not in the timed code: a manager has them loaded already
from jupyter_client import BlockingKernelClient, KernelManager  # noqa: E402
from nbcheckpoint.engine.images import files_pb2, imagedir  # noqa: E402
from common import BenchError, evict, Owned, private_dirty, reap, rm, set_subreaper, stat  # noqa: E402

MIB = 1 << 20
NBCK = [sys.executable, "-m", "nbcheckpoint"]
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
TARGETS = {"checkpoint_s": 0.5, "restore_reply_s": 0.6}
CRIU_REF = {"version": "4.2", "checkpoint_s": 1.0, "restore_reply_s": 0.63,
            "note": "measured on another host (this VM's CRIU 3.17 cannot run on its kernel)"}
SUMMARY_RE = re.compile(r"frozen ([0-9.]+)s, total ([0-9.]+)s")


# --- processes ----------------------------------------------------------------------


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def cli(args: list[str], timeout: float, pass_fds=()) -> tuple[str, float]:
    """Run `nbcheckpoint ARGS`; return (stdout, wall seconds)."""
    t = time.monotonic()
    r = subprocess.run(NBCK + args, capture_output=True, text=True, timeout=timeout, pass_fds=pass_fds,
                       stdin=subprocess.DEVNULL)
    wall = time.monotonic() - t
    if r.returncode != 0:
        raise BenchError(f"nbcheckpoint {args[0]} exited {r.returncode}: {r.stderr.strip()[-600:]}")
    return r.stdout, wall


def ensure_dill() -> str:
    """dill in the interpreter the kernels run (jupyter_client uses sys.executable)."""
    probe = [sys.executable, "-c", "import dill; print(dill.__version__)"]
    r = subprocess.run(probe, capture_output=True, text=True)
    if r.returncode != 0:
        print("bench_kernel.py: dill is missing: pip install dill", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "dill"], check=True)
        r = subprocess.run(probe, capture_output=True, text=True, check=True)
    return r.stdout.strip()


# --- kernels -------------------------------------------------------------------------
def run_code(kc, code: str, timeout: float) -> tuple[str, dict, float]:
    """Execute code; (stdout and errors seen on IOPub, execute_reply content, wall seconds)."""
    out: list[str] = []

    def hook(msg):
        t = msg["msg_type"]
        if t == "stream":
            out.append(msg["content"]["text"])
        elif t == "error":
            out.append("\n".join(msg["content"]["traceback"]))
        elif t == "execute_result":
            out.append(msg["content"]["data"].get("text/plain", "") + "\n")
    t0 = time.monotonic()
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook, store_history=False)
    return "".join(out), reply["content"], time.monotonic() - t0


def run_ok(kc, code: str, timeout: float) -> tuple[str, float]:
    out, content, wall = run_code(kc, code, timeout)
    if content["status"] != "ok":
        raise BenchError(f"cell failed: {content.get('ename')}: {content.get('evalue')}\n{out[-1500:]}")
    return out, wall


def first_reply(kc, timeout: float) -> float:
    """Send `1+1` on shell; return the monotonic time its execute_reply arrives."""
    msg_id = kc.execute("1+1", store_history=False)
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg = kc.get_shell_msg(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise BenchError(f"no execute_reply within {timeout:.0f}s") from None
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_reply":
            if msg["content"]["status"] != "ok":
                raise BenchError(f"1+1 failed: {msg['content']}")
            return time.monotonic()


class Kernel:
    """One kernel process: launched by jupyter_client, or restored by nbcheckpoint."""

    def __init__(self, pid: int, kc, info: dict, popen=None):
        self.pid, self.kc, self.info, self.popen = pid, kc, info, popen
        self.dead = False
        Owned.pids.add(pid)

    @classmethod
    def launch(cls, work: str, tag: str, timeout: float) -> Kernel:
        cf = os.path.join(work, f"kernel-{tag}.json")
        log = open(os.path.join(work, f"kernel-{tag}.log"), "ab")
        t = time.monotonic()
        km = KernelManager(kernel_name="python3", connection_file=cf)
        km.cache_ports = False
        km.start_kernel(independent=True, stdout=log, stderr=log, cwd=work)
        log.close()
        popen = km.provisioner.process
        k = cls(popen.pid, km.client(), None, popen)
        k.km = km
        k.kc.start_channels()
        k.kc.wait_for_ready(timeout=timeout)
        k.start_s = time.monotonic() - t
        with open(cf) as f:
            k.info = json.load(f)
        return k

    def run(self, code: str, timeout: float) -> tuple[str, float]:
        return run_ok(self.kc, code, timeout)

    def gone(self, timeout: float) -> None:
        """The engine killed it (kill-mode dump): reap it, drop the client."""
        self.dead = True
        if self.popen is not None:
            self.popen.wait(timeout)
            Owned.pids.discard(self.pid)
        else:
            reap(self.pid, timeout)
        self.close_client()

    def kill(self) -> None:
        self.close_client()
        if self.dead:
            return
        self.dead = True
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.popen is not None:
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                pass
            Owned.pids.discard(self.pid)
        else:
            reap(self.pid)

    def close_client(self) -> None:
        try:
            self.kc.stop_channels()
        except Exception:                            # noqa: BLE001 -- best effort
            pass


def listeners_in_image(images: str) -> dict[int, int]:
    """socket inode -> port of every listening TCP socket in the image."""
    rd = imagedir.ImageReader(images)
    out = {}
    for f in rd.messages("files.img", files_pb2.FileEntry):
        if f.kind == files_pb2.INET and f.inet.state == 10:      # TCP_LISTEN
            out[f.inet.ino] = f.inet.src_port
    return out


def dump_kernel(k: Kernel, images: str, leave_running: bool, timeout: float, snapshot: bool = True) -> dict:
    """`nbcheckpoint dump` of a kernel through the CLI, as a user would run it."""
    pd = private_dirty(k.pid)
    args = ["dump", "-t", str(k.pid), "-D", images, "--tcp-established", "--file-locks"]
    if leave_running:
        args.append("--leave-running")
    if not snapshot:
        args.append("--no-snapshot")
    out, wall = cli(args, timeout)
    m = SUMMARY_RE.search(out)
    if not m:
        raise BenchError(f"no summary line in the CLI's output: {out!r}")
    rec = {"wall_s": wall, "frozen_s": float(m.group(1)), "total_s": float(m.group(2)),
           "image_bytes": dir_bytes(images), "private_dirty": pd}
    if leave_running:
        t = time.monotonic()
        rec["answers_after_s"] = first_reply(k.kc, timeout) - t    # still runs, same client
    return rec


def restore_kernel(images: str, old_info: dict, work: str, tag: str, timeout: float,
                   lazy: bool = False) -> tuple[Kernel, dict]:
    """As a new manager: fresh listeners, a connection file, CLI restore, a new client.

    Timed from the first listener created until the execute_reply of `1+1`.  lazy:
    `restore -d --pidns --lazy-pages`, whose CLI prints the pid once the kernel runs
    and exits once all its memory is in: the client starts at the pid (cli_s), and
    pages_in_s is when the CLI exited."""
    t0 = time.monotonic()
    old_ports = {old_info[f"{c}_port"]: c for c in CHANNELS}
    listeners, inherit, pass_fds = {}, [], []
    try:
        for ino, port in listeners_in_image(images).items():
            if port not in old_ports:
                continue                       # the kernel's own internal listener: recreated
            sk = socket.socket()
            sk.bind(("127.0.0.1", 0))
            sk.listen(128)
            listeners[old_ports[port]] = sk
            inherit += ["--inherit-fd", f"fd[{sk.fileno()}]:socket:[{ino}]"]
            pass_fds.append(sk.fileno())
        if sorted(listeners) != sorted(CHANNELS):
            raise BenchError(f"listeners in the image: {sorted(listeners)}, expected {sorted(CHANNELS)}")
        info = dict(old_info)
        for c, sk in listeners.items():
            info[f"{c}_port"] = sk.getsockname()[1]
        cf = os.path.join(work, f"kernel-{tag}.json")
        with open(cf, "w") as f:
            json.dump(info, f)
        pidfile = os.path.join(work, f"restored-{tag}.pid")
        t1 = time.monotonic()
        args = ["restore", "-D", images, "-d", "--pidfile", pidfile, "--tcp-close", "--file-locks"] + inherit
        if lazy:
            p = subprocess.Popen(NBCK + args + ["--pidns", "--lazy-pages"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, pass_fds=pass_fds, stdin=subprocess.DEVNULL)
            line = p.stdout.readline()         # the pid: the kernel runs
            cli_s = time.monotonic() - t1
            if not line.strip().isdigit():
                p.wait(timeout)
                raise BenchError(f"nbcheckpoint restore --lazy-pages: {p.stderr.read().strip()[-600:]}")
        else:
            _, cli_s = cli(args, timeout, pass_fds=pass_fds)
    finally:
        for sk in listeners.values():
            sk.close()                         # the kernel has its own copies now
    with open(pidfile) as f:
        pid = int(f.read())
    t2 = time.monotonic()
    kc = BlockingKernelClient(connection_file=cf)
    kc.load_connection_file()
    kc.start_channels()
    k = Kernel(pid, kc, info)
    t3 = first_reply(kc, timeout)
    rec = {"setup_s": t1 - t0, "cli_s": cli_s, "reply_s": t3 - t2, "total_s": t3 - t0}
    if lazy:
        if p.wait(timeout) != 0:
            raise BenchError(f"nbcheckpoint restore --lazy-pages exited {p.returncode}: {p.stderr.read()[-600:]}")
        rec["pages_in_s"] = time.monotonic() - t1
    return k, rec


# --- one measured run ---------------------------------------------------------------
STATE = """\
import numpy as np, time, dill, warnings
warnings.filterwarnings("ignore", category=DeprecationWarning)
_t = time.perf_counter()
big = np.random.default_rng().random({n})
print("fill", time.perf_counter() - _t)
print("sum", repr(float(big.sum())))
"""

DILL_DUMP = """\
_t = time.perf_counter()
dill.dump_session({path!r})
print("dill", time.perf_counter() - _t)
"""

# names that no saved session holds: load_session overwrites the globals it brings back
DILL_LOAD = """\
import time as _nbck_time, warnings as _nbck_warnings
_nbck_warnings.filterwarnings("ignore", category=DeprecationWarning)
_nbck_t = _nbck_time.perf_counter()
import dill
dill.load_session({path!r})
print("dill", _nbck_time.perf_counter() - _nbck_t)
"""


def _value(out: str, key: str) -> str:
    for line in out.splitlines():
        if line.startswith(key + " "):
            return line[len(key) + 1:]
    raise BenchError(f"no {key!r} line in the cell's output: {out[-500:]!r}")


def check_sum(k: Kernel, want: str, timeout: float) -> None:
    out, _ = k.run('print("sum", repr(float(big.sum())))', timeout)
    if _value(out, "sum") != want:
        raise BenchError(f"kernel {k.pid}: the array changed ({_value(out, 'sum')} != {want})")


def one_run(idx: int, n_floats: int, disk: str, shm: str, work: str, timeout: float) -> dict:
    rec: dict = {"loadavg_before": os.getloadavg()[0]}
    k = Kernel.launch(work, f"{idx}", timeout)
    try:
        rec["kernel_start_s"] = k.start_s
        out, rec["state_cell_s"] = k.run(STATE.format(n=n_floats), timeout)
        rec["fill_s"] = float(_value(out, "fill"))
        want = _value(out, "sum")

        # 1. --leave-running: the kernel pauses for `frozen`, the user waits for the CLI;
        #    and --no-snapshot, frozen while the memory is copied (second in even runs,
        #    first in odd ones: the first dump after the fill meets fresh memory)
        for where, base in (("disk", disk), ("shm", shm)):
            pair = [(f"{where}_dump_lr", True), (f"{where}_dump_lr_nosnap", False)]
            for key, snap in (pair if idx % 2 == 0 else pair[::-1]):
                path = os.path.join(base, f"lr-{idx}")
                rec[key] = dump_kernel(k, path, True, timeout, snapshot=snap)
                rm(path)

        # 2. dill.dump_session in the same kernel state (file in the disk images' dir)
        dill_file = os.path.join(disk, f"session-{idx}.pkl")
        out, cell_s = k.run(DILL_DUMP.format(path=dill_file), timeout)
        rec["dill_dump"] = {"kernel_s": float(_value(out, "dill")), "cell_s": cell_s,
                            "bytes": os.path.getsize(dill_file), "private_dirty": private_dirty(k.pid)}

        # 3. kill-mode dump to disk
        img = os.path.join(disk, f"img-{idx}")
        rec["disk_dump"] = dump_kernel(k, img, False, timeout)
        k.gone(timeout)

        # 4. restore -> first execute_reply: cold page cache, then warm
        evict(img)
        img_info = k.info                      # the ports the image's listeners were bound to
        k, rec["disk_restore_cold"] = restore_kernel(img, img_info, work, f"{idx}-cold", timeout)
        check_sum(k, want, timeout)
        k.kill()
        k, rec["disk_restore_lazy"] = restore_kernel(img, img_info, work, f"{idx}-lazy", timeout, lazy=True)
        check_sum(k, want, timeout)
        k.kill()
        k, rec["disk_restore_warm"] = restore_kernel(img, img_info, work, f"{idx}-warm", timeout)
        check_sum(k, want, timeout)
        rm(img)

        # 5. the restored kernel, to tmpfs and back
        img = os.path.join(shm, f"img-{idx}")
        rec["shm_dump"] = dump_kernel(k, img, False, timeout)
        k.gone(timeout)
        shm_info = k.info
        k, rec["shm_restore"] = restore_kernel(img, shm_info, work, f"{idx}-shm", timeout)
        check_sum(k, want, timeout)
        k.kill()
        k, rec["shm_restore_lazy"] = restore_kernel(img, shm_info, work, f"{idx}-shm-lazy", timeout, lazy=True)
        check_sum(k, want, timeout)
        k.kill()
        rm(img)

        # 6. dill: a fresh kernel loads the session
        k = Kernel.launch(work, f"{idx}-dill", timeout)
        out, cell_s = k.run(DILL_LOAD.format(path=dill_file), timeout)
        t = time.monotonic()
        reply = first_reply(k.kc, timeout) - t
        rec["dill_load"] = {"start_s": k.start_s, "kernel_s": float(_value(out, "dill")), "cell_s": cell_s,
                            "reply_s": reply, "total_s": k.start_s + cell_s + reply}
        check_sum(k, want, timeout)
        rm(dill_file)
    finally:
        k.kill()
        Owned.kill_all()
    rec["loadavg_after"] = os.getloadavg()[0]
    return rec


# --- what dill cannot save ------------------------------------------------------------
UNSAVABLE = {
    "generator": ("g", "def gen():\n    for i in range(10):\n        yield i * i\n"
                       "g = gen(); [next(g) for _ in range(4)]      # next is 16\n"),
    "thread": ("th", "ticks = [0]\ndef tick():\n    while True:\n        ticks[0] += 1; time.sleep(0.01)\n"
                     "th = threading.Thread(target=tick, daemon=True); th.start()\n"),
    "open file": ("f", "f = open('written.txt', 'w'); f.write('first half,'); f.flush()\n"),
    "socket": ("a", "a, b = socket.socketpair(); a.sendall(b'queued in a socket')\n"),
}
# after a restore: each object must still work
USE = {
    "generator": "assert next(g) == 16, 'next(g) != 16'",
    "thread": "_t0 = ticks[0]; time.sleep(0.2); assert ticks[0] > _t0 and th.is_alive(), 'thread not running'",
    "open file": ("f.write('second half'); f.close(); _c = open('written.txt').read()\n"
                  "assert _c == 'first half,second half', f'file holds {_c!r}, not first half,second half'"),
    "socket": "assert b.recv(100) == b'queued in a socket', 'socket data lost'",
}
HOLD_ALL = ("import sys\nsys._nbck_hold = {n: globals().pop(n) for n in %r}\n")
TRY_DILL = """\
globals().update({{n: sys._nbck_hold[n] for n in {names!r}}})
try:
    dill.dump_session({path!r}); print("dill saved")
except Exception as e:
    print("dill error", type(e).__name__ + ": " + str(e)[:300])
for _n in {names!r}:
    del globals()[_n]
"""


def _use_cell(obj: str) -> str:
    body = "".join(f"    {line}\n" for line in USE[obj].splitlines())
    return f"try:\n{body}    print('use ok')\nexcept Exception as e:\n    print('use error', type(e).__name__ + ': ' + str(e))\n"


def unsavable(disk: str, shm: str, work: str, timeout: float) -> dict:
    """Each object alone through dill.dump_session; all four through nbcheckpoint."""
    res: dict = {"dill": {}, "nbcheckpoint": {}}
    names = {"generator": ["g"], "thread": ["th"], "open file": ["f"], "socket": ["a", "b"]}
    all_names = [n for v in names.values() for n in v]
    vwork = os.path.join(work, "variant")
    os.makedirs(vwork)
    k = Kernel.launch(vwork, "variant", timeout)
    try:
        k.run("import dill, threading, time, socket, warnings\n"
              "warnings.filterwarnings('ignore', category=DeprecationWarning)\n"
              + "".join(code for _, code in UNSAVABLE.values()), timeout)
        k.run(HOLD_ALL % (all_names,), timeout)
        saved = {}
        for obj, ns in names.items():
            path = os.path.join(vwork, f"dill-{obj.replace(' ', '_')}.pkl")
            out, _ = k.run(TRY_DILL.format(names=ns, path=path), timeout)
            if "dill saved" in out:
                res["dill"][obj] = {"saved": True}
                saved[obj] = path
            else:
                res["dill"][obj] = {"saved": False, "error": _value(out, "dill error")}
        out, _ = k.run(TRY_DILL.format(names=all_names, path=os.path.join(vwork, "dill-all.pkl")), timeout)
        res["dill"]["all four"] = ({"saved": True} if "dill saved" in out
                                   else {"saved": False, "error": _value(out, "dill error")})
        k.run(f"globals().update({{n: sys._nbck_hold[n] for n in {all_names!r}}})", timeout)

        # what a saved object is worth: load it in a fresh kernel and use it
        # (the original kernel keeps its file open meanwhile, as it would in real use)
        for obj, path in saved.items():
            k2 = Kernel.launch(vwork, f"variant-{obj.replace(' ', '_')}", timeout)
            try:
                k2.run("import time, threading, socket", timeout)
                k2.run(DILL_LOAD.format(path=path), timeout)
                out, _ = k2.run(_use_cell(obj), timeout)
                res["dill"][obj]["after_load"] = "ok" if "use ok" in out else _value(out, "use error")
            finally:
                k2.kill()
            # put the file back as the nbcheckpoint check expects it
            if obj == "open file":
                with open(os.path.join(vwork, "written.txt"), "w") as f:
                    f.write("first half,")

        # nbcheckpoint: the kernel with all four, dumped (kill) and restored
        img = os.path.join(shm, "img-variant")
        d = dump_kernel(k, img, False, timeout)
        k.gone(timeout)
        k, r = restore_kernel(img, k.info, vwork, "variant-restored", timeout)
        res["nbcheckpoint"]["dump_wall_s"] = d["wall_s"]
        res["nbcheckpoint"]["restore_reply_s"] = r["total_s"]
        rm(img)
        for obj in names:
            out, _ = k.run(_use_cell(obj), timeout)
            res["nbcheckpoint"][obj] = "ok" if "use ok" in out else _value(out, "use error")
    except BenchError as e:
        res["error"] = str(e)
    finally:
        k.kill()
        Owned.kill_all()
    return res


# --- statistics and table ---------------------------------------------------------------


def summarize(runs: list[dict]) -> dict:
    s: dict = {}

    def add(key, fn):
        vals = []
        for r in runs:
            try:
                vals.append(fn(r))
            except (KeyError, ZeroDivisionError, TypeError):
                pass
        s[key] = stat(vals)

    for d in ("disk_dump_lr", "shm_dump_lr", "disk_dump_lr_nosnap", "shm_dump_lr_nosnap", "disk_dump", "shm_dump"):
        for k in ("wall_s", "frozen_s", "total_s", "answers_after_s"):
            add(f"{d}.{k}", lambda r, d=d, k=k: r[d][k])
        add(f"{d}.image_ratio", lambda r, d=d: r[d]["image_bytes"] / r[d]["private_dirty"])
        add(f"{d}.image_mib", lambda r, d=d: r[d]["image_bytes"] / MIB)
    for d in ("disk_restore_cold", "disk_restore_warm", "shm_restore", "disk_restore_lazy", "shm_restore_lazy"):
        for k in ("setup_s", "cli_s", "reply_s", "total_s", "pages_in_s"):
            add(f"{d}.{k}", lambda r, d=d, k=k: r[d][k])
    for k in ("kernel_s", "cell_s"):
        add(f"dill_dump.{k}", lambda r, k=k: r["dill_dump"][k])
    add("dill_dump.mib", lambda r: r["dill_dump"]["bytes"] / MIB)
    add("dill_dump.ratio", lambda r: r["dill_dump"]["bytes"] / r["dill_dump"]["private_dirty"])
    for k in ("start_s", "kernel_s", "cell_s", "reply_s", "total_s"):
        add(f"dill_load.{k}", lambda r, k=k: r["dill_load"][k])
    add("private_dirty_mib", lambda r: r["disk_dump"]["private_dirty"] / MIB)
    add("kernel_start_s", lambda r: r["kernel_start_s"])
    add("fill_s", lambda r: r["fill_s"])
    add("loadavg", lambda r: (r["loadavg_before"] + r["loadavg_after"]) / 2)
    return s


def fmt(st, digits=2, unit=""):
    if not st:
        return "n/a"
    if st["n"] == 1:
        return f"{st['median']:.{digits}f}{unit}"
    return f"{st['median']:.{digits}f}{unit} [{st['min']:.{digits}f}-{st['max']:.{digits}f}]"


def verdict(st, target) -> str:
    if not st:
        return ""
    return "OK" if st["median"] <= target else "MISS"


def render(res: dict) -> str:
    s = res["summary"]
    p = res["params"]
    W = (46, 24, 24, 10, 10)
    lines: list[str] = []

    def row(label, a="", b="", target="", ref="", ok=""):
        lines.append(f"{label:<{W[0]}}{a:<{W[1]}}{b:<{W[2]}}{target:<{W[3]}}{ref:<{W[4]}}{ok}".rstrip())

    def g(key, digits=2, unit=""):
        return fmt(s.get(key), digits, unit)

    def oks(keys, target):
        return "/".join(v for v in (verdict(s.get(k), target) for k in keys) if v)

    ct, rt = TARGETS["checkpoint_s"], TARGETS["restore_reply_s"]
    cr = res.get("criu_reference", CRIU_REF)
    lines.append(f"nbcheckpoint vs dill on a live ipykernel holding {p['size_mib']} MiB of numpy data "
                 f"(rng.random: every page touched)")
    lines.append(f"{res['runs_completed']} measured run(s) after {p['warmup']} warm-up; median [min-max], seconds; "
                 f"dill {res.get('dill_version', '?')}; 1-min load average {g('loadavg', 1)} (2 CPUs)")
    lines.append(f"CRIU {cr['version']}: {cr['note']}")
    lines.append("")
    row("", "files on disk", "files on tmpfs", "target", f"CRIU {cr['version']}", "")
    row("-" * (W[0] - 2), "-" * (W[1] - 2), "-" * (W[2] - 2), "-" * (W[3] - 2), "-" * (W[4] - 2), "----")
    lines.append("CHECKPOINT")
    row("nbcheckpoint dump (kill): CLI wall", g("disk_dump.wall_s"), g("shm_dump.wall_s"), f"<= {ct} s",
        f"{cr['checkpoint_s']} s", oks(["disk_dump.wall_s", "shm_dump.wall_s"], ct))
    row("  engine: freeze -> image durable", g("disk_dump.total_s"), g("shm_dump.total_s"))
    row("nbcheckpoint dump -R: kernel frozen", g("disk_dump_lr.frozen_s", 3), g("shm_dump_lr.frozen_s", 3),
        f"<= {ct} s", "", oks(["disk_dump_lr.frozen_s", "shm_dump_lr.frozen_s"], ct))
    row("  engine: freeze -> image durable", g("disk_dump_lr.total_s"), g("shm_dump_lr.total_s"))
    row("nbcheckpoint dump -R: CLI wall", g("disk_dump_lr.wall_s"), g("shm_dump_lr.wall_s"))
    row("  then 1+1 on the old client", g("disk_dump_lr.answers_after_s", 3), g("shm_dump_lr.answers_after_s", 3))
    row("dump -R --no-snapshot: kernel frozen", g("disk_dump_lr_nosnap.frozen_s"), g("shm_dump_lr_nosnap.frozen_s"),
        f"<= {ct} s", "", oks(["disk_dump_lr_nosnap.frozen_s", "shm_dump_lr_nosnap.frozen_s"], ct))
    row("  engine: freeze -> image durable", g("disk_dump_lr_nosnap.total_s"), g("shm_dump_lr_nosnap.total_s"))
    row("dill.dump_session (in the kernel)", g("dill_dump.kernel_s"), "", f"<= {ct} s", "",
        verdict(s.get("dill_dump.kernel_s"), ct))
    row("  the cell, as the client sees it", g("dill_dump.cell_s"))
    lines.append("RESTORE -> execute_reply of 1+1 on a new client")
    row("nbcheckpoint, image in page cache (warm)", g("disk_restore_warm.total_s"), g("shm_restore.total_s"),
        f"<= {rt} s", f"{cr['restore_reply_s']} s", oks(["disk_restore_warm.total_s", "shm_restore.total_s"], rt))
    row("  listeners + connection file", g("disk_restore_warm.setup_s", 3), g("shm_restore.setup_s", 3))
    row("  nbcheckpoint restore -d (CLI wall)", g("disk_restore_warm.cli_s"), g("shm_restore.cli_s"))
    row("  new client -> execute_reply", g("disk_restore_warm.reply_s", 3), g("shm_restore.reply_s", 3))
    row("nbcheckpoint --pidns --lazy-pages (warm)", g("disk_restore_lazy.total_s"), g("shm_restore_lazy.total_s"),
        f"<= {rt} s", f"{cr['restore_reply_s']} s",
        oks(["disk_restore_lazy.total_s", "shm_restore_lazy.total_s"], rt))
    row("  listeners + connection file", g("disk_restore_lazy.setup_s", 3), g("shm_restore_lazy.setup_s", 3))
    row("  restore -d until the pid (kernel runs)", g("disk_restore_lazy.cli_s"), g("shm_restore_lazy.cli_s"))
    row("  new client -> execute_reply", g("disk_restore_lazy.reply_s", 3), g("shm_restore_lazy.reply_s", 3))
    row("  CLI exits: all memory in", g("disk_restore_lazy.pages_in_s"), g("shm_restore_lazy.pages_in_s"))
    row("nbcheckpoint, image evicted (cold)", g("disk_restore_cold.total_s"), "", f"<= {rt} s", "",
        verdict(s.get("disk_restore_cold.total_s"), rt))
    row("  listeners + connection file", g("disk_restore_cold.setup_s", 3))
    row("  nbcheckpoint restore -d (CLI wall)", g("disk_restore_cold.cli_s"))
    row("  new client -> execute_reply", g("disk_restore_cold.reply_s", 3))
    row("dill: fresh kernel + load_session + 1+1", g("dill_load.total_s"), "", f"<= {rt} s", "",
        verdict(s.get("dill_load.total_s"), rt))
    row("  kernel launch -> ready", g("dill_load.start_s"))
    row("  load_session (in the kernel)", g("dill_load.kernel_s"))
    row("  load cell, as the client sees it", g("dill_load.cell_s"))
    row("  then 1+1 -> execute_reply", g("dill_load.reply_s", 3))
    lines.append("SIZE")
    row("kernel private dirty (smaps_rollup)     MiB", g("private_dirty_mib", 1))
    row("nbcheckpoint image (kill dump)          MiB", g("disk_dump.image_mib", 1), g("shm_dump.image_mib", 1))
    row("  / private dirty", g("disk_dump.image_ratio", 3, "x"), g("shm_dump.image_ratio", 3, "x"))
    row("dill session file                       MiB", g("dill_dump.mib", 1))
    row("  / private dirty", g("dill_dump.ratio", 3, "x"))
    lines.append("CONTEXT")
    row("kernel launch -> ready (jupyter_client)", g("kernel_start_s"))
    row("rng.random fill of the array in the kernel", g("fill_s"))
    cs = res.get("cli_startup") or {}
    if cs:
        row("CLI start: python / + import nbcheckpoint", fmt(stat(cs["python_s"])), fmt(stat(cs["import_cli_s"])))
    u = res.get("unsavable") or {}
    if u:
        lines.append("")
        lines.append("WHAT DILL CANNOT SAVE (kernel without the array; dill.dump_session with each object alone;")
        lines.append("a saved object is loaded in a fresh kernel and used; nbcheckpoint: the kernel holding all")
        lines.append("four, dumped and restored, then each object used)")
        for obj in list(UNSAVABLE) + ["all four"]:
            dd = u.get("dill", {}).get(obj)
            if dd is None:
                continue
            if dd.get("saved"):
                dtxt = "saved; after load: " + dd.get("after_load", "not loaded")
            else:
                dtxt = "FAILS: " + dd.get("error", "?")
            nb = u.get("nbcheckpoint", {}).get(obj, "")
            lines.append(f"  {obj:<10} dill: {dtxt}")
            if nb:
                lines.append(f"  {'':<10} nbcheckpoint: {'works after restore' if nb == 'ok' else nb}")
        if u.get("error"):
            lines.append(f"  error: {u['error']}")
    lines.append("")
    lines.append("Notes: kill-mode dumps return once the image is durable (fsync), dill.dump_session does not fsync.")
    lines.append("dump -R thaws the kernel once it is forked (a copy-on-write snapshot the image is read from),")
    lines.append("--no-snapshot once its memory is copied; both before the fsync. 'kernel frozen' is the pause the")
    lines.append("user feels. Fresh memory is slow and erratic on this VM (docs/bench.md): the copy into page")
    lines.append("cache/tmpfs and the restored address space are bound by first touch. Read medians, not single runs.")
    for e in res.get("errors", []):
        lines.append(f"error: {e}")
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------
def machine_info() -> dict:
    info = {"kernel": platform.release(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import ipykernel
        import jupyter_client
        import numpy
        info.update(ipykernel=ipykernel.__version__, jupyter_client=jupyter_client.__version__,
                    numpy=numpy.__version__)
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
        with open("/proc/meminfo") as f:
            info["mem_total_kb"] = int(f.readline().split()[1])
    except OSError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                                            text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "nbcheckpoint"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        info["engine_uncommitted_changes"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def cli_startup(n: int = 3) -> dict:
    """What every CLI call pays before the engine starts: the interpreter, then the imports."""
    out: dict = {"python_s": [], "import_cli_s": []}
    for _ in range(n):
        for key, code in (("python_s", "pass"), ("import_cli_s", "import nbcheckpoint.cli")):
            t = time.monotonic()
            subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, cwd=REPO)
            out[key].append(time.monotonic() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="numpy data the kernel holds (default 1024)")
    ap.add_argument("--runs", type=int, default=5, help="measured runs (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="discarded runs first (default 1)")
    ap.add_argument("--images-dir", default="/var/tmp/nbcheckpoint-bench",
                    help="where disk images and dill files go (default /var/tmp/nbcheckpoint-bench)")
    ap.add_argument("--shm-dir", default="/dev/shm", help="tmpfs for the in-memory comparison (default /dev/shm)")
    ap.add_argument("--no-variant", action="store_true", help="skip the generator/thread/file/socket variant")
    ap.add_argument("--time-budget", type=float, default=540.0,
                    help="stop starting new runs past this many seconds (default 540)")
    ap.add_argument("--timeout", type=float, default=120.0, help="limit for each step (default 120 s)")
    ap.add_argument("--output", help="JSON file (default bench/results/kernel-<date>.json)")
    ap.add_argument("--render", metavar="JSON", help="only print the table of a saved results file")
    args = ap.parse_args(argv)

    if args.render:
        with open(args.render) as f:
            res = json.load(f)
        res["summary"] = summarize(res["runs"])
        print(render(res))
        return 0
    if os.geteuid() != 0:
        print("bench_kernel.py: run as root (ptrace of any process, clone3 with set_tid)", file=sys.stderr)
        return 2

    # every CLI call imports nbcheckpoint: time it as a user's install would run it, with
    # bytecode compiled (this machine sets PYTHONDONTWRITEBYTECODE)
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(REPO, "nbcheckpoint")],
                   check=True, stdout=subprocess.DEVNULL)
    t_start = time.monotonic()

    def log(msg):
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    dill_version = ensure_dill()
    set_subreaper()
    os.makedirs(args.images_dir, mode=0o700, exist_ok=True)
    disk = tempfile.mkdtemp(prefix="kernel-", dir=args.images_dir)
    shm = tempfile.mkdtemp(prefix="nbcheckpoint-kbench-", dir=args.shm_dir)
    work = tempfile.mkdtemp(prefix="nbcheckpoint-kbench-work-")
    n_floats = args.size_mib * MIB // 8
    res: dict = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "params": {"size_mib": args.size_mib, "runs": args.runs, "warmup": args.warmup,
                   "images_dir": args.images_dir, "shm_dir": args.shm_dir},
        "machine": machine_info(), "targets": TARGETS, "criu_reference": CRIU_REF, "dill_version": dill_version,
        "runs": [], "warmup_runs": [], "errors": [],
    }
    try:
        res["cli_startup"] = cli_startup()
        if not args.no_variant:
            log("variant: generator, thread, open file, socket through dill and nbcheckpoint")
            try:
                res["unsavable"] = unsavable(disk, shm, work, args.timeout)
            except Exception as e:                   # noqa: BLE001 -- report and go on
                traceback.print_exc()
                res["errors"].append(f"variant: {type(e).__name__}: {e}")
            if (res.get("unsavable") or {}).get("error"):
                log(f"  variant: {res['unsavable']['error'][:300]}")
        total = args.warmup + args.runs
        durations: list[float] = []
        for i in range(total):
            elapsed = time.monotonic() - t_start
            if durations and elapsed + max(durations) > args.time_budget:
                res["errors"].append(f"time budget ({args.time_budget:.0f}s) reached: "
                                     f"{len(res['runs'])} measured run(s) of {args.runs}")
                log(res["errors"][-1])
                break
            kind = "warm-up" if i < args.warmup else "run"
            log(f"{kind} {i + 1}/{total}: kernel with {args.size_mib} MiB")
            t = time.monotonic()
            try:
                rec = one_run(i, n_floats, disk, shm, work, args.timeout)
            except Exception as e:                   # noqa: BLE001 -- report and go on
                traceback.print_exc()
                res["errors"].append(f"{kind} {i + 1}: {type(e).__name__}: {str(e)[:600]}")
                rec = None
            durations.append(time.monotonic() - t)
            if rec is not None:
                (res["warmup_runs"] if i < args.warmup else res["runs"]).append(rec)
                log(f"  dump -R frozen {rec['disk_dump_lr']['frozen_s']:.3f}s (--no-snapshot "
                    f"{rec['disk_dump_lr_nosnap']['frozen_s']:.2f}s), kill dump "
                    f"{rec['disk_dump']['wall_s']:.2f}s, restore->reply {rec['disk_restore_warm']['total_s']:.2f}s; "
                    f"dill dump {rec['dill_dump']['kernel_s']:.2f}s, start+load+reply "
                    f"{rec['dill_load']['total_s']:.2f}s ({durations[-1]:.0f}s)")
            elif "cannot checkpoint" in res["errors"][-1]:
                log("  the engine cannot dump this kernel: no point in more runs")
                break
    finally:
        Owned.kill_all()
        rm(disk)
        rm(shm)
        rm(work)
        try:
            os.rmdir(args.images_dir)
        except OSError:
            pass

    res["runs_completed"] = len(res["runs"])
    res["summary"] = summarize(res["runs"])
    res["seconds"] = time.monotonic() - t_start
    table = render(res)
    res["table"] = table.splitlines()
    out = args.output or os.path.join(HERE, "results", f"kernel-{_dt.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1, sort_keys=True)
        f.write("\n")
    print(table)
    print(f"\nresults: {out}  ({res['seconds']:.0f} s)")
    return 0 if res["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
