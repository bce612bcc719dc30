"""Restores under limits the image cannot know about (a pids cgroup, a cpuset):

- a restore that fails once the restored process's threads exist (the pids cgroup refuses
  a thread's clone) returns with the error, kills and reaps everything it made and leaves
  the image's PIDs free -- with and without --pidns (it used to hang in wait4 for ever:
  the leader of a killed stub cannot be reaped while its other threads, traced by the
  engine, wait for a __WALL wait);
- a multi-threaded process dumped on CPU 1 and restored where only CPU 0 is allowed (a
  cpuset) comes back on the allowed CPUs, with a warning naming each thread and both masks.

cgroup v1 (/sys/fs/cgroup/pids, /sys/fs/cgroup/cpuset) or v2 (/sys/fs/cgroup); every
cgroup made is removed at the end.  Making a cgroup is root's: those tests are root_only, and
each limit has a twin that an ordinary user can set up -- RLIMIT_NPROC, which counts the
tasks of a user namespace of the restore's own (root is exempt from it: ordinary_user_only),
in place of the pids cgroup; the engine's own affinity (sched_setaffinity, as `taskset` sets
it) in place of the cpuset, in both passes.
"""
from __future__ import annotations

import contextlib
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import nspids, wait_pid_free

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


# `nbcheckpoint ARGV...` run as an ordinary user does, in a user namespace of its own, but with
# RLIMIT_NPROC at argv[1] set once inside it: the limit then counts the tasks of that namespace
# only (the namespace keeps the limit its creator had: the user's other processes do not count).
IN_NPROC = """
import resource, sys
from nbcheckpoint.engine.sys import userns
userns.enter()
n = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NPROC, (n, resource.getrlimit(resource.RLIMIT_NPROC)[1]))   # the soft one: the image's hard one stays
from nbcheckpoint import cli
sys.exit(cli.main(sys.argv[2:]))
"""


def _run_with_nproc(n: int, argv: list[str]) -> subprocess.CompletedProcess:
    """argv (nbcheckpoint's arguments) with room for n tasks (IN_NPROC); fail (not hang)
    if it does not end within HANG seconds."""
    try:
        return subprocess.run([sys.executable, "-c", IN_NPROC, str(n), *argv], capture_output=True, text=True,
                              timeout=HANG, start_new_session=True,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"restore hung (killed after {HANG}s)\n--- stderr ---\n{e.stderr}")


def _left_of(img: Path, exe: str) -> list[str]:
    """Processes of ours still running the engine on img (stubs, a namespace's init) or the
    target's binary, after a restore that failed (within a few seconds): 'pid: command'."""
    deadline = time.monotonic() + 10
    while True:
        left = []
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == os.getpid():
                continue
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                binary = os.readlink(f"/proc/{d}/exe")
            except OSError:
                continue
            if str(img) in cmd or binary == exe:
                left.append(f"{d}: {cmd}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


@pytest.mark.root_only          # making a cgroup is root's; the twin below uses RLIMIT_NPROC
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


@pytest.mark.ordinary_user_only     # root is exempt from RLIMIT_NPROC: its test is the one above
def test_thread_refused_by_nproc_fails_cleanly(launch, images):
    """RLIMIT_NPROC leaves room in the restore's user namespace for the engine, the init, the
    root stub and one thread -- both the restore's own (IN_NPROC) and the image's (lowered with
    prlimit before the dump), so that whichever the stub has when it makes the threads (the
    image's are set once the threads exist, as CRIU does) is that tight: the next thread's
    clone3 fails (EAGAIN).  The CLI returns with that error, naming the limits that may cause
    it; nothing is left; an image of the same process with its usual limit then restores and
    passes."""
    t = launch("threads")
    exe = os.readlink(f"/proc/{t.pid}/exe")
    usual = images("usual")
    t.checkpoint(usual, leave_running=True)
    resource.prlimit(t.pid, resource.RLIMIT_NPROC, (4, resource.getrlimit(resource.RLIMIT_NPROC)[1]))
    low = images("low")
    t.checkpoint(low)
    r = _run_with_nproc(4, ["restore", "-D", str(low)])
    assert not _left_of(low, exe), _left_of(low, exe)
    assert r.returncode == 1, r
    assert f"process {t.vpid}: cannot create its thread" in r.stderr and "EAGAIN" in r.stderr, r.stderr
    assert "a pids cgroup or RLIMIT_NPROC leaves no room for it" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    t.restore(usual)
    t.expect_pass()


def _inner_tids(pid: int) -> dict[int, int]:
    """{tid as the process sees it: tid as we see it} of pid's threads."""
    return {nspids(int(tid))[-1]: int(tid) for tid in os.listdir(f"/proc/{pid}/task")}


def test_affinity_outside_allowed_cpus_is_narrowed(launch, images, caplog):
    """As test_affinity_outside_cpuset_is_narrowed, with the CPUs allowed to the engine set
    as `taskset` does (sched_setaffinity: anyone may narrow their own), not by a cpuset:
    threads pinned to CPU 1 at the dump come back on {0}, with the warning, and pass."""
    assert {0, 1} <= os.sched_getaffinity(0), "this test needs CPUs 0 and 1 (CI's VMs have 2)"
    t = launch("threads")
    for tid in os.listdir(f"/proc/{t.pid}/task"):
        os.sched_setaffinity(int(tid), {1})
    tids = sorted(_inner_tids(t.pid))
    img = images()
    t.checkpoint(img)
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    try:
        with caplog.at_level(logging.WARNING, logger="nbcheckpoint"):
            t.restore(img)
    finally:
        os.sched_setaffinity(0, mine)
    restored = _inner_tids(t.pid)
    assert sorted(restored) == tids
    for tid in tids:
        assert os.sched_getaffinity(restored[tid]) == {0}, tid
        assert f"process {t.vpid} thread {tid}: CPU affinity [1] as dumped, but only CPUs [0] are " \
               "allowed here: restored with [0]" in caplog.text, caplog.text
    t.expect_pass()


@pytest.mark.root_only          # making a cgroup is root's; test_affinity_outside_allowed_cpus_is_narrowed
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


@pytest.mark.root_only          # making a cgroup is root's; the twin below uses RLIMIT_NPROC
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


@pytest.mark.ordinary_user_only     # root is exempt from RLIMIT_NPROC: its test is the one above
def test_no_room_for_the_io_thread_by_nproc(launch, images):
    """RLIMIT_NPROC leaves room in the restore's user namespace for the engine, the init and
    the one stub only: the engine's page I/O thread cannot start, and the pages are moved
    without it."""
    t = launch("counter")
    img = images()
    t.checkpoint(img)
    r = _run_with_nproc(3, ["restore", "-d", "-D", str(img)])
    assert r.returncode == 0 and "Traceback" not in r.stderr, r
    t.adopt_restored(int(r.stdout.split()[0]), is_child=False)
    t.expect_pass()
    t.reap()
