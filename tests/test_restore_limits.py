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
import logging
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
def _cgroup(controller: str, settings: dict[str, str]):
    """A new cgroup of `controller` with `settings` ({file name: value}, in order);
    removed on exit (its processes must be gone by then)."""
    cg = _controller_root(controller) / f"nbcheckpoint-test-{os.getpid()}-{time.monotonic_ns()}"
    cg.mkdir()
    try:
        for k, v in settings.items():
            (cg / k).write_text(v)
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
    with _cgroup("pids", {"pids.max": str(room)}) as cg:
        r = _run_in(cg, argv)
        deadline = time.monotonic() + 10
        while _tasks(cg) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _tasks(cg), f"left in the cgroup: {_tasks(cg)}"
    assert r.returncode != 0, r
    assert f"process {t.pid}: cannot create its thread" in r.stderr and "EAGAIN" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    wait_pid_free(t.pid, timeout=2)
    t.restore(img)
    t.expect_pass()


def test_affinity_outside_cpuset_is_narrowed(launch, images, caplog):
    """Threads pinned to CPU 1 at the dump, restored by an engine whose cpuset has only
    CPU 0: the restore succeeds, every thread runs on {0}, a warning names each thread with
    the dumped and the new mask, and the target passes its own checks."""
    assert {0, 1} <= os.sched_getaffinity(0), "this test needs CPUs 0 and 1 (CI's VMs have 2)"
    t = launch("threads")
    for tid in os.listdir(f"/proc/{t.pid}/task"):
        os.sched_setaffinity(int(tid), {1})
    tids = sorted(int(x) for x in os.listdir(f"/proc/{t.pid}/task"))
    img = images()
    t.checkpoint(img)
    root = _controller_root("cpuset")
    settings = {"cpuset.cpus": "0"}
    if (root / "cpuset.mems").exists():           # v1: a cpuset needs its memory nodes
        settings["cpuset.mems"] = (root / "cpuset.mems").read_text().strip()
    home = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                if line.split(":", 2)[1] in ("cpuset", ""))
    mine = os.sched_getaffinity(0)
    with _cgroup("cpuset", settings) as cg:
        (cg / "cgroup.procs").write_text(str(os.getpid()))
        try:
            with caplog.at_level(logging.WARNING, logger="nbcheckpoint"):
                t.restore(img)
        finally:
            (root / home.lstrip("/") / "cgroup.procs").write_text(str(os.getpid()))
            os.sched_setaffinity(0, mine)
        assert sorted(int(x) for x in os.listdir(f"/proc/{t.pid}/task")) == tids
        for tid in tids:
            assert os.sched_getaffinity(tid) == {0}, tid
            assert f"process {t.pid} thread {tid}: CPU affinity [1] as dumped, but only CPUs [0] are " \
                   "allowed here: restored with [0]" in caplog.text, caplog.text
        t.expect_pass()
        t.reap()


def test_no_room_for_the_io_thread(launch, images):
    """A pids cgroup with room for the engine and the one stub only: the engine's page I/O
    thread cannot start, so the pages are moved without it (it was a traceback: "can't
    start new thread").  Found by tests/fuzz."""
    t = launch("counter")
    img = images()
    t.checkpoint(img)
    argv = [sys.executable, "-m", "nbcheckpoint", "restore", "-d", "-D", str(img)]
    with _cgroup("pids", {"pids.max": "2"}) as cg:
        r = _run_in(cg, argv)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r
        t.adopt_restored(int(r.stdout.split()[0]), is_child=False)
        t.expect_pass()
        t.reap()
