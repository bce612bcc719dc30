"""pidfds (files/pidfd.py): what is recorded, a pidfd of a process outside the tree refused
by name, and a tree living in a PID namespace.  Target pidfd.c checks the restored fds
itself (it also goes through every test of test_engine_targets.py)."""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

from nbcheckpoint.engine import Options, UnsupportedError, dump, restore
from nbcheckpoint.engine.show import show
from nbcheckpoint.engine.files import pidfd
from nbcheckpoint.engine.images import files_pb2, imagedir


def test_image_contents(launch, images):
    t = launch("pidfd")
    img = images()
    t.checkpoint(img, leave_running=True)
    entries = imagedir.ImageReader(str(img)).messages("files.img", files_pb2.FileEntry)
    got = sorted((e.pidfd.pid, e.flags & pidfd.PIDFD_FLAGS) for e in entries if e.kind == files_pb2.PIDFD)
    kids = sorted(int(c) for c in open(f"/proc/{t.pid}/task/{t.pid}/children").read().split())
    # the waiting kid (blocking, and nonblocking), the zombie, the reaped one (0), itself (thread)
    assert got == sorted([(kids[0], 0), (kids[0], os.O_NONBLOCK), (kids[1], 0), (0, 0),
                          (t.pid, pidfd.PIDFD_THREAD)]), got
    text = show(str(img))
    assert f"pidfd of process {kids[0]}" in text and "pidfd of a process that had exited" in text, text
    assert f"pidfd of process {t.pid} (PIDFD_THREAD)" in text, text
    t.expect_pass()


def test_outside_process_refused_by_name(launch, images):
    """A pidfd of a process outside the tree (here: the test itself) fails the dump, naming
    the holder, the fd, the kind and the outside process; the target lives on, intact."""
    me = os.getpid()
    t = launch("pidfd", args=(me,))
    fd = next(int(n) for n in os.listdir(f"/proc/{t.pid}/fd")
              if f"Pid:\t{me}\n" in open(f"/proc/{t.pid}/fdinfo/{n}").read())
    img = images()
    with pytest.raises(UnsupportedError) as ei:
        dump(t.pid, str(img))
    msg = str(ei.value)
    assert re.search(rf"process {t.pid}: fd {fd} is a pidfd of process {me}\b", msg), msg
    assert "outside the checkpointed tree" in msg, msg
    assert not img.exists()
    time.sleep(0.1)
    assert t.alive(), t.log()
    t.expect_pass()


def test_pidns(launch, images):
    """Restored into a PID namespace, then dumped from there (fdinfo's Pid is the engine's
    view, the image keeps the tree's) and restored again: the pidfds name the same processes."""
    t = launch("pidfd")
    img = images()
    t.checkpoint(img)
    res = restore(str(img), options=Options(pidns=True))
    try:
        img2 = images("in-ns")
        dump(res.pid, str(img2))
        os.waitpid(res.init_pid, 0)
        res = restore(str(img2))
        assert res.init_pid is not None and res.pid != t.pid
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
