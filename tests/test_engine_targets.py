"""Every target through the engine: launch, READY, run a little, dump, restore, SIGUSR1,
and the restored process must verify its own state (PASS, exit 0).  Every target also goes
through dump -> restore -> dump -> restore, and through a --leave-running dump (the original
goes on and passes; the image, taken while it ran, restores and passes too).  Kind-specific
test files hold only what is particular to their kind.

Each test is independent and uses its own image directories under tmp_path."""
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ALL_TARGETS, target_params

RUN_BEFORE_DUMP = 0.3


@pytest.fixture(scope="module")
def engine():
    """The engine API; imported here so that a broken engine fails these tests, not
    collection of the whole suite."""
    import nbcheckpoint.engine as engine
    return engine


@pytest.mark.parametrize("name", target_params(ALL_TARGETS))
def test_dump_restore(engine, launch, images, name):
    t = launch(name)
    time.sleep(RUN_BEFORE_DUMP)
    img = images()
    t.checkpoint(img)                 # kills and reaps the original
    assert not t.alive()
    t.restore(img)
    t.expect_pass()


@pytest.mark.parametrize("name", target_params(ALL_TARGETS))
def test_dump_restore_dump_restore(engine, launch, images, name):
    t = launch(name)
    time.sleep(RUN_BEFORE_DUMP)
    img1 = images("first")
    t.checkpoint(img1)
    t.restore(img1)
    time.sleep(RUN_BEFORE_DUMP)       # the restored process runs on...
    assert t.alive(), t.log()
    img2 = images("second")
    t.checkpoint(img2)                # ...and is dumped again (now as our restored child)
    t.restore(img2)
    t.expect_pass()


# targets whose image records a TID beyond the threads' own (timers: a SIGEV_THREAD_ID timer's)
IN_PIDNS_AGAIN = ["timers"]


@pytest.mark.parametrize("name", IN_PIDNS_AGAIN)
def test_dump_in_pidns_restore(engine, launch, images, name):
    """Restored into a PID namespace (--pidns; always without root), the process is dumped
    again from outside it, where its TIDs differ: the image must hold the TIDs it sees."""
    t = launch(name)
    time.sleep(RUN_BEFORE_DUMP)
    img1 = images("first")
    t.checkpoint(img1)
    t.adopt_restored(engine.restore(str(img1), options=engine.Options(pidns=True)))
    assert t.init_pid is not None and t.pid != t.vpid
    time.sleep(RUN_BEFORE_DUMP)
    assert t.alive(), t.log()
    img2 = images("second")
    t.checkpoint(img2)
    t.restore(img2)
    t.expect_pass()


# mappings: its MAP_SHARED file *is* its memory, and the original goes on writing it after
# the dump -- the image then sees newer file contents, the hazard --leave-running documents.
LEAVE_RUNNING = [n for n in ALL_TARGETS if n != "mappings"]


@pytest.mark.parametrize("name", target_params(LEAVE_RUNNING))
def test_leave_running(engine, launch, images, name):
    t = launch(name)
    time.sleep(RUN_BEFORE_DUMP)
    img = images()
    t.checkpoint(img, leave_running=True)
    time.sleep(0.2)
    assert t.alive(), f"{name} did not survive a leave-running dump\n{t.log()}"
    t.expect_pass()                   # the original carries on and verifies itself
    t.reap()
    t.restore(img)                    # the image, taken while it ran, restores too
    t.expect_pass()


def test_restore_same_image_twice(engine, launch, images):
    t = launch("counter")
    time.sleep(RUN_BEFORE_DUMP)
    img = images()
    t.checkpoint(img)
    t.restore(img)
    t.expect_pass()
    t.reap()
    t.restore(img)                    # an image is not consumed by restoring it
    t.expect_pass()


def test_dump_into_nonempty_dir_refused(engine, launch, tmp_path):
    t = launch("counter")
    img = tmp_path / "busy"
    img.mkdir()
    (img / "something").write_text("not an image")
    with pytest.raises(engine.EngineError):
        engine.dump(t.pid, str(img))
    assert (img / "something").read_text() == "not an image"
    assert t.alive(), "a refused dump must leave the process running"
    t.expect_pass()


def _cli(*args, timeout=120, preexec_fn=None):
    exe = shutil.which("nbcheckpoint")
    cmd = [exe] if exe else [sys.executable, "-c",
                             "import sys; from nbcheckpoint.cli import main; sys.exit(main())"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, preexec_fn=preexec_fn)


def test_cli_dump_restore_detached(engine, launch, images, tmp_path):
    """The CLI as a separate process: dump, then restore --detach.  The restored process is
    not our child, so the harness follows it through /proc and the log."""
    t = launch("counter")
    time.sleep(RUN_BEFORE_DUMP)
    img = images()
    r = _cli("dump", "--pid", t.pid, "--images", img)
    assert r.returncode == 0, f"dump failed\n{r.stdout}\n{r.stderr}"
    t.reap()                          # the original is our Popen child
    pidfile = tmp_path / "restored.pid"
    r = _cli("restore", "--images", img, "--detach", "--pidfile", pidfile)
    assert r.returncode == 0, f"restore failed\n{r.stdout}\n{r.stderr}"
    pid = int(pidfile.read_text().strip())
    t.adopt_restored(pid, is_child=False)
    assert t.alive(), t.log()
    t.expect_pass()                   # verdict from the log; exit status is not ours to see


def _disable_thp():
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(41, 1, 0, 0, 0)     # PR_SET_THP_DISABLE


def test_engine_thp_disable_not_inherited(engine, launch, images, tmp_path):
    """The stubs inherit the engine's mm flags by fork: an engine with THP disabled must
    still give prctl_flags's grandchild (THP enabled in the image) THP back."""
    t = launch("prctl_flags")
    time.sleep(RUN_BEFORE_DUMP)
    img = images()
    t.checkpoint(img)
    pidfile = tmp_path / "restored.pid"
    r = _cli("restore", "--images", img, "--detach", "--pidfile", pidfile, preexec_fn=_disable_thp)
    assert r.returncode == 0, f"restore failed\n{r.stdout}\n{r.stderr}"
    t.adopt_restored(int(pidfile.read_text().strip()), is_child=False)
    t.expect_pass()
