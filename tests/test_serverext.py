"""The server extension's REST API (nbcheckpoint/jupyter/serverext.py) against a real
jupyter_server, started as `python -m jupyter_server` with a token on a free port, a temp
root dir, NBCHECKPOINT_DIR and the Jupyter config/data/runtime dirs in temp dirs.

The extension, the kernelspec and the labextension must be there through the install
(`pip install -e .` puts them in <prefix>/etc/jupyter and <prefix>/share/jupyter):
nothing here enables them by hand.
"""
from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests
from jupyter_client import BlockingKernelClient
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from conftest import output_hook

KERNEL = "python3-checkpointable"
START_TIMEOUT = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jupyter_env(base: Path) -> dict:
    """An environment whose Jupyter dirs are all under BASE (no user config leaks in).

    The runtime dir is BASE/runtime, a symlink to a short directory: the kernels' admin
    sockets live there and an AF_UNIX path has at most 107 bytes.
    """
    env = dict(os.environ)
    if not (base / "runtime").exists():
        (base / "runtime").symlink_to(tempfile.mkdtemp(prefix="nbck-rt-"))
    for var in ("JUPYTER_TOKEN", "JUPYTER_PATH", "JUPYTER_CONFIG_PATH", "JPY_PARENT_PID"):
        env.pop(var, None)
    env.update(
        JUPYTER_CONFIG_DIR=str(base / "config"),
        JUPYTER_DATA_DIR=str(base / "data"),
        JUPYTER_RUNTIME_DIR=os.readlink(base / "runtime"),
        JUPYTER_PLATFORM_DIRS="1",
        IPYTHONDIR=str(base / "ipython"),
        NBCHECKPOINT_DIR=str(base / "checkpoints"),
        PYTHONUNBUFFERED="1",
    )
    for d in ("config", "data", "ipython", "checkpoints", "root"):
        (base / d).mkdir(exist_ok=True)
    return env


@dataclass
class Server:
    """A jupyter_server (or JupyterLab) subprocess; `api()` calls it with the token."""
    base: Path
    app: str = "jupyter_server"
    extra_args: list = field(default_factory=list)

    def __post_init__(self):
        self.env = jupyter_env(self.base)
        self.root = self.base / "root"
        self.runtime = self.base / "runtime"
        self.checkpoints = self.base / "checkpoints"
        self.token = uuid.uuid4().hex
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "server.log"
        self._log = open(self.log_path, "ab")
        cmd = [sys.executable, "-m", self.app, "--no-browser", "--allow-root",
               "--ip=127.0.0.1", f"--port={self.port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
               *self.extra_args]
        self.proc = subprocess.Popen(cmd, env=self.env, cwd=self.root, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.app} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.api("GET", "/api/status").status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{self.app} did not answer in {START_TIMEOUT} s:\n{self.log()}")
            time.sleep(0.25)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def api(self, method: str, path: str, *, token: str | None | bool = True, **kw) -> requests.Response:
        headers = kw.pop("headers", {})
        if token is True:
            token = self.token
        if token:
            headers["Authorization"] = f"token {token}"
        kw.setdefault("timeout", 300)
        return requests.request(method, self.url + path, headers=headers, **kw)

    def ok(self, method: str, path: str, status: int = 200, **kw):
        r = self.api(method, path, **kw)
        assert r.status_code == status, f"{method} {path}: {r.status_code} {r.text}\n--- server log:\n{self.log()}"
        return r.json() if r.content else None

    def stop(self) -> None:
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)      # shuts its kernels down
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for p in kids:                                # whatever it left behind (ours only)
            try:
                p.kill()
            except psutil.Error:
                pass
        self._log.close()
        shutil.rmtree(os.readlink(self.base / "runtime"), ignore_errors=True)


def wait_ready(kc, timeout: float = 60) -> None:
    """kernel_info answered on shell and IOPub subscribed (jupyter_client's wait_for_ready
    gives up on a kernel that misses a heartbeat while it starts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kc.kernel_info()
        try:
            msg = kc.get_shell_msg(timeout=2)
        except queue.Empty:
            continue
        if msg["msg_type"] == "kernel_info_reply":
            try:
                kc.get_iopub_msg(timeout=0.5)
                return
            except queue.Empty:
                continue
    raise AssertionError(f"the kernel did not answer kernel_info in {timeout} s")


def run_code(server: Server, kernel_id: str, code: str, timeout: float = 120) -> str:
    """Execute CODE in the kernel through its connection file; return its stdout."""
    kc = BlockingKernelClient()
    kc.load_connection_file(str(server.runtime / f"kernel-{kernel_id}.json"))
    kc.start_channels()
    try:
        wait_ready(kc)
        out = []
        reply = kc.execute_interactive(code, timeout=timeout, output_hook=output_hook(out, results=False))
        assert reply["content"]["status"] == "ok", "".join(out)
        return "".join(out)
    finally:
        kc.stop_channels()


def wait_kernel_gone(kernel_id: str, timeout: float = 30) -> None:
    """Until no process of the kernel (its shim, whose command line names it) is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = []
        for p in psutil.process_iter(["cmdline"]):
            if kernel_id in (p.info["cmdline"] or []):
                left.append(p)
        if not left:
            return
        time.sleep(0.1)
    raise AssertionError(f"kernel {kernel_id} still has processes {timeout} s after its shutdown")


def wait_for_kernels(server: Server, expected: set, timeout: float = 30) -> None:
    """Until the server's kernels are EXPECTED and no other kernel's process is left."""
    deadline = time.monotonic() + timeout
    while {k["id"] for k in server.ok("GET", "/api/kernels")} != expected:
        assert time.monotonic() < deadline, server.ok("GET", "/api/kernels")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("jupyter_server"))
    yield s
    s.stop()


API = "/nbcheckpoint/api"


def test_installed_by_pip(server):
    """The install put the kernelspec, the server extension config and the labextension in place."""
    env = server.env
    def jupyter(*args):
        r = subprocess.run([sys.executable, "-m", "jupyter", *args], env=env, capture_output=True,
                           text=True, timeout=120)
        return re.sub(r"\x1b\[[0-9;]*m", "", r.stdout + r.stderr)
    specs = json.loads(subprocess.run([sys.executable, "-m", "jupyter", "kernelspec", "list", "--json"],
                                      env=env, capture_output=True, text=True, check=True).stdout)
    assert KERNEL in specs["kernelspecs"]
    spec = specs["kernelspecs"][KERNEL]["spec"]
    assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == "nbcheckpoint-provisioner"
    out = jupyter("server", "extension", "list")
    assert re.search(r"nbcheckpoint\.jupyter\.serverext\s+enabled", out), out
    assert re.search(r"nbcheckpoint\.jupyter\.serverext\s+OK", out), out
    out = jupyter("labextension", "list")
    assert re.search(r"nbcheckpoint v\S+ enabled\s+OK", out), out
    # and the running server loaded it
    assert "nbcheckpoint: REST API at" in server.log()


@pytest.mark.parametrize("method,path", [
    ("GET", "/checkpoints"),
    ("GET", "/checkpoints/some-name"),
    ("DELETE", "/checkpoints/some-name"),
    ("POST", f"/kernels/{uuid.uuid4()}/checkpoint"),
    ("POST", f"/kernels/{uuid.uuid4()}/restore"),
    ("POST", "/restore"),
    ("GET", f"/kernels/{uuid.uuid4()}/status"),
])
def test_unauthenticated_rejected(server, method, path):
    for token in (None, "wrong-" + server.token):
        r = server.api(method, API + path, token=token, json={"name": "x"})
        assert r.status_code in (401, 403), (token, r.status_code, r.text)


def test_cookie_auth_needs_xsrf(server):
    """A browser session (cookie auth) must send the XSRF token with a POST/DELETE."""
    s = requests.Session()
    r = s.get(f"{server.url}/api/status", params={"token": server.token}, timeout=30)
    assert r.status_code == 200
    assert any(c.name.startswith("username-") or "login" in c.name for c in s.cookies), s.cookies
    kid = str(uuid.uuid4())
    assert s.get(f"{server.url}{API}/checkpoints", timeout=30).status_code == 200    # GET needs none
    r = s.post(f"{server.url}{API}/kernels/{kid}/checkpoint", json={}, timeout=30)
    assert r.status_code == 403, r.text
    r = s.delete(f"{server.url}{API}/checkpoints/some-name", timeout=30)
    assert r.status_code == 403, r.text
    xsrf = s.cookies.get("_xsrf")
    if not xsrf:                                  # some versions set it on a page, not on the API
        s.get(f"{server.url}/login", timeout=30)
        xsrf = s.cookies.get("_xsrf")
    assert xsrf
    r = s.post(f"{server.url}{API}/kernels/{kid}/checkpoint", json={},
               headers={"X-XSRFToken": xsrf}, timeout=30)
    assert r.status_code == 404, r.text           # authenticated: now the kernel is what is missing
    assert "no kernel" in r.json()["message"]


@pytest.mark.parametrize("method,path,body,status,words", [
    ("POST", "/kernels/not-a-uuid/checkpoint", {}, 400, "bad kernel id"),
    ("POST", "/kernels/..%2F..%2Fapi/checkpoint", {}, 400, "bad kernel id"),
    ("POST", "/kernels/NOT-A-UUID-AT-ALL-x/restore", {"name": "c"}, 400, "bad kernel id"),
    ("GET", "/checkpoints?kernel_id=123", None, 400, "bad kernel id"),
    ("GET", "/kernels/not-a-uuid/status", None, 400, "bad kernel id"),
    ("GET", "/kernels/{uuid}/status", None, 404, "no kernel"),
    ("POST", "/kernels/{uuid}/checkpoint", {}, 404, "no kernel"),
    ("POST", "/kernels/{uuid}/checkpoint", {"name": "../x"}, 404, "no kernel"),
    ("POST", "/kernels/{uuid}/restore", {"name": "../x"}, 400, "bad checkpoint name"),
    ("POST", "/kernels/{uuid}/restore", {}, 400, "name is required"),
    ("POST", "/restore", {"name": "../x"}, 400, "bad checkpoint name"),
    ("POST", "/restore", {"name": "a/b"}, 400, "bad checkpoint name"),
    ("POST", "/restore", {"name": 7}, 400, "bad checkpoint name"),
    ("POST", "/restore", {"name": "no-such-checkpoint"}, 404, "no checkpoint named"),
    ("POST", "/restore", "not json", 400, "not JSON"),
    ("POST", "/restore", "[" * 5000 + "]" * 5000, 400, "not JSON"),        # RecursionError in json
    ("POST", "/restore", b"\xff\xfe{", 400, "not JSON"),
    ("POST", "/restore", '"x' + "y" * (64 << 10) + '"', 400, "too large"),
    ("POST", "/restore", [{"name": "c"}], 400, "must be a JSON object"),
    ("POST", "/restore", {"name": "no-such-checkpoint", "session_id": 5}, 400, "session_id must be a string"),
    ("POST", "/restore", {"name": "no-such-checkpoint", "path": ["a"]}, 400, "path must be a string"),
    ("POST", "/kernels/{uuid}/restore", {"name": "c", "session_id": {}}, 400, "session_id must be a string"),
    ("POST", "/kernels/{uuid}/restore", "[" * 5000, 400, "not JSON"),
    ("POST", "/kernels/{uuid}/checkpoint", {"notebook": 5}, 400, "notebook must be a string"),
    ("POST", "/kernels/{uuid}/checkpoint", {"execution_count": True}, 400, "execution_count must be an integer"),
    ("GET", "/checkpoints/..%2Fx", None, 400, "bad checkpoint name"),
    ("DELETE", "/checkpoints/..%2Fx", None, 400, "bad checkpoint name"),
    ("DELETE", "/checkpoints/%2E%2E", None, 400, "bad checkpoint name"),
    ("DELETE", "/checkpoints/.hidden", None, 400, "bad checkpoint name"),
    ("GET", "/checkpoints/no-such-checkpoint", None, 404, "no checkpoint named"),
    ("DELETE", "/checkpoints/no-such-checkpoint", None, 404, "no checkpoint named"),
])
def test_bad_requests(server, method, path, body, status, words):
    path = path.replace("{uuid}", str(uuid.uuid4()))
    kw = {"data": body} if isinstance(body, (str, bytes)) else {"json": body} if body is not None else {}
    r = server.api(method, API + path, **kw)
    assert r.status_code == status, (r.status_code, r.text)
    assert words in r.json()["message"], r.json()
    assert not any(server.checkpoints.iterdir())


def new_session(server: Server, path: str, kernel: str = KERNEL) -> dict:
    return server.ok("POST", "/api/sessions", 201,
                     json={"path": path, "type": "notebook", "name": "", "kernel": {"name": kernel}})


async def _ws_execute(ws, code: str, timeout: float = 120) -> str:
    """Run CODE over a kernel websocket (jupyter_server's JSON protocol); its stdout."""
    msg_id = uuid.uuid4().hex
    await ws.write_message(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "t",
                   "session": "s", "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": True,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}))
    out, replied, idle = [], False, False
    deadline = time.monotonic() + timeout
    while not (replied and idle):
        raw = await asyncio.wait_for(ws.read_message(), max(1, deadline - time.monotonic()))
        assert raw is not None, "the kernel websocket closed"
        m = json.loads(raw)
        if m.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        t = m["header"]["msg_type"]
        if t == "stream":
            out.append(m["content"]["text"])
        elif t == "error":
            out.append("\n".join(m["content"]["traceback"]))
        elif t == "execute_reply":
            replied = True
        elif t == "status" and m["content"]["execution_state"] == "idle":
            idle = True
    return "".join(out)


def test_checkpoint_list_restore_delete(server):
    sess = new_session(server, "work/state.ipynb")
    kid, sid = sess["kernel"]["id"], sess["id"]
    assert run_code(server, kid, "x = 41\ng = iter(range(10))\nnext(g), next(g)\nprint('ok')") == "ok\n"

    # checkpoint, with a bad and a taken name first
    r = server.api("POST", f"{API}/kernels/{kid}/checkpoint", json={"name": "../x"})
    assert r.status_code == 400 and "bad checkpoint name" in r.json()["message"]
    r = server.api("POST", f"{API}/kernels/{kid}/checkpoint", json={"name": "c0", "execution_count": "7"})
    assert r.status_code == 400 and "execution_count" in r.json()["message"]
    meta = server.ok("POST", f"{API}/kernels/{kid}/checkpoint", json={"name": "c1", "execution_count": 7})
    assert meta["name"] == "c1" and meta["kernel_id"] == kid and meta["execution_count"] == 7
    assert meta["notebook"] == "work/state.ipynb"          # found from the kernel's session
    assert meta["size_bytes"] > 0 and meta["created"] > 0
    assert "key" not in (meta.get("connection") or {})     # the HMAC key never goes out
    r = server.api("POST", f"{API}/kernels/{kid}/checkpoint", json={"name": "c1"})
    assert r.status_code == 409 and "already exists" in r.json()["message"]
    auto = server.ok("POST", f"{API}/kernels/{kid}/checkpoint")      # a name chosen for us
    assert auto["name"] != "c1"

    # list, with filters
    names = [m["name"] for m in server.ok("GET", f"{API}/checkpoints")]
    assert set(names) >= {"c1", auto["name"]}
    assert {m["name"] for m in server.ok("GET", f"{API}/checkpoints", params={"kernel_id": kid})} \
        == {"c1", auto["name"]}
    assert server.ok("GET", f"{API}/checkpoints", params={"kernel_id": str(uuid.uuid4())}) == []
    assert {m["name"] for m in server.ok("GET", f"{API}/checkpoints",
                                         params={"notebook": "work/state.ipynb"})} >= {"c1"}
    one = server.ok("GET", f"{API}/checkpoints/c1")
    assert one["name"] == "c1" and "key" not in (one.get("connection") or {})
    server.ok("DELETE", f"{API}/checkpoints/{auto['name']}", 204)

    # restore in place: same kernel id, and a websocket client connected before stays usable
    async def in_place():
        url = f"ws://127.0.0.1:{server.port}/api/kernels/{kid}/channels?session_id=t-{uuid.uuid4().hex}"
        ws = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {server.token}"}))
        try:
            assert await _ws_execute(ws, "x = 0\nprint(next(g))") == "2\n"
            reply = await asyncio.to_thread(server.ok, "POST", f"{API}/kernels/{kid}/restore",
                                            json={"name": "c1", "session_id": sid})
            assert reply["in_place"] is True and reply["kernel_id"] == kid
            assert reply["session_id"] == sid
            assert reply["checkpoint"]["name"] == "c1"
            out = await _ws_execute(ws, "print(x, next(g))")
            assert out == "41 2\n", out
        finally:
            ws.close()
    asyncio.run(in_place())
    assert run_code(server, kid, "print(x)") == "41\n"

    # a second live copy while this kernel runs: it works, or fails saying so and leaves no
    # kernel behind (never an empty kernel passed off as the restored one)
    before = {k["id"] for k in server.ok("GET", "/api/kernels")}
    r = server.api("POST", f"{API}/restore", json={"name": "c1"})
    if r.status_code == 200:
        copy = r.json()["kernel_id"]
        assert run_code(server, copy, "print(x)") == "41\n"
        server.ok("DELETE", f"/api/kernels/{copy}", 204)
        wait_kernel_gone(copy)
    else:
        # the provisioner raises the shim's reason (409: the original holds what the copy needs)
        assert r.status_code == 409, r.text
        assert "restoring checkpoint 'c1' failed" in r.json()["message"], r.text
        wait_for_kernels(server, before)

    # the kernel goes away: restore starts a new kernel (the session went away with the old one)
    server.ok("DELETE", f"/api/kernels/{kid}", 204)
    wait_kernel_gone(kid)
    reply = server.ok("POST", f"{API}/kernels/{kid}/restore",
                      json={"name": "c1", "session_id": sid, "path": "work/state.ipynb"})
    new = reply["kernel_id"]
    assert reply["in_place"] is False and new != kid and reply["session_id"] is None
    assert run_code(server, new, "print(x, next(g))") == "41 2\n"
    assert all(s["kernel"]["id"] != kid for s in server.ok("GET", "/api/sessions"))
    # one live copy of a checkpoint at a time on one machine (its in-kernel listeners keep their ports)
    server.ok("DELETE", f"/api/kernels/{new}", 204)
    wait_kernel_gone(new)

    # a notebook on a kernel that cannot be checkpointed (plain python3)...
    plain = new_session(server, "work/plain.ipynb", kernel="python3")
    pkid = plain["kernel"]["id"]
    r = server.api("POST", f"{API}/kernels/{pkid}/checkpoint")
    assert r.status_code == 409 and "checkpointable" in r.json()["message"], r.text
    # ...gets the restored kernel instead: its session switched, its old kernel shut down
    reply = server.ok("POST", f"{API}/kernels/{pkid}/restore",
                      json={"name": "c1", "session_id": plain["id"]})
    assert reply["in_place"] is False and reply["session_id"] == plain["id"]
    new = reply["kernel_id"]
    assert server.ok("GET", f"/api/sessions/{plain['id']}")["kernel"]["id"] == new
    assert server.api("GET", f"/api/kernels/{pkid}").status_code == 404
    assert run_code(server, new, "print(x, next(g))") == "41 2\n"
    server.ok("DELETE", f"/api/sessions/{plain['id']}", 204)
    wait_kernel_gone(new)

    # POST restore: no kernel at all
    reply = server.ok("POST", f"{API}/restore", json={"name": "c1"})
    assert reply["in_place"] is False and reply["session_id"] is None
    new = reply["kernel_id"]
    assert run_code(server, new, "print(x, next(g))") == "41 2\n"

    # delete
    server.ok("DELETE", f"{API}/checkpoints/c1", 204)
    assert "c1" not in [m["name"] for m in server.ok("GET", f"{API}/checkpoints")]
    assert not (server.checkpoints / "c1").exists()
    r = server.api("DELETE", f"{API}/checkpoints/c1")
    assert r.status_code == 404
    r = server.api("POST", f"{API}/kernels/{new}/restore", json={"name": "c1"})
    assert r.status_code == 404 and "no checkpoint named" in r.json()["message"]
    server.ok("DELETE", f"/api/kernels/{new}", 204)
    wait_kernel_gone(new)


def test_bad_request_changes_nothing(server):
    """A request is checked whole before anything is done: a restore in place with a bad
    session_id used to restore the kernel and only then answer 400."""
    sess = new_session(server, "work/bad.ipynb")
    kid = sess["kernel"]["id"]
    assert run_code(server, kid, "x = 1\nprint('ok')") == "ok\n"
    server.ok("POST", f"{API}/kernels/{kid}/checkpoint", json={"name": "v1"})
    assert run_code(server, kid, "x = 2\nprint('ok')") == "ok\n"
    store = sorted(os.listdir(server.checkpoints))
    for body in ({"name": "v1", "session_id": 5}, {"name": "v1", "path": 5}):
        r = server.api("POST", f"{API}/kernels/{kid}/restore", json=body)
        assert r.status_code == 400 and "must be a string" in r.json()["message"], r.text
    for body in ('{"name": "v2", "notebook": ' + "[" * 5000 + "]" * 5000 + "}", '{"name": "v2", "notebook": 5}'):
        r = server.api("POST", f"{API}/kernels/{kid}/checkpoint", data=body)
        assert r.status_code == 400, r.text
    assert idle_status(server, kid)["restored_from"] is None
    assert run_code(server, kid, "print(x)") == "2\n"                # not rolled back
    assert sorted(os.listdir(server.checkpoints)) == store            # nothing taken
    server.ok("DELETE", f"/api/sessions/{sess['id']}", 204)
    wait_kernel_gone(kid)
    server.ok("DELETE", f"{API}/checkpoints/v1", 204)


def test_error_statuses(server):
    """The status says what failed, from the type of the error (before, every failure of the
    shim came back 500 from a checkpoint and 409 from a restore into a new kernel)."""
    sess = new_session(server, "work/errors.ipynb")
    kid = sess["kernel"]["id"]
    assert run_code(server, kid, "print('ok')") == "ok\n"
    # the name is being written (the shim's answer; the server sees no such checkpoint): 409
    partial = server.checkpoints / f".w.partial-{os.getpid()}"
    partial.mkdir()
    try:
        r = server.api("POST", f"{API}/kernels/{kid}/checkpoint", json={"name": "w"})
        assert r.status_code == 409 and "being written" in r.json()["message"], r.text
    finally:
        partial.rmdir()
    # a damaged checkpoint: its restore into a new kernel fails in the shim, 500; no kernel left
    server.ok("POST", f"{API}/kernels/{kid}/checkpoint", json={"name": "dmg"})
    files_img = server.checkpoints / "dmg" / "image" / "files.img"
    os.chmod(files_img, 0o600)
    files_img.write_bytes(files_img.read_bytes()[: files_img.stat().st_size // 2])
    before = {k["id"] for k in server.ok("GET", "/api/kernels")}
    r = server.api("POST", f"{API}/restore", json={"name": "dmg"})
    assert r.status_code == 500 and "restoring checkpoint 'dmg' failed" in r.json()["message"], r.text
    assert "files.img" in r.json()["message"], r.text
    wait_for_kernels(server, before)
    server.ok("DELETE", f"/api/sessions/{sess['id']}", 204)
    wait_kernel_gone(kid)


def idle_status(server: Server, kid: str, timeout: float = 60) -> dict:
    """GET kernels/KID/status once the shim is done (it holds `busy` a moment after a
    checkpoint's answer, and while a lazily restored kernel's memory comes in)."""
    deadline = time.monotonic() + timeout
    while True:
        st = server.ok("GET", f"{API}/kernels/{kid}/status")
        assert set(st) == {"busy", "starting", "restored_from", "lineage", "parent"}, st   # no pids, no paths
        if not (st["busy"] or st["starting"]) or time.monotonic() > deadline:
            return st
        time.sleep(0.1)


def test_kernel_status(server):
    sess = new_session(server, "work/status.ipynb")
    kid = sess["kernel"]["id"]
    assert run_code(server, kid, "y = 5\nprint('ok')") == "ok\n"
    assert idle_status(server, kid) == {"busy": False, "starting": False, "restored_from": None,
                                        "lineage": kid, "parent": None}
    server.ok("POST", f"{API}/kernels/{kid}/checkpoint", json={"name": "st1"})
    assert idle_status(server, kid) == {"busy": False, "starting": False, "restored_from": None,
                                        "lineage": kid, "parent": "st1"}
    # restored into a new kernel (the original goes first: one live copy per machine)
    server.ok("DELETE", f"/api/sessions/{sess['id']}", 204)
    wait_kernel_gone(kid)
    new = server.ok("POST", f"{API}/restore", json={"name": "st1"})["kernel_id"]
    assert idle_status(server, new) == {"busy": False, "starting": False, "restored_from": "st1",
                                        "lineage": kid, "parent": "st1"}
    assert run_code(server, new, "print(y)") == "5\n"
    server.ok("DELETE", f"/api/kernels/{new}", 204)
    wait_kernel_gone(new)
    # a plain ipykernel has no shim to ask
    plain = new_session(server, "work/plain-status.ipynb", kernel="python3")
    r = server.api("GET", f"{API}/kernels/{plain['kernel']['id']}/status")
    assert r.status_code == 409 and "has no checkpoint status" in r.json()["message"], r.text
    assert "checkpointable" in r.json()["message"], r.text
    server.ok("DELETE", f"/api/sessions/{plain['id']}", 204)
    server.ok("DELETE", f"{API}/checkpoints/st1", 204)
