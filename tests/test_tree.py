"""Process trees: parents, sessions, groups, zombies, stopped tasks, shared memory."""
from __future__ import annotations

import os

from nbcheckpoint.engine import restore


def _tree(pid: int) -> dict[int, tuple]:
    """pid -> (ppid, pgid, sid, state, comm) of pid and its descendants."""
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        with open(f"/proc/{p}/stat") as f:
            raw = f.read()
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        out[p] = (int(fields[1]), int(fields[2]), int(fields[3]), fields[0], comm)
        for tid in os.listdir(f"/proc/{p}/task"):
            with open(f"/proc/{p}/task/{tid}/children") as f:
                todo += [int(c) for c in f.read().split()]
    return out


def test_tree_round_trip(launch, images):
    t = launch("tree")
    before = _tree(t.pid)
    assert len(before) == 5 and sorted(s[3] for s in before.values()) == ["S", "S", "S", "T", "Z"]
    img = images()
    t.checkpoint(img)
    t.restore(img)
    after = _tree(t.pid)
    assert after == before, "same pids, parents, groups, sessions, states and names"
    t.expect_pass()


def test_tree_twice(launch, images):
    t = launch("tree")
    before = _tree(t.pid)
    for tag in ("one", "two"):
        img = images(tag)
        t.checkpoint(img)
        t.restore(img)
        assert _tree(t.pid) == before
    t.expect_pass()


def test_tree_leave_running_then_restore(launch, images):
    t = launch("tree")
    img = images()
    t.checkpoint(img, leave_running=True)
    t.expect_pass()           # the original finishes its own check
    res = restore(img)        # the tree's pids are free again
    t.adopt_restored(res.pid)
    t.expect_pass()
