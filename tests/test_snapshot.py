"""The copy-on-write snapshot of --leave-running dumps (nbcheckpoint/engine/snapshot.py).

The tree is frozen only while its non-page state is collected and each process is forked
by an injected clone; the private pages are read out of those children after the thaw.

- the image is one instant: cow_churn never stops writing its memory (a ring of pages,
  MADV_DONTNEED and munmap/mmap churn, a MADV_DONTFORK and a MADV_WIPEONFORK region, a
  private file mapping), and the restored process finds every page as its counters say;
- the snapshot sees what the frozen process sees (same page runs, same bytes);
- the freeze is short, measured from inside the target, and nothing is left behind;
- reading the snapshot does not copy it (the pages stay shared with the running process);
- the engine killed at the clone, after it, or while the pages stream: the target lives
  on, no copy of it ever runs its code, and the next dump reaps the dead child;
- a refused clone (pids.max) falls back to the frozen copy, and says so.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def engine():
    import nbcheckpoint.engine as engine
    return engine


# ----------------------------------------------------------------------------- helpers

def _field(pid: int, name: str, tid: int | None = None) -> str | None:
    path = f"/proc/{pid}/task/{tid}/status" if tid else f"/proc/{pid}/status"
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name + ":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat fields, 1-based as in proc(5)."""
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    return ["", "", ""] + raw[raw.rindex(")") + 2:].split()


def _tasks(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def _children(pid: int) -> list[int]:
    out = []
    for tid in _tasks(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return sorted(out)


def _untouched(pid: int) -> list[str]:
    """Why the process does not look free to run (traced or ptrace-stopped threads)."""
    bad = []
    for tid in _tasks(pid):
        tracer, state = _field(pid, "TracerPid", tid), _field(pid, "State", tid) or "?"
        if tracer not in (None, "0"):
            bad.append(f"thread {tid} traced by {tracer}")
        if state.startswith("t"):
            bad.append(f"thread {tid} in {state}")
    return bad


def _phases(log: list) -> list[str]:
    """The progress phases in order, repeats folded."""
    out = []
    for ph in log:
        if not out or out[-1] != ph:
            out.append(ph)
    return out


def _gap(t, timeout: float = 10.0) -> float:
    """SIGUSR2: cow_churn's ticking thread prints the longest gap between its ticks since the
    last time it was asked, and starts again."""
    before = len(re.findall(r"^GAP ", t.log(), re.M))
    t.signal(signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while True:
        gaps = re.findall(r"^GAP ([0-9.]+) (\d+) ([0-9.]+)$", t.log(), re.M)
        if len(gaps) > before:
            return float(gaps[-1][0])
        assert t.alive() and time.monotonic() < deadline, f"no GAP line\n{t.log()}"
        time.sleep(0.01)


def _page_runs(img: Path, pid: int) -> dict[int, bytes]:
    """{vaddr: bytes} of every saved private page run of process pid."""
    from nbcheckpoint.engine.images import imagedir, pagemap_pb2
    rd = imagedir.ImageReader(str(img))
    entries = list(rd.messages(f"pagemap-{pid}.img", pagemap_pb2.PagemapEntry))
    src = rd.open_pages(f"pages-{pid}.img")
    out = {}
    for e in entries:
        buf = bytearray(e.nr_pages * 4096)
        src.readinto(memoryview(buf))
        out[e.vaddr] = bytes(buf)
    src.finish()
    src.close()
    return out


def _vmas(img: Path, pid: int):
    from nbcheckpoint.engine.images import imagedir, mm_pb2
    return list(imagedir.ImageReader(str(img)).messages(f"mm-{pid}.img", mm_pb2.Mm))[0].vmas


def _threads(img: Path, pid: int):
    from nbcheckpoint.engine.images import core_pb2, imagedir
    return list(imagedir.ImageReader(str(img)).messages(f"core-{pid}.img", core_pb2.ThreadCore))


def _processes(img: Path):
    from nbcheckpoint.engine.images import imagedir, pstree_pb2
    return list(imagedir.ImageReader(str(img)).messages("pstree.img", pstree_pb2.Process))


# ----------------------------------------------------------------------------- the image is one instant

def test_image_is_one_instant(engine, launch, images):
    """Three leave-running dumps of a process that never stops writing; each image, restored,
    finds every page where its counters say (and the original carries on unharmed)."""
    t = launch("cow_churn", args=(32,))
    time.sleep(0.3)
    tasks = _tasks(t.pid)
    imgs = []
    for i in range(3):
        img = images(f"lr{i}")
        log: list[str] = []
        stats = engine.dump(t.pid, str(img), leave_running=True, progress=lambda ph, d, n: log.append(ph))
        assert stats.snapshot, stats
        assert stats.frozen_s == stats.frozen_seconds <= stats.copy_seconds <= stats.total_seconds
        # the MADV_DONTFORK/WIPEONFORK regions are read while frozen, the rest after the thaw
        assert _phases(log) == ["frozen", "pages", "thawed", "pages", "sync"], log
        assert _tasks(t.pid) == tasks and _children(t.pid) == [], (_tasks(t.pid), _children(t.pid))
        assert not _untouched(t.pid), _untouched(t.pid)
        imgs.append(img)
        time.sleep(0.2)
    t.expect_pass()
    t.reap()
    for img in imgs:
        t.restore(img)
        t.expect_pass()
        t.reap()
    assert "DUPLICATE" not in t.log(), t.log()


def test_tree_left_as_it_was(engine, launch, images):
    """A tree (children, a grandchild, a zombie, a stopped child): every process is forked
    and every fork reaped; afterwards each process has the children it had, the stopped one
    is still stopped, and the image restores."""
    t = launch("tree")
    time.sleep(0.3)
    tree = [t.pid]
    for p in tree:
        tree += [c for c in _children(p) if c not in tree]
    def state(p):                       # stopped, zombie, or live (running or sleeping)
        st = _field(p, "State")[0]
        return st if st in "TtZ" else "live"
    before = {p: (_children(p), _tasks(p), state(p)) for p in tree}
    img = images()
    stats = engine.dump(t.pid, str(img), leave_running=True)
    assert stats.snapshot, stats
    time.sleep(0.1)
    after = {p: (_children(p), _tasks(p), state(p)) for p in tree}
    assert after == before
    t.expect_pass()
    t.reap()
    t.restore(img)
    t.expect_pass()


def test_snapshot_sees_what_the_frozen_process_sees(engine, launch, images):
    """A process that does not change (mappings: private anon, a private file mapping with some
    pages written, PROT_NONE, read-only, sparse): the snapshot's image holds exactly the page
    runs and bytes of a frozen copy -- in particular, of the private file mapping only the
    copied-on-write pages (the fork copies its page table; the clean pages are page cache)."""
    t = launch("mappings")
    time.sleep(0.3)
    frozen, snap = images("frozen"), images("snap")
    s1 = engine.dump(t.pid, str(frozen), leave_running=True,
                     options=engine.Options(leave_running=True, snapshot=False))
    s2 = engine.dump(t.pid, str(snap), leave_running=True)
    assert not s1.snapshot and s2.snapshot
    a, b = _page_runs(frozen, t.pid), _page_runs(snap, t.pid)
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    # The kernel writes each thread's rseq area (cpu_id ...) whenever it runs, injected calls too.
    for img, runs in ((frozen, a), (snap, b)):
        for c in _threads(img, t.pid):
            for v, data in runs.items():
                if v <= c.rseq_addr < v + len(data):
                    o = c.rseq_addr - v
                    runs[v] = data[:o] + bytes(c.rseq_len) + data[o + c.rseq_len:]
    differ = [hex(v) for v in a if a[v] != b[v]]
    assert not differ, f"page runs with other bytes: {differ}"
    priv = next(v for v in _vmas(snap, t.pid) if v.file.path.endswith("/priv.dat"))
    inside = sorted((va - priv.start) // 4096 + k for va in b if priv.start <= va < priv.end
                    for k in range(len(b[va]) // 4096))
    assert inside == [pg for pg in range(256) if pg % 5 == 1], inside   # mappings.c cow_page()
    t.kill()                # (its check writes its MAP_SHARED file: the image would see that)
    t.reap()
    t.restore(snap)
    t.expect_pass()


# ----------------------------------------------------------------------------- frozen briefly

def test_frozen_only_briefly(engine, launch, images):
    """~530 MiB process: the longest pause its ticking thread sees during a snapshot dump is
    well under the pause of a frozen copy of the same process; no thread or child is added."""
    t = launch("cow_churn", args=(16, 512))
    time.sleep(0.3)
    tasks = _tasks(t.pid)

    def measured(snapshot: bool):
        _gap(t)                                # start counting from here
        img = images("copy" if not snapshot else "snap")
        stats = engine.dump(t.pid, str(img), leave_running=True,
                            options=engine.Options(leave_running=True, snapshot=snapshot))
        gap = _gap(t)
        shutil.rmtree(img)
        return stats, gap

    copy_stats, copy_gap = measured(False)
    snap_stats, snap_gap = measured(True)
    report = (f"frozen copy: frozen {copy_stats.frozen_seconds:.3f}s (gap seen {copy_gap:.3f}s), "
              f"total {copy_stats.total_seconds:.3f}s; snapshot: frozen {snap_stats.frozen_seconds:.3f}s "
              f"(gap seen {snap_gap:.3f}s), total {snap_stats.total_seconds:.3f}s")
    print(report)
    assert not copy_stats.snapshot and snap_stats.snapshot, report
    assert snap_stats.pages_bytes >= 512 << 20, report
    assert copy_gap >= 0.8 * copy_stats.frozen_seconds, report       # the ticker does see a freeze
    assert snap_gap < copy_gap / 3, report
    assert snap_stats.frozen_seconds < copy_stats.frozen_seconds / 3, report
    assert _tasks(t.pid) == tasks and _children(t.pid) == [], (_tasks(t.pid), _children(t.pid))
    assert not _untouched(t.pid), _untouched(t.pid)
    t.expect_pass()


def test_reading_the_snapshot_copies_nothing(engine, launch, images):
    """The snapshot's pages are read without breaking their sharing: at the end of the stream
    the target's static 256 MiB are still shared with its fork (process_vm_readv would have
    made the kernel copy each page first: GUP unshare of FOLL_PIN on a shared anonymous page)."""
    t = launch("cow_churn", args=(8, 256))
    time.sleep(0.3)
    seen, thawed = [], []

    def progress(phase, done, total):
        if phase == "thawed":
            thawed.append(True)
        elif phase == "pages" and thawed and done == total and total >= 256 << 20:
            with open(f"/proc/{t.pid}/smaps_rollup") as f:
                seen.append(next(int(ln.split()[1]) for ln in f if ln.startswith("Shared_Dirty:")) << 10)

    stats = engine.dump(t.pid, str(images()), leave_running=True, progress=progress)
    assert stats.snapshot and len(seen) == 1, (stats, seen)
    assert seen[0] >= 250 << 20, f"only {seen[0] >> 20} MiB of the target still shared at the end of the stream"
    t.expect_pass()


# ----------------------------------------------------------------------------- the engine killed

# Where the engine dies (snapshot.DEBUG_KILL_ENV), and how its fork must have ended:
# at the clone's syscall-exit stop, before the child has PTRACE_O_EXITKILL -- detached, it runs
# the gadget's exit_group(SNAPSHOT_EXIT); once it has it, or while the pages stream after the
# thaw, the kernel kills it.
KILL_POINTS = ["clone", "snapshot", "thawed"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_engine_killed_around_the_snapshot(engine, launch, images, point):
    from nbcheckpoint.engine import sigframe, snapshot
    t = launch("cow_churn")
    time.sleep(0.3)
    tasks = _tasks(t.pid)
    img = images()
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env[snapshot.DEBUG_KILL_ENV] = point
    r = subprocess.run([sys.executable, "-m", "nbcheckpoint", "dump", "-t", str(t.pid), "-D", str(img), "-R"],
                       env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == -signal.SIGKILL, f"rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    time.sleep(0.3)
    assert t.alive(), t.log()
    assert not _untouched(t.pid), _untouched(t.pid)
    assert _tasks(t.pid) == tasks
    assert not img.exists()
    # the fork: a zombie that ran none of the target's code
    kids = _children(t.pid)
    assert len(kids) == 1, kids
    st = _stat(kids[0])
    want = sigframe.SNAPSHOT_EXIT << 8 if point == "clone" else signal.SIGKILL
    assert (st[3], int(st[38]), int(st[52])) == ("Z", 0, want), (st[3], st[38], st[52])
    assert "DUPLICATE" not in t.log(), t.log()
    # the next dump reaps it, and leaves it out of the image
    img2 = images("next")
    stats = engine.dump(t.pid, str(img2), leave_running=True)
    assert stats.snapshot
    assert _children(t.pid) == [], _children(t.pid)
    assert [p.pid for p in _processes(img2)] == [t.pid]
    t.expect_pass()
    t.reap()
    t.restore(img2)
    t.expect_pass()


# ----------------------------------------------------------------------------- clone refused

def _pids_cgroup_root(tmp: Path) -> Path:
    """A mounted hierarchy with the pids controller: the machine's (v1 or v2), else one we
    mount under `tmp` (root may mount cgroupfs; unmounted by the caller via tmp)."""
    v1 = Path("/sys/fs/cgroup/pids")
    if (v1 / "cgroup.procs").exists():
        return v1
    v2 = Path("/sys/fs/cgroup")
    try:
        if "pids" in (v2 / "cgroup.controllers").read_text().split():
            return v2
    except OSError:
        pass
    for fstype, opts, name in (("cgroup", "pids", "pids"), ("cgroup2", "", "unified")):
        mnt = tmp / name
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", fstype] + (["-o", opts] if opts else []) + [fstype, str(mnt)],
                           capture_output=True, text=True)
        if r.returncode == 0 and (mnt / "cgroup.procs").exists():
            if fstype == "cgroup2" and "pids" not in (mnt / "cgroup.controllers").read_text().split():
                subprocess.run(["umount", str(mnt)])
                continue
            return mnt
    raise AssertionError("no pids cgroup controller is mounted here and none could be mounted "
                         "(v1 `mount -t cgroup -o pids`, v2 `mount -t cgroup2`): this test needs one")


def _cgroup_of(pid: int, root: Path) -> Path:
    v1 = root.name == "pids"
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrl, path = line.split(":", 2)
        if (v1 and "pids" in ctrl.split(",")) or (not v1 and ctrl == ""):
            return root / path.lstrip("/")
    raise AssertionError(f"pid {pid} is in no pids cgroup")


@contextlib.contextmanager
def _no_room_for_a_fork(pid: int):
    """Process PID may not fork for a while (its clone fails with EAGAIN): as root, a pids
    cgroup of its own at its count (pids.max; root ignores RLIMIT_NPROC); as an ordinary user,
    whose cgroups are root's, RLIMIT_NPROC 0 (prlimit on a process of one's own; the dump
    records it, and the restored process has it too)."""
    from nbcheckpoint.engine.sys import userns
    if not userns.privileged():
        old = resource.prlimit(pid, resource.RLIMIT_NPROC)
        resource.prlimit(pid, resource.RLIMIT_NPROC, (0, old[1]))
        try:
            yield
        finally:
            resource.prlimit(pid, resource.RLIMIT_NPROC, old)
        return
    mounts = Path(tempfile.mkdtemp(prefix="nbck-cg-"))
    root = _pids_cgroup_root(mounts)
    home = _cgroup_of(pid, root)
    cg = root / f"nbcheckpoint-test-{os.getpid()}-{pid}"
    if (root / "cgroup.subtree_control").exists():           # v2: the children need the controller
        (root / "cgroup.subtree_control").write_text("+pids")
    cg.mkdir()
    try:
        (cg / "cgroup.procs").write_text(str(pid))
        (cg / "pids.max").write_text((cg / "pids.current").read_text().strip())
        yield
    finally:
        (home / "cgroup.procs").write_text(str(pid))
        cg.rmdir()
        if root.is_relative_to(mounts):
            subprocess.run(["umount", str(root)])
        shutil.rmtree(mounts, ignore_errors=True)


def test_clone_refused_falls_back_to_frozen_copy(engine, launch, images, caplog):
    """No room for the fork (pids.max, or RLIMIT_NPROC without root): the dump copies while
    frozen, as without a snapshot, and says so (warning naming the process and the error,
    progress "no-snapshot", DumpStats.snapshot False); the image is whole."""
    t = launch("cow_churn")
    time.sleep(0.3)
    with _no_room_for_a_fork(t.pid):
        img = images()
        log: list[str] = []
        with caplog.at_level(logging.WARNING, logger="nbcheckpoint"):
            stats = engine.dump(t.pid, str(img), leave_running=True, progress=lambda ph, d, n: log.append(ph))
    assert not stats.snapshot
    assert _phases(log) == ["frozen", "no-snapshot", "pages", "thawed", "sync"], log
    assert f"process {t.pid}" in caplog.text and "EAGAIN" in caplog.text, caplog.text
    assert _children(t.pid) == [] and not _untouched(t.pid)
    t.expect_pass()
    t.reap()
    t.restore(img)
    t.expect_pass()
