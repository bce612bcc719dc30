"""The control protocol between a kernel, its shim and the manager (docs/jupyter.md).

AF_UNIX SOCK_SEQPACKET, one JSON object per message: a request ``{"op": OP, "id", ...}``
or an event ``{"event": EVENT, "id", ...}``.  The ops, events and the kernel's channel
names below are spelled only here.  Shared by the shim (nbcheckpoint/jupyter/), the
provisioner and the code inside the kernel (nbcheckpoint/kernel/); imports nothing from
Jupyter.
"""
from __future__ import annotations

import json
import os
import socket
import uuid

from .engine.errors import NbcheckpointError

MAX_MESSAGE = 1 << 20            # a message is one datagram; metadata stays far below this
CONTROL_FD_ENV = "NBCHECKPOINT_CONTROL_FD"

# the kernel's five ZeroMQ channels, as in its connection file ("<channel>_port")
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")

# ops: requests to the shim (RESTORE is in place; STATUS is answered by the event of that name)
CHECKPOINT, RESTORE, STATUS = "checkpoint", "restore", "status"
# events: answers to a request, with its id (PROGRESS and TAKEN are not final; REPLACED ends
# an in-place restore on the admin socket); RESTORED goes to a restored kernel on its new
# control socket; PREPARE asks the kernel to quiesce before a checkpoint it did not ask for,
# PREPARED is its answer
PROGRESS, TAKEN, SAVED, REPLACED, RESTORED, ERROR = "progress", "taken", "saved", "replaced", "restored", "error"
PREPARE, PREPARED = "prepare", "prepared"


class ControlError(NbcheckpointError):
    """Raised by `Channel` when the peer is gone or sends something that is not a message."""


class Busy(NbcheckpointError):
    """The shim refused a request: a checkpoint or restore of this kernel is already running."""


def error(rid: str, e: BaseException) -> dict:
    """The `error` event answering request RID with E: its message for the user, and the name
    of its type as `kind`, which the provisioner raises again (provisioner.SHIM_ERRORS)."""
    return {"event": ERROR, "id": rid, "message": str(e) or type(e).__name__, "kind": type(e).__name__}


def new_id() -> str:
    return uuid.uuid4().hex[:12]


class Channel:
    """One end of a control or admin connection.  Not thread-safe for concurrent receivers."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    @classmethod
    def connect(cls, path: str, timeout: float | None = 10) -> "Channel":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as e:
            s.close()
            raise ControlError(f"cannot reach the kernel's shim at {path}: {e.strerror}") from None
        s.settimeout(None)
        return cls(s)

    def send(self, msg: dict) -> None:
        data = json.dumps(msg).encode()
        if len(data) > MAX_MESSAGE:
            raise ControlError(f"control message of {len(data)} bytes is too large")
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise ControlError(f"control peer is gone ({e.strerror})") from None

    def recv(self, timeout: float | None = None) -> dict:
        """The next message; ControlError on EOF.  socket.timeout if `timeout` passes."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(MAX_MESSAGE)
        except socket.timeout:
            raise
        except OSError as e:
            raise ControlError(f"control peer is gone ({e.strerror})") from None
        finally:
            try:
                self.sock.settimeout(None)
            except OSError:
                pass
        if not data:
            raise ControlError("control peer closed the connection")
        try:
            msg = json.loads(data)
        except ValueError:
            raise ControlError(f"control peer sent a malformed message ({len(data)} bytes)") from None
        if not isinstance(msg, dict):
            raise ControlError("control peer sent a message that is not an object")
        return msg

    def request(self, msg: dict, on_progress=None, timeout: float | None = None) -> dict:
        """Send a request and wait for its final answer (not `progress` or `taken`,
        which go to on_progress); returns it."""
        msg = dict(msg)
        msg.setdefault("id", new_id())
        self.send(msg)
        while True:
            ans = self.recv(timeout)
            if ans.get("id") != msg["id"]:
                continue
            if ans.get("event") in (PROGRESS, TAKEN):      # not final: see docs/jupyter.md
                if on_progress:
                    on_progress(ans)
                continue
            return ans

    def reply(self, msg: dict) -> None:
        """send(), for an answer: a requester that left does not stop the operation."""
        try:
            self.send(msg)
        except ControlError:
            pass

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


def socketpair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def control_from_env() -> Channel | None:
    """The kernel's end of its control socketpair, if it was started by the shim (the fd in
    $NBCHECKPOINT_CONTROL_FD is a SOCK_SEQPACKET socket)."""
    v = os.environ.get(CONTROL_FD_ENV, "")
    if not v.isdigit():
        return None
    try:
        s = socket.socket(fileno=int(v))
    except OSError:                         # closed, or not a socket
        return None
    if s.family != socket.AF_UNIX or s.type != socket.SOCK_SEQPACKET:
        s.detach()                          # an fd of someone else's: not ours to close
        return None
    # our children must not take an unrelated fd of theirs for a control channel
    os.environ.pop(CONTROL_FD_ENV, None)
    return Channel(s)
