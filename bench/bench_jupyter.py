#!/usr/bin/env python3
"""Benchmark of the Jupyter layer: %checkpoint and restores through a real jupyter_server.

    python bench/bench_jupyter.py [--size-mib 1024] [--runs 5] [--warmup 1]
    python bench/bench_jupyter.py --as-user USER [--user-python PATH] ...   # as root: root and USER

Run from the repository root with nbcheckpoint installed (`pip install -e .`: its kernelspec,
provisioner and server extension); the code measured is this checkout's (PYTHONPATH).  A
jupyter_server is started with a token; a notebook session gets a "Python 3
(checkpointable)" kernel holding --size-mib MiB of incompressible numpy data
(np.random.default_rng().random), and a BlockingKernelClient talks to it through its
connection file.  Every run:

 1. `%checkpoint NAME` in the kernel: the time the client waits for the cell (execute ->
    execute_reply), the time the kernel was frozen (the checkpoint's metadata), and the
    time until the image is complete (saved: it appears in the store);
 2. POST .../checkpoint through the REST API (returns once the image is complete);
 3. POST .../restore in place: from the request until `1+1` gets its execute_reply on
    the same client;
 4. DELETE the kernel, then POST .../restore with the notebook's session: the server
    starts a new kernel from the checkpoint and switches the session; from the request
    until `1+1` gets its execute_reply on a client of the new kernel.

After 3 and 4 the data are checked, and the run ends when the kernel is idle (a lazy
restore's memory all in); none of that is timed.

--as-user USER (as root) measures three sides in one invocation, each with its own server,
kernel, store and work dir: root with the provisioner's lazy_restore off (restores in full,
as an ordinary user's shim must: lazy restore is root's, docs/unprivileged.md), root with
lazy restore (its default), and USER (runuser, a clean environment, USER's venv python
--user-python, default ~USER/venv/bin/python, with this checkout on PYTHONPATH: USER must be
able to read it).  The sides take turns run by run (each first in turn), so that drift on
the machine falls on all of them alike; the table gives USER/root of the medians, like for
like (both restoring in full), and USER against root's lazy restores.

Medians over --runs (after --warmup runs per side, not counted), min and max are printed
and written to bench/results/jupyter-<date>[-USER].json with every run and both sides'
Python and package versions.  The checkpoint store is in each side's work dir under
--work-dir (default /var/tmp, on the disk), or --store for a single side.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import pwd
import secrets
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import requests

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from jupyter_client import BlockingKernelClient  # noqa: E402
from common import stat  # noqa: E402

KERNEL = "python3-checkpointable"
API = "/nbcheckpoint/api"


class Server:
    def __init__(self, base: str, store: str, lazy: bool | None = None):
        self.base = base
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.runtime = tempfile.mkdtemp(prefix="nbck-rt-")       # short: AF_UNIX paths
        env = dict(os.environ, JUPYTER_RUNTIME_DIR=self.runtime, JUPYTER_CONFIG_DIR=f"{base}/config",
                   JUPYTER_DATA_DIR=f"{base}/data", IPYTHONDIR=f"{base}/ipython", NBCHECKPOINT_DIR=store)
        env.pop("JPY_PARENT_PID", None)
        os.makedirs(f"{base}/root", exist_ok=True)
        self.log = open(f"{base}/server.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root", f"--port={self.port}",
             f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={base}/root",
             "--ServerApp.port_retries=0"]
            # the provisioner's lazy_restore (its shims' --no-lazy-pages), from the server's config
            + ([] if lazy is None else [f"--CheckpointableProvisioner.lazy_restore={lazy}"]),
            env=env, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url("/api/status"), headers=self.h, timeout=2).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.2)
        raise RuntimeError(f"jupyter_server did not start; see {base}/server.log")

    h = property(lambda self: {"Authorization": f"token {self.token}"})

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def call(self, method: str, path: str, **kw):
        r = requests.request(method, self.url(path), headers=self.h, timeout=600, **kw)
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text}")
        return r.json() if r.text else None

    def client(self, kid: str) -> BlockingKernelClient:
        kc = BlockingKernelClient(connection_file=os.path.join(self.runtime, f"kernel-{kid}.json"))
        kc.load_connection_file()
        kc.start_channels()
        return kc

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.runtime, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(kc, code: str, timeout: float = 600) -> tuple[str, dict, float]:
    out = []
    t0 = time.monotonic()
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=lambda m: out.append(
        m["content"].get("text", "") if m["msg_type"] == "stream" else
        "\n".join(m["content"].get("traceback", [])) if m["msg_type"] == "error" else ""))
    dt = time.monotonic() - t0
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"cell failed: {code!r}\n{''.join(out)}")
    return "".join(out), reply["content"], dt


def first_reply(kc, timeout: float = 120) -> None:
    """`1+1` until an execute_reply comes (the client may still be reconnecting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kc.execute_interactive("1+1", timeout=5, output_hook=lambda m: None)
            return
        except TimeoutError:
            continue
    raise RuntimeError("no execute_reply from the restored kernel")


def ready(kc, timeout: float = 120) -> None:
    """kernel_info until a reply: a standalone client's wait_for_ready can give up on
    its very first heartbeat, before the channel ever beat."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kc.kernel_info(reply=True, timeout=2)
            return
        except TimeoutError:
            continue
    raise RuntimeError("the kernel never answered kernel_info")


def wait_saved(store: str, name: str, timeout: float = 600) -> float:
    t0 = time.monotonic()
    while not os.path.exists(os.path.join(store, name, "meta.json")):
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"checkpoint {name} never completed")
        time.sleep(0.005)
    return time.monotonic() - t0


def wait_idle(srv: Server, kid: str, timeout: float = 600) -> float:
    """Until the kernel's shim is no longer busy (an image still being written, a lazy
    restore's memory still coming in)."""
    t0 = time.monotonic()
    while srv.call("GET", f"{API}/kernels/{kid}/status")["busy"]:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"kernel {kid} still busy after {timeout:.0f} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def one_run(i: int, srv: Server, sess: dict, store: str, n: int) -> dict:
    kid = sess["kernel"]["id"]
    kc = srv.client(kid)
    ready(kc)
    want = run(kc, "print(float(a[::4096].sum()))")[0].strip()
    r: dict = {}
    # 1. the magic
    name = f"m{i}"
    t0 = time.monotonic()
    out, _, r["magic_s"] = run(kc, f"%checkpoint {name}")
    r["magic_saved_s"] = r["magic_s"] + wait_saved(store, name) if not os.path.exists(
        os.path.join(store, name, "meta.json")) else time.monotonic() - t0
    meta = json.load(open(os.path.join(store, name, "meta.json")))
    r["magic_frozen_s"] = meta["frozen_s"]
    r["image_gib"] = meta["size_bytes"] / (1 << 30)
    r["magic_output"] = out.strip().splitlines()[-1] if out.strip() else ""
    # 2. REST checkpoint
    t0 = time.monotonic()
    m2 = srv.call("POST", f"{API}/kernels/{kid}/checkpoint", json={"name": f"r{i}"})
    r["rest_checkpoint_s"] = time.monotonic() - t0
    r["rest_frozen_s"] = (m2.get("checkpoint") or m2).get("frozen_s")
    run(kc, "a[:1000] = 0")                        # diverge, so a restore has work to show
    # 3. in place
    t0 = time.monotonic()
    srv.call("POST", f"{API}/kernels/{kid}/restore", json={"name": name, "session_id": sess["id"]})
    first_reply(kc)
    r["restore_in_place_first_reply_s"] = time.monotonic() - t0
    got = run(kc, "print(float(a[::4096].sum()))")[0].strip()
    assert got == want, (got, want)
    kc.stop_channels()
    # 4. into a new kernel
    srv.call("DELETE", f"/api/kernels/{kid}")
    t0 = time.monotonic()
    rep = srv.call("POST", f"{API}/kernels/{kid}/restore", json={"name": name, "session_id": sess["id"]})
    nkid = rep["kernel_id"]
    kc = srv.client(nkid)
    first_reply(kc)
    r["restore_new_kernel_first_reply_s"] = time.monotonic() - t0
    got = run(kc, "print(float(a[::4096].sum()))")[0].strip()
    assert got == want, (got, want)
    kc.stop_channels()
    sess["kernel"]["id"] = nkid
    # not timed: a lazily restored kernel's memory all in, before the next run (or side) starts
    r["settle_s"] = wait_idle(srv, nkid)
    for nm in (name, f"r{i}"):
        srv.call("DELETE", f"{API}/checkpoints/{nm}")
    return r


# ---------------------------------------------------------------- one side: a worker process
#
# Every side (root, root with lazy restore, the ordinary user) is this script run with
# --worker, as that user: it starts its own jupyter_server and kernel, then does one run per
# {"op": "run"} line on stdin and answers one JSON line on stdout. The caller interleaves the
# sides run by run, so that this VM's drift (fresh-memory speed, other sessions' load) falls
# on all of them alike.

def versions() -> dict:
    from importlib import metadata
    v = {"python": platform.python_version(), "executable": sys.executable}
    for dist in ("ipython", "ipykernel", "jupyter_client", "jupyter_server", "pyzmq", "numpy"):
        try:
            v[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            v[dist] = None
    import nbcheckpoint
    v["nbcheckpoint_from"] = os.path.dirname(os.path.abspath(nbcheckpoint.__file__))
    return v


def worker(args) -> int:
    proto = os.fdopen(os.dup(1), "w")             # the protocol's stdout; anything else printed goes to stderr
    os.dup2(2, 1)

    def send(msg: dict) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    base = tempfile.mkdtemp(prefix=f"nbck-bench-jupyter-{args.worker}-", dir=args.work_dir)   # 0700
    store = args.store or os.path.join(base, "checkpoints")
    os.makedirs(store, mode=0o700, exist_ok=True)
    srv = None
    try:
        srv = Server(base, store, lazy=args.lazy)
        sess = srv.call("POST", "/api/sessions", json={"path": "bench.ipynb", "type": "notebook", "name": "bench.ipynb",
                                                      "kernel": {"name": KERNEL}})
        kc = srv.client(sess["kernel"]["id"])
        ready(kc)
        n = args.size_mib * (1 << 20) // 8
        run(kc, f"import numpy as np\na = np.random.default_rng(1).random({n})")
        kc.stop_channels()
        dirs = {p: {"uid": os.stat(p).st_uid, "mode": oct(os.stat(p).st_mode & 0o7777)} for p in (base, store)}
        send({"ready": {"uid": os.getuid(), "user": pwd.getpwuid(os.getuid()).pw_name, "lazy_restore": args.lazy,
                        "versions": versions(), "dirs": dirs}})
        log_pos = os.path.getsize(f"{base}/server.log")
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] != "run":
                break
            r = one_run(cmd["i"], srv, sess, store, n)
            # which restores the shims made lazily: from their log lines (jupyter/operations.py)
            with open(f"{base}/server.log", "rb") as f:
                f.seek(log_pos)
                new = f.read().decode(errors="replace")
                log_pos = f.tell()
            r["restores"] = new.count("kernel restored from")
            r["lazy_restores"] = new.count("of memory to come lazily")
            send({"run": r})
    except BaseException:
        send({"error": traceback.format_exc(), "server_log": f"{base}/server.log"})
        raise
    finally:
        if srv:
            srv.stop()
        if args.keep:
            print(f"kept {base}", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


class Side:
    """A worker process and what it answered."""

    def __init__(self, label: str, cmd: list[str], env: dict | None, lazy: bool | None):
        self.label, self.cmd, self.env, self.lazy = label, cmd, env, lazy   # lazy None: the provisioner's default
        self.info: dict = {}
        self.runs: list[dict] = []
        self.warmup: list[dict] = []
        self.summary: dict = {}
        self.proc = None

    def start(self, args) -> None:
        argv = ["--worker", self.label, "--size-mib", str(args.size_mib), "--work-dir", args.work_dir] \
            + ([] if self.lazy is None else ["--lazy" if self.lazy else "--no-lazy"]) \
            + (["--keep"] if args.keep else []) + (["--store", args.store] if args.store else [])
        self.proc = subprocess.Popen(self.cmd + argv, env=self.env, cwd=REPO, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.info = self.recv(900)["ready"]

    def recv(self, timeout: float) -> dict:
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise RuntimeError(f"side {self.label}: no answer within {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"side {self.label}: the worker exited (status {self.proc.wait()}); see above")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"side {self.label} failed (server log: {msg['server_log']}, kept with --keep):\n"
                               f"{msg['error']}")
        return msg

    def run(self, i: int) -> dict:
        self.proc.stdin.write(json.dumps({"op": "run", "i": i}) + "\n")
        self.proc.stdin.flush()
        return self.recv(1800)["run"]

    def stop(self) -> None:
        if not self.proc or self.proc.poll() is not None:
            return
        try:
            self.proc.stdin.write(json.dumps({"op": "stop"}) + "\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------- the ordinary user's side

# run as the user with -c: can they reach the checkout, and does their python import it?
PROBE = r"""
import json, os, sys
repo = sys.argv[1]
d = "/"
for part in repo.strip("/").split("/"):
    d = os.path.join(d, part)
    if not os.access(d, os.X_OK | os.R_OK):
        print(json.dumps({"closed": d})); sys.exit()
missing = []
for m in ("nbcheckpoint", "numpy", "requests", "jupyter_client", "jupyter_server", "ipykernel"):
    try:
        __import__(m)
    except ImportError as e:
        missing.append(f"{m} ({e})")
import importlib.util
spec = importlib.util.find_spec("nbcheckpoint")
print(json.dumps({"missing": missing, "nbcheckpoint": spec and os.path.dirname(spec.origin)}))
"""


def user_cmd(pw, python: str) -> list[str]:
    """A command line running PYTHON as the user pw with a clean environment: their HOME, the
    venv's bin first on PATH, this checkout on PYTHONPATH (so that it is the code measured)."""
    return ["runuser", "-u", pw.pw_name, "--", "env", "-i", f"HOME={pw.pw_dir}", f"USER={pw.pw_name}",
            f"LOGNAME={pw.pw_name}", "LANG=C.UTF-8", f"PATH={os.path.dirname(python)}:/usr/local/bin:/usr/bin:/bin",
            f"PYTHONPATH={REPO}", python]


def check_user(pw, python: str) -> None:
    who = f"the ordinary user {pw.pw_name}"
    p = subprocess.run(user_cmd(pw, python) + ["-c", PROBE, REPO], capture_output=True, text=True, cwd="/")
    if p.returncode != 0 or not p.stdout.strip():
        raise SystemExit(f"bench_jupyter: {who} cannot run {python} ({p.stderr.strip() or p.returncode}): "
                         f"give their venv's python with --user-python (jupyter_server, ipykernel, numpy and "
                         f"requests installed in it, and nbcheckpoint with `pip install -e`)")
    got = json.loads(p.stdout.strip().splitlines()[-1])
    if "closed" in got:
        raise SystemExit(f"bench_jupyter: {who} cannot read this checkout ({REPO}): {got['closed']} is closed to "
                         f"them. Run the benchmark from a checkout they can read (e.g. `git worktree add` outside "
                         f"/root, readable or chowned to {pw.pw_name}), so that both sides run the same code")
    if got["missing"]:
        raise SystemExit(f"bench_jupyter: {python} of {who} lacks {', '.join(got['missing'])}: install them in "
                         f"that venv (pip install -e CHECKOUT installs nbcheckpoint, its kernelspec and server "
                         f"extension)")
    if os.path.realpath(got["nbcheckpoint"] or "") != os.path.realpath(os.path.join(REPO, "nbcheckpoint")):
        raise SystemExit(f"bench_jupyter: {python} of {who} imports nbcheckpoint from {got['nbcheckpoint']}, "
                         f"not from this checkout ({REPO}) even with PYTHONPATH set")


def compile_bytecode(pw=None, python: str | None = None) -> None:
    """The shim and the kernel import nbcheckpoint at every start: time them as an install
    runs them, with bytecode compiled (this machine sets PYTHONDONTWRITEBYTECODE). The user
    first, so that the files they own hold __pycache__ of theirs; CPython 3.11's .pyc are
    the same for every 3.11.x, so both sides use the same ones."""
    target = os.path.join(REPO, "nbcheckpoint")
    if pw:
        subprocess.run(user_cmd(pw, python) + ["-m", "compileall", "-q", target], cwd="/",
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "compileall", "-q", target], check=True, stdout=subprocess.DEVNULL)


# ---------------------------------------------------------------- results

ROWS = [("magic_s", "`%checkpoint` returns (cell round trip)"),
        ("magic_frozen_s", "kernel frozen during it"),
        ("magic_saved_s", "image complete"),
        ("rest_checkpoint_s", "REST checkpoint (returns when complete)"),
        ("restore_in_place_first_reply_s", "restore in place -> first reply"),
        ("restore_new_kernel_first_reply_s", "restore into a new kernel -> first reply")]
RESTORES = ROWS[4:]
TARGETS = {"magic_s": 0.5, "restore_new_kernel_first_reply_s": 1.0}     # issue #4's, one side
RATIO_TARGET = 1.10                                                      # issue #12: the user within 10% of root


def summarize(runs: list[dict]) -> dict:
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
    return {k: stat([r[k] for r in runs]) for k in keys}


def cell(s) -> str:
    return f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]" if s else "-"


def ratio(a, b):
    return a["median"] / b["median"] if a and b and b["median"] else None


def describe(v: dict) -> str:
    return (f"python {v['python']}, IPython {v['ipython']}, ipykernel {v['ipykernel']}, jupyter_client "
            f"{v['jupyter_client']}, jupyter_server {v['jupyter_server']}, pyzmq {v['pyzmq']}, numpy {v['numpy']} "
            f"({v['executable']})")


def version_note(a: Side, b: Side) -> str | None:
    va, vb = a.info["versions"], b.info["versions"]
    diff = [f"{k} {va[k]} vs {vb[k]}" for k in ("python", "ipython", "ipykernel", "jupyter_client",
                                                  "jupyter_server", "pyzmq", "numpy") if va[k] != vb[k]]
    return f"note: the two sides ran different versions ({a.label} vs {b.label}): {', '.join(diff)}" if diff else None


def lazy_check(side: Side) -> str | None:
    """Did the restores go as the side says (lazy or full)?  From the shims' log lines."""
    n, lazy = sum(r["restores"] for r in side.runs), sum(r["lazy_restores"] for r in side.runs)
    if side.label == "root-lazy" and lazy != n:
        return f"warning: {side.label}: only {lazy} of {n} restores were lazy"
    if side.label != "root-lazy" and lazy:
        return f"warning: {side.label}: {lazy} of {n} restores were lazy"
    return None


def table_one(side: Side, args) -> list[str]:
    s = side.summary
    lines = [f"Jupyter layer, {args.size_mib} MiB kernel, {args.runs} runs, as {side.info['user']} "
             f"(median [min-max], seconds)", f"  {describe(side.info['versions'])}", "",
             "| | median [min-max] | target |", "|---|---|---|"]
    for k, label in ROWS:
        t = f"<= {TARGETS[k]}" if k in TARGETS else ""
        lines.append(f"| {label} | {cell(s.get(k))} | {t} |")
    return lines + ["", f"magic output: {side.runs[-1]['magic_output']}"]


def table_compare(root: Side, lazy: Side, user: Side, args) -> list[str]:
    u = user.label
    load = stat([r["loadavg"] for sd in (root, lazy, user) for r in sd.runs])
    lines = [f"Jupyter layer, {args.size_mib} MiB kernel, {args.runs} runs + {args.warmup} warm-up per side, "
             f"root and {u} interleaved; median [min-max], seconds; 1-min load average {cell(load)}",
             f"  root: {describe(root.info['versions'])}",
             f"  {u}: {describe(user.info['versions'])}"]
    note = version_note(root, user)
    lines += [f"  {note}"] if note else []
    lines += [f"  {w}" for w in map(lazy_check, (root, lazy, user)) if w]
    gib = {sd.label: (sd.summary.get("image_gib") or {}).get("median") for sd in (root, user)}
    lines += ["", f"| | root | {u} | {u}/root | target |", "|---|---|---|---|---|"]
    for k, label in ROWS:
        if k == "magic_saved_s" and all(gib.values()):
            label += f" ({' / '.join(f'{v:.2f}' for v in gib.values())} GiB on disk)"
        q = ratio(user.summary.get(k), root.summary.get(k))
        verdict = "" if q is None else ("met" if q <= RATIO_TARGET else "missed")
        lines.append(f"| {label} | {cell(root.summary.get(k))} | {cell(user.summary.get(k))} | "
                     f"{'-' if q is None else f'{q:.2f}'} | <= {RATIO_TARGET:.2f}: {verdict} |")
    for k, label in RESTORES:
        q = ratio(user.summary.get(k), lazy.summary.get(k))
        lines.append(f"| root lazy (its default) vs {u}: {label} | "
                     f"{cell(lazy.summary.get(k))} | {cell(user.summary.get(k))} | "
                     f"{'-' if q is None else f'{q:.2f}'} | lazy restore is root's |")
    lines += ["", "root: lazy_restore off (restores in full, as an ordinary user's shim must); root lazy: "
              f"lazy_restore on, root's default; {u}: the default config (lazy requested, the shim restores in full)"]
    return lines


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-c", f"safe.directory={REPO}", "-C", REPO, "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="runs per side before the measured ones (not counted)")
    ap.add_argument("--as-user", metavar="USER",
                    help="as root: measure root and USER side by side, interleaved, with ratios USER/root")
    ap.add_argument("--user-python", metavar="PATH", help="USER's python (default: ~USER/venv/bin/python)")
    ap.add_argument("--store", default=None, help="checkpoint store (default: in each side's work dir)")
    ap.add_argument("--work-dir", default="/var/tmp", help="where each side makes its work dir (on the disk)")
    ap.add_argument("--output", help="result file (default: bench/results/jupyter-DATE[-USER].json)")
    ap.add_argument("--keep", action="store_true", help="keep the work dirs (server.log: the shims' timings)")
    ap.add_argument("--worker", metavar="LABEL", help=argparse.SUPPRESS)
    ap.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    me = [sys.executable, os.path.abspath(__file__)]
    if args.as_user:
        if os.geteuid() != 0:
            ap.error("--as-user needs root (it runs the user's side with runuser)")
        if args.store:
            ap.error("--store is for one side: with --as-user each side keeps its store in its own work dir")
        try:
            pw = pwd.getpwnam(args.as_user)
        except KeyError:
            ap.error(f"no user {args.as_user!r}")
        if pw.pw_uid == 0:
            ap.error("--as-user: give an ordinary user, not root")
        upy = args.user_python or os.path.join(pw.pw_dir, "venv", "bin", "python")
        check_user(pw, upy)
        compile_bytecode(pw, upy)
        sides = [Side("root", me, env, lazy=False), Side("root-lazy", me, env, lazy=True),
                 Side(pw.pw_name, user_cmd(pw, upy) + [os.path.abspath(__file__)], None, lazy=True)]
    else:
        compile_bytecode()
        sides = [Side(pwd.getpwuid(os.getuid()).pw_name, me, env, lazy=args.lazy)]
    try:
        for sd in sides:                                      # one at a time: the kernels' fill takes the CPUs
            sd.start(args)
            print(f"{sd.label}: ready, {describe(sd.info['versions'])}", flush=True)
            if args.as_user and sd is sides[-1]:
                for d, st in sd.info["dirs"].items():
                    if st["uid"] != pw.pw_uid or st["mode"] != "0o700":
                        raise RuntimeError(f"{sd.label}'s {d} is uid {st['uid']} mode {st['mode']}, not theirs 0700")
        for k in range(args.warmup + args.runs):
            for sd in sides[k % len(sides):] + sides[:k % len(sides)]:     # each side first in turn
                os.sync()                                     # the last side's writes out of the way (not timed)
                load = os.getloadavg()[0]
                r = sd.run(k)
                r["loadavg"] = load
                (sd.warmup if k < args.warmup else sd.runs).append(r)
                tag = "warm-up" if k < args.warmup else f"run {k - args.warmup}"
                print(f"{tag} {sd.label}: " + ", ".join(f"{n} {v:.3f}" for n, v in r.items()
                                                         if isinstance(v, float)), flush=True)
    finally:
        for sd in sides:
            sd.stop()
    for sd in sides:
        sd.summary = summarize(sd.runs)
    lines = table_compare(*sides, args) if args.as_user else table_one(sides[0], args)
    print("\n" + "\n".join(lines))
    out = args.output or os.path.join(HERE, "results", f"jupyter-{_dt.date.today()}"
                                      + (f"-{args.as_user}" if args.as_user else "") + ".json")
    with open(out, "w") as f:
        json.dump({"size_mib": args.size_mib, "runs": args.runs, "warmup": args.warmup, "git_commit": git_commit(),
                   "sides": {sd.label: {"lazy_restore": sd.lazy, "info": sd.info, "summary": sd.summary,
                                        "runs": sd.runs, "warmup_runs": sd.warmup} for sd in sides},
                   "ratios": ({k: ratio(sides[2].summary.get(k), sides[0].summary.get(k)) for k, _ in ROWS}
                              | {f"{k}_vs_root_lazy": ratio(sides[2].summary.get(k), sides[1].summary.get(k))
                                 for k, _ in RESTORES}) if args.as_user else None,
                   "table": lines, "machine": {"kernel": platform.release(), "cpus": os.cpu_count()}}, f, indent=1)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
