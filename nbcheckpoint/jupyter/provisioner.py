"""CheckpointableProvisioner: launches kernels under the shim, and restores them.

Registered as ``nbcheckpoint-provisioner`` in ``jupyter_client.kernel_provisioners`` and
selected by the "Python 3 (checkpointable)" kernelspec.  It honours the provisioner
contract of jupyter_client (LocalProvisioner does the process bookkeeping; the process
it sees is the shim, which exits with the kernel's status), so it works from
jupyter_server, JupyterLab, jupyter console, nbclient and a plain KernelManager.

Extra launch argument: ``nbcheckpoint_restore=NAME`` (``km.start_kernel(...)``) starts
the kernel from a checkpoint instead: the five channel sockets are bound here (the old
ports when free, new ones otherwise), the connection file gets the image's key and
signature scheme, and the shim restores the image with those listeners in place of the
old ones.
"""
from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
import time
import uuid

from jupyter_client.provisioning import LocalProvisioner
from traitlets import Bool, Unicode

from .. import control
from ..control import CHANNELS
from ..engine.errors import NbcheckpointError, RestoreError
from ..store import BadName, NoSuchCheckpoint, Store, StoreError


class ShimError(NbcheckpointError):
    """The kernel's shim failed a request, could not be reached, or exited; the message is
    the shim's (for the user)."""


# the `kind`s of the shim's error answers (control.error) raised here as that type;
# any other kind: ShimError
SHIM_ERRORS = {c.__name__: c for c in (BadName, NoSuchCheckpoint, StoreError, control.Busy, RestoreError)}


class CheckpointableProvisioner(LocalProvisioner):
    checkpoint_dir = Unicode(
        "", config=True,
        help="Where checkpoints are stored (default: $NBCHECKPOINT_DIR, else "
             "<jupyter data dir>/nbcheckpoint). A shared filesystem lets another machine restore them.")
    pidns = Bool(
        True, config=True,
        help="Run each kernel in a PID namespace of its own, so a checkpoint can be restored "
             "anywhere without PID collisions. An ordinary user's kernel gets it inside a user "
             "namespace of its own (the kernel keeps the user's uid).")

    lazy_restore = Bool(
        True, config=True,
        help="Restore kernels lazily: the kernel answers as soon as it runs, and its big arrays "
             "come in from the checkpoint behind it (first the pages it touches). Needs the "
             "PID namespace (pidns) and userfaultfd (an ordinary user: vm.unprivileged_userfaultfd=1 "
             "or access to /dev/userfaultfd; without them the restore is a full one, and the shim's "
             "log says why). False: restore returns once all memory is in place.")

    _restore_name: str | None = None
    _restarting = False                            # cleanup(restart=True) came: a restart is next
    _listener_fds: list[int]
    _admin_path: str | None = None

    @property
    def store(self) -> Store:
        return Store(self.checkpoint_dir or None)

    # ------------------------------------------------------------------ launch

    async def pre_launch(self, **kwargs):
        # "Restart kernel" must give a fresh kernel, not this checkpoint again: the manager
        # replays its first launch's arguments on restart
        name = kwargs.pop("nbcheckpoint_restore", None)
        self._restore_name = None if self._restarting else name
        self._restarting = False
        self._listener_fds = []
        km = self.parent
        if self._restore_name:
            ck = self.store.get(self._restore_name)
            listeners = self._bind_listeners(km, ck.meta)
            conn = ck.meta.get("connection") or {}
            if conn.get("key"):
                km.session.key = conn["key"].encode()
            if conn.get("signature_scheme"):
                km.session.signature_scheme = conn["signature_scheme"]
            # a kernel that encrypted its transport (jupyter_client >= 8.10) keeps its CurveZMQ
            # keypair in memory: its clients need the same keys in the connection file
            for k in ("curve_publickey", "curve_secretkey"):
                if conn.get(k):
                    if not hasattr(km, k):
                        raise StoreError(f"checkpoint {self._restore_name!r} is of a kernel with CurveZMQ "
                                         "transport encryption, which this jupyter_client cannot set up "
                                         "(it needs jupyter_client >= 8.10)")
                    setattr(km, k, conn[k].encode())
            km.cache_ports = False
        kwargs = await super().pre_launch(**kwargs)
        kid = getattr(km, "kernel_id", None) or kwargs.get("kernel_id") or uuid.uuid4().hex
        runtime = os.path.dirname(km.connection_file) or "."
        self._admin_path = _admin_path(runtime, kid)
        cmd = list(kwargs["cmd"])
        if cmd and os.path.basename(cmd[0]) in ("python", "python3"):
            cmd[0] = sys.executable                # the Python this server runs, as ipykernel's own spec
        shim = [sys.executable, "-m", "nbcheckpoint.jupyter.shim",
                "--connection-file", km.connection_file, "--admin", self._admin_path,
                "--store", str(self.store.root), "--kernel-id", kid,
                "--kernel-name", getattr(km, "kernel_name", "") or ""]
        if not self.pidns:
            shim.append("--no-pidns")
        if not self.lazy_restore:
            shim.append("--no-lazy-pages")
        if self._restore_name:
            shim += ["--restore", self._restore_name]
            for ch, s in listeners.items():
                shim += ["--listener", f"{ch}={s.fileno()}"]
                self._listener_fds.append(s.detach())
            kwargs["pass_fds"] = tuple(self._listener_fds)
        kwargs["cmd"] = shim + ["--"] + cmd
        return kwargs

    def _bind_listeners(self, km, meta: dict) -> dict[str, socket.socket]:
        """The five channel listeners of a restored kernel: the old ports when free."""
        conn = meta.get("connection") or {}
        if conn.get("transport", "tcp") != "tcp":
            raise StoreError(f"checkpoint {meta.get('name')!r} used the {conn.get('transport')} transport; "
                             "only tcp kernels can be restored")
        missing = [c for c in CHANNELS if c not in (meta.get("listeners") or {})]
        if missing:
            raise StoreError(f"checkpoint {meta.get('name')!r} does not record the kernel's "
                             f"{', '.join(missing)} listeners; it was not taken by nbcheckpoint's shim")
        ip = km.ip or conn.get("ip") or "127.0.0.1"
        out = {}
        try:
            for ch in CHANNELS:
                s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((ip, int(conn.get(f"{ch}_port") or 0)))
                except OSError as e:
                    if e.errno != errno.EADDRINUSE:
                        raise
                    s.bind((ip, 0))
                s.listen(128)
                out[ch] = s
                setattr(km, f"{ch}_port", s.getsockname()[1])
        except BaseException:
            for s in out.values():
                s.close()
            raise
        km.ip = ip
        return out

    async def post_launch(self, **kwargs):
        for fd in self._listener_fds:              # the shim has its own copies now
            os.close(fd)
        self._listener_fds = []
        await super().post_launch(**kwargs)
        await self._wait_started(self._restore_name)
        if not self._restore_name:
            await self._wait_listening()

    async def _wait_started(self, name: str | None, timeout: float = 600) -> None:
        """Return once the shim has launched the kernel, or restored checkpoint `name`;
        raise with its error if that failed (otherwise the manager would take a dead start
        for a kernel, wait for it in vain, and a restarter would quietly replace it)."""
        what = f"restoring checkpoint {name!r}" if name else "starting the kernel"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise ShimError(f"{what} failed: the kernel's shim exited "
                                f"with status {self.process.returncode if self.process else '?'} (see the server log)")
            try:
                st = await self._request({"op": control.STATUS}, timeout=5)
            except (control.ControlError, OSError, TimeoutError):
                await asyncio.sleep(0.02)
                continue
            except NbcheckpointError as e:                 # the shim's answer: the type it gave
                raise type(e)(f"{what} failed: {e}") from None
            if st.get("restored_from") == name if name else not st.get("starting"):
                return
            await asyncio.sleep(0.02)
        raise ShimError(f"{what} did not finish within {timeout:.0f} s")

    async def _wait_listening(self, timeout: float = 60) -> None:
        """Return once the new kernel accepts connections on its channel ports (tcp), or
        its shim exited, or after `timeout` (the manager's own wait then decides).  A client
        that connects before the kernel listens retries each socket on its own (ZeroMQ,
        every 100 ms): its shell could then get the first reply before its IOPub
        subscription is in, and a client that waits for that cell's "idle" on IOPub
        (jupyter console) waited for ever.  Once the ports listen, all of a client's sockets
        connect at once.  (A restored kernel's listeners are bound before it starts.)"""
        km = self.parent
        if getattr(km, "transport", "tcp") != "tcp":
            return
        ports = [getattr(km, f"{ch}_port", 0) for ch in CHANNELS]
        ports = [p for p in ports if p]
        deadline = time.monotonic() + timeout
        while ports and time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return                      # the manager sees the exit and says so
            try:
                _, w = await asyncio.wait_for(asyncio.open_connection(km.ip or "127.0.0.1", ports[0]), 1)
                w.close()
                ports.pop(0)
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.02)

    # ------------------------------------------------------------------ checkpoint / restore

    async def _request(self, msg: dict, progress=None, timeout: float | None = None) -> dict:
        path = self._admin_path
        if not path or not self.has_process:
            raise ShimError("this kernel is not running under nbcheckpoint's shim")

        def call():
            for _ in range(200):                        # the shim may still be binding its socket
                if os.path.exists(path) or self.process is None or self.process.poll() is not None:
                    break
                time.sleep(0.05)
            ch = control.Channel.connect(path)
            try:
                return ch.request(msg, on_progress=progress, timeout=timeout)
            finally:
                ch.close()
        ans = await asyncio.get_running_loop().run_in_executor(None, call)
        if ans.get("event") == control.ERROR:
            raise SHIM_ERRORS.get(ans.get("kind"), ShimError)(ans.get("message") or "the shim reported an error")
        return ans

    async def checkpoint(self, name: str | None = None, notebook: str | None = None,
                         execution_count: int | None = None, progress=None) -> dict:
        """Checkpoint the running kernel (it goes on); returns the checkpoint's metadata."""
        if name is not None:
            Store.validate_name(name)
        ans = await self._request({"op": control.CHECKPOINT, "name": name, "notebook": notebook,
                                   "execution_count": execution_count}, progress)
        return ans["checkpoint"]

    async def restore_in_place(self, name: str, progress=None) -> dict:
        """Replace the running kernel by checkpoint NAME: same kernel id, same ports."""
        Store.validate_name(name)
        ans = await self._request({"op": control.RESTORE, "name": name}, progress)
        return ans["checkpoint"]

    async def status(self) -> dict:
        return await self._request({"op": control.STATUS})

    async def cleanup(self, restart: bool = False) -> None:
        self._restarting = restart
        if self._admin_path:
            try:
                os.unlink(self._admin_path)
            except OSError:
                pass
        await super().cleanup(restart=restart)


def _admin_path(runtime: str, kid: str) -> str:
    """The shim's admin socket: in Jupyter's runtime dir, or, where that path would be too
    long for a unix socket (108 bytes), in a private directory under /tmp."""
    path = os.path.join(runtime, f"nbcheckpoint-{kid}.sock")
    if len(os.fsencode(path)) < 100:
        return path
    d = os.path.join("/tmp", f"nbcheckpoint-{os.getuid()}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.lstat(d)
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or not os.path.isdir(d):
        raise ShimError(f"{d} must be a directory private to you (mode 0700) for the kernel's admin socket")
    return os.path.join(d, f"{kid[:36]}.sock")
