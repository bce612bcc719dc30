"""The image format: generated code current, permissions, atomicity, `show`."""
from __future__ import annotations

import filecmp
import os
import stat
import subprocess
import sys
from pathlib import Path

from nbcheckpoint.engine import show
from nbcheckpoint.engine.images import imagedir

ROOT = Path(__file__).resolve().parent.parent
IMAGES_PKG = ROOT / "nbcheckpoint" / "engine" / "images"


def test_generated_code_is_current(tmp_path):
    """The checked-in *_pb2.py are exactly what protoc makes of the .proto files."""
    r = subprocess.run([sys.executable, str(IMAGES_PKG / "regen.py"), str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    generated = sorted((tmp_path / "nbcheckpoint" / "engine" / "images").glob("*_pb2.py"))
    assert {p.name for p in generated} == {p.stem + "_pb2.py" for p in IMAGES_PKG.glob("*.proto")}
    stale = [p.name for p in generated if not filecmp.cmp(p, IMAGES_PKG / p.name, shallow=False)]
    assert not stale, f"regenerate with: python nbcheckpoint/engine/images/regen.py  (stale: {stale})"


def test_image_is_private_complete_and_readable(launch, images):
    t = launch("counter")
    img = images()
    t.checkpoint(img, leave_running=True)
    assert stat.S_IMODE(os.stat(img).st_mode) == 0o700
    names = os.listdir(img)
    assert "inventory.img" in names and any(n.startswith("pages-") for n in names)
    for n in names:
        assert stat.S_IMODE(os.stat(img / n).st_mode) == 0o600, n
    # no temporary directory is left next to the image
    assert [p for p in os.listdir(img.parent) if p.startswith(f".{img.name}.partial")] == []
    inv = imagedir.ImageReader(str(img)).inventory
    assert {f.name for f in inv.files} | {"inventory.img"} == set(names)
    text = show(img)
    assert f"process {t.pid}" in text and "[heap]" in text and "[vdso]" in text
    assert "/dev/null" in text        # fd 0
    t.expect_pass()


def test_dump_refuses_non_empty_images_dir(launch, images):
    from nbcheckpoint.engine import ImageError, dump
    t = launch("counter")
    img = images()
    img.mkdir()
    (img / "something").write_text("keep me")
    try:
        dump(t.pid, img, leave_running=True)
    except ImageError as e:
        assert "not an empty directory" in str(e)
    else:
        raise AssertionError("dump wrote into a non-empty directory")
    assert (img / "something").read_text() == "keep me"
    t.expect_pass()


def test_abandoned_partial_image_is_removed(launch, images):
    """A dump whose engine was killed leaves a hidden partial dir; the next dump there removes it."""
    import subprocess
    import sys
    t = launch("counter")
    img = images()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = img.parent / f".{img.name}.partial-{dead.pid}-abcd"
    stale.mkdir()
    (stale / "pages-1.img").write_bytes(b"x" * 100)
    live = img.parent / f".{img.name}.partial-{os.getpid()}-efgh"    # a dump still running
    live.mkdir()
    t.checkpoint(img, leave_running=True)
    assert not stale.exists() and live.exists()
    live.rmdir()
    t.expect_pass()
