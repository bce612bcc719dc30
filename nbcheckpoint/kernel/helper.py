"""%checkpoint in a kernel that nbcheckpoint's shim did not start ("helper mode").

The engine must run outside the tree it dumps, so the kernel starts a helper that is
not its descendant: ``python -m nbcheckpoint.kernel.helper WORKDIR`` (a new session)
forks the real helper, which calls setsid() again, and exits at once; the kernel reaps
it, so the helper is reparented away (to init or the nearest subreaper).  The helper
dumps the kernel with --leave-running into the checkpoint store and writes the outcome
to WORKDIR/done.json.

While the helper works the kernel only stat()s WORKDIR/done.json and sleeps: it holds
no file open, so the image never captures a file that will have changed by the time it
is restored.  A kernel restored from that image wakes up in the same wait; it tells
itself from the original by its CPU clock, which started again (kernel/life.py).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .. import engine
from ..control import RESTORED, SAVED
from ..engine.sys.proc import pid_alive
from ..kernel_image import checkpoint_meta, dump_options, outside_terminals
from ..store import Store, StoreError, public_meta
from . import frontend
from .life import Life
from .messages import CheckpointError, helper_mode_note, saved_line
from .progress import Progress

SPAWN_TIMEOUT = 30.0


# ---------------------------------------------------------------------------- in the kernel

def _kernel_app():
    try:
        from ipykernel.kernelapp import IPKernelApp
        if IPKernelApp.initialized():
            return IPKernelApp.instance()
    except Exception:
        pass
    return None


def _guard_parent_poller(kernel_app, life: Life):
    """Neutralise ipykernel's parent poller in kernels restored from this checkpoint.

    A kernel launched by a manager (JPY_PARENT_PID) exits when its parent changes, as it
    does on every restore.  While the helper runs, the poller compares the parent pid
    with an int that compares equal to any pid once this process knows it is a restored
    copy (its start time differs, or its CPU time went back); the original gets its plain
    parent pid back when the checkpoint is done.  A restored copy keeps that int: it was
    started by `nbcheckpoint restore -d`, whose process exits at once, so it has no parent
    worth watching (taking os.getppid() there raced with that exit: the kernel shut down).
    """
    poller = getattr(kernel_app, "poller", None)
    if poller is None or not hasattr(poller, "parent_pid") or not poller.parent_pid:
        return None
    real = int(poller.parent_pid)
    restored = [False]

    class ParentPid(int):
        def _same(self, other):
            if int(self) == other or restored[0]:
                return True
            # only when the parent differs: in the original that means it died
            if life.restored(read_start=True):
                restored[0] = True
            return restored[0]

        def __eq__(self, other):
            return self._same(other)

        def __ne__(self, other):
            return not self._same(other)

        __hash__ = int.__hash__

    poller.parent_pid = ParentPid(real)
    return poller, real, restored


def checkpoint_with_helper(side, name: str | None, quiet: bool, progress_cb) -> dict:
    """NAME is valid (KernelSide.checkpoint checked it) or None."""
    kernel_app = _kernel_app()
    cf = kernel_app.abs_connection_file if kernel_app else None
    if not cf or not os.path.exists(cf):
        raise CheckpointError("%checkpoint needs a Jupyter kernel (this IPython has no connection file)")
    store = Store()
    name = name or store.new_name()
    if (store.root / name).exists():
        raise CheckpointError(f"a checkpoint named {name!r} already exists in {store.root}: "
                              "choose another name or delete it first")
    work = Path(tempfile.mkdtemp(prefix="nbcheckpoint-helper-"))
    args = {"pid": os.getpid(), "name": name, "root": str(store.root), "connection_file": cf,
            "notebook": side._notebook(), "execution_count": side._execution_count(),
            "kernel_id": _kernel_id(cf)}
    (work / "args.json").write_text(json.dumps(args))
    prog = Progress(f"checkpoint '{name}'", quiet=quiet, callback=progress_cb)
    prog.show("starting a helper outside the kernel (the kernel pauses while its memory is copied)",
              force=True)
    frontend.flush_std()
    life = Life()
    guard = _guard_parent_poller(kernel_app, life)
    try:
        try:
            # the log is the helper's: our copy is closed before it can dump us (an fd to a
            # file deleted afterwards would make the image unrestorable)
            with open(work / "helper.log", "ab") as log:
                p = subprocess.Popen([sys.executable, "-m", "nbcheckpoint.kernel.helper", str(work)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                     close_fds=True, start_new_session=True)
            out, _ = p.communicate(timeout=SPAWN_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CheckpointError(f"could not start the checkpoint helper: {e}") from None
        try:
            helper_pid = int(out.split()[0])
        except (ValueError, IndexError):
            raise CheckpointError(f"the checkpoint helper did not start (exit status {p.returncode}); "
                                  f"its log: {work / 'helper.log'}") from None
        done = work / "done.json"
        while True:
            if life.restored():
                break
            if os.path.exists(done):
                if life.restored():
                    break
                res = json.loads(done.read_text())
                if not res.get("ok"):
                    prog.finish("failed")
                    raise CheckpointError(res.get("message") or "the checkpoint failed")
                meta = res["checkpoint"]
                prog.finish("done")
                if not quiet:
                    print(saved_line(meta))
                    print(helper_mode_note(name, restore_command(store.root / name / "image",
                                                                 bool(meta.get("shell_job")))))
                shutil.rmtree(work, ignore_errors=True)
                return side._record({"event": SAVED, "checkpoint": meta, "mode": "helper"})
            if not pid_alive(helper_pid) and not os.path.exists(done):
                # a copy restored from an image frozen after the check above, in this
                # iteration, finds the helper gone and its workdir removed: not a failure
                if life.restored():
                    break
                prog.finish("failed")
                log_text = ""
                try:
                    log_text = (work / "helper.log").read_text()[-2000:]
                except OSError:
                    pass
                raise CheckpointError(f"the checkpoint helper (pid {helper_pid}) died without an answer"
                                      + (f"; its log ends with:\n{log_text}" if log_text else ""))
            time.sleep(0.05)
        # ---- a kernel restored from the image this loop was frozen in
        if guard:
            guard[2][0] = True      # the poller's ParentPid equals any parent from now on
        try:
            meta = store.get(name).meta
        except StoreError:
            meta = {"name": name}
        return side._restored({"event": RESTORED, "checkpoint": public_meta(meta)}, prog, quiet)
    finally:
        if guard and not guard[2][0]:
            guard[0].parent_pid = guard[1]      # the original watches its parent again


def _kernel_id(cf: str) -> str | None:
    base = os.path.basename(cf)
    if base.startswith("kernel-") and base.endswith(".json"):
        return base[len("kernel-"):-len(".json")]
    return None


# ---------------------------------------------------------------------------- the helper

def restore_command(image, shell_job: bool) -> str:
    return (f"nbcheckpoint restore -D {image} --tcp-close --file-locks"
            + (" --shell-job" if shell_job else "") + " -d")


def _write_done(work: Path, result: dict) -> None:
    tmp = work / f".done.{os.getpid()}"
    tmp.write_text(json.dumps(result))
    os.rename(tmp, work / "done.json")


def run_helper(work: Path) -> int:
    args = json.loads((work / "args.json").read_text())
    pending = None
    try:
        store = Store(args["root"])
        with open(args["connection_file"]) as f:
            conn = json.load(f)
        pending = store.begin(args["name"])
        t0 = time.time()
        stats = engine.dump(args["pid"], pending.image, options=dump_options())
        meta = checkpoint_meta(pending.image, stats, conn, t0, kernel_id=args.get("kernel_id"),
                               notebook=args.get("notebook"), execution_count=args.get("execution_count"),
                               pid=args["pid"], mode="helper", shell_job=bool(outside_terminals(pending.image)))
        ck = pending.commit(meta)
        pending = None
        _write_done(work, {"ok": True, "checkpoint": public_meta(ck.meta)})
        return 0
    except Exception as e:
        if pending is not None:
            pending.abort()
        traceback.print_exc()
        _write_done(work, {"ok": False, "message": str(e) or type(e).__name__})
        return 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m nbcheckpoint.kernel.helper WORKDIR", file=sys.stderr)
        return 2
    work = Path(argv[0])
    pid = os.fork()
    if pid:
        print(pid, flush=True)              # the kernel waits for this line, then for our exit
        os._exit(0)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)                      # stderr stays: WORKDIR/helper.log
    os.close(devnull)
    # wait until our parent is gone and reaped: then we are outside the kernel's tree
    kernel_pid = int(json.loads((work / "args.json").read_text())["pid"])
    for _ in range(500):
        if not _is_child_of_kernel(kernel_pid):
            break
        time.sleep(0.01)
    else:
        _write_done(work, {"ok": False, "message": "the checkpoint helper could not leave the kernel's "
                                                   "process tree"})
        os._exit(1)
    code = run_helper(work)
    os._exit(code)


def _is_child_of_kernel(kernel_pid: int) -> bool:
    """Is any ancestor of ours the kernel?"""
    p = os.getppid()
    for _ in range(64):
        if p == kernel_pid:
            return True
        if p <= 1:
            return False
        try:
            with open(f"/proc/{p}/stat") as f:
                p = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


if __name__ == "__main__":
    sys.exit(main())
