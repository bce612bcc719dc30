"""The engine as an ordinary user (issue 12): restores land in a user + PID namespace of the
user's own, and what an ordinary user cannot do is refused by name.

The suite runs twice in CI, as root and as an ordinary user (.ci/run): `ordinary_user_only`
tests run in the second pass, `root_only` ones in the first (they need both identities)."""
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import nspids

# the ordinary user of the root pass, and the venv it can run (made by .ci/run)
TEST_USER = os.environ.get("NBCHECKPOINT_TEST_USER", "nbuser")


def _cli(*args, env=None, timeout=120, user_python=None, **kw):
    py = user_python or sys.executable
    return subprocess.run([py, "-m", "nbcheckpoint", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=env, **kw)


def test_demo_runs():
    """`nbcheckpoint demo`, as a new user would run it, in both passes."""
    r = _cli("demo", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "demo passed" in r.stdout
    assert r.stdout.count("  OK   ") >= 6 and "FAIL" not in r.stdout


@pytest.mark.ordinary_user_only
def test_restore_lands_in_a_user_and_pid_namespace_of_ours(launch, images, tmp_path):
    t = launch("counter")
    time.sleep(0.3)
    img = images()
    r = _cli("dump", "-t", t.pid, "-D", img)
    assert r.returncode == 0, r.stderr
    t.reap()
    pidfile = tmp_path / "pid"
    r = _cli("restore", "-D", img, "-d", "--pidfile", pidfile)
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())
    t.adopt_restored(pid, is_child=False)          # checks the pid it sees is the original's
    assert len(nspids(pid)) == len(nspids(os.getpid())) + 1
    assert os.stat(f"/proc/{pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino
    uid = os.getuid()
    with open(f"/proc/{pid}/uid_map") as f:
        assert f.read().split() == [str(uid), str(uid), "1"]      # its own uid, not 0
    with open(f"/proc/{pid}/status") as f:
        st = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    assert st["Uid"].split() == [str(uid)] * 4
    assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0   # as the original had
    t.expect_pass()


@pytest.mark.ordinary_user_only
def test_user_namespaces_disabled_say_why(launch, images):
    """With user namespaces off (here: the limit set to 0 in the suite's own user namespace,
    which the suite may do), a restore fails with the cause and the administrator's fix, and
    creates nothing; the image restores once they are back."""
    t = launch("counter")
    time.sleep(0.3)
    img = images()
    t.checkpoint(img)
    knob = Path("/proc/sys/user/max_user_namespaces")
    old = knob.read_text()
    knob.write_text("0")
    try:
        r = _cli("restore", "-D", img, "-d")
    finally:
        knob.write_text(old)
    assert r.returncode == 1
    assert "cannot create a user namespace" in r.stderr, r.stderr
    assert "user.max_user_namespaces=0" in r.stderr and "sysctl" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    t.restore(img)
    t.expect_pass()


@pytest.mark.ordinary_user_only
def test_dump_of_another_users_process_says_so(tmp_path):
    r = _cli("dump", "-t", 1, "-D", tmp_path / "img")
    assert r.returncode == 1
    assert "only root may checkpoint another user's processes" in r.stderr, r.stderr
    assert not (tmp_path / "img").exists() or not any((tmp_path / "img").iterdir())


def _user_python() -> tuple[pwd.struct_passwd, str, dict]:
    """The test user, a python of theirs with nbcheckpoint (.ci/run's copy and venv, or a
    developer's ~USER/venv running this checkout), and the environment to add."""
    try:
        pw = pwd.getpwnam(TEST_USER)
    except KeyError:
        pytest.fail(f"no user {TEST_USER!r}: create it and its venv as .ci/run does "
                    "(or set NBCHECKPOINT_TEST_USER)")
    py = os.environ.get("NBCHECKPOINT_TEST_USER_PYTHON")
    env = {}
    if not py:
        py = os.path.join(pw.pw_dir, "venv", "bin", "python")
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    if not os.access(py, os.X_OK):
        pytest.fail(f"{py} is missing: make {TEST_USER}'s venv with nbcheckpoint in it as .ci/run does")
    return pw, py, env


@pytest.mark.root_only
def test_image_taken_as_root_does_not_restore_for_a_user(launch, images):
    """Even handed the image and its key, a user cannot restore root's checkpoint: the image
    names who took it."""
    pw, py, user_env = _user_python()
    t = launch("counter")
    time.sleep(0.3)
    img = images()
    t.checkpoint(img)
    box = Path(tempfile.mkdtemp(prefix="nbck-handover-"))
    try:
        shutil.copytree(img, box / "img")
        shutil.copy(os.environ["NBCHECKPOINT_KEY_FILE"], box / "image.key")
        for p in [box, *box.rglob("*")]:
            os.chown(p, pw.pw_uid, pw.pw_gid)
        env = {"HOME": pw.pw_dir, "PATH": "/usr/bin:/bin", "NBCHECKPOINT_KEY_FILE": str(box / "image.key"),
               **user_env}
        runuser = shutil.which("runuser", path="/usr/sbin:/sbin:/usr/bin:/bin")
        r = subprocess.run([runuser, "-u", TEST_USER, "--", py, "-m", "nbcheckpoint", "restore", "-D",
                            str(box / "img"), "-d"], capture_output=True, text=True, timeout=120, env=env)
    finally:
        shutil.rmtree(box)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"was taken by uid 0 (root), and you are uid {pw.pw_uid} ({TEST_USER})" in r.stderr, r.stderr
    assert "restores only for the user who took it" in r.stderr
    t.restore(img)                          # still root's to restore
    t.expect_pass()


@pytest.mark.root_only
def test_a_file_the_user_can_no_longer_open_is_named():
    """A user's process opened root's file while it could; root closed the file to others since.
    The user's restore says which file, for what, and what would allow it.  (The user's own
    files always reopen: in the restore's user namespace the user's files are its own.)"""
    pw, py, user_env = _user_python()
    box = Path(tempfile.mkdtemp(prefix="nbck-reopen-"))
    os.chmod(box, 0o755)
    shared, work = box / "shared.txt", box / "work"
    shared.write_text("x")
    os.chmod(shared, 0o644)
    work.mkdir()
    os.chown(work, pw.pw_uid, pw.pw_gid)
    runuser = shutil.which("runuser", path="/usr/sbin:/sbin:/usr/bin:/bin")
    env = {"HOME": pw.pw_dir, "PATH": "/usr/bin:/bin", "NBCHECKPOINT_KEY_FILE": str(work / "image.key"), **user_env}

    def as_user(*argv, **kw):
        return subprocess.run([runuser, "-u", TEST_USER, "--", *map(str, argv)], capture_output=True, text=True,
                              timeout=120, env=env, **kw)
    log = work / "out.log"
    log.touch()
    os.chown(log, pw.pw_uid, pw.pw_gid)                 # the user's, as the rest of the process's files
    with open(log, "ab") as out:
        p = subprocess.Popen([runuser, "-u", TEST_USER, "--", "/usr/bin/python3", "-c",
                              f"import time; f = open({str(shared)!r}); print('READY', flush=True); time.sleep(600)"],
                             stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while b"READY" not in log.read_bytes():
            assert time.monotonic() < deadline and p.poll() is None, log.read_text()
            time.sleep(0.05)
        target = int(subprocess.run(["pgrep", "-u", TEST_USER, "-f", str(shared)], capture_output=True,
                                    text=True).stdout.split()[0])
        r = as_user(py, "-m", "nbcheckpoint", "dump", "-t", target, "-D", work / "img")
        assert r.returncode == 0, r.stderr
        p.wait(timeout=20)
        os.chmod(shared, 0o600)
        r = as_user(py, "-m", "nbcheckpoint", "restore", "-D", work / "img", "-d")
        assert r.returncode == 1, r.stdout
        assert (f"cannot reopen {shared} (for reading): Permission denied: an ordinary user reopens a file "
                "with their own permissions") in r.stderr, r.stderr
        assert "restore as root" in r.stderr and "Traceback" not in r.stderr
    finally:
        p.kill()
        p.wait()
        subprocess.run(["pkill", "-9", "-u", TEST_USER, "-f", str(shared)])
        shutil.rmtree(box)
