"""Process trees: parents, sessions, groups, zombies, stopped tasks, shared memory."""
from __future__ import annotations

import os

import pytest

from nbcheckpoint.engine import restore


def _tree(t) -> dict[int, tuple]:
    """pid -> (ppid, pgid, sid, state, comm) of target T's root and its descendants, as they
    see them: through their own /proc (without root a restored tree lives in a PID namespace of
    its own, under other pids as we see it and its old ones inside)."""
    proc = f"/proc/{t.pid}/root/proc"
    out, todo = {}, [t.vpid]
    while todo:
        p = todo.pop()
        with open(f"{proc}/{p}/stat") as f:
            raw = f.read()
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        state = "S" if fields[0] in "RSD" else fields[0]     # running vs sleeping is a matter of timing
        out[p] = (int(fields[1]), int(fields[2]), int(fields[3]), state, comm)
        for tid in os.listdir(f"{proc}/{p}/task"):
            with open(f"{proc}/{p}/task/{tid}/children") as f:
                todo += [int(c) for c in f.read().split()]
    return out


def _restored(before: dict, t) -> dict:
    """BEFORE as T's restored tree must look: the same, but for the root's parent, which in a
    PID namespace of the tree's own (always without root) is the namespace's init, 1 there."""
    if not t.init_pid:
        return before
    ppid, *rest = before[t.vpid]
    return {**before, t.vpid: (1, *rest)}


def test_tree_round_trip(launch, images):
    t = launch("tree")
    before = _tree(t)
    assert len(before) == 5 and sorted(s[3] for s in before.values()) == ["S", "S", "S", "T", "Z"]
    img = images()
    t.checkpoint(img)
    t.restore(img)
    after = _tree(t)
    assert after == _restored(before, t), "same pids, parents, groups, sessions, states and names"
    t.expect_pass()


def test_tree_twice(launch, images):
    t = launch("tree")
    before = _tree(t)
    for tag in ("one", "two"):
        img = images(tag)
        t.checkpoint(img)
        t.restore(img)
        assert _tree(t) == _restored(before, t)
    t.expect_pass()


def test_tree_leave_running_then_restore(launch, images):
    t = launch("tree")
    img = images()
    t.checkpoint(img, leave_running=True)
    t.expect_pass()           # the original finishes its own check
    res = restore(img)        # the tree's pids are free again
    t.adopt_restored(res.pid)
    t.expect_pass()


def _ns_view(host_pid: int) -> tuple[str, list[str]]:
    """(pid namespace, NSpid line) of a process as /proc tells the engine."""
    ns = os.readlink(f"/proc/{host_pid}/ns/pid")
    with open(f"/proc/{host_pid}/status") as f:
        nspid = next(line.split()[1:] for line in f if line.startswith("NSpid:"))
    return ns, nspid


@pytest.mark.root_only      # without root every restore goes into a new PID namespace: no PID is taken there
def test_restore_over_running_original_needs_pidns(launch, images):
    """Without --pidns the tree's PIDs are the host's, taken while the original runs on."""
    from nbcheckpoint.engine import RestoreError
    t = launch("tree")
    img = images()
    t.checkpoint(img, leave_running=True)
    try:
        restore(img)
    except RestoreError as e:
        assert f"PID {t.pid}" in str(e) and "taken" in str(e)
    else:
        raise AssertionError("restore over a running original must fail without --pidns")
    t.expect_pass()


def test_pidns_restore_while_original_runs(launch, images, tmp_path):
    """--pidns: the PIDs are taken (the original runs on), so the tree comes back in a
    new PID namespace with the same numbers there, under an init, with /proc to match."""
    import signal
    import time
    from nbcheckpoint.engine import Options
    t = launch("tree")
    img = images()
    t.checkpoint(img, leave_running=True)
    res = restore(img, options=Options(pidns=True))
    try:
        assert res.vpid == t.pid and res.pid != t.pid and res.init_pid is not None
        ns, nspid = _ns_view(res.pid)
        assert ns != os.readlink("/proc/self/ns/pid")
        assert nspid == [str(res.pid), str(t.pid)], nspid
        # the restored root's parent is the namespace's init (PID 1 inside)
        with open(f"/proc/{res.pid}/status") as f:
            assert f"PPid:\t{res.init_pid}\n" in f.read()
        assert _ns_view(res.init_pid)[1] == [str(res.init_pid), "1"]
        # the namespace has its own /proc, where the root has its own number
        assert os.path.exists(f"/proc/{res.pid}/root/proc/{t.pid}/status")
        with open(f"/proc/{res.pid}/root/proc/{t.pid}/status") as f:
            assert f"NSpid:\t{t.pid}\n" in f.read()
        # the original finishes its own check
        before = t.log().count("PASS")
        t.expect_pass()
        # a tree living in a PID namespace is dumped with its own view of PIDs, and
        # comes back in a namespace again (the image says so; no option needed)
        from nbcheckpoint.engine import dump
        img2 = images("in-ns")
        dump(res.pid, img2)
        _, status = os.waitpid(res.init_pid, 0)    # root killed: the init exits
        res = restore(img2)
        assert res.vpid == t.pid and res.init_pid is not None
        assert _ns_view(res.pid)[1] == [str(res.pid), str(t.pid)]
        # the restored tree verifies itself (same checks as the original, with ns PIDs);
        # its output goes to the same log: wait for a second PASS
        os.kill(res.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while t.log().count("PASS") < before + 2 and "FAIL" not in t.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert t.log().count("PASS") == before + 2, t.log()
        _, status = os.waitpid(res.init_pid, 0)     # init exits with the root's status
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    finally:
        for p in (res.pid, res.init_pid):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(res.init_pid, os.WNOHANG)
        except ChildProcessError:
            pass


def test_pidns_epoll_registrations(launch, images):
    """A tree living in a PID namespace keeps its epoll registrations through a dump and
    restore: the epoll's owner is recorded as the process sees itself, not as the engine
    does (they differ there).  This is how the Jupyter shim runs every kernel."""
    import signal
    import time
    from nbcheckpoint.engine import Options, dump
    t = launch("eventfd_epoll")
    img = images()
    t.checkpoint(img)                                  # the original is gone
    res = restore(img, options=Options(pidns=True))    # now it lives in a namespace
    try:
        img2 = images("in-ns")
        dump(res.pid, img2)
        os.waitpid(res.init_pid, 0)
        res = restore(img2)
        assert res.init_pid is not None and _ns_view(res.pid)[1] == [str(res.pid), str(t.pid)]
        os.kill(res.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while "PASS" not in t.log() and "FAIL" not in t.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "PASS" in t.log(), t.log()
    finally:
        for p in (res.pid, res.init_pid):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(res.init_pid, 0)
        except ChildProcessError:
            pass
