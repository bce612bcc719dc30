"""What a restored kernel does so that its clients see what it says.

A restored kernel's old client connections come back closed; clients reconnect by
themselves (ZeroMQ), but IOPub drops what is published before a client has subscribed
again.  So a restored kernel that has something to say for a cell (the pending
``%checkpoint``'s "restored from ..." line, the reply to an in-place ``%restore``) first
waits, for a bounded time, until its clients have subscribed to IOPub again -- as many as
the shim's `restored` event says (the replaced kernel's, for an in-place restore); so does
the first cell after any restore (the server's or the toolbar's has no magic waiting).
Subscriptions are seen through the kernel's IOPub XPUB socket (ipykernel >= 7).  Such a
socket passes up only the *first* subscription to a topic: a client that subscribes to ""
while another one is (or a restored kernel's closed one still seems) subscribed would go
unseen, and the kernel would wait out CLIENT_WAIT.  So the watch sets ZMQ_XPUB_VERBOSE:
every subscription comes up (ipykernel then welcomes each, as JEP 65 has it).
"""
from __future__ import annotations

import base64
import os
import sys
import threading
import time

from . import hooks
from .life import Life
from .messages import restored_line

# How long a restored kernel waits for a client to subscribe before it speaks anyway.
# A frontend resubscribes within a second.
CLIENT_WAIT = float(os.environ.get("NBCHECKPOINT_CLIENT_WAIT", "2"))


class SubscriptionWatch:
    """Counts IOPub subscriptions seen by the kernel's XPUB socket."""

    def __init__(self):
        self.count = 0
        self.last = 0.0                     # time.monotonic() of the latest subscription
        self.cond = threading.Condition()
        self.installed = False
        self._mark: int | None = None

    def mark(self) -> None:
        """Just before a checkpoint: the count as the image will hold it.  A restored
        kernel waits for subscriptions newer than that, so one made before the `restored`
        event was even read still counts."""
        self._mark = self.count
        gate.for_image(self._mark)

    def marked(self) -> int:
        return self._mark if self._mark is not None else self.count

    def install(self, kernel) -> bool:
        iopub = getattr(kernel, "iopub_thread", None)
        stream = getattr(iopub, "_xpub_stream", None)
        orig = getattr(iopub, "_handle_subscription", None)      # what ipykernel gave on_recv
        if stream is None or orig is None:
            return False
        if self.installed:
            return True

        def on_subscription(frames):
            try:
                orig(frames)
            finally:
                subs = sum(bytes(f)[:1] == b"\x01" for f in frames)
                if subs:
                    with self.cond:
                        self.count += subs
                        self.last = time.monotonic()
                        self.cond.notify_all()

        def watch_subscriptions():
            import zmq
            stream.on_recv(on_subscription)
            stream.socket.setsockopt(zmq.XPUB_VERBOSE, 1)
        iopub.io_loop.add_callback(watch_subscriptions)     # the stream belongs to the IOPub thread
        self.installed = True
        return True

    def wait_new(self, since, timeout: float) -> bool:
        """Wait until `since` = (count, clients) -- or a bare count: one client -- has that
        many subscriptions newer than count; False on timeout."""
        count0, clients = since if isinstance(since, (tuple, list)) else (since, 1)
        need = count0 + max(1, clients)
        if not self.installed:
            time.sleep(min(timeout, 1.0))
            return False
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.count < need:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            last = self.last
        # the client's shell/stdin sockets reconnect at the same pace as its IOPub one: a
        # reply sent before its shell is back would be dropped by the ROUTER
        time.sleep(max(0.0, last + 0.3 - time.monotonic()))
        return True


watch = SubscriptionWatch()


def wait_for_client(since) -> bool:
    if since is None:
        since = watch.count
    return watch.wait_new(since, CLIENT_WAIT)


class _FirstCellGate:
    """After a restore, the next cell waits (at most CLIENT_WAIT) until the clients have
    subscribed to IOPub again before it runs, so that its output is not published into the
    void: each client socket reconnects on its own, and a restore nobody asked for in a
    cell (the server's, the toolbar's) has no magic that waits.  Returns at once when the
    clients are back already.

    Armed by the `restored` event; and in the image itself (``for_image``, when the
    subscriptions are marked just before a checkpoint), because a cell sent right after an
    in-place restore can start before the listener thread has read that event: such a
    cell waits for the event first, which says how many clients to wait for.
    """

    def __init__(self):
        self.since = None
        self.armed = threading.Event()
        self._image = None          # (mark, Life) when the last checkpoint was taken

    def arm(self, since) -> None:
        self.since = since
        self.armed.set()

    def for_image(self, since) -> None:
        self._image = (since, Life())
        self.armed.clear()

    def pre_run_cell(self, *_args) -> None:
        image, self._image = self._image, None
        if self.since is None and image is not None and image[1].restored():
            self.armed.wait(CLIENT_WAIT)        # the listener reads the `restored` event
            if self.since is None:
                self.since = image[0]
        since, self.since = self.since, None
        if since is not None:
            wait_for_client(since)


gate = _FirstCellGate()


# ---------------------------------------------------------------------------- origin

def _idents(kernel) -> list:
    try:
        return list(kernel._get_shell_context_var(kernel._shell_parent_ident) or [])
    except Exception:
        return []


def current_origin(kernel) -> dict | None:
    """The cell now running (its header and the client's routing identity), as JSON.

    Sent along with an in-place restore request so that the restored kernel, which has
    never seen this cell, can finish it for the client that is waiting on it.
    """
    if kernel is None:
        return None
    try:
        from jupyter_client.jsonutil import json_default
        import json
        parent = kernel.get_parent("shell") or {}
        header = json.loads(json.dumps(parent.get("header") or {}, default=json_default))
        if not header.get("msg_id"):
            return None
        idents = [base64.b64encode(f.bytes if hasattr(f, "bytes") else bytes(f)).decode()
                  for f in _idents(kernel)]
        return {"header": header, "idents": idents}
    except Exception:
        return None


def _shell_reply_stream(kernel, subshell_id=None):
    if getattr(kernel, "_supports_kernel_subshells", False):
        return kernel.shell_channel_thread.manager.get_subshell_to_shell_channel_socket(subshell_id)
    stream = getattr(kernel, "shell_stream", None)
    if stream is None:
        streams = getattr(kernel, "shell_streams", None) or [None]
        stream = streams[0]
    return stream


def flush_std() -> None:
    """Push out what this process printed (ipykernel's streams publish asynchronously)."""
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except Exception:          # noqa: BLE001 -- a closed or replaced stream
            pass


def drain_iopub(kernel, timeout: float = 2.0) -> None:
    """Just before a checkpoint: wait until the IOPub thread has sent what this thread
    published.  A message still queued inside the process when it is frozen is sent twice:
    by this process after the thaw, and again by every kernel restored from the image; a
    client that sees both (an in-place restore) rejects the second ("Duplicate
    Signature")."""
    flush_std()
    iopub = getattr(kernel, "iopub_thread", None)
    if iopub is None or not hasattr(iopub, "schedule"):
        return
    sent = threading.Event()
    iopub.schedule(sent.set)        # runs after everything this thread scheduled before
    sent.wait(timeout)


def finish_origin(kernel, msg: dict, run_hooks: bool) -> None:
    """In a kernel restored in place: end the `%restore` cell of the kernel it replaced.

    Runs on the kernel's main thread.  Publishes the "restored" line under that cell,
    then its execute_reply and idle status, routed to the client that sent it.
    """
    origin = msg.get("origin") or {}
    header = origin.get("header") or {}
    meta = msg.get("checkpoint") or {}
    if kernel is None or not header.get("msg_id"):
        if run_hooks:
            hooks.run("restore", meta)
        return
    wait_for_client(msg.get("_subs"))
    idents = [base64.b64decode(i) for i in origin.get("idents") or []]
    parent = {"header": header, "msg_id": header["msg_id"], "msg_type": header.get("msg_type"),
              "parent_header": {}, "metadata": {}, "content": {}, "buffers": []}
    # This runs as an event-loop callback, possibly while the next cell is already under
    # way (a cell's execution yields to the loop): put its parent back afterwards, or that
    # cell's output would be published under the %restore cell and its client drop it.
    prev, prev_idents = kernel.get_parent("shell"), _idents(kernel)
    flush_std()             # what that cell printed so far goes out under its own parent
    try:
        _finish(kernel, msg, run_hooks, meta, header, idents, parent)
    finally:
        if prev:
            flush_std()
            kernel.set_parent(prev_idents, prev, "shell")


def _finish(kernel, msg, run_hooks, meta, header, idents, parent) -> None:
    kernel.set_parent(idents, parent, "shell")
    if run_hooks:
        hooks.run("restore", meta)
    print(restored_line(meta, in_place=True))
    flush_std()
    count = getattr(getattr(kernel, "shell", None), "execution_count", 1) - 1
    content = {"status": "ok", "execution_count": count, "user_expressions": {}, "payload": []}
    try:
        stream = _shell_reply_stream(kernel, header.get("subshell_id"))
        kernel.session.send(stream, "execute_reply", content, parent, ident=idents)
    finally:
        kernel._publish_status("idle", "shell", parent)
