"""Image files that are not what they should be: special files, links, wrong sizes.

Every image file must be a regular file of a bounded, expected size, opened without
following a symbolic link, before it is read: a FIFO must not block `restore` or `show`, a
link to /dev/zero must not read without bound.  Each case runs `restore`, `show` and
`show --verify` through the CLI under a timeout (a hang fails) and a memory limit (an
unbounded read fails), and must end in a one-line error naming the file and the problem.
An image (its directory and files) must also be the caller's and writable by nobody else.
"""
from __future__ import annotations

import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import wait_pid_free

CLI = [sys.executable, "-c", "import sys; from nbcheckpoint.cli import main; sys.exit(main())"]
TIMEOUT = 30


@pytest.fixture
def good_image(launch, images):
    """(image dir, pid) of a kill-mode dump of counter; the pid is free again."""
    t = launch("counter")
    time.sleep(0.2)
    img = images("good")
    t.checkpoint(img)
    wait_pid_free(t.pid)
    return img, t.pid


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def _cli(*args):
    try:
        return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True,
                              timeout=TIMEOUT, stdin=subprocess.DEVNULL, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`nbcheckpoint {' '.join(map(str, args))}` hung for {TIMEOUT}s")


def _replace(p: Path, make) -> None:
    p.unlink()
    make(p)


def _fifo(img, pid):
    _replace(img / "inventory.img", os.mkfifo)
    return "inventory.img is a FIFO, not a regular file"


def _zero_link(img, pid):
    _replace(img / "inventory.img", lambda p: p.symlink_to("/dev/zero"))
    return "inventory.img is a symbolic link, not a regular file"


def _directory(img, pid):
    _replace(img / "inventory.img", os.mkdir)
    return "inventory.img is a directory, not a regular file"


def _device(img, pid):
    _replace(img / "inventory.img", lambda p: os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 5)))
    return "inventory.img is a character device, not a regular file"


def _too_big(img, pid):
    os.truncate(img / "inventory.img", 16 << 30)        # sparse
    return f"inventory.img has {16 << 30} bytes, more than an inventory may hold"


def _core_fifo(img, pid):
    _replace(img / f"core-{pid}.img", os.mkfifo)
    return f"core-{pid}.img is a FIFO, not a regular file"


def _mm_link(img, pid):
    """A link to a true copy of the file: only the link itself is wrong."""
    mm = img / f"mm-{pid}.img"
    copy = img.parent / f"{img.name}-mm-copy"
    shutil.copyfile(mm, copy)
    _replace(mm, lambda p: p.symlink_to(copy))
    return f"mm-{pid}.img is a symbolic link, not a regular file"


def _pages_size(img, pid):
    p = img / f"pages-{pid}.img"
    size = p.stat().st_size
    os.truncate(p, 4096)
    return f"pages-{pid}.img has 4096 bytes, the inventory says {size}"


def _dir_link(img, pid):
    real = img.parent / f"{img.name}-real"
    img.rename(real)
    img.symlink_to(real)
    return f"{img} is a symbolic link"


def _foreign_file(img, pid):
    os.chown(img / f"task-{pid}.img", 65534, 65534)
    return f"task-{pid}.img belongs to uid 65534, not to you"


def _foreign_dir(img, pid):
    os.chown(img, 65534, 65534)
    return f"image directory {img} belongs to uid 65534, not to you"


def _writable_file(img, pid):
    os.chmod(img / f"mm-{pid}.img", 0o666)
    return f"mm-{pid}.img can be changed by others (mode 0666)"


def _writable_dir(img, pid):
    os.chmod(img, 0o777)
    return f"image directory {img} can be changed by others (mode 0777)"


CASES = {"inventory-fifo": _fifo, "inventory-link-to-dev-zero": _zero_link,
         "inventory-directory": _directory, "inventory-device": _device,
         "inventory-too-big": _too_big, "core-fifo": _core_fifo, "mm-link-to-copy": _mm_link,
         "pages-wrong-size": _pages_size, "image-dir-link": _dir_link, "file-of-another-user": _foreign_file,
         "dir-of-another-user": _foreign_dir, "file-writable-by-others": _writable_file,
         "dir-writable-by-others": _writable_dir}


# making a device node or giving a file away is root's: those cases run in the root pass
_ROOT_CASES = {"inventory-device", "file-of-another-user", "dir-of-another-user"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.root_only) if c in _ROOT_CASES else c
                                  for c in CASES])
def test_special_image_file_refused(good_image, case):
    img, pid = good_image
    msg = CASES[case](img, pid)
    try:
        cmds = [["show", "--verify", img], ["restore", "-d", "-D", img]]
        if case != "pages-wrong-size":          # plain show reads no page data
            cmds.append(["show", img])
        for cmd in cmds:
            t0 = time.monotonic()
            r = _cli(*cmd)
            what = f"`nbcheckpoint {' '.join(map(str, cmd))}` ({case})"
            assert r.returncode == 1, f"{what}: rc {r.returncode}\n{r.stdout}\n{r.stderr}"
            assert "Traceback" not in r.stderr, f"{what}:\n{r.stderr}"
            assert r.stderr.startswith("nbcheckpoint: error: ") and msg in r.stderr, \
                f"{what}: expected {msg!r} in\n{r.stderr}"
            assert time.monotonic() - t0 < 10, f"{what} took {time.monotonic() - t0:.1f}s"
    finally:
        if os.path.exists(f"/proc/{pid}"):       # a wrongly accepted image restored
            os.kill(pid, signal.SIGKILL)
