"""The kernel side of nbcheckpoint: what %checkpoint, %restore and the browser call.

Two modes, chosen once per kernel process:

* **shim** -- the kernel was started by nbcheckpoint's provisioner ("Python 3
  (checkpointable)"): requests go to the shim over the control channel
  ($NBCHECKPOINT_CONTROL_FD), whose receive side one background thread owns
  (listener.Listener).  A checkpoint "returns twice": "saved" in this kernel, "restored"
  in every kernel restored from it.
* **helper** -- any other kernel: a checkpoint is taken by a helper process started
  outside the kernel's process tree (helper.py); restoring needs the checkpointable
  kernel or the command line.
"""
from __future__ import annotations

import os
import threading

from .. import control
from ..store import Store, StoreError
from . import frontend, hooks
from .helper import checkpoint_with_helper
from .history import flush_history, new_history_session
from .listener import Listener
from .messages import CheckpointError, helper_restore_message, restored_line, saved_line, taken_line
from .progress import Progress

BUSY = "a checkpoint of this kernel is already running; wait for it to finish and try again"


class KernelSide:
    """One per kernel process (see `get`)."""

    def __init__(self, shell=None):
        self.shell = shell
        self.kernel = getattr(shell, "kernel", None)
        ch = control.control_from_env()
        self.listener = Listener(ch, self.kernel).start() if ch else None
        self.lock = threading.Lock()             # one checkpoint/restore at a time from here
        self.last: dict | None = None            # the last result: {"event": "saved"|"restored", ...}
        self.history: list[dict] = []            # every result seen by this process (and its image)
        self.cell: int | None = None             # In[N] of the cell running now (pre_run_cell)
        if self.kernel is not None:
            frontend.watch.install(self.kernel)

    @property
    def mode(self) -> str:
        return "shim" if self.listener is not None else "helper"

    # ------------------------------------------------------------------ small helpers

    def _notebook(self) -> str | None:
        ns = getattr(self.shell, "user_ns", {}) or {}
        return os.environ.get("JPY_SESSION_NAME") or ns.get("__session__") or None

    def pre_run_cell(self, *_info) -> None:
        """Note the running cell's number.  IPython >= 9.8 (ipython#15088) counts a cell before
        running it, older ones after; at pre_run_cell both have stored the N-1 earlier inputs."""
        count = getattr(self.shell, "execution_count", None)
        hist = getattr(getattr(self.shell, "history_manager", None), "input_hist_raw", None)
        self.cell = min(count, len(hist)) if count is not None and hist is not None else count

    def _execution_count(self) -> int | None:
        return self.cell if self.cell is not None else getattr(self.shell, "execution_count", None)

    def _record(self, result: dict) -> dict:
        self.last = result
        self.history.append(result)
        return result

    def _acquire(self) -> None:
        if not self.lock.acquire(blocking=False):
            raise CheckpointError(BUSY)

    # ------------------------------------------------------------------ checkpoint

    def checkpoint(self, name: str | None = None, quiet: bool = False, progress=None,
                   wait: bool = True) -> dict:
        """Checkpoint this kernel.  Returns {"event": "saved"|"taken"|"restored", ...}.

        "saved" (with "checkpoint": META) in this kernel once the image is complete, or,
        with wait=False, "taken" (with "name", "frozen_s") as soon as the kernel runs
        again while the shim writes the image; "restored" in every kernel later restored
        from the image.
        """
        if name is not None:
            _check_name(name)
        self._acquire()
        try:
            hooks.run("checkpoint", {"name": name})
            flush_history(self.shell)
            if self.mode == "shim":
                return self._checkpoint_shim(name, quiet, progress, wait)
            return checkpoint_with_helper(self, name, quiet, progress)
        finally:
            self.lock.release()

    def _checkpoint_shim(self, name, quiet, progress_cb, wait=True) -> dict:
        title = f"checkpoint '{name}'" if name else "checkpoint"
        prog = Progress(title, quiet=quiet, callback=progress_cb)
        prog.show("asking the kernel's shim", force=True)
        frontend.drain_iopub(self.kernel)       # nothing of ours in flight when it freezes
        try:
            frontend.watch.mark()
            p = self.listener.request({"op": control.CHECKPOINT, "name": name, "notebook": self._notebook(),
                                       "execution_count": self._execution_count()})
        except control.ControlError as e:
            raise CheckpointError(str(e)) from None
        try:
            for ev, msg in _answers(p, prog, "the checkpoint failed"):
                if ev == control.TAKEN and not wait:
                    # the kernel runs again; the shim writes the image (and takes any
                    # %checkpoint/%restore after it in turn)
                    prog.finish("taken")
                    if not quiet:
                        print(taken_line(msg))
                    return self._record({"event": control.TAKEN, "name": msg.get("name"),
                                         "frozen_s": msg.get("frozen_s")})
                elif ev == control.SAVED:
                    meta = msg.get("checkpoint") or {}
                    prog.finish("done")
                    if not quiet:
                        print(saved_line(meta))
                    return self._record({"event": control.SAVED, "checkpoint": meta})
                elif ev == control.RESTORED:
                    return self._restored(msg, prog, quiet)
        finally:
            p.close()

    def _restored(self, msg: dict, prog: Progress | None, quiet: bool) -> dict:
        """In a kernel restored from the image this process's magic was waiting in."""
        meta = msg.get("checkpoint") or {}
        new_history_session(self.shell)
        if not quiet:
            frontend.wait_for_client(msg.get("_subs"))
        if prog is not None:
            prog.finish("restored")
        hooks.run("restore", meta)
        if not quiet:
            print(restored_line(meta))
        return self._record({"event": control.RESTORED, "checkpoint": meta})

    # ------------------------------------------------------------------ restore

    def restore(self, name: str | None = None, quiet: bool = False, progress=None) -> None:
        """Replace this kernel, in place, by checkpoint `name` (default: its latest one).

        Returns only on failure (CheckpointError; this kernel is untouched): on success
        this process is replaced and the restored kernel goes on from its checkpoint.
        """
        if self.mode != "shim":
            raise CheckpointError(helper_restore_message(name))
        self._acquire()
        try:
            name = _check_name(name or self._latest_of_lineage())
            prog = Progress(f"restore '{name}'", quiet=quiet, callback=progress)
            origin = None
            if self.kernel is not None:
                parent = self.kernel.get_parent("shell") or {}
                if (parent.get("header") or {}).get("msg_type") == "execute_request":
                    origin = frontend.current_origin(self.kernel)
            frontend.flush_std()
            try:
                p = self.listener.request({"op": control.RESTORE, "name": name, "origin": origin})
            except control.ControlError as e:
                raise CheckpointError(str(e)) from None
            prog.show("asking the kernel's shim", force=True)
            try:
                for ev, msg in _answers(p, prog, f"restoring {name!r} failed"):
                    if ev in (control.REPLACED, control.RESTORED):
                        # not expected here (this process is the one replaced); say so
                        return None
            finally:
                p.close()
        finally:
            self.lock.release()

    def _latest_of_lineage(self) -> str:
        try:
            lineage = (self._shim_status() or {}).get("lineage")
        except control.ControlError:
            lineage = None
        mine = [c for c in Store().list() if lineage and c.info.lineage == lineage]
        if not mine:
            raise CheckpointError("this kernel has no checkpoint to go back to yet: name one "
                                  "(%restore NAME; %checkpoints lists them)")
        return mine[0].name

    # ------------------------------------------------------------------ status

    def status(self) -> dict:
        out = {"mode": self.mode, "last": self.last}
        if self.listener is not None:
            out["control_closed"] = self.listener.closed
            try:
                out["shim"] = self._shim_status()
            except control.ControlError as e:
                out["shim"] = {"error": str(e)}
        return out

    def _shim_status(self) -> dict | None:
        p = self.listener.request({"op": control.STATUS})
        try:
            return p.get(timeout=10)
        finally:
            p.close()


def _check_name(name: str) -> str:
    try:
        return Store.validate_name(name)
    except StoreError as e:
        raise CheckpointError(str(e)) from None


def _answers(p, prog: Progress, failure: str):
    """(event, message) of every answer to request `p` but `progress` (shown by `prog`);
    an `error` raises CheckpointError with the shim's message (else `failure`)."""
    while True:
        msg = p.get(timeout=1.0)
        if msg is None:
            continue
        ev = msg.get("event")
        if ev == control.PROGRESS:
            prog.event(msg)
        elif ev == control.ERROR:
            prog.finish("failed")
            raise CheckpointError(msg.get("message") or failure)
        else:
            yield ev, msg


_side: KernelSide | None = None
_side_lock = threading.Lock()


def get(shell=None) -> KernelSide:
    """This process's KernelSide (created on first use)."""
    global _side
    with _side_lock:
        if _side is None:
            if shell is None:
                try:
                    from IPython import get_ipython
                    shell = get_ipython()
                except Exception:
                    shell = None
            _side = KernelSide(shell)
        return _side
