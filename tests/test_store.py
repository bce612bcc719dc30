"""The checkpoint store and `nbcheckpoint ls/rm`, with real engine images."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from nbcheckpoint import engine
from nbcheckpoint.store import CheckpointMeta, Store, StoreError

NBCK = [sys.executable, "-m", "nbcheckpoint"]


def _take(store: Store, name: str, **meta):
    p = subprocess.Popen(["sleep", "60"])
    try:
        pending = store.begin(name)
        stats = engine.dump(p.pid, pending.image, leave_running=True)
        return pending.commit(CheckpointMeta(created=time.time(), frozen_s=stats.frozen_seconds, **meta))
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "x..y", "-lead", "a" * 101, "sp ace", "end."])
def test_names_validated(bad):
    with pytest.raises(StoreError, match="bad checkpoint name"):
        Store.validate_name(bad)


def test_store_life_cycle(tmp_path):
    st = Store(tmp_path / "s")
    a = _take(st, "a", notebook="nb.ipynb", execution_count=4)
    b = _take(st, "b.2", parent="a")
    assert [c.name for c in st.list()] == ["b.2", "a"]              # newest first
    assert a.meta["size_bytes"] > 0 and st.get("a").meta["notebook"] == "nb.ipynb"
    assert oct(os.stat(st.root).st_mode & 0o777) == "0o700"
    with pytest.raises(StoreError, match="already exists"):
        st.begin("a")
    # a writer that died mid-way leaves a hidden partial dir: not listed, swept by the next writer
    dead = subprocess.Popen(["true"])
    dead.wait()
    partial = st.root / f".c.partial-{dead.pid}"
    partial.mkdir()
    assert [c.name for c in st.list()] == ["b.2", "a"]
    _take(st, "d")
    assert not partial.exists()
    # one in progress (a live writer) holds its name
    live = st.begin("e")
    with pytest.raises(StoreError, match="being written"):
        st.begin("e")
    live.abort()
    # damaged entries are not listed and say what is wrong
    os.unlink(b.path / "meta.json")
    assert "b.2" not in [c.name for c in st.list()]
    with pytest.raises(StoreError, match="meta.json is missing"):
        st.get("b.2")
    st.delete("a")
    with pytest.raises(StoreError, match="no checkpoint named 'a'"):
        st.get("a")


def test_cli_ls_rm(tmp_path):
    st = Store(tmp_path / "s")
    _take(st, "first", notebook="analysis.ipynb", execution_count=7)
    env = dict(os.environ, NBCHECKPOINT_DIR=str(st.root))
    r = subprocess.run(NBCK + ["ls"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "first" in r.stdout and "analysis.ipynb [7]" in r.stdout, r.stdout
    r = subprocess.run(NBCK + ["rm", "../x"], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "bad checkpoint name" in r.stderr
    r = subprocess.run(NBCK + ["rm", "first", "--store", str(st.root)], capture_output=True, text=True)
    assert r.returncode == 0 and not st.list()
    r = subprocess.run(NBCK + ["ls"], capture_output=True, text=True, env=env)
    assert "no checkpoints" in r.stdout


NOBODY = 65534


def test_store_root_trusted_as_sshd_does(tmp_path):
    """A store writable by others (not sticky) or owned by another user is refused, naming the
    path, its owner/mode and the fix; a sticky one (as /tmp) is not: what others plant there
    is checked entry by entry."""
    st = Store(tmp_path / "s")
    _take(st, "mine")
    os.chmod(st.root, 0o777)
    with pytest.raises(StoreError, match=rf"{st.root} is writable by group or others \(mode 0777\).*chmod 700 {st.root}"):
        st.begin("x")
    with pytest.raises(StoreError, match="writable by group or others"):
        st.get("mine")
    assert st.list() == []
    env = dict(os.environ, NBCHECKPOINT_DIR=str(st.root))
    r = subprocess.run(NBCK + ["ls"], capture_output=True, text=True, env=env)
    assert "no checkpoints" in r.stdout and f"chmod 700 {st.root}" in r.stderr, (r.stdout, r.stderr)
    os.chmod(st.root, 0o770)
    assert st.list() == [] and "mode 0770" in st.untrusted()
    os.chmod(st.root, 0o1777)                           # sticky: others cannot move what is ours
    assert [c.name for c in st.list()] == ["mine"]


@pytest.mark.root_only
def test_store_of_another_user_refused(tmp_path):
    """Another user's store: root neither lists nor restores it, and says why.  (Root only:
    giving a directory away is root's.)"""
    st = Store(tmp_path / "s")
    _take(st, "mine")
    os.chown(st.root, NOBODY, NOBODY)
    assert st.list() == []
    with pytest.raises(StoreError, match=rf"{st.root} is owned by uid {NOBODY} .*not by you"):
        st.get("mine")
    with pytest.raises(StoreError, match="owned by uid"):
        st.begin("y")


def _owner(what):     # another owner (mode None): giving a file away is root's
    return pytest.param(what, None, marks=pytest.mark.root_only)


@pytest.mark.parametrize("what,mode", [
    _owner(""), ("", 0o777), _owner("meta.json"), ("meta.json", 0o666), ("image", 0o770),
    _owner("image"), _owner("image/inventory.img"), ("image/pstree.img", 0o622),
])
def test_entry_not_ours_neither_listed_nor_restored(tmp_path, what, mode):
    """Entry, meta.json, image/ and image files: another owner (mode None) or writable by others."""
    st = Store(tmp_path / "s")
    ck = _take(st, "c")
    target = ck.path / what if what else ck.path
    os.chmod(target, mode) if mode else os.chown(target, NOBODY, NOBODY)
    assert st.list() == []
    with pytest.raises(StoreError, match=rf"checkpoint 'c' is not trusted: {target} is (owned by uid {NOBODY}|writable by group or others)"):
        st.get("c")


def test_rm_symlink_entry_removes_the_link_only(tmp_path):
    st = Store(tmp_path / "s")
    _take(st, "real")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("x")
    for name, to in (("link", elsewhere), ("link2", st.root / "real"), ("dangling", tmp_path / "none")):
        (st.root / name).symlink_to(to)
    assert [c.name for c in st.list()] == ["real"]             # a link is no checkpoint
    with pytest.raises(StoreError, match="a symbolic link"):
        st.get("link2")
    r = subprocess.run(NBCK + ["rm", "link", "link2", "dangling", "--store", str(st.root)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(st.root)) == ["real"]              # no .NAME.partial-PID left
    assert (elsewhere / "keep").exists() and st.get("real")
    # a partial entry left as a link by a dead writer is swept too, its target untouched
    dead = subprocess.Popen(["true"])
    dead.wait()
    (st.root / f".z.partial-{dead.pid}").symlink_to(elsewhere)
    st.begin("n").abort()
    assert sorted(os.listdir(st.root)) == ["real"] and (elsewhere / "keep").exists()
