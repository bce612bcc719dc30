"""The shim: a checkpointable kernel's ancestor, tracer and voice (docs/jupyter.md).

``python -m nbcheckpoint.jupyter.shim --connection-file CF [...] -- KERNEL ARGV...``

Launched by CheckpointableProvisioner in place of the kernel.  It

* starts the kernel as PID 2 of a new PID namespace (engine.pstree.spawn_init), its
  stdio on a pty whose master it forwards to its own stdout (the server's log), fd 3 the
  kernel's end of the control socketpair;
* serves checkpoint/restore/status requests from the kernel (control) and from the
  provisioner or tools (the admin socket), one operation at a time, in one engine thread
  (ptrace requests must come from the thread that attached);
* forwards signals to the kernel and exits with the kernel's status when it dies.

Threads: the main thread owns the selector (pty, sockets, signals, the init's pidfd);
the engine thread runs dumps and restores.  The main thread never calls waitpid while
an operation runs: a wait could consume ptrace stops of the engine thread's tracees.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
import tty
import uuid

from .. import control, engine
from ..engine import Options, pstree, seize
from ..engine.show import objects
from ..engine.sys import libc, memory, proc
from ..engine.sys.x86_64 import NR
from ..engine.units import format_size
from ..store import Store, StoreError, public_meta

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
             signal.SIGWINCH)
CONTROL_FD = 3          # the kernel's end of the control socketpair, as the kernel sees it


def log(msg: str) -> None:
    sys.stderr.write(f"[nbcheckpoint shim {os.getpid()}] {msg}\n")
    sys.stderr.flush()


class Shim:
    def __init__(self, args):
        self.args = args
        self.store = Store(args.store)
        self.cf = args.connection_file
        with open(self.cf) as f:
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
        self.control: control.Channel | None = None
        self.busy = threading.Lock()
        self.jobs: queue.Queue = queue.Queue()
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.posted: queue.Queue = queue.Queue()  # callables the engine thread hands the main thread
        self.exit_code: int | None = None
        self.pidfd = -1
        self.pidfd_watched = False
        self.starting = True
        self.start_error: BaseException | None = None
        self.exit_deadline = 0.0
        self.preparing: dict[str, threading.Event] = {}   # prepare requests awaiting the kernel
        self.writing: str | None = None          # a checkpoint whose kernel runs again, being written
        self.lazy = None                          # the page server of a lazy restore, until it is served
        self.restored = None                      # engine.RestoreResult of the running kernel, if restored
        self.filling: str | None = None           # a restored kernel whose memory is coming in
        # the pty: the shim keeps the slave open, so the master never sees EIO and a
        # restored kernel can be handed the same terminal (--shell-job / inherit-fd)
        self.pty_master, self.pty_slave = os.openpty()
        tty.setraw(self.pty_slave)               # the log gets the kernel's bytes as written
        os.set_inheritable(self.pty_slave, False)
        os.set_blocking(self.pty_master, False)

    # ------------------------------------------------------------------ lifecycle

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
        fds = {0: self.pty_slave, 1: self.pty_slave, 2: self.pty_slave, CONTROL_FD: theirs.fileno()}
        argv = list(self.args.cmd)
        if self.pidns:
            self.init_pid, self.kernel_pid = pstree.spawn_init(argv, env, fds)
        else:
            self.init_pid = self.kernel_pid = self._spawn_plain(argv, env, fds)
        self.control_ino = os.fstat(theirs.fileno()).st_ino
        theirs.close()
        self._install(control.Channel(ours))
        log(f"kernel started: pid {self.kernel_pid}" + (" in a new PID namespace" if self.pidns else ""))

    def _spawn_plain(self, argv, env, fds) -> int:
        """Without CAP_SYS_ADMIN: no namespace; restore then needs the same PIDs free."""
        import subprocess
        pass_fds = [fds[CONTROL_FD], CONTROL_FD]
        p = subprocess.Popen(argv, env=env, stdin=fds[0], stdout=fds[1], stderr=fds[2],
                             pass_fds=pass_fds, start_new_session=True,
                             preexec_fn=lambda: os.dup2(pass_fds[0], CONTROL_FD))
        self._popen = p
        return p.pid

    def _watch_init(self) -> None:
        if self.pidfd >= 0:
            if self.pidfd_watched:
                self.sel.unregister(self.pidfd)
            os.close(self.pidfd)
        self.pidfd = memory.pidfd_open(self.init_pid)
        self.sel.register(self.pidfd, selectors.EVENT_READ, self._on_init_exit)
        self.pidfd_watched = True

    def _resume_watch(self) -> None:
        """After an operation: watch the init again if _on_init_exit paused it."""
        if self.pidfd >= 0 and not self.pidfd_watched:
            self.sel.register(self.pidfd, selectors.EVENT_READ, self._on_init_exit)
            self.pidfd_watched = True

    def _install(self, ch: control.Channel) -> None:
        """From the engine thread: the new kernel's control channel and init, watched by
        the main loop (the selector is only touched there)."""
        done = threading.Event()

        def swap():
            try:
                self._set_control(ch)
                self._watch_init()
            finally:
                done.set()
        self.post(swap)
        done.wait()

    def _set_control(self, ch: control.Channel) -> None:
        if self.control is not None:
            try:
                self.sel.unregister(self.control.sock)
            except (KeyError, ValueError):
                pass
            self.control.close()
        self.control = ch
        self.sel.register(ch.sock, selectors.EVENT_READ, lambda: self._on_message(self.control))

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        for s in FORWARDED:
            signal.signal(s, self._on_signal)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.sel.register(self.wake_r, selectors.EVENT_READ, self._drain_posted)
        self.sel.register(self.pty_master, selectors.EVENT_READ, self._on_pty)
        admin = None
        if self.args.admin:
            admin = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                os.unlink(self.args.admin)
            except FileNotFoundError:
                pass
            old = os.umask(0o177)
            try:
                admin.bind(self.args.admin)
            finally:
                os.umask(old)
            admin.listen(8)
            self.sel.register(admin, selectors.EVENT_READ, lambda: self._on_accept(admin))
        worker = threading.Thread(target=self._engine_thread, name="engine", daemon=True)
        worker.start()
        # the first launch or restore runs in the engine thread too (the restored init
        # is created there: its PR_SET_PDEATHSIG follows the creating thread), while this
        # loop already answers `status` ("starting", then the outcome)
        self.busy.acquire()

        def first():
            try:
                self.start()
            except BaseException as e:          # noqa: BLE001 -- reported to the manager
                if not isinstance(e, (engine.EngineError, StoreError)):
                    log(traceback.format_exc())
                log(f"could not start the kernel: {e}")
                self.start_error = e
                # the provisioner asks for the outcome; leave soon whether or not it does
                self.post(lambda: setattr(self, "exit_deadline", time.monotonic() + 5))
            finally:
                self.starting = False
            try:
                self._fill_memory()
            finally:
                self.busy.release()
        self.jobs.put(first)
        try:
            while self.exit_code is None:
                for key, _ in self.sel.select(timeout=0.2):
                    key.data()
                if self.exit_deadline and time.monotonic() > self.exit_deadline:
                    self.exit_code = 1
        finally:
            if admin is not None:
                try:
                    os.unlink(self.args.admin)
                except OSError:
                    pass
        return self.exit_code

    def _drain_posted(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                fn = self.posted.get_nowait()
            except queue.Empty:
                return
            fn()

    def post(self, fn) -> None:
        """Run fn in the main thread (selector changes happen only there)."""
        self.posted.put(fn)
        try:
            os.write(self.wake_w, b"x")
        except BlockingIOError:
            pass

    def _on_pty(self) -> None:
        try:
            data = os.read(self.pty_master, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        if data:
            try:
                os.write(1, data)
            except OSError:
                pass

    def _on_signal(self, signum, frame) -> None:
        if self.kernel_pid:
            try:
                os.kill(self.kernel_pid, signum)
            except ProcessLookupError:
                pass

    def _on_init_exit(self) -> None:
        if not self.busy.acquire(blocking=False):
            # an operation runs (an in-place restore may be replacing the init): look
            # again when it is over, instead of spinning on a readable pidfd
            self.sel.unregister(self.pidfd)
            self.pidfd_watched = False
            return
        try:
            _, status = os.waitpid(self.init_pid, 0)
        except ChildProcessError:
            status = 0
        finally:
            self.busy.release()
        self.exit_code = os.waitstatus_to_exitcode(status)
        if self.exit_code < 0:
            self.exit_code = 128 - self.exit_code
        log(f"kernel exited with status {self.exit_code}")

    def _on_accept(self, admin: socket.socket) -> None:
        conn, _ = admin.accept()
        ch = control.Channel(conn)

        def readable():
            try:
                self._on_message(ch)
            except control.ControlError:
                self.sel.unregister(conn)
                conn.close()
        self.sel.register(conn, selectors.EVENT_READ, readable)

    def _on_message(self, ch: control.Channel) -> None:
        try:
            msg = ch.recv(timeout=0)
        except (socket.timeout, BlockingIOError):
            return
        except control.ControlError:
            if ch is self.control:                # the kernel closed its end (or died)
                self.sel.unregister(ch.sock)
                return
            raise
        rid = msg.get("id") or control.new_id()
        op = msg.get("op")
        if msg.get("event") == "prepared" and ch is self.control:
            ev = self.preparing.get(rid)
            if ev is not None:
                ev.set()
            return
        if op == "status" and self.start_error:
            self._reply(ch, control.error(rid, self.start_error))
            self.exit_deadline = time.monotonic() + 0.5
            return
        if op == "status":
            self._reply(ch, {"event": "status", "id": rid, "busy": self.busy.locked(), "starting": self.starting,
                             "kernel_pid": self.kernel_pid, "init_pid": self.init_pid,
                             "restored_from": self.restored_from, "lineage": self.lineage,
                             "parent": self.parent, "store": str(self.store.root)})
            return
        if op not in ("checkpoint", "restore"):
            self._reply(ch, {"event": "error", "id": rid, "message": f"unknown request {op!r}"})
            return
        queued = False
        if not self.busy.acquire(blocking=False):
            if not (self.writing or self.filling):
                self._reply(ch, control.error(rid, control.Busy(
                    "a checkpoint or restore of this kernel is already running; wait for it to finish "
                    "and try again")))
                return
            # the kernel already runs on; only the image is being written: take the next
            # turn of the engine thread (which holds `busy` until then) instead of refusing
            queued = True
            what = (f"checkpoint '{self.writing}' to be written" if self.writing else
                    f"the memory of the kernel restored from '{self.filling}' to come in")
            self._reply(ch, {"event": "progress", "id": rid, "phase": f"waiting for {what}",
                             "done": 0, "total": 0})
        fn = self._checkpoint if op == "checkpoint" else self._restore_in_place

        def job():
            if queued:
                self.busy.acquire()
            try:
                fn(msg, rid, ch)
                self._fill_memory()
            except Exception as e:              # noqa: BLE001 -- every failure goes to the requester
                if not isinstance(e, (engine.EngineError, StoreError, control.ControlError)):
                    log(traceback.format_exc())
                self._reply(ch, control.error(rid, e))
            finally:
                self.busy.release()
                self.post(self._resume_watch)
        self.jobs.put(job)

    def _reply(self, ch: control.Channel, msg: dict) -> None:
        try:
            ch.send(msg)
        except control.ControlError:
            pass

    def _engine_thread(self) -> None:
        while True:
            self.jobs.get()()

    def _progress(self, ch, rid):
        last = [0.0]

        def cb(phase, done, total):
            now = time.monotonic()
            if phase == "pages" and done < total and now - last[0] < 0.1:
                return
            last[0] = now
            self._reply(ch, {"event": "progress", "id": rid, "phase": phase, "done": done, "total": total})
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
                self._reply(ch, {"event": "taken", "id": rid, "name": name,
                                 "frozen_s": round(time.monotonic() - t[0], 4)})
            inner(phase, done, total)
        return cb

    # ------------------------------------------------------------------ operations (engine thread)

    def _prepare_kernel(self, name: str, timeout: float = 10.0) -> None:
        """Before a checkpoint the kernel did not ask for itself (from the server or a tool):
        let the kernel side quiesce -- run its on_checkpoint hooks and write out IPython's
        history, so that no database transaction is open in the image.  A kernel without
        nbcheckpoint's extension never answers: go on after the timeout."""
        if self.control is None:
            return
        pid = control.new_id()
        ev = self.preparing[pid] = threading.Event()
        try:
            self.control.send({"event": "prepare", "id": pid, "name": name})
            if not ev.wait(timeout):
                log("the kernel did not answer 'prepare' (is nbcheckpoint's extension loaded?); "
                    "checkpointing it as it is")
        except control.ControlError:
            pass
        finally:
            self.preparing.pop(pid, None)

    def _checkpoint(self, msg: dict, rid: str, ch: control.Channel) -> None:
        name = msg.get("name") or self.store.new_name()
        pending = self.store.begin(name)
        t0 = time.time()
        if ch is not self.control:
            self._prepare_kernel(name)
        try:
            opts = Options(leave_running=True, tcp_established=True, ext_unix_sk=True, shell_job=True,
                           file_locks=True)
            stats = engine.dump(self.kernel_pid, pending.image, leave_running=True,
                                progress=self._taken(ch, rid, name, self._progress(ch, rid)), options=opts)
            ports = {self.conn.get(f"{c}_port"): c for c in CHANNELS}
            listeners = {ports[o["port"]]: o["ino"] for o in objects(pending.image)
                         if o["kind"] == "inet" and o.get("listening") and o["port"] in ports}
            meta = {
                "created": t0, "kernel_id": self.kernel_id, "kernel_name": self.kernel_name,
                "notebook": msg.get("notebook"), "execution_count": msg.get("execution_count"),
                "pages_bytes": stats.pages_bytes, "frozen_s": round(stats.frozen_seconds, 4),
                "total_s": round(stats.total_seconds, 4), "parent": self.parent, "lineage": self.lineage,
                "pid": self.kernel_pid, "pidns": self.pidns, "connection": self.conn,
                "listeners": listeners, "control_ino": self.control_ino, "request_id": rid,
                "engine_version": engine_version(),
            }
            ck = pending.commit(meta)
        except BaseException:
            pending.abort()
            raise
        finally:
            self.writing = None
        self.parent = name
        log(f"checkpoint {name!r}: {format_size(ck.meta['size_bytes'])}, kernel frozen "
            f"{stats.frozen_seconds:.2f} s, {stats.total_seconds:.2f} s in all")
        self._reply(ch, {"event": "saved", "id": rid, "checkpoint": public_meta(ck.meta)})

    def _restore_in_place(self, msg: dict, rid: str, ch: control.Channel) -> None:
        name = msg.get("name")
        if not name:
            raise StoreError("restore needs the name of a checkpoint (`nbcheckpoint ls` lists them)")
        ck = self.store.get(name)
        missing = [c for c in CHANNELS if c not in ck.meta.get("listeners", {})]
        if missing:
            raise StoreError(f"checkpoint {name!r} does not record the kernel's {', '.join(missing)} "
                             "listening sockets; it was not taken by nbcheckpoint's shim")
        curve = [(ck.meta.get("connection") or {}).get("curve_publickey"), self.conn.get("curve_publickey")]
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
            self._reply(ch, {"event": "progress", "id": rid, "phase": "verifying", "done": 0, "total": 0})
            plan = _Plan(self, ck, listeners)
            engine.verify(ck.image, plan.opts)
            self._reply(ch, {"event": "progress", "id": rid, "phase": "stopping", "done": 0, "total": 0})
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
            self.post(lambda: setattr(self, "exit_code", 1))
            raise
        finally:
            for fd in listeners.values():
                os.close(fd)
        self._reply(ch, {"event": "replaced", "id": rid, "checkpoint": public_meta(ck.meta),
                         "kernel_pid": self.kernel_pid})

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
        meta = ck.meta
        plan = plan or _Plan(self, ck, listeners)
        try:
            res = engine.restore(ck.image, progress=self._progress(ch, req_id) if ch else None, options=plan.opts)
            self.control_ino = os.fstat(plan.theirs.fileno()).st_ino
        except BaseException:
            plan.close()
            raise
        plan.theirs.close()
        ours = plan.ours
        self.init_pid = res.init_pid or res.pid
        self.kernel_pid = res.pid
        self.restored = res
        self.restored_from = self.parent = ck.name
        self.lineage = meta.get("lineage") or self.lineage
        chan = control.Channel(ours)
        # the thread that was waiting on the control socket in the image wakes up with this
        restored = {"event": "restored", "id": meta.get("request_id"), "checkpoint": public_meta(meta),
                    "key": self.conn.get("key", ""),
                    # IOPub clients to wait for before speaking: the replaced kernel's (in place),
                    # or the first one of a new kernel (kernel/frontend.py)
                    "clients": clients}
        if origin:
            restored["origin"] = origin          # the %restore cell, for the restored kernel to end
        self._reply(chan, restored)
        self._install(chan)
        self.lazy = res.lazy
        log(f"kernel restored from {ck.name!r}: pid {self.kernel_pid}, {res.seconds:.2f} s"
            + (f", {format_size(res.lazy.total)} of memory to come lazily" if res.lazy else ""))

    def _fill_memory(self) -> None:
        """After a lazy restore (engine thread, `busy` held): serve the kernel's memory
        until all of it is in.  The kernel runs and answers meanwhile; checkpoint and
        restore requests wait for their turn."""
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

    def __init__(self, shim: Shim, ck, listeners: dict[str, int]):
        meta = ck.meta
        inherit = {}
        for c, ino in meta.get("listeners", {}).items():
            if c in listeners:
                inherit[f"socket:[{ino}]"] = listeners[c]
        self.ours, self.theirs = control.socketpair()
        if meta.get("control_ino"):
            inherit[f"socket:[{meta['control_ino']}]"] = self.theirs.fileno()
        try:
            for o in objects(ck.image):
                if o["kind"] == "tty" and o["external"] and o["key"]:
                    inherit[o["key"]] = shim.pty_slave
        except BaseException:
            self.close()
            raise
        pidns = bool(meta.get("pidns"))
        # lifeline: a restored kernel dies with its shim, as a launched one does
        self.opts = Options(tcp_close=True, shell_job=True, file_locks=True, ext_unix_sk=True,
                            pidns=pidns, lazy_pages=pidns and shim.args.lazy_pages, lifeline=pidns,
                            inherit_fd=inherit)

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


def engine_version() -> str:
    from .. import __version__
    return __version__


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nbcheckpoint.jupyter.shim",
                                 description="run a Jupyter kernel under nbcheckpoint's shim")
    ap.add_argument("--connection-file", required=True)
    ap.add_argument("--store", default=None, help="checkpoint store directory")
    ap.add_argument("--admin", default=None, help="path of the admin socket to listen on")
    ap.add_argument("--kernel-id", default=None)
    ap.add_argument("--kernel-name", default=None)
    ap.add_argument("--no-pidns", dest="pidns", action="store_false",
                    help="run the kernel without a PID namespace of its own")
    ap.add_argument("--no-lazy-pages", dest="lazy_pages", action="store_false",
                    help="restore with all memory in place before the kernel runs (default: lazily)")
    ap.add_argument("--restore", metavar="NAME", help="restore the kernel from this checkpoint")
    ap.add_argument("--listener", action="append", default=[], metavar="CHANNEL=FD",
                    help="with --restore: an inherited listening socket for a channel")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.cmd and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    if not args.cmd and not args.restore:
        ap.error("give the kernel's command after --")
    if os.geteuid() != 0 and args.pidns:
        log("not root: running the kernel without a PID namespace of its own "
            "(restoring it will need its PIDs to be free)")
        args.pidns = False
    parent = os.environ.get("JPY_PARENT_PID")
    if parent and parent.isdigit():
        libc.syscall(NR["prctl"], 1, signal.SIGTERM, request="prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != int(parent):
            return 1                                 # the server is already gone
    return Shim(args).run()


if __name__ == "__main__":
    sys.exit(main())
