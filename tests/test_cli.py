"""The `nbcheckpoint` command: feature probes, argument parsing, error output.

Nothing here needs a working engine (dump/restore are replaced where a test
goes through them), except `show --verify`, which reads a real image.
"""
import io
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import mount, umount
from nbcheckpoint import cli
from nbcheckpoint.engine import EngineError
from nbcheckpoint.engine.check import check


def _children() -> set[int]:
    out = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            out.update(int(p) for p in f.read().split())
    return out


def test_check_all_required_present_and_no_child_left():
    before = _children()
    features = check()
    missing = [f"{f.name}: {f.detail}" for f in features if f.required and not f.ok]
    assert not missing
    assert _children() == before      # probe children were killed and reaped
    names = {f.name for f in features}
    assert {"PTRACE_SEIZE + INTERRUPT", "clone3 with set_tid", "PAGEMAP_SCAN ioctl"} <= names


def test_check_command_output(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "all required features present"
    assert re.match(r"running as uid \d+ ", out[0])
    assert ("without root" in out[0]) == (os.getuid() != 0)
    assert all(re.match(r"(OK|MISSING) +\S", line) for line in out[1:-1])
    userns = next(line for line in out if "user namespaces" in line)
    assert userns.startswith("OK")      # CI's machines enable them; as a user they are required
    xstate = next(line for line in out if "NT_X86_XSTATE" in line)
    assert xstate.startswith("OK") and "bytes" in xstate


@pytest.mark.parametrize("argv", [
    [], ["bogus"], ["dump"], ["dump", "-t", "1"], ["dump", "-D", "d"],
    ["dump", "-t", "x", "-D", "d"], ["restore"], ["show"], ["restore", "-D"],
])
def test_argument_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_criu_style_aliases():
    p = cli.build_parser()
    a = p.parse_args(["dump", "--tree", "5", "--images-dir", "d", "-R"])
    assert (a.pid, a.images_dir, a.leave_running) == (5, "d", True)
    a = p.parse_args(["dump", "--pid", "6", "--images", "e", "-v"])
    assert (a.pid, a.images_dir, a.leave_running, a.verbose) == (6, "e", False, 1)
    a = p.parse_args(["-v", "restore", "-D", "d", "-d", "--pidfile", "f"])
    assert (a.images_dir, a.detach, a.pidfile, a.verbose) == ("d", True, "f", 1)
    assert p.parse_args(["show", "x"]).dir == "x"


def _fail(*a, **k):
    raise EngineError("boom: pid 1 is not traceable")


def test_engine_error_message_without_traceback(monkeypatch, capsys):
    monkeypatch.setattr(cli.engine, "dump", _fail)
    assert cli.main(["dump", "-t", "1", "-D", "d"]) == 1
    err = capsys.readouterr().err
    assert err == "nbcheckpoint: error: boom: pid 1 is not traceable\n"


def test_verbose_error_shows_traceback(monkeypatch, capsys):
    monkeypatch.setattr(cli.engine, "dump", _fail)
    assert cli.main(["dump", "-v", "-t", "1", "-D", "d"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("nbcheckpoint: error: boom: pid 1 is not traceable\n")


def _fake_restore(code: str):
    """engine.restore stand-in whose 'restored process' is a child running `code`."""
    proc = subprocess.Popen([sys.executable, "-c", code])
    return proc, lambda *a, **k: SimpleNamespace(pid=proc.pid, seconds=0.0, lazy=None, init_pid=None)


@pytest.mark.parametrize("code,rc", [("import sys; sys.exit(3)", 3),
                                     ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", 143)])
def test_restore_waits_and_returns_status(monkeypatch, tmp_path, code, rc):
    proc, fake = _fake_restore(code)
    monkeypatch.setattr(cli.engine, "restore", fake)
    pidfile = tmp_path / "pid"
    assert cli.main(["restore", "-D", "d", "--pidfile", str(pidfile)]) == rc
    assert pidfile.read_text() == f"{proc.pid}\n"


def test_restore_detach_prints_pid(monkeypatch, capsys):
    proc, fake = _fake_restore("import time; time.sleep(0.2)")
    monkeypatch.setattr(cli.engine, "restore", fake)
    assert cli.main(["restore", "-D", "d", "--detach"]) == 0
    assert capsys.readouterr().out == f"{proc.pid}\n"
    proc.wait()


def test_show_verify_reads_every_page_checksum(launch, images, capsys):
    """Plain show reads no page data; --verify checks it all and names the damaged file."""
    t = launch("counter")
    img = images()
    t.checkpoint(img)
    assert cli.main(["show", "--verify", str(img)]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert re.fullmatch(r"verified: \d+ files, [\d.]+ \S+ of page data, all checksums match", last), last
    pages = img / f"pages-{t.pid}.img"
    data = bytearray(pages.read_bytes())
    data[len(data) // 2] ^= 0x20
    pages.write_bytes(bytes(data))
    assert cli.main(["show", str(img)]) == 0
    assert not capsys.readouterr().err
    assert cli.main(["show", str(img), "--verify"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nbcheckpoint: error: image file ") and f"{pages.name} is corrupted" in err, err


def test_progress_only_on_a_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    quiet, tty = io.StringIO(), Tty()
    cli.Progress(quiet)("pages", 1 << 30, 2 << 30)
    p = cli.Progress(tty)
    p("pages", 1 << 30, 2 << 30)
    p.clear()
    assert quiet.getvalue() == ""
    assert "pages: 1.0 GiB / 2.0 GiB" in tty.getvalue()


def test_demo_cleans_up_when_the_engine_fails(monkeypatch, capsys):
    monkeypatch.setattr(cli.engine, "dump", _fail)
    assert cli.main(["demo"]) == 1
    out = capsys.readouterr().out
    tmp = re.search(r"working in (\S+)", out).group(1)
    pid = int(re.search(r"started target pid (\d+)", out).group(1))
    assert not os.path.exists(tmp)
    assert pid not in _children()


def test_demo_target_passes_verification_when_left_alone(tmp_path):
    """The demo's checks hold for a target that simply keeps running."""
    from nbcheckpoint import demo
    log = tmp_path / "state.log"
    log.touch()
    script = os.path.join(os.path.dirname(demo.__file__), "demo_target.py")
    proc = subprocess.Popen([sys.executable, "-I", script, str(log)], stdin=subprocess.DEVNULL)
    try:
        states = demo.StateLog(str(log))
        alive = lambda: proc.poll() is None  # noqa: E731
        lines = [states.next(alive)]
        for _ in range(3):
            proc.send_signal(demo.signal.SIGUSR1)
            lines.append(states.next(alive))
        checks = demo._verify(*lines[1:])
        assert all(ok for ok, _ in checks), checks
        assert lines[1]["size"] == 256 << 20 and lines[1]["gen_next"] == 51
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_unlock_malformed_lock_name_is_a_clear_error(launch, images, capsys):
    """A (sealed) image whose network lock is not one of our names: an error, not a traceback."""
    from nbcheckpoint.engine.images import imagedir
    t = launch("counter")
    img = images()
    t.checkpoint(img, leave_running=True)
    inv = imagedir.ImageReader(img).inventory
    inv.network_lock = "nbck_x; flush ruleset"
    imagedir.reseal(img, inventory=inv)
    assert cli.main(["unlock", str(img)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nbcheckpoint: error: the image names the network lock 'nbck_x; flush ruleset', "
                          "which is not the name of an nbcheckpoint lock"), err


def test_disk_full_says_which_file_and_how_much(launch, tmp_path, capsys):
    """A dump into a full filesystem names the file, the bytes it could not write and what is free."""
    t = launch("counter")
    small = tmp_path / "small"
    small.mkdir()
    mount("tmpfs", small, "size=64k")
    try:
        assert cli.main(["dump", "-t", str(t.pid), "-D", str(small / "img"), "-R"]) == 1
        err = capsys.readouterr().err
        assert re.search(rf"no space left for the image file {small}/\.img\.partial-\S+/\S+\.img "
                         r"\(No space left on device\): [\d,]+ bytes of a [\d,]+-byte write were not written, "
                         r"after [\d,]+ bytes of this file; [\d,]+ bytes free on its filesystem", err), err
        assert os.listdir(small) == []                  # the partial image is gone
    finally:
        umount(small)
    t.expect_pass()                                      # left running, unharmed


def test_lower_hard_rlimit_named(launch, images):
    """A restore under a lower hard RLIMIT_AS than the image's, without CAP_SYS_RESOURCE (dropped
    from the bounding set before exec): the limit, both values and what to do; not a bare EPERM."""
    import ctypes
    import resource

    def lower():
        ctypes.CDLL(None, use_errno=True).prctl(24, 24)   # PR_CAPBSET_DROP, CAP_SYS_RESOURCE
        resource.setrlimit(resource.RLIMIT_AS, (64 << 30, 64 << 30))
    t = launch("counter")
    img = images()
    t.checkpoint(img)
    assert resource.getrlimit(resource.RLIMIT_AS)[1] == resource.RLIM_INFINITY
    r = subprocess.run([sys.executable, "-m", "nbcheckpoint", "restore", "-d", "-D", str(img)],
                       capture_output=True, text=True, timeout=120, preexec_fn=lower)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the image's RLIMIT_AS (soft unlimited, hard unlimited) is above the hard limit this restore runs " \
           f"under ({64 << 30}), and raising a hard limit needs CAP_SYS_RESOURCE" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr




# `nbcheckpoint restore -d --pidns` N times from a process that exits the moment the CLI
# returns (no interpreter teardown, as the fuzz runner's children), all on one CPU: one line per restore, the
# restored root's state 0.2 s later (then it is killed).  A fresh process: without root it
# enters a user namespace of its own, as the command does.
DETACHED_RESTORES = """
import os, signal, sys, time
from nbcheckpoint import cli
img, pidfile, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})    # one CPU: the init runs only once the CLI yields
for _ in range(n):
    child = os.fork()
    if child == 0:
        rc = 1
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)        # (-d prints the pid)
            rc = cli.main(["restore", "-d", "--pidns", "-D", img, "--pidfile", pidfile])
        finally:
            os._exit(rc)
    _, st = os.waitpid(child, 0)
    if st:
        sys.exit(f"restore failed: status {st}")
    pid = int(open(pidfile).read())
    time.sleep(0.2)
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(") ", 1)[1][0]
        os.kill(pid, signal.SIGKILL)
    except (OSError, IndexError):
        state = "gone"
    print(state, flush=True)
    time.sleep(0.1)
"""


def test_detached_pidns_restore_outlives_the_cli(launch, images, tmp_path):
    """`restore -d --pidns` (every restore of an ordinary user's) returns only once the
    namespace's init no longer dies with the CLI (PR_SET_PDEATHSIG): a CLI exiting at once
    used to take the tree it had just restored along, one time in three (found by tests/fuzz)."""
    t = launch("counter")
    img = images()
    t.checkpoint(img)
    r = subprocess.run([sys.executable, "-c", DETACHED_RESTORES, str(img), str(tmp_path / "pid"), "12"],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    states = r.stdout.split()
    assert r.returncode == 0 and len(states) == 12, r
    assert all(s in "RS" for s in states), f"restored trees gone right after the CLI exited: {states}"
    t.restore(img)
    t.expect_pass()
