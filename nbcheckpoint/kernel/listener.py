"""The kernel's side of the control channel: one background thread owns its receive side.

The thread blocks in ``recv()`` on the kernel's end of the control socketpair and
dispatches every message by its ``id``: answers to a pending request (``progress``,
``saved``, ``error``, ``status``) go to the queue of the request waiting for them.

A checkpoint freezes the kernel with this thread blocked in ``recv()``.  In every kernel
restored from that image the same ``recv()`` returns the shim's ``restored`` event (on a
fresh socketpair end the shim handed in): the thread adopts the HMAC key now in use, and
either hands the event to the magic that was waiting in the image (same ``id``), which
prints "restored from ..." and runs the ``on_restore`` hooks, or, when no request was
pending (a checkpoint taken from the server while the kernel was idle), runs the hooks
itself on the kernel's main thread.  If the event carries the ``origin`` of an in-place
``%restore`` (the cell that asked for it, in the kernel that was replaced), the restored
kernel finishes that cell for the client that ran it.
"""
from __future__ import annotations

import logging
import queue
import threading

from ..control import ERROR, PREPARE, PREPARED, RESTORED, Channel, ControlError, new_id
from . import frontend, hooks
from .history import new_history_session, quiesce_history

log = logging.getLogger("nbcheckpoint.kernel")


class Pending:
    """A request sent on the control channel whose final answer has not come yet."""

    def __init__(self, listener: "Listener", req_id: str):
        self.listener = listener
        self.id = req_id
        self.queue: queue.Queue = queue.Queue()

    def get(self, timeout: float | None = None) -> dict | None:
        """The next message for this request, or None after `timeout` seconds."""
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.listener._forget(self.id)


class Listener:
    def __init__(self, channel: Channel, kernel=None):
        self.channel = channel
        self.kernel = kernel
        self._pending: dict[str, Pending] = {}
        self._lock = threading.Lock()
        self.closed: str | None = None           # why the channel is gone, once it is
        self.thread = threading.Thread(target=self._run, name="nbcheckpoint-control", daemon=True)

    def start(self) -> "Listener":
        self.thread.start()
        return self

    # ------------------------------------------------------------------ requests

    def request(self, msg: dict) -> Pending:
        """Send a request; its answers arrive on the returned Pending's queue."""
        if self.closed:
            raise ControlError(f"the control channel to the kernel's shim is closed ({self.closed})")
        msg = dict(msg)
        msg["id"] = msg.get("id") or new_id()
        p = Pending(self, msg["id"])
        with self._lock:
            self._pending[p.id] = p
        try:
            self.channel.send(msg)
        except ControlError:
            self._forget(p.id)
            raise
        return p

    def _forget(self, req_id: str) -> None:
        with self._lock:
            self._pending.pop(req_id, None)

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            try:
                msg = self.channel.recv()
            except ControlError as e:
                self._closed(str(e))
                return
            except Exception as e:            # never let the thread die silently
                self._closed(f"{type(e).__name__}: {e}")
                return
            try:
                self._dispatch(msg)
            except Exception:
                log.exception("nbcheckpoint: handling control message %r failed", msg)

    def _closed(self, why: str) -> None:
        self.closed = why
        with self._lock:
            pending = list(self._pending.values())
        for p in pending:
            p.queue.put({"event": ERROR, "id": p.id,
                         "message": f"lost the connection to the kernel's shim ({why})"})

    def _dispatch(self, msg: dict) -> None:
        event = msg.get("event")
        if event == RESTORED:
            self._adopt_key(msg.get("key"))
            # IOPub subscriptions when the image was taken, and how many clients come back
            msg["_subs"] = (frontend.watch.marked(), msg.get("clients", 1))
            frontend.gate.arm(msg["_subs"])
        if event == PREPARE:
            threading.Thread(target=self._prepare, args=(msg,), name="nbcheckpoint-prepare",
                             daemon=True).start()
            return
        with self._lock:
            p = self._pending.get(msg.get("id"))
        if p is not None:
            p.queue.put(msg)
            if event == RESTORED and msg.get("origin"):
                # the magic pending in the image prints its own line and runs the hooks;
                # the cell that asked for the in-place restore still needs its reply
                self._on_main(frontend.finish_origin, self.kernel, msg, False)
            return
        if event == RESTORED:
            self._on_main(_unsolicited_restore, self.kernel, msg)
        else:
            log.debug("nbcheckpoint: control message for no pending request: %r", msg)

    def _prepare(self, msg: dict) -> None:
        """The shim is about to checkpoint this kernel for someone else (server, toolbar).

        Quiesce IPython's history (no database transaction may be open in the image), run
        the on_checkpoint hooks -- on the main thread when it is idle, here when a cell
        keeps it busy (the checkpoint must not wait for the cell) -- and answer `prepared`.
        """
        frontend.watch.mark()
        shell = getattr(self.kernel, "shell", None)
        resume = quiesce_history(shell)
        claim = threading.Lock()
        done = threading.Event()

        def run_hooks():
            if claim.acquire(blocking=False):
                try:
                    hooks.run("checkpoint", {"name": msg.get("name")})
                finally:
                    frontend.drain_iopub(self.kernel)   # what the hooks printed, out before the freeze
                    done.set()
        try:
            if self.kernel is not None and getattr(self.kernel, "io_loop", None) is not None:
                self._on_main(run_hooks)
                if not done.wait(1.0):
                    run_hooks()                 # the main thread is busy: run them here
                done.wait()
            else:
                run_hooks()
        finally:
            self.channel.reply({"event": PREPARED, "id": msg.get("id")})
            if resume is not None:
                # the checkpoint is taken right after `prepared`; history writes resume later
                t = threading.Timer(10.0, resume)
                t.daemon = True
                t.start()

    def _adopt_key(self, key) -> None:
        if not isinstance(key, str) or self.kernel is None:
            return
        session = getattr(self.kernel, "session", None)
        if session is not None and session.key != key.encode():
            session.key = key.encode()

    def _on_main(self, fn, *args) -> None:
        """Run fn(*args) on the kernel's main thread (its event loop), or here without one."""
        loop = getattr(self.kernel, "io_loop", None)
        if loop is None:
            fn(*args)
        else:
            loop.add_callback(fn, *args)


def _unsolicited_restore(kernel, msg: dict) -> None:
    """A `restored` event no magic was waiting for: hooks, then the origin cell if any."""
    new_history_session(getattr(kernel, "shell", None))
    if msg.get("origin"):
        frontend.finish_origin(kernel, msg, True)
    else:
        hooks.run("restore", msg.get("checkpoint") or {})
