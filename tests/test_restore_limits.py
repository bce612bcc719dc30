"""Restores under limits the image cannot know about (a pids cgroup, a cpuset):

- a restore that fails once the restored process's threads exist (the pids cgroup refuses
  a thread's clone) returns with the error, kills and reaps everything it made and leaves
  the image's PIDs free -- with and without --pidns (it used to hang in wait4 for ever:
  the leader of a killed stub cannot be reaped while its other threads, traced by the
  engine, wait for a __WALL wait);
- a multi-threaded process dumped on CPU 1 and restored where only CPU 0 is allowed (a
  cpuset) comes back on the allowed CPUs, with a warning naming each thread and both masks.

cgroup v1 (/sys/fs/cgroup/pids, /sys/fs/cgroup/cpuset) or v2 (/sys/fs/cgroup); every
cgroup made is removed at the end.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import wait_pid_free

HANG = 30           # seconds: a restore that takes longer than this has hung


def _controller_root(name: str) -> Path:
    """Where the `name` controller's hierarchy is: v1's own mount, else v2 with the
    controller enabled for the root's children."""
    v1 = Path(f"/sys/fs/cgroup/{name}")
    if (v1 / "cgroup.procs").exists():
        return v1
    v2 = Path("/sys/fs/cgroup")
    if name not in (v2 / "cgroup.controllers").read_text().split():
        pytest.fail(f"no {name} cgroup controller here: this test needs one")
    (v2 / "cgroup.subtree_control").write_text(f"+{name}")
    return v2


@contextlib.contextmanager
def _cgroup(controller: str, **settings: str):
    """A new cgroup of `controller` with `settings` (file name with . as _ -> value);
    removed on exit (its processes must be gone by then)."""
    cg = _controller_root(controller) / f"nbcheckpoint-test-{os.getpid()}-{time.monotonic_ns()}"
    cg.mkdir()
    try:
        for k, v in settings.items():
            (cg / k.replace("_", ".", 1)).write_text(v)
        yield cg
    finally:
        deadline = time.monotonic() + 10
        while True:
            try:
                cg.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _run_in(cg: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """Run argv inside cgroup cg; fail (not hang) if it does not end within HANG seconds."""
    sh = f'echo $$ > {cg}/cgroup.procs && exec "$@"'
    p = subprocess.Popen(["sh", "-c", sh, "sh", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        p.kill()            # the stubs die with their tracer (PDEATHSIG, EXITKILL)
        out, err = p.communicate()
        pytest.fail(f"restore hung (killed after {HANG}s)\n--- stderr ---\n{err}")
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def _tasks(cg: Path) -> list[str]:
    return (cg / "cgroup.procs").read_text().split()


@pytest.mark.parametrize("pidns", [False, True], ids=["plain", "pidns"])
def test_thread_refused_fails_cleanly(launch, images, pidns):
    """The pids cgroup has room for the engine, the stubs and one thread: the next thread's
    clone3 fails (EAGAIN).  The CLI returns with that error; nothing is left: no task in
    the cgroup, the image's PIDs free; the image then restores and passes."""
    t = launch("threads")
    img = images()
    t.checkpoint(img)
    # the engine (1), the init with --pidns (1), the root stub (1), one thread (1)
    room = 3 + pidns
    argv = [sys.executable, "-m", "nbcheckpoint", "restore", "-D", str(img)] + (["--pidns"] if pidns else [])
    with _cgroup("pids", pids_max=str(room)) as cg:
        r = _run_in(cg, argv)
        deadline = time.monotonic() + 10
        while _tasks(cg) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _tasks(cg), f"left in the cgroup: {_tasks(cg)}"
    assert r.returncode != 0, r
    assert "clone3" in r.stderr and "EAGAIN" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    wait_pid_free(t.pid, timeout=2)
    t.restore(img)
    t.expect_pass()
