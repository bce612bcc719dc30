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

This module is the supervision: the main thread owns the selector (pty, sockets,
signals, the init's pidfd) and dispatches requests by op; the operations themselves
(launch, checkpoint, restore) are operations.Kernel's, run in the engine thread.  The
main thread never calls waitpid while an operation runs: a wait could consume ptrace
stops of the engine thread's tracees.
"""
from __future__ import annotations

import argparse
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
from functools import partial

from .. import control, engine
from ..control import Channel
from ..engine.sys import libc, memory, userns, waitstatus
from ..engine.sys.x86_64 import NR
from ..store import StoreError
from .operations import Kernel, log, progress

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
             signal.SIGWINCH)


class Shim:
    def __init__(self, args):
        self.args = args
        self.kernel = Kernel(self, args)
        self.control: Channel | None = None
        self.busy = threading.Lock()              # held by the engine thread while an operation runs
        self.answered = False                     # ... and once it has sent its final answer
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
        # the requests, by op: status is answered at once, the others run in the engine thread
        self.handlers = {control.STATUS: self._status,
                         control.CHECKPOINT: partial(self._queue, self.kernel.checkpoint),
                         control.RESTORE: partial(self._queue, self.kernel.restore_in_place)}
        # the pty: the shim keeps the slave open, so the master never sees EIO and a
        # restored kernel can be handed the same terminal (--shell-job / inherit-fd)
        self.pty_master, self.pty_slave = os.openpty()
        tty.setraw(self.pty_slave)               # the log gets the kernel's bytes as written
        os.set_inheritable(self.pty_slave, False)
        os.set_blocking(self.pty_master, False)

    # ------------------------------------------------------------------ the kernel's init and control

    def _watch_init(self) -> None:
        if self.pidfd >= 0:
            if self.pidfd_watched:
                self.sel.unregister(self.pidfd)
            os.close(self.pidfd)
        self.pidfd = memory.pidfd_open(self.kernel.init_pid)
        self.sel.register(self.pidfd, selectors.EVENT_READ, self._on_init_exit)
        self.pidfd_watched = True

    def _resume_watch(self) -> None:
        """After an operation: watch the init again if _on_init_exit paused it."""
        if self.pidfd >= 0 and not self.pidfd_watched:
            self.sel.register(self.pidfd, selectors.EVENT_READ, self._on_init_exit)
            self.pidfd_watched = True

    def install(self, ch: Channel) -> None:
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

    def _set_control(self, ch: Channel) -> None:
        if self.control is not None:
            try:
                self.sel.unregister(self.control.sock)
            except (KeyError, ValueError):
                pass
            self.control.close()
        self.control = ch
        self.sel.register(ch.sock, selectors.EVENT_READ, lambda: self._on_message(self.control))

    # ------------------------------------------------------------------ main loop

    def run(self, refused: BaseException | None = None) -> int:
        """refused: the kernel cannot be started (the reason): only answer `status` with it."""
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
                if refused is not None:
                    raise refused
                self.kernel.start()
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
                self.kernel.fill_memory()
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
        except OSError:
            return
        if data:
            try:
                os.write(1, data)
            except OSError:
                pass

    def _on_signal(self, signum, _frame) -> None:
        if self.kernel.kernel_pid:
            try:
                os.kill(self.kernel.kernel_pid, signum)
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
            _, status = os.waitpid(self.kernel.init_pid, 0)
        except ChildProcessError:
            status = 0
        finally:
            self.busy.release()
        self.exit_code = waitstatus.exit_code(status)
        log(f"kernel exited with status {self.exit_code}")

    def _on_accept(self, admin: socket.socket) -> None:
        conn, _ = admin.accept()
        ch = Channel(conn)

        def readable():
            try:
                self._on_message(ch)
            except control.ControlError:
                self.sel.unregister(conn)
                conn.close()
        self.sel.register(conn, selectors.EVENT_READ, readable)

    def _on_message(self, ch: Channel) -> None:
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
        if msg.get("event") == control.PREPARED and ch is self.control:
            self.kernel.prepared(rid)
            return
        handler = self.handlers.get(msg.get("op"))
        if handler is None:
            ch.reply({"event": control.ERROR, "id": rid, "message": f"unknown request {msg.get('op')!r}"})
            return
        handler(msg, rid, ch)

    def _status(self, msg: dict, rid: str, ch: Channel) -> None:
        if self.start_error:
            ch.reply(control.error(rid, self.start_error))
            self.exit_deadline = time.monotonic() + 0.5
            return
        k = self.kernel
        ch.reply({"event": control.STATUS, "id": rid, "busy": self.busy.locked(), "starting": self.starting,
                  "kernel_pid": k.kernel_pid, "init_pid": k.init_pid, "restored_from": k.restored_from,
                  "lineage": k.lineage, "parent": k.parent, "store": str(k.store.root)})

    def _queue(self, operation, msg: dict, rid: str, ch: Channel) -> None:
        """Run operation(msg, rid, ch) in the engine thread, or refuse it while another runs.
        The operation returns its final answer, sent here."""
        queued = False
        if not self.busy.acquire(blocking=False):
            writing, filling = self.kernel.writing, self.kernel.filling
            if not (writing or filling or self.answered):
                ch.reply(control.error(rid, control.Busy(
                    "a checkpoint or restore of this kernel is already running; wait for it to finish "
                    "and try again")))
                return
            # the kernel already runs on (only the image is being written, or its memory comes
            # in), or the running request has been answered: take the next turn of the engine
            # thread (which holds `busy` until then) instead of refusing
            queued = True
            what = (f"checkpoint '{writing}' to be written" if writing else
                    f"the memory of the kernel restored from '{filling}' to come in" if filling else
                    "the previous request to finish")
            progress(ch, rid, f"waiting for {what}")

        def job():
            if queued:
                self.busy.acquire()
            try:
                try:
                    answer = operation(msg, rid, ch)
                except Exception as e:          # noqa: BLE001 -- every failure goes to the requester
                    if not isinstance(e, (engine.EngineError, StoreError, control.ControlError)):
                        log(traceback.format_exc())
                    answer = control.error(rid, e)
                # answered: a request from the requester now is queued behind the rest of this
                # job, never refused as busy
                self.answered = True
                ch.reply(answer)
                self.kernel.fill_memory()
            finally:
                self.answered = False
                self.busy.release()
                self.post(self._resume_watch)
        self.jobs.put(job)

    def _engine_thread(self) -> None:
        while True:
            self.jobs.get()()


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
    parent = os.environ.get("JPY_PARENT_PID")
    if parent and parent.isdigit():
        libc.syscall(NR["prctl"], 1, signal.SIGTERM, request="prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != int(parent):
            return 1                                 # the server is already gone
    # An ordinary user gets the rights over the kernel's PID + mount namespaces (and so
    # over its PIDs at restore) in a user namespace of its own, entered while this process
    # is single-threaded (no thread has started yet); the kernel keeps the user's uid.
    refused = None
    if args.pidns:
        try:
            if userns.ensure():
                log(f"in a user namespace of our own (uid {os.getuid()}, gid {os.getgid()})")
        except userns.UserNamespaceError as e:
            refused = engine.EngineError(f"cannot start the checkpointable kernel: {e}")
    return Shim(args).run(refused)


if __name__ == "__main__":
    sys.exit(main())
