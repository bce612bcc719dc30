"""--leave-running hazards (files/regfile.py check): after a leave-running dump the process
goes on; if it then deletes or replaces a file it had open, restore refuses before any
process exists, naming the file and --leave-running.  Files it merely went on writing are
accepted, and a plain leave-running round trip still works."""
import os
import signal
import time

import pytest

from conftest import wait_pid_free


@pytest.fixture(scope="module")
def engine():
    import nbcheckpoint.engine as engine
    return engine


def _go_on(t, timeout=10.0):
    """SIGUSR2: the original changes its files as MODE says, then prints MUTATED."""
    t.signal(signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while "MUTATED\n" not in t.log():
        assert t.alive() and time.monotonic() < deadline, t.log()
        time.sleep(0.02)


@pytest.mark.parametrize("mode,said", [("delete", "no longer exists"), ("replace", "replaced by another file")])
def test_changed_file_refused(engine, launch, images, mode, said):
    t = launch("leave_running", args=(mode,))
    img = images()
    t.checkpoint(img, leave_running=True)
    _go_on(t)
    t.kill()                                # the original is gone; its PID is free
    wait_pid_free(t.pid)
    victim = str(t.workdir / "data" / "victim.dat")
    with pytest.raises(engine.RestoreError) as ei:
        engine.restore(str(img))
    msg = str(ei.value)
    assert victim in msg and said in msg and "--leave-running" in msg, msg
    assert f"process {t.pid}: fd 11" in msg, msg
    assert not os.path.exists(f"/proc/{t.pid}"), "restore created a process before refusing"


def test_file_put_back_accepted(engine, launch, images):
    """The fix the error suggests: the file put back as it was (cp -a keeps size and mtime)."""
    import shutil
    t = launch("leave_running", args=("replace",))
    victim = t.workdir / "data" / "victim.dat"
    img = images()
    t.checkpoint(img, leave_running=True)
    shutil.copy2(victim, t.workdir / "victim.snapshot")
    _go_on(t)
    t.kill()
    with pytest.raises(engine.RestoreError, match="replaced"):
        t.restore(img)
    shutil.copy2(t.workdir / "victim.snapshot", victim)
    t.restore(img)
    t.expect_pass()


def test_written_file_accepted(engine, launch, images):
    """The round trip: the original writes on after the dump (data.dat grows, its mtime and
    the log file move on), verifies itself and exits; the image restores all the same."""
    t = launch("leave_running", args=("grow",))
    img = images()
    t.checkpoint(img, leave_running=True)
    _go_on(t)
    t.expect_pass()
    t.reap()
    assert os.path.getsize(t.workdir / "data" / "data.dat") > 8192
    t.restore(img)
    t.expect_pass()


def test_round_trip(engine, launch, images):
    t = launch("leave_running")
    img = images()
    t.checkpoint(img, leave_running=True)
    time.sleep(0.2)
    assert t.alive(), t.log()
    t.expect_pass()
    t.reap()
    t.restore(img)
    t.expect_pass()


def test_dump_leaves_the_callers_options_alone(engine, launch, images):
    """dump(leave_running=True) does not write leave_running into the Options it was given."""
    t = launch("leave_running")
    opts = engine.Options()
    engine.dump(t.pid, str(images()), leave_running=True, options=opts)
    assert opts == engine.Options()
    t.expect_pass()
    t.reap()


def test_deleted_after_plain_dump(engine, launch, images):
    """Without --leave-running the message does not blame the process."""
    t = launch("leave_running")
    img = images()
    t.checkpoint(img)
    os.unlink(t.workdir / "data" / "victim.dat")
    with pytest.raises(engine.RestoreError) as ei:
        t.restore(img)
    msg = str(ei.value)
    assert "victim.dat" in msg and "no longer exists" in msg and "--leave-running" not in msg, msg


def test_deleted_while_open_at_dump_is_fine(engine, launch, images):
    """A file already deleted at the dump is in the image: a leave-running dump restores."""
    t = launch("deleted_file")
    img = images()
    t.checkpoint(img, leave_running=True)
    t.expect_pass()
    t.reap()
    t.restore(img)
    t.expect_pass()


def test_shared_file_mapping_written_after_dump(engine, launch, images):
    """A MAP_SHARED file is the process's memory: that it changed after a leave-running dump
    is what the process did, not a hazard.  A privately mapped file that changed is refused."""
    t = launch("mappings")
    img = images()
    t.checkpoint(img, leave_running=True)
    shared = t.workdir / "shared.dat" if (t.workdir / "shared.dat").exists() else next(t.workdir.rglob("shared.dat"))
    s0 = os.stat(shared)                 # written through the mapping since: a new mtime
    os.utime(shared, ns=(s0.st_atime_ns, s0.st_mtime_ns + 10**9))
    t.expect_pass()
    t.reap()
    wait_pid_free(t.pid)
    private = shared.with_name("priv.dat")
    st = os.stat(private)
    os.utime(private, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(engine.RestoreError, match="priv.dat changed since the dump.*--leave-running"):
        engine.restore(str(img))
    os.utime(private, ns=(st.st_atime_ns, st.st_mtime_ns))
    res = engine.restore(str(img))
    t.adopt_restored(res)
    assert t.alive()
