"""Bad input and failures: every one must end in a clear error and leave nothing broken.

- an fd kind the engine cannot save: UnsupportedError naming pid, fd and kind; the target
  keeps running untraced and passes its own check; no image and no partial image is left;
- a damaged image (missing/flipped/truncated/foreign/other-version files, an empty or
  missing directory): ImageError naming the file, no process left behind -- and, except
  for page data (verified while it streams), raised before any process is created;
- the image's PID is taken: RestoreError naming the PID, the running process untouched;
- a file behind a file mapping changed since the dump: RestoreError before any process;
- the dumping engine SIGKILLed at any moment of a leave-running dump: the target survives
  untraced and passes, and the image is complete (and restores) or absent.

(Leave-running itself -- original passes, then the image restores and passes -- is covered
by tests/test_engine_targets.py::test_leave_running.)
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN_DIR, build_c, Target, TARGETS_DIR, wait_pid_free

FAIL_TARGETS = TARGETS_DIR / "failures"
RUN_BEFORE_DUMP = 0.2


@pytest.fixture(scope="module")
def engine():
    import nbcheckpoint.engine as engine
    return engine


# ----------------------------------------------------------------------------- helpers

def _compile(name: str) -> Path:
    """Build tests/targets/failures/NAME.c (kept out of tests/targets/*.c: those are all
    expected to dump and restore) into tests/targets/bin/failures-NAME."""
    return build_c(FAIL_TARGETS / f"{name}.c", f"failures-{name}")


@pytest.fixture(scope="module")
def unsupported_fd_bin(target_bins) -> Path:
    return _compile("unsupported_fd")


@pytest.fixture
def launch_argv(target_bins, tmp_path):
    """launch_argv(argv, tag) -> a started, READY Target running an arbitrary command line
    (a target binary that is not one of conftest's ALL_TARGETS, or one run from a copy)."""
    started: list[Target] = []

    def _launch(argv: list, tag: str) -> Target:
        t = Target("counter", tmp_path / tag)      # any known name; argv replaced below
        t.name = tag
        t.argv = [str(a) for a in argv]
        started.append(t)
        t.start()
        t.wait_ready()
        return t

    yield _launch
    for t in started:
        t.kill()


def _children() -> set[int]:
    """Pids whose parent is this process (zombies included)."""
    me, out = os.getpid(), set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                data = f.read()
        except OSError:
            continue
        if int(data[data.rindex(")") + 2:].split()[1]) == me:
            out.add(int(d))
    return out


def _status_field(pid: int, field: str, tid: int | None = None) -> str | None:
    path = f"/proc/{pid}/task/{tid}/status" if tid else f"/proc/{pid}/status"
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _tracers(pid: int) -> dict[int, str]:
    """{tid: TracerPid} of every thread of pid that is traced."""
    out = {}
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return out
    for tid in tids:
        tp = _status_field(pid, "TracerPid", tid)
        if tp not in (None, "0"):
            out[tid] = tp
    return out


def _stopped_threads(pid: int) -> dict[int, str]:
    out = {}
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return out
    for tid in tids:
        st = _status_field(pid, "State", tid)
        if st and st[0] in "tT":
            out[tid] = st
    return out


def _partials(img: Path) -> list[str]:
    return sorted(p.name for p in img.parent.glob(f".{img.name}.partial-*"))


class _ChildWatch:
    """Counts SIGCHLD while active: any process the engine creates (the restore stub is
    our child: its ptrace stops and its death each send one) shows up here."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        self.old = signal.signal(signal.SIGCHLD, self._on)
        return self

    def _on(self, *_):
        self.count += 1

    def __exit__(self, *exc):
        time.sleep(0.05)          # let a pending SIGCHLD be handled
        signal.signal(signal.SIGCHLD, self.old)
        return False


@contextlib.contextmanager
def _deadline(seconds: float, what: str):
    """Fail instead of hanging the suite."""
    def _on(*_):
        raise TimeoutError(f"{what} did not finish within {seconds}s (hang)")
    old = signal.signal(signal.SIGALRM, _on)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _assert_nothing_left(pid: int, children_before: set[int], exe: str | None = None) -> None:
    """No new child of ours (not even a zombie), and the image's pid is not a restored
    process: free, or (pid reuse by an unrelated program) not ours and not the target."""
    left = _children() - children_before
    assert not left, f"restore left processes behind: {sorted(left)}"
    state = _status_field(pid, "State")
    if state is None:
        return
    ppid = _status_field(pid, "PPid")
    try:
        pexe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        pexe = "?"
    assert ppid != str(os.getpid()) and (exe is None or pexe != exe), \
        f"pid {pid} exists after a failed restore (state {state}, ppid {ppid}, exe {pexe})"


# ----------------------------------------------------------------------------- 1. unsupported fd

UNSUPPORTED_FD = 9
# Kinds the design never plans to support (pipes, sockets, eventfds ... will be), so this
# test keeps meaning "unsupported" as the engine grows.
UNSUPPORTED_KINDS = ["perf_event", "io_uring"]


@pytest.mark.parametrize("kind", UNSUPPORTED_KINDS)
def test_unsupported_fd_fails_dump_and_target_lives(engine, unsupported_fd_bin, launch_argv,
                                                    images, kind):
    t = launch_argv([unsupported_fd_bin, kind, UNSUPPORTED_FD], f"ufd-{kind}")
    time.sleep(RUN_BEFORE_DUMP)
    img = images()
    with pytest.raises(engine.UnsupportedError) as ei:
        engine.dump(t.pid, str(img))
    msg = str(ei.value)
    assert str(t.pid) in msg, f"message does not name the pid {t.pid}: {msg}"
    assert re.search(rf"\bfd {UNSUPPORTED_FD}\b", msg), f"message does not name fd {UNSUPPORTED_FD}: {msg}"
    assert kind in msg, f"message does not name the kind {kind!r}: {msg}"
    assert "close it" in msg, f"message does not say what to do: {msg}"
    # nothing on disk: neither the image nor a hidden partial one next to it
    assert not img.exists(), f"a failed dump left {img}"
    assert _partials(img) == [], f"a failed dump left partial images {_partials(img)}"
    # the target runs on, untraced, and its state is intact
    time.sleep(0.1)
    assert t.alive(), f"the target died after a refused dump\n{t.log()}"
    assert _tracers(t.pid) == {}, f"threads still traced after a refused dump: {_tracers(t.pid)}"
    assert _stopped_threads(t.pid) == {}, f"threads left stopped: {_stopped_threads(t.pid)}"
    t.expect_pass()


def test_unsupported_mapping_fails_dump_and_target_lives(engine, unsupported_fd_bin,
                                                        launch_argv, images):
    """io_uring with its rings mapped: the mappings are refused too, naming the address."""
    t = launch_argv([unsupported_fd_bin, "io_uring_mapped", UNSUPPORTED_FD], "ufd-mapped")
    time.sleep(RUN_BEFORE_DUMP)
    img = images()
    with pytest.raises(engine.UnsupportedError) as ei:
        engine.dump(t.pid, str(img))
    msg = str(ei.value)
    assert str(t.pid) in msg and "io_uring" in msg, msg
    assert re.search(rf"\bfd {UNSUPPORTED_FD}\b|0x[0-9a-f]+", msg), f"names no fd nor address: {msg}"
    assert not img.exists() and _partials(img) == []
    time.sleep(0.1)
    assert t.alive() and _tracers(t.pid) == {} and _stopped_threads(t.pid) == {}, t.log()
    t.expect_pass()


def test_unsupported_fd_cli(engine, unsupported_fd_bin, launch_argv, images):
    """The CLI says the same in one line (no traceback) and exits 1."""
    t = launch_argv([unsupported_fd_bin, "perf_event", UNSUPPORTED_FD], "ufd-cli")
    img = images()
    r = _cli("dump", "-t", t.pid, "-D", img)
    assert r.returncode == 1, f"rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("nbcheckpoint: error: "), r.stderr
    assert f"fd {UNSUPPORTED_FD}" in r.stderr and "perf_event" in r.stderr and str(t.pid) in r.stderr, r.stderr
    assert not img.exists() and _partials(img) == []
    assert t.alive() and _tracers(t.pid) == {}
    t.expect_pass()


# ----------------------------------------------------------------------------- 2. damaged images

@pytest.fixture
def good_image(engine, launch, images):
    """(image dir, pid, exe) of a fresh kill-mode dump of counter; the pid is free again."""
    t = launch("counter")
    time.sleep(RUN_BEFORE_DUMP)
    img = images("good")
    t.checkpoint(img)          # kills and reaps it
    wait_pid_free(t.pid)
    return img, t.pid, t.argv[0]


def _copy(img: Path, tmp_path: Path, tag: str) -> Path:
    dst = tmp_path / f"damaged-{tag}"
    shutil.copytree(img, dst)
    return dst


def _flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x20
    path.write_bytes(bytes(data))


def _rewrite_inventory(img: Path, edit) -> None:
    """Edit the inventory, then reseal the image with our key (imagedir.reseal)."""
    from nbcheckpoint.engine.images import imagedir
    inv = imagedir.ImageReader(str(img)).inventory
    edit(inv)
    imagedir.reseal(img, inv)


def _restore_must_fail(engine, img, pid, exe, exc, before_any_process=True):
    before = _children()
    with _ChildWatch() as watch, _deadline(60, f"restore of damaged image {img}"):
        with pytest.raises(exc) as ei:
            engine.restore(str(img))
    _assert_nothing_left(pid, before, exe)
    if before_any_process:
        assert watch.count == 0, "the damage was found only after a process was created"
    return str(ei.value)


def _damage_missing_inventory(img, pid, other):
    (img / "inventory.img").unlink()
    return ["inventory.img", str(img)]


def _damage_inventory_flipped(img, pid, other):
    _flip(img / "inventory.img")
    return ["inventory.img", "corrupt"]


def _damage_inventory_random(img, pid, other):
    p = img / "inventory.img"
    p.write_bytes(os.urandom(p.stat().st_size))
    return ["inventory.img"]


def _damage_inventory_truncated(img, pid, other):
    p = img / "inventory.img"
    p.write_bytes(p.read_bytes()[:-5])
    return ["inventory.img"]


def _damage_pages_truncated(img, pid, other):
    p = img / f"pages-{pid}.img"
    size = p.stat().st_size
    assert size > 4096
    os.truncate(p, size // 2)
    return [f"pages-{pid}.img", "truncated"]


def _damage_core_missing(img, pid, other):
    (img / f"core-{pid}.img").unlink()
    return [f"core-{pid}.img", "missing"]


def _damage_mm_random(img, pid, other):
    p = img / f"mm-{pid}.img"
    p.write_bytes(os.urandom(p.stat().st_size))
    return [f"mm-{pid}.img", "corrupt"]


def _damage_mm_from_other_image(img, pid, other):
    o_img, o_pid = other
    shutil.copyfile(o_img / f"mm-{o_pid}.img", img / f"mm-{pid}.img")
    return [f"mm-{pid}.img"]


def _damage_mm_is_task_with_fixed_sums(img, pid, other):
    """A file of another kind put in mm's place, and the image resealed to match: only
    the type name inside the file can tell."""
    from nbcheckpoint.engine.images import imagedir
    shutil.copyfile(img / f"task-{pid}.img", img / f"mm-{pid}.img")
    imagedir.reseal(img)
    return [f"mm-{pid}.img", "TaskCore", "Mm"]


def _damage_format_version(img, pid, other):
    from nbcheckpoint.engine.images import imagedir

    def edit(inv):
        inv.format_version = imagedir.FORMAT_VERSION + 1
    _rewrite_inventory(img, edit)
    return [str(img), f"version {imagedir.FORMAT_VERSION + 1}", f"version {imagedir.FORMAT_VERSION}"]


DAMAGES = {
    "missing-inventory": _damage_missing_inventory,
    "inventory-flipped-byte": _damage_inventory_flipped,
    "inventory-random-bytes": _damage_inventory_random,
    "inventory-truncated": _damage_inventory_truncated,
    "pages-truncated": _damage_pages_truncated,
    "core-missing": _damage_core_missing,
    "mm-random-same-size": _damage_mm_random,
    "mm-from-another-image": _damage_mm_from_other_image,
    "mm-foreign-kind-checksums-fixed": _damage_mm_is_task_with_fixed_sums,
    "format-version": _damage_format_version,
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_image_refused_before_any_process(engine, good_image, launch, images,
                                                  tmp_path, damage):
    img, pid, exe = good_image
    other = None
    if damage == "mm-from-another-image":
        t2 = launch("counter", tag="other")
        o_img = images("other")
        t2.checkpoint(o_img)
        other = (o_img, t2.pid)
    bad = _copy(img, tmp_path, damage)
    must_name = DAMAGES[damage](bad, pid, other)
    msg = _restore_must_fail(engine, bad, pid, exe, engine.ImageError)
    for word in must_name:
        assert word in msg, f"error does not mention {word!r}: {msg}"


def test_damaged_page_data_detected_while_streaming(engine, good_image, tmp_path):
    """A flipped byte in page data (same size) is found while the pages stream into the
    stub: restore must raise ImageError and kill and reap the stub."""
    img, pid, exe = good_image
    bad = _copy(img, tmp_path, "pages-flipped")
    pages = bad / f"pages-{pid}.img"
    assert pages.stat().st_size > 4096
    _flip(pages)
    msg = _restore_must_fail(engine, bad, pid, exe, engine.ImageError, before_any_process=False)
    assert pages.name in msg and "corrupt" in msg, msg
    state = _status_field(pid, "State")
    assert state is None or _status_field(pid, "PPid") != str(os.getpid()), \
        f"stub {pid} still exists (state {state})"


def test_empty_dir_is_not_an_image(engine, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    before = _children()
    with pytest.raises(engine.ImageError) as ei:
        engine.restore(str(d))
    assert str(d) in str(ei.value) and "inventory.img" in str(ei.value), str(ei.value)
    assert _children() == before


def test_missing_dir(engine, tmp_path):
    d = tmp_path / "no-such-image"
    before = _children()
    with pytest.raises(engine.ImageError) as ei:
        engine.restore(str(d))
    assert str(d) in str(ei.value), str(ei.value)
    assert _children() == before


def test_file_instead_of_dir(engine, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("hello")
    with pytest.raises(engine.ImageError) as ei:
        engine.restore(str(f))
    assert str(f) in str(ei.value), str(ei.value)


def _cli(*args, timeout=120, **kw):
    cmd = [sys.executable, "-c", "import sys; from nbcheckpoint.cli import main; sys.exit(main())"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, **kw)


def test_cli_restore_damaged_image(engine, good_image, tmp_path):
    img, pid, exe = good_image
    bad = _copy(img, tmp_path, "cli")
    _flip(bad / "inventory.img")
    r = _cli("restore", "-D", bad)
    assert r.returncode == 1, f"rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert r.stderr.startswith("nbcheckpoint: error: ") and "inventory.img" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    r = _cli("restore", "-D", tmp_path / "nothing-here")
    assert r.returncode == 1 and r.stderr.startswith("nbcheckpoint: error: "), r.stderr


# ----------------------------------------------------------------------------- 3. PID taken

@pytest.mark.root_only       # an ordinary user restores into a PID namespace of its own: no PID is taken there
def test_restore_while_original_runs_pid_taken(engine, launch, images):
    t = launch("counter")
    time.sleep(RUN_BEFORE_DUMP)
    img = images()
    t.checkpoint(img, leave_running=True)
    assert t.alive()
    before = _children()
    with _ChildWatch() as watch, _deadline(60, "restore onto a taken pid"):
        with pytest.raises(engine.RestoreError) as ei:
            engine.restore(str(img))
    msg = str(ei.value)
    assert f"PID {t.pid}" in msg and "taken" in msg, msg
    assert "Stop that process" in msg or "restore where" in msg, f"no remedy given: {msg}"
    assert watch.count == 0, "a process was created although the pid was taken"
    assert _children() == before
    # the original is untouched
    assert t.alive(), t.log()
    assert _tracers(t.pid) == {} and _stopped_threads(t.pid) == {}
    t.expect_pass()


# ----------------------------------------------------------------------------- 4. mapped file changed

def _append_byte(p: Path):
    with open(p, "ab") as f:
        f.write(b"\0")


def _touch(p: Path):
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def _remove(p: Path):
    p.unlink()


@pytest.mark.parametrize("change", [_append_byte, _touch, _remove],
                         ids=["appended", "touched", "removed"])
def test_mapped_file_changed_since_dump(engine, launch_argv, images, tmp_path, change):
    exe = tmp_path / "bin" / "counter"
    exe.parent.mkdir()
    shutil.copy2(BIN_DIR / "counter", exe)
    t = launch_argv([exe], "copied-counter")
    time.sleep(RUN_BEFORE_DUMP)
    img = images()
    t.checkpoint(img)
    wait_pid_free(t.pid)
    change(exe)
    before = _children()
    with _ChildWatch() as watch, _deadline(60, "restore with a changed mapped file"):
        with pytest.raises(engine.RestoreError) as ei:
            engine.restore(str(img))
    msg = str(ei.value)
    assert str(exe) in msg, f"error does not name {exe}: {msg}"
    assert ("changed" in msg or "gone" in msg), msg
    assert watch.count == 0, "the change was found only after a process was created"
    _assert_nothing_left(t.pid, before, str(exe))
    assert _status_field(t.pid, "State") is None or _status_field(t.pid, "PPid") != str(os.getpid())


# ----------------------------------------------------------------------------- 5. engine killed mid-dump

BIG_MB = 400
KILLER = r"""
import sys, time
from nbcheckpoint import cli

t0 = time.monotonic()
def mark(phase):
    print(f"{time.monotonic() - t0:.4f} {phase}", flush=True)

class PhasePrinter:          # the CLI's progress line, as timestamped phase changes on stdout
    last = None
    def __call__(self, phase, done, total):
        if phase != self.last:
            self.last = phase
            mark(phase)
    def __enter__(self):      # used as `with Progress() as progress:` (cli.py)
        return self
    def __exit__(self, *exc):
        pass

cli.Progress = PhasePrinter
# Diagnostics only: also mark the injection phase, if the engine still has one by that name.
_dump = sys.modules.get("nbcheckpoint.engine.dump")
_inject = getattr(_dump, "_inject_phase", None)
if _inject is not None:
    def _marked(*a, **k):
        mark("inject")
        r = _inject(*a, **k)
        mark("injected")
        return r
    _dump._inject_phase = _marked
print("GO", flush=True)
t0 = time.monotonic()
sys.exit(cli.main(sys.argv[1:]))
"""


def _start_killable_dump(pid: int, img: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", KILLER, "dump", "-t", str(pid), "-D", str(img),
                          "--leave-running"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    if line != "GO\n":
        p.kill()
        raise AssertionError(f"dump wrapper did not start: {line!r} {p.stderr.read()}")
    return p


def _verify_complete(engine, img: Path) -> None:
    """An image dir that exists must be whole: inventory, every file and all page data."""
    from nbcheckpoint.engine.images import imagedir
    rd = imagedir.ImageReader(str(img))
    rd.verify_all_metadata()
    for name in rd.sums:
        if name.startswith("pages-"):
            r = rd.open_pages(name)
            buf = bytearray(8 << 20)
            left = rd.sums[name].size
            while left:
                n = min(left, len(buf))
                r.readinto(memoryview(buf)[:n])
                left -= n
            r.finish()


def test_engine_killed_mid_dump(engine, launch, images, tmp_path):
    t = launch("pybig", args=(BIG_MB,))
    time.sleep(RUN_BEFORE_DUMP)

    # calibration: one whole dump, to know how long one takes
    cal = images("calibration")
    p = _start_killable_dump(t.pid, cal)
    t0 = time.monotonic()
    out, err = p.communicate(timeout=300)
    duration = time.monotonic() - t0
    assert p.returncode == 0, f"calibration dump failed\n{out}\n{err}"
    shutil.rmtree(cal)

    seed = int(os.environ.get("NBCK_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    # short delays land in freeze, mm/fds and injection (here: frozen after ~5 ms,
    # injection from ~10-40 ms for some 20 ms); random ones anywhere; the last one after
    # the commit
    delays = [0.0, 0.001, 0.003, 0.006, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.07]
    delays += [rng.uniform(0, duration) for _ in range(5)]
    delays.append(duration * 1.5)

    problems, complete = [], []
    for i, delay in enumerate(delays):
        img = images(f"kill{i}")
        p = _start_killable_dump(t.pid, img)
        time.sleep(delay)
        p.kill()
        out, err = p.communicate(timeout=60)
        phases = [ln.split()[1] for ln in out.splitlines() if len(ln.split()) == 2]
        where = f"kill #{i} after {delay:.4f}s (seed {seed}; phases reached {phases or ['none']}; " \
                f"dump rc {p.returncode}{'; ' + err.strip().splitlines()[-1] if err.strip() else ''})"
        print(where)                         # shown when the test fails
        time.sleep(0.3)                      # let a damaged target show it
        if not t.alive():
            problems.append(f"{where}: the target died (status {t.status})")
            break
        if _tracers(t.pid):
            problems.append(f"{where}: target threads still traced: {_tracers(t.pid)}")
        if _stopped_threads(t.pid):
            problems.append(f"{where}: target threads left stopped: {_stopped_threads(t.pid)}")
        if img.exists():
            try:
                _verify_complete(engine, img)
            except engine.ImageError as e:
                problems.append(f"{where}: {img} exists but is not a whole image: {e}")
                shutil.rmtree(img, ignore_errors=True)
            else:
                for old in complete:         # keep only the last whole image (400 MB each)
                    shutil.rmtree(old, ignore_errors=True)
                complete = [img]
        for name in _partials(img):          # SIGKILL leaves the hidden partial dir: remove it
            shutil.rmtree(img.parent / name, ignore_errors=True)

    res = t.run_to_result() if t.alive() else None
    if res is None or not res.passed:
        problems.append(f"the target did not pass its check after the killed dumps: "
                        f"{res!r}\n--- log ---\n{t.log()}")
    assert not problems, "\n".join(problems)

    # an image committed before the kill is a real image: it restores and passes
    if complete:
        t.reap()
        t.restore(complete[-1])
        t.expect_pass()
