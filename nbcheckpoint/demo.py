"""``nbcheckpoint demo``: checkpoint a sample process, restore it, verify its state.

The target (demo_target.py) writes its state as JSON lines to a log file when
sent SIGUSR1.  Its stdio goes to a regular file and /dev/null, in a session
of its own: the engine cannot dump pipes or terminals yet.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from . import engine
from .cli_progress import Progress
from .engine.errors import NbcheckpointError
from .engine.sys.proc import pid_alive
from .engine.units import format_size


class DemoError(NbcheckpointError):
    pass


class StateLog:
    """Reads the JSON lines the target appends to its log."""

    def __init__(self, path: str):
        self.path = path
        self.offset = 0
        self.pending = b""

    def next(self, alive, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            self.offset += len(chunk)
            self.pending += chunk
            if b"\n" in self.pending:
                line, self.pending = self.pending.split(b"\n", 1)
                return json.loads(line)
            if not alive():
                raise DemoError("the target process died (see its output file)")
            if time.monotonic() > deadline:
                raise DemoError(f"no state line from the target within {timeout:.0f}s")
            time.sleep(0.02)


def _stop(pid: int) -> None:
    """SIGTERM, then SIGKILL after 5 s; reaps it (our child)."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 30.0)):
        if not pid_alive(pid):
            break
        os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _describe(s: dict) -> str:
    return (f"ticks={s['ticks']} beats={s['beats']} generator next={s['gen_next']} "
            f"thread {'alive' if s['thread_alive'] else 'DEAD'} "
            f"data {format_size(s['size'])} sha256={s['sha256'][:16]}...")


def _verify(before: dict, after: dict, later: dict) -> list[tuple[bool, str]]:
    return [
        (after["pid"] == before["pid"], f"same pid ({before['pid']} -> {after['pid']})"),
        (after["token"] == before["token"], "same process, not a re-run (start token kept)"),
        (after["sha256"] == before["sha256"] and after["size"] == before["size"],
         f"256 MB of data intact (sha256 {before['sha256'][:16]}... -> {after['sha256'][:16]}...)"),
        (after["ticks"] > before["ticks"], f"counter continued ({before['ticks']} -> {after['ticks']})"),
        (after["gen_next"] == before["gen_next"] + 1,
         f"generator continued at the next item ({before['gen_next']} -> {after['gen_next']})"),
        (later["thread_alive"] and later["beats"] > after["beats"],
         f"thread alive and running after restore (beats {after['beats']} -> {later['beats']})"),
    ]


def run_demo(images: str | None = None, keep: bool = False, verbose: int = 0) -> int:
    tmp = tempfile.mkdtemp(prefix="nbcheckpoint-demo-")
    images = images or os.path.join(tmp, "images")
    log_path = os.path.join(tmp, "state.log")
    out_path = os.path.join(tmp, "target.out")
    target = None
    restored = None
    print(f"working in {tmp}")
    try:
        open(log_path, "w").close()
        with open(out_path, "w") as out:
            script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_target.py")
            # -I: a plain interpreter, standard library only (a small image).
            target = subprocess.Popen([sys.executable, "-I", script, log_path], cwd=tmp,
                                      stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        log = StateLog(log_path)
        log.next(lambda: target.poll() is None)
        print(f"[1/4] started target pid {target.pid}")

        target.send_signal(signal.SIGUSR1)
        before = log.next(lambda: target.poll() is None)
        print(f"      state:    {_describe(before)}")

        with Progress() as progress:
            stats = engine.dump(target.pid, images, progress=progress)
        try:
            target.wait(timeout=30)     # the dump killed it; reap it so its pid is free
        except subprocess.TimeoutExpired:
            raise DemoError("the target still runs after the dump") from None
        print(f"[2/4] {_dump_summary_short(stats)}")

        text = engine.show(images).rstrip("\n").splitlines()
        shown = text if verbose else text[:15]
        print(f"[3/4] image {images} ({format_size(stats.image_bytes)}):")
        for line in shown:
            print(f"      {line}")
        if len(shown) < len(text):
            print(f"      ... ({len(text) - len(shown)} more lines; -v shows all)")

        with Progress() as progress:
            res = engine.restore(images, progress=progress)
        restored = res.pid
        print(f"[4/4] restored pid {res.pid} in {res.seconds:.2f}s")
        os.kill(restored, signal.SIGUSR1)
        after = log.next(lambda: pid_alive(restored))
        print(f"      state:    {_describe(after)}")
        time.sleep(0.3)                 # let the thread and the counter move on
        os.kill(restored, signal.SIGUSR1)
        later = log.next(lambda: pid_alive(restored))
        print(f"      later:    {_describe(later)}")

        checks = _verify(before, after, later)
        for ok, what in checks:
            print(f"  {'OK  ' if ok else 'FAIL'} {what}")
        passed = all(ok for ok, _ in checks)
        print(f"demo {'passed' if passed else 'FAILED'}: dump {stats.total_seconds:.2f}s "
              f"(frozen {stats.frozen_seconds:.2f}s), restore {res.seconds:.2f}s, "
              f"memory {format_size(stats.pages_bytes)}, image {format_size(stats.image_bytes)}")
        return 0 if passed else 1
    except DemoError as e:
        print(f"nbcheckpoint: error: {e}", file=sys.stderr)
        _print_tail(out_path)
        return 1
    finally:
        if target is not None and target.poll() is None:
            target.kill()
            target.wait()
        if restored is not None:
            _stop(restored)
        if keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _dump_summary_short(stats) -> str:
    return (f"dumped {stats.threads} threads, {stats.vmas} VMAs, {format_size(stats.pages_bytes)} of pages "
            f"in {stats.total_seconds:.2f}s (frozen {stats.frozen_seconds:.2f}s); target killed")


def _print_tail(path: str) -> None:
    try:
        with open(path, "rb") as f:
            tail = f.read()[-2000:].decode("utf-8", "replace")
    except OSError:
        return
    if tail.strip():
        print("target output:\n" + tail, file=sys.stderr)
