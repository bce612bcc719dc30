"""What the shim does to its kernel: launch, checkpoint, restore (docs/jupyter.md).

`Kernel` holds what the shim knows of the kernel it runs (pids, the checkpoint it
descends from, its lineage) and the operations on it.  They run in the shim's engine
thread, one at a time (shim.py): ptrace requests must come from the thread that attached,
and a restored init's PR_SET_PDEATHSIG follows the thread that created it.  They reach
the main thread only through the shim (`install`, `post`).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

from .. import control, engine
from ..control import CHANNELS, Channel
from ..engine import lazy, pstree, seize
from ..engine.sys import memory, proc
from ..kernel_image import checkpoint_meta, dump_options, outside_terminals, restore_options
from ..engine.units import format_size
from ..store import Store, StoreError, public_meta

CONTROL_FD = 3          # the kernel's end of the control socketpair, as the kernel sees it


def log(msg: str) -> None:
    sys.stderr.write(f"[nbcheckpoint shim {os.getpid()}] {msg}\n")
    sys.stderr.flush()


def progress(ch: Channel, rid, phase: str, done: int = 0, total: int = 0) -> None:
    ch.reply({"event": control.PROGRESS, "id": rid, "phase": phase, "done": done, "total": total})


class Kernel:
    def __init__(self, shim, args):
        self.shim = shim                          # its control channel, pty and main thread (shim.py)
        self.args = args
        self.store = Store(args.store)
        with open(args.connection_file) as f:
            self.conn = json.load(f)
        self.kernel_id = args.kernel_id or ""
        self.kernel_name = args.kernel_name or ""
        self.lineage = self.kernel_id or uuid.uuid4().hex
        self.parent: str | None = None           # the checkpoint this kernel descends from
        self.restored_from: str | None = None
        self.pidns = args.pidns
        self.init_pid = 0                         # the namespace's init (our child)
        self.kernel_pid = 0                       # the kernel, as we see it
        self.control_ino = 0
        self.preparing: dict[str, threading.Event] = {}   # prepare requests awaiting the kernel
        self.writing: str | None = None          # a checkpoint whose kernel runs again, being written
        self.lazy = None                          # the page server of a lazy restore, until it is served
        self.restored = None                      # engine.RestoreResult of the running kernel, if restored
        self.filling: str | None = None           # a restored kernel whose memory is coming in

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        if self.args.restore:
            listeners = {}
            for spec in self.args.listener:
                ch, _, fd = spec.partition("=")
                listeners[ch] = int(fd)
            self._restore(self.store.get(self.args.restore), listeners, req_id=None)
            for fd in listeners.values():
                os.close(fd)
        else:
            self._launch()

    def _launch(self) -> None:
        ours, theirs = control.socketpair()
        env = dict(os.environ)
        env.pop("JPY_PARENT_PID", None)           # ipykernel would watch the server, not us
        env[control.CONTROL_FD_ENV] = str(CONTROL_FD)
        env["NBCHECKPOINT_DIR"] = str(self.store.root)
        env["NBCHECKPOINT_KERNEL_ID"] = self.kernel_id
        slave = self.shim.pty_slave
        fds = {0: slave, 1: slave, 2: slave, CONTROL_FD: theirs.fileno()}
        argv = list(self.args.cmd)
        if self.pidns:
            self.init_pid, self.kernel_pid = pstree.spawn_init(argv, env, fds)
        else:
            self.init_pid = self.kernel_pid = self._spawn_plain(argv, env, fds)
        self.control_ino = os.fstat(theirs.fileno()).st_ino
        theirs.close()
        self.shim.install(Channel(ours))
        log(f"kernel started: pid {self.kernel_pid}" + (" in a new PID namespace" if self.pidns else ""))

    def _spawn_plain(self, argv, env, fds) -> int:
        """Without CAP_SYS_ADMIN: no namespace; restore then needs the same PIDs free."""
        pass_fds = [fds[CONTROL_FD], CONTROL_FD]
        p = subprocess.Popen(argv, env=env, stdin=fds[0], stdout=fds[1], stderr=fds[2],
                             pass_fds=pass_fds, start_new_session=True,
                             preexec_fn=lambda: os.dup2(pass_fds[0], CONTROL_FD))
        self._popen = p         # kept: subprocess would reap the child of a collected Popen
        return p.pid

    # ------------------------------------------------------------------ checkpoint

    def prepared(self, rid: str) -> None:
        """The kernel's answer to `prepare` (main thread)."""
        ev = self.preparing.get(rid)
        if ev is not None:
            ev.set()

    def _prepare(self, name: str, timeout: float = 10.0) -> None:
        """Before a checkpoint the kernel did not ask for itself (from the server or a tool):
        let the kernel side quiesce -- run its on_checkpoint hooks and write out IPython's
        history, so that no database transaction is open in the image.  A kernel without
        nbcheckpoint's extension never answers: go on after the timeout."""
        if self.shim.control is None:
            return
        pid = control.new_id()
        ev = self.preparing[pid] = threading.Event()
        try:
            self.shim.control.send({"event": control.PREPARE, "id": pid, "name": name})
            if not ev.wait(timeout):
                log(f"the kernel did not answer '{control.PREPARE}' (is nbcheckpoint's extension loaded?); "
                    "checkpointing it as it is")
        except control.ControlError:
            pass
        finally:
            self.preparing.pop(pid, None)

    def checkpoint(self, msg: dict, rid: str, ch: Channel) -> dict:
        name = msg.get("name") or self.store.new_name()
        pending = self.store.begin(name)
        t0 = time.time()
        if ch is not self.shim.control:
            self._prepare(name)
        try:
            stats = engine.dump(self.kernel_pid, pending.image, options=dump_options(),
                                progress=self._taken(ch, rid, name, self._progress(ch, rid)))
            meta = checkpoint_meta(
                pending.image, stats, self.conn, t0, kernel_id=self.kernel_id, kernel_name=self.kernel_name,
                notebook=msg.get("notebook"), execution_count=msg.get("execution_count"), parent=self.parent,
                lineage=self.lineage, pid=self.kernel_pid, pidns=self.pidns, control_ino=self.control_ino,
                request_id=rid)
            ck = pending.commit(meta)
        except BaseException:
            pending.abort()
            raise
        finally:
            self.writing = None
        self.parent = name
        log(f"checkpoint {name!r}: {format_size(ck.info.size_bytes)}, kernel frozen "
            f"{stats.frozen_seconds:.2f} s, {stats.total_seconds:.2f} s in all")
        return {"event": control.SAVED, "id": rid, "checkpoint": public_meta(ck.meta)}

    def _progress(self, ch, rid):
        last = [0.0]

        def cb(phase, done, total):
            now = time.monotonic()
            if phase == "pages" and done < total and now - last[0] < 0.1:
                return
            last[0] = now
            progress(ch, rid, phase, done, total)
        return cb

    def _taken(self, ch, rid, name, inner):
        """Progress that also says `taken` the moment the kernel runs again: the image is
        still being written (its pages come from a copy-on-write snapshot), so a caller
        may go on without waiting for `saved`."""
        t = [0.0]

        def cb(phase, done, total):
            if phase == "frozen":
                t[0] = time.monotonic()
            elif phase == "thawed":
                self.writing = name
                ch.reply({"event": control.TAKEN, "id": rid, "name": name,
                          "frozen_s": round(time.monotonic() - t[0], 4)})
            inner(phase, done, total)
        return cb

    # ------------------------------------------------------------------ restore

    def restore_in_place(self, msg: dict, rid: str, ch: Channel) -> dict:
        name = msg.get("name")
        if not name:
            raise StoreError("restore needs the name of a checkpoint (`nbcheckpoint ls` lists them)")
        ck = self.store.get(name)
        missing = [c for c in CHANNELS if c not in ck.info.listeners]
        if missing:
            raise StoreError(f"checkpoint {name!r} does not record the kernel's {', '.join(missing)} "
                             "listening sockets; it was not taken by nbcheckpoint's shim")
        curve = [(ck.info.connection or {}).get("curve_publickey"), self.conn.get("curve_publickey")]
        if curve[0] != curve[1]:
            # the image's ZeroMQ sockets hold its own keypair (or none): this kernel's clients
            # could not connect to them
            what = ("other CurveZMQ keys than this kernel" if all(curve) else
                    "CurveZMQ transport encryption, which this kernel does not use" if curve[0] else
                    "no CurveZMQ transport encryption, which this kernel uses")
            raise StoreError(f"checkpoint {name!r} was taken by a kernel with {what}: this kernel's "
                             "clients could not reach the restored one; restore it into a new kernel instead")
        listeners = self._grab_listeners()
        plan = None
        try:
            # everything restore checks, and every checksum, while the kernel still runs:
            # a damaged or unusable checkpoint leaves it untouched
            progress(ch, rid, "verifying")
            plan = _Plan(self, ck, listeners)
            engine.verify(ck.image, plan.opts)
            progress(ch, rid, "stopping")
            clients = proc.tcp_connections_to(int(self.conn.get("iopub_port") or 0))   # they come back to the restored one
            seize.kill_for_restore(self.kernel_pid, via=self.init_pid)   # the namespace goes with its init
            if self.restored is not None:
                self.restored.end()                  # its lifeline (the init is gone already)
                self.restored = None
        except BaseException:
            if plan is not None:
                plan.close()
            for fd in listeners.values():
                os.close(fd)
            raise
        try:
            self._restore(ck, listeners, rid, ch, origin=msg.get("origin"), plan=plan, clients=clients)
        except BaseException as e:
            # the old kernel is gone: let the manager's restarter start a fresh one
            log(f"in-place restore of {name!r} failed after the old kernel was stopped: {e}")
            self.shim.post(lambda: setattr(self.shim, "exit_code", 1))
            raise
        finally:
            for fd in listeners.values():
                os.close(fd)
        return {"event": control.REPLACED, "id": rid, "checkpoint": public_meta(ck.meta),
                "kernel_pid": self.kernel_pid}

    def _grab_listeners(self) -> dict[str, int]:
        """Our own copies of the running kernel's five channel listeners (pidfd_getfd)."""
        want = {self.conn.get(f"{c}_port"): c for c in CHANNELS}
        got: dict[str, int] = {}
        pidfd = memory.pidfd_open(self.kernel_pid)
        try:
            for fd in proc.fds(self.kernel_pid):
                try:
                    if not proc.fdlink(self.kernel_pid, fd).startswith("socket:"):
                        continue
                    dup = memory.pidfd_getfd(pidfd, fd, self.kernel_pid)
                except (OSError, engine.EngineError):
                    continue
                s = socket.socket(fileno=dup)
                try:
                    ok = (s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM
                          and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
                    ch = want.get(s.getsockname()[1]) if ok else None
                except OSError:
                    ch = None
                if ch and ch not in got:
                    got[ch] = s.detach()
                else:
                    s.close()
        finally:
            os.close(pidfd)
        if len(got) != len(CHANNELS):
            for fd in got.values():
                os.close(fd)
            raise engine.EngineError(f"the running kernel does not hold its channel listeners "
                                     f"({', '.join(sorted(set(CHANNELS) - set(got)))} missing); cannot restore in place")
        return got

    def _restore(self, ck, listeners: dict[str, int], req_id, ch=None, origin=None, plan=None,
                 clients: int = 1) -> None:
        plan = plan or _Plan(self, ck, listeners)
        try:
            res = engine.restore(ck.image, progress=self._progress(ch, req_id) if ch else None, options=plan.opts)
            self.control_ino = os.fstat(plan.theirs.fileno()).st_ino
        except BaseException:
            plan.close()
            raise
        plan.theirs.close()
        self.init_pid = res.init_pid or res.pid
        self.kernel_pid = res.pid
        self.restored = res
        self.restored_from = self.parent = ck.name
        self.lineage = ck.info.lineage or self.lineage
        chan = Channel(plan.ours)
        # the thread that was waiting on the control socket in the image wakes up with this
        restored = {"event": control.RESTORED, "id": ck.info.request_id, "checkpoint": public_meta(ck.meta),
                    "key": self.conn.get("key", ""),
                    # IOPub clients to wait for before speaking: the replaced kernel's (in place),
                    # or the first one of a new kernel (kernel/frontend.py)
                    "clients": clients}
        if origin:
            restored["origin"] = origin          # the %restore cell, for the restored kernel to end
        chan.reply(restored)
        self.shim.install(chan)
        self.lazy = res.lazy
        log(f"kernel restored from {ck.name!r}: pid {self.kernel_pid}, {res.seconds:.2f} s"
            + (f", {format_size(res.lazy.total)} of memory to come lazily" if res.lazy else ""))

    def can_be_lazy(self) -> bool:
        """Can this shim restore lazily?  If not, restores are full ones (the lazy_restore
        option is about speed: a user who did not turn it off expects a restore, not a refusal),
        and the log says why -- before anything is stopped."""
        why = lazy.unavailable()
        if why:
            log(f"restoring with all memory in place, not lazily: {why}")
        return why is None

    def fill_memory(self) -> None:
        """After a lazy restore (engine thread, the shim's `busy` held): serve the kernel's
        memory until all of it is in.  The kernel runs and answers meanwhile; checkpoint
        and restore requests wait for their turn."""
        server, self.lazy = self.lazy, None
        if server is None:
            return
        self.filling = self.restored_from
        t0 = time.monotonic()
        try:
            server.serve()
            log(f"memory of the restored kernel in: {format_size(server.done)} in "
                f"{time.monotonic() - t0:.2f} s ({server.faults} faults served first)")
        except engine.EngineError as e:
            log(f"the restored kernel was stopped: {e}")
        finally:
            self.filling = None


class _Plan:
    """What a restore of checkpoint `ck` hands in (--inherit-fd): the channel listeners,
    a fresh control socketpair end in place of the old one, our pty slave for its
    terminal; and the options that say so."""

    def __init__(self, kernel: Kernel, ck, listeners: dict[str, int]):
        meta = ck.info
        inherit = {f"socket:[{ino}]": listeners[c] for c, ino in meta.listeners.items() if c in listeners}
        self.ours, self.theirs = control.socketpair()
        if meta.control_ino:
            inherit[f"socket:[{meta.control_ino}]"] = self.theirs.fileno()
        try:
            for key in outside_terminals(ck.image):
                inherit[key] = kernel.shim.pty_slave
        except BaseException:
            self.close()
            raise
        self.opts = restore_options(bool(meta.pidns), kernel.args.lazy_pages and kernel.can_be_lazy(), inherit)

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()
