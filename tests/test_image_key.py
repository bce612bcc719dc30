"""Images (and the store's meta.json) sealed with the per-user key (engine/images/key.py).

The suite runs with a key of its own (conftest sets NBCHECKPOINT_KEY_FILE); a test that
needs another key points NBCHECKPOINT_KEY_FILE into its tmp_path.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest
import xxhash

from conftest import wait_pid_free
from nbcheckpoint import engine
from nbcheckpoint.engine import Options
from nbcheckpoint.engine.images import imagedir, inventory_pb2, key as keys
from nbcheckpoint.store import CheckpointMeta, Store, StoreError

NOT_SEALED = "was not sealed with your key"


@pytest.fixture
def good_image(launch, images):
    t = launch("counter")
    time.sleep(0.2)
    img = images("good")
    t.checkpoint(img)
    wait_pid_free(t.pid)
    return img, t


def _other_key(monkeypatch, tmp_path, name="other"):
    path = tmp_path / name / "image.key"
    monkeypatch.setenv(keys.KEY_ENV, str(path))
    return path


def _refused(img, *words, **options):
    with pytest.raises(engine.ImageError) as ei:
        engine.restore(str(img), options=Options(**options))
    msg = str(ei.value)
    for w in (str(img),) + words:
        assert w in msg, f"{w!r} not in: {msg}"
    return msg


def test_dump_creates_private_key_and_restores(monkeypatch, tmp_path, launch, images):
    path = _other_key(monkeypatch, tmp_path, "fresh/config")
    assert not path.exists()
    t = launch("counter", tag="fresh")
    img = images("fresh")
    t.checkpoint(img)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_size == keys.KEY_SIZE
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["image.key"]       # no temporary left
    secret = path.read_bytes()
    t.restore(img)
    t.expect_pass()
    assert path.read_bytes() == secret                                    # used, not replaced


def _rechecksum_without_key(img, edit):
    """What a forger without the key can do: edit the inventory and fix every checksum."""
    p = img / "inventory.img"
    raw = p.read_bytes()
    n = imagedir._SEAL.size + keys.MAC_SIZE
    head_mac, body = raw[:n], raw[n:-16]
    inv = list(imagedir._parse_messages(body, str(p), inventory_pb2.Inventory))[0]
    edit(inv)
    data = inv.SerializeToString()
    name = inventory_pb2.Inventory.DESCRIPTOR.full_name.encode()
    body = imagedir.MAGIC + len(name).to_bytes(2, "little") + name + len(data).to_bytes(4, "little") + data
    raw = head_mac + body
    p.write_bytes(raw + xxhash.xxh3_128_digest(raw))


def test_inventory_rechecksummed_without_key_refused(good_image):
    img, t = good_image

    def edit(inv):
        inv.hostname = "forged"
    _rechecksum_without_key(img, edit)
    msg = _refused(img, NOT_SEALED, "changed since")
    for run in (["show", img], ["show", "--verify", img]):
        r = subprocess.run([sys.executable, "-m", "nbcheckpoint", *map(str, run)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 1 and NOT_SEALED in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "forged" not in msg


def test_file_rechecksummed_without_key_refused(good_image):
    """A data file replaced (here: by a copy of another) with its checksum fixed in the inventory."""
    img, t = good_image
    mm = img / f"mm-{t.pid}.img"
    mm.write_bytes((img / f"task-{t.pid}.img").read_bytes())

    def edit(inv):
        for s in inv.files:
            if s.name == mm.name:
                s.size, s.xxh3_128 = mm.stat().st_size, xxhash.xxh3_128_digest(mm.read_bytes())
    _rechecksum_without_key(img, edit)
    _refused(img, NOT_SEALED)


def test_image_of_another_key_refused(good_image, monkeypatch, tmp_path, launch, images):
    """Another user's image (their key): refused by dump, verify, show and lazy restore alike."""
    _, t = good_image
    mine = os.environ[keys.KEY_ENV]
    _other_key(monkeypatch, tmp_path)
    t2 = launch("counter", tag="theirs")
    img = images("theirs")
    t2.checkpoint(img)
    wait_pid_free(t2.pid)
    imagedir.ImageReader(str(img))                           # theirs: fine for them
    monkeypatch.setenv(keys.KEY_ENV, mine)
    _refused(img, NOT_SEALED, "another user, or with another key", mine)
    _refused(img, NOT_SEALED, pidns=True, lazy_pages=True)
    for call in (engine.verify, engine.show):
        with pytest.raises(engine.ImageError, match=NOT_SEALED):
            call(str(img))
    assert not os.path.exists(f"/proc/{t2.pid}")


def test_reseal_makes_a_changed_image_whole(good_image):
    """The helper for tests and fuzzing: changed on purpose, resealed, read again."""
    img, t = good_image
    inv = imagedir.ImageReader(str(img)).inventory
    inv.hostname = "resealed"
    imagedir.reseal(img, inv)
    assert imagedir.ImageReader(str(img)).inventory.hostname == "resealed"
    t.restore(img)
    t.expect_pass()


def test_old_format_refused_by_version(good_image):
    """A version-2 image (an unsealed inventory: the message file and its xxh3) says so."""
    img, t = good_image
    p = img / "inventory.img"
    raw = p.read_bytes()
    body = raw[imagedir._SEAL.size + keys.MAC_SIZE:-16]
    p.write_bytes(body + xxhash.xxh3_128_digest(body))
    _refused(img, "format version 2 or older", f"reads version {imagedir.FORMAT_VERSION}")


@pytest.mark.parametrize("bad", ["mode-0644", "mode-0660", pytest.param("other-owner", marks=pytest.mark.root_only),
                                 "symlink-to-0644", "short", "missing"])     # (giving a file away is root's)
def test_bad_key_file_refused(good_image, monkeypatch, tmp_path, bad):
    img, t = good_image
    path = tmp_path / "k" / "image.key"
    path.parent.mkdir()
    monkeypatch.setenv(keys.KEY_ENV, str(path))
    if bad != "missing":
        path.write_bytes(os.urandom(keys.KEY_SIZE if bad != "short" else 5))
        path.chmod(0o600)
    expect = {"mode-0644": "has mode 0644", "mode-0660": "has mode 0660", "other-owner": "belongs to uid 65534",
              "symlink-to-0644": "has mode 0644", "short": "has 5 bytes", "missing": "you have no image key"}[bad]
    if bad.startswith("mode-"):
        path.chmod(int(bad[-4:], 8))
    elif bad == "other-owner":
        os.chown(path, 65534, 65534)
    elif bad == "symlink-to-0644":
        real = tmp_path / "k" / "real.key"
        path.rename(real)
        real.chmod(0o644)
        path.symlink_to(real)
    with pytest.raises(engine.ImageError) as ei:
        engine.show(str(img))
    assert str(path) in str(ei.value) and expect in str(ei.value), str(ei.value)
    if bad != "missing":                # a dump refuses it too, before it touches the process
        with pytest.raises(engine.ImageError, match=expect):
            imagedir.ImageWriter(str(tmp_path / "new-image"))
        assert not (tmp_path / "new-image").exists() and not list(tmp_path.glob(".new-image.partial-*"))


def test_store_meta_sealed(monkeypatch, tmp_path):
    """A checkpoint planted in the store by another user (their key) or whose meta.json was
    changed is not listed, and get() refuses it; one's own is listed."""
    mine = os.environ[keys.KEY_ENV]
    st = Store(tmp_path / "store")

    def take(name):
        p = subprocess.Popen(["sleep", "60"])
        try:
            pending = st.begin(name)
            engine.dump(p.pid, pending.image, leave_running=True)
            return pending.commit(CheckpointMeta(created=time.time(), notebook=f"{name}.ipynb"))
        finally:
            p.kill()
            p.wait()
    take("mine")
    changed = take("changed")
    _other_key(monkeypatch, tmp_path)
    take("planted")
    monkeypatch.setenv(keys.KEY_ENV, mine)
    m = json.loads((changed.path / "meta.json").read_text())
    m["notebook"] = "evil.ipynb"
    (changed.path / "meta.json").write_text(json.dumps(m))
    assert [c.name for c in st.list()] == ["mine"]
    for name in ("planted", "changed"):
        with pytest.raises(StoreError, match=NOT_SEALED):
            st.get(name)
    # a user without a key owns no checkpoint
    monkeypatch.setenv(keys.KEY_ENV, str(tmp_path / "none" / "image.key"))
    assert st.list() == []
