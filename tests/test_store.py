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
