"""File locks through the engine (files/locks.py): flock, POSIX and OFD locks are refused
without --file-locks (the target runs on), saved and re-acquired with it (a child of the
restored process is refused conflicting locks; /proc/locks shows them as ours), and an
image with locks needs --file-locks on restore too."""
import inspect
import os

import pytest

from conftest import wait_pid_free

KINDS = ["flock", "posix", "ofd"]
WHAT = {"flock": "flock()", "posix": "POSIX (fcntl F_SETLK)", "ofd": "OFD (fcntl F_OFD_SETLK)"}
FD = {"flock": 10, "posix": 11, "ofd": 12}
PATH = {"flock": "flock.dat", "posix": "posix.dat", "ofd": "ofd.dat"}


@pytest.fixture(scope="module")
def engine():
    import nbcheckpoint.engine as engine
    return engine


@pytest.fixture(autouse=True)
def wired(monkeypatch):
    """dump.py / restore.py call files.locks at the points below; until that wiring lands,
    put the same two calls there (after a process's fds are dumped; after they are placed)."""
    import importlib
    dump_mod = importlib.import_module("nbcheckpoint.engine.dump")
    restore_mod = importlib.import_module("nbcheckpoint.engine.restore")
    from nbcheckpoint.engine import files
    from nbcheckpoint.engine.files import locks
    if "dump_locks" not in inspect.getsource(dump_mod):
        orig_dump_fds = files.DumpContext.dump_fds

        def dump_fds(self, pid):
            fds = orig_dump_fds(self, pid)
            locks.dump_locks(self, pid, fds)
            return fds
        monkeypatch.setattr(files.DumpContext, "dump_fds", dump_fds)
    if "restore_locks" not in inspect.getsource(restore_mod):
        orig_after_place = files.RestoreContext.after_place

        def after_place(self, remote, pid, fds):
            orig_after_place(self, remote, pid, fds)
            locks.restore_locks(self, remote, pid, fds)
        monkeypatch.setattr(files.RestoreContext, "after_place", after_place)


def _saved_locks(img, pid):
    from nbcheckpoint.engine.images import imagedir, locks_pb2
    rd = imagedir.ImageReader(str(img))
    name = f"locks-{pid}.img"
    return rd.messages(name, locks_pb2.FileLock) if rd.has(name) else []


@pytest.mark.parametrize("kind", KINDS)
def test_refused_without_file_locks(engine, launch, images, kind):
    t = launch("locks", args=(kind,))
    img = images()
    with pytest.raises(engine.UnsupportedError) as ei:
        engine.dump(t.pid, str(img))
    msg = str(ei.value)
    assert f"process {t.pid}" in msg and f"fd {FD[kind]}" in msg, msg
    assert PATH[kind] in msg and WHAT[kind] in msg and "--file-locks" in msg, msg
    assert not img.exists() or not os.listdir(img)
    assert t.alive(), t.log()
    t.expect_pass()                   # thawed, locks still held


@pytest.mark.parametrize("kind", KINDS + ["all", "flock,ofd"])
def test_locks_survive(engine, launch, images, kind):
    t = launch("locks", args=(kind,))
    img = images()
    engine.dump(t.pid, str(img), options=engine.Options(file_locks=True))
    t.reap()
    saved = _saved_locks(img, t.pid)
    from nbcheckpoint.engine.images import locks_pb2
    counts = {k: sum(1 for lk in saved if lk.kind == v) for k, v in
              (("flock", locks_pb2.LOCK_FLOCK), ("posix", locks_pb2.LOCK_POSIX), ("ofd", locks_pb2.LOCK_OFD))}
    want = {"flock": 2, "posix": 3, "ofd": 2}       # fd 13 shares fd 10's description: saved once
    assert counts == {k: (want[k] if kind == "all" or k in kind else 0) for k in want}, saved
    wait_pid_free(t.pid)
    res = engine.restore(str(img), options=engine.Options(file_locks=True))
    t.adopt_restored(res)
    t.expect_pass()


def test_no_locks_no_image_file(engine, launch, images):
    """A process holding no lock dumps fine without --file-locks and writes no locks file."""
    t = launch("locks")
    img = images()
    t.checkpoint(img)
    assert not (img / f"locks-{t.pid}.img").exists()
    t.restore(img)
    t.expect_pass()


def test_restore_needs_file_locks(engine, launch, images):
    t = launch("locks", args=("all",))
    img = images()
    engine.dump(t.pid, str(img), options=engine.Options(file_locks=True))
    t.reap()
    wait_pid_free(t.pid)
    with pytest.raises(engine.RestoreError, match="--file-locks") as ei:
        engine.restore(str(img))
    assert f"process {t.pid}" in str(ei.value)
    wait_pid_free(t.pid)              # nothing left behind
    res = engine.restore(str(img), options=engine.Options(file_locks=True))
    t.adopt_restored(res)
    t.expect_pass()


@pytest.mark.parametrize("kind", KINDS)
def test_conflict_with_original_names_holder(engine, launch, images, kind):
    """--leave-running + --file-locks: the original still holds the locks, so a restore
    beside it (in a new PID namespace, where its PID is free) cannot take them and says who
    holds them; once the original is gone, the same image restores."""
    t = launch("locks", args=(kind,))
    img = images()
    engine.dump(t.pid, str(img), leave_running=True, options=engine.Options(file_locks=True))
    assert t.alive(), t.log()
    with pytest.raises(engine.RestoreError) as ei:
        engine.restore(str(img), options=engine.Options(file_locks=True, pidns=True))
    msg = str(ei.value)
    assert PATH[kind] in msg and f"pid {t.pid}" in msg and "--leave-running" in msg, msg
    t.expect_pass()                   # the original kept its locks throughout
    t.reap()
    res = engine.restore(str(img), options=engine.Options(file_locks=True))
    t.adopt_restored(res)
    t.expect_pass()


def test_cli_file_locks(engine, launch, images, capsys):
    """--file-locks on the command line, on both stages."""
    from nbcheckpoint import cli
    t = launch("locks", args=("posix",))
    img = images()
    assert cli.main(["dump", "-t", str(t.pid), "-D", str(img)]) == 1
    err = capsys.readouterr().err
    assert "--file-locks" in err and "posix.dat" in err, err
    assert t.alive()
    assert cli.main(["dump", "-t", str(t.pid), "-D", str(img), "--file-locks"]) == 0
    t.reap()
    assert cli.main(["restore", "-D", str(img), "--detach"]) == 1
    assert "--file-locks" in capsys.readouterr().err
    wait_pid_free(t.pid)
    assert cli.main(["restore", "-D", str(img), "--detach", "--file-locks"]) == 0
    t.adopt_restored(int(capsys.readouterr().out.split()[-1]))    # checks the pid it sees
    t.expect_pass()
