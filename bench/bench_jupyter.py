#!/usr/bin/env python3
"""Benchmark of the Jupyter layer: %checkpoint and restores through a real jupyter_server.

    python bench/bench_jupyter.py [--size-mib 1024] [--runs 5] [--store DIR]

Run as root from the repository root after `pip install -e .` (see docs/bench.md).  A
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

After 3 and 4 the data are checked (not timed).  Medians over --runs, min and max are
printed and written to bench/results/jupyter-<date>.json.  The checkpoint store is
--store (default: a directory on the disk under /var/tmp).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import requests

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from jupyter_client import BlockingKernelClient  # noqa: E402
from common import stat  # noqa: E402

KERNEL = "python3-checkpointable"
API = "/nbcheckpoint/api"


class Server:
    def __init__(self, base: str, store: str):
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
             "--ServerApp.port_retries=0"], env=env, stdout=self.log, stderr=self.log)
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
            kc.execute_interactive("1+1", timeout=5)
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
    for nm in (name, f"r{i}"):
        srv.call("DELETE", f"{API}/checkpoints/{nm}")
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--store", default=None, help="checkpoint store (default: on the disk, /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (server.log: the shims' timings)")
    args = ap.parse_args(argv)
    # the shim and the kernel import nbcheckpoint at every start: time them as a user's
    # install would run them, with bytecode compiled (this machine sets PYTHONDONTWRITEBYTECODE)
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(os.path.dirname(HERE), "nbcheckpoint")],
                   check=True, stdout=subprocess.DEVNULL)
    base = tempfile.mkdtemp(prefix="nbck-bench-jupyter-", dir="/var/tmp")
    store = args.store or os.path.join(base, "checkpoints")
    srv = Server(base, store)
    runs = []
    try:
        sess = srv.call("POST", "/api/sessions", json={"path": "bench.ipynb", "type": "notebook", "name": "bench.ipynb",
                                                      "kernel": {"name": KERNEL}})
        kc = srv.client(sess["kernel"]["id"])
        ready(kc)
        n = args.size_mib * (1 << 20) // 8
        run(kc, f"import numpy as np\na = np.random.default_rng(1).random({n})")
        kc.stop_channels()
        for i in range(args.runs):
            r = one_run(i, srv, sess, store, n)
            print(f"run {i}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if isinstance(v, float)),
                  flush=True)
            runs.append(r)
    finally:
        srv.stop()
        if args.keep:
            print(f"kept {base}", flush=True)
        else:
            shutil.rmtree(base, ignore_errors=True)
    keys = [k for k in runs[0] if isinstance(runs[0][k], float)]
    summary = {k: stat([r[k] for r in runs]) for k in keys}
    print(f"\nJupyter layer, {args.size_mib} MiB kernel, {args.runs} runs (median [min, max], seconds)")
    targets = {"magic_s": 0.5, "restore_new_kernel_first_reply_s": 1.0}
    for k in keys:
        s = summary[k]
        t = f"   target <= {targets[k]}" if k in targets else ""
        print(f"  {k:<36} {s['median']:8.3f}  [{s['min']:.3f}, {s['max']:.3f}]{t}")
    print(f"  magic output: {runs[-1]['magic_output']}")
    out = os.path.join(HERE, "results", f"jupyter-{_dt.date.today()}.json")
    with open(out, "w") as f:
        json.dump({"size_mib": args.size_mib, "runs": runs, "summary": summary,
                   "machine": {"kernel": platform.release(), "cpus": os.cpu_count()}}, f, indent=1)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
