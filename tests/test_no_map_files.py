"""Mappings without /proc/PID/map_files (engine/mapped.py): what an ordinary user's engine does,
forced on a privileged one by NBCHECKPOINT_NO_MAP_FILES=1 so that every run tests both ways.
Files are found by the path in /proc/PID/maps checked against the VMA's inode, shmem objects
read through an fd of the tree or the tree's own mappings, and restored as memfds."""
import shutil
import time

import pytest

from nbcheckpoint.engine import UnsupportedError
from nbcheckpoint.engine.sys import proc, userns


@pytest.fixture
def no_map_files(monkeypatch):
    monkeypatch.setenv(userns.NO_MAP_FILES, "1")
    assert not userns.map_files_allowed()


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


# each maps shared anonymous memory or an unlinked /dev/shm file (mppool's semaphores)
@pytest.mark.parametrize("name", ["mappings", "shmem", "tree", "mppool"])
def test_dump_restore(no_map_files, launch, images, name):
    t = launch(name)
    time.sleep(0.3)
    img = images()
    t.checkpoint(img)
    t.restore(img)
    # restored from a memfd named after the object it replaces (docs/engine.md)
    assert "/memfd:/dev/" in _maps(t.pid), _maps(t.pid)
    t.expect_pass()


def test_leave_running(no_map_files, launch, images):
    """The shmem objects are read through the processes' mappings while they are frozen."""
    t = launch("shmem")
    time.sleep(0.3)
    img = images()
    t.checkpoint(img, leave_running=True)
    t.expect_pass()
    t.reap()
    t.restore(img)
    t.expect_pass()


def test_replaced_file_refused_by_name(no_map_files, launch, images):
    """A mapped file whose path now names another file, which no fd of the tree holds, has
    nothing left that names it (maps shows it "(deleted)"): the dump fails saying so, and the
    process runs on."""
    t = launch("mappings")
    data = t.workdir / "data"
    shutil.copy2(data / "priv.dat", data / "priv.new")
    (data / "priv.new").rename(data / "priv.dat")       # same content, another inode
    with pytest.raises(UnsupportedError) as e:
        t.checkpoint(images())
    msg = str(e.value)
    assert f"process {t.pid}: mapping 0x" in msg and "priv.dat" in msg, msg
    assert "deleted or replaced" in msg and "map_files" in msg, msg
    assert t.alive() and proc.pid_state(t.pid) not in ("t", "T"), "the refused dump must thaw the process"
    # (not expect_pass(): the target itself sees its mapping of priv.dat "(deleted)" now)
