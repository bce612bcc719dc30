"""Lazy restore (--lazy-pages, engine/lazy.py): the tree runs before its big anonymous
memory is in, and the engine's page server fills it -- faults first, the rest streamed.

The lazy_mem target changes its memory in every way that matters to the server (a write
into a page still to come, mprotect splitting a VMA, MADV_DONTNEED, mremap, munmap + mmap,
fork) first thing after SIGUSR1; with the stream held back those all meet pages still to
come, and the server's event counters prove it.

Lazy restore is root's (userfaultfd's fork events need CAP_SYS_PTRACE in the initial user
namespace): these tests run in the root pass; what an ordinary user gets -- a refusal before
any process exists, and the Jupyter shim's full restore -- is tests/test_lazy_access.py's."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ALL_TARGETS, _proc_state

pytestmark = pytest.mark.root_only


@pytest.fixture(scope="module")
def engine():
    import nbcheckpoint.engine as engine
    return engine


def _wait_server(t, timeout=60.0):
    t.lazy_thread.join(timeout)
    assert not t.lazy_thread.is_alive(), "the page server did not finish"


def test_events_meet_pages_still_to_come(engine, launch, images):
    t = launch("lazy_mem")
    img = images()
    t.checkpoint(img)
    res = t.restore_lazy(img, stream_after=120)        # only faults are served meanwhile
    assert res.lazy is not None and res.lazy.total >= 40 << 20, "lazy_mem's regions were not left lazy"
    t.expect_pass()
    _wait_server(t)                                    # everything touched: nothing left to come
    assert t.lazy_error is None, t.lazy_error
    ev = res.lazy.events
    assert ev["fork"] >= 1 and ev["remap"] >= 1 and ev["remove"] >= 1 and ev["unmap"] >= 1, ev
    assert res.lazy.faults > 0


def test_dump_refused_while_memory_is_coming_in(engine, launch, images):
    """PAGEMAP_SCAN cannot see pages that have not come in: a dump of a process whose VMAs
    are still registered with the page server is refused by name, and the process goes on."""
    t = launch("lazy_mem")
    img = images()
    t.checkpoint(img)
    t.restore_lazy(img, stream_after=120)
    with pytest.raises(engine.UnsupportedError, match="userfaultfd"):
        engine.dump(t.pid, str(images("while-lazy")), leave_running=True)
    t.expect_pass()
    _wait_server(t)
    assert t.lazy_error is None, t.lazy_error


def test_streamed_while_running(engine, launch, images):
    t = launch("lazy_mem")
    img = images()
    t.checkpoint(img)
    res = t.restore_lazy(img)                          # streams at once
    _wait_server(t)
    assert t.lazy_error is None, t.lazy_error
    assert res.lazy.done == res.lazy.total >= 40 << 20, (res.lazy.done, res.lazy.total)
    t.expect_pass()


@pytest.mark.parametrize("name", ALL_TARGETS)
def test_every_target(engine, launch, images, name):
    """Every target through a lazy restore (into a PID namespace); those with big
    anonymous memory (pybig, cow_churn, mppool ...) are really served lazily."""
    t = launch(name)
    time.sleep(0.3)
    img = images()
    t.checkpoint(img)
    t.restore_lazy(img)
    t.expect_pass()
    if t.lazy_thread is not None:
        _wait_server(t)
        assert t.lazy_error is None, t.lazy_error


def test_tree_exits_while_pages_are_to_come(engine, launch, images):
    """The restored process dies with most of its memory still to come: the server finds
    it gone (a probe copy fails with ESRCH) and ends cleanly, though the init is gone too."""
    t = launch("pybig", args=(64,))
    img = images()
    t.checkpoint(img)
    res = t.restore_lazy(img, stream_after=120)
    assert res.lazy.total >= 64 << 20
    os.kill(res.pid, signal.SIGKILL)
    _wait_server(t, timeout=10)
    assert t.lazy_error is None, t.lazy_error
    assert res.lazy.done < 64 << 20, "the pages were streamed although held back"


def test_needs_pidns(engine, launch, images):
    t = launch("counter")
    img = images()
    t.checkpoint(img)
    with pytest.raises(engine.RestoreError, match="--lazy-pages needs --pidns"):
        engine.restore(str(img), options=engine.Options(lazy_pages=True))


def test_damaged_block_kills_the_tree(engine, launch, images, tmp_path):
    """A flipped byte in lazily served page data: the server stops with LazyError naming the
    file, and the tree is killed before any process reads the block."""
    t = launch("lazy_mem")
    img = images()
    t.checkpoint(img)
    pages = img / f"pages-{t.pid}.img"
    size = pages.stat().st_size
    with open(pages, "r+b") as f:                      # the middle: inside region A or E
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0x40]))
    res = t.restore_lazy(img)
    _wait_server(t)
    assert isinstance(t.lazy_error, engine.LazyError), repr(t.lazy_error)
    assert pages.name in str(t.lazy_error) and "corrupted" in str(t.lazy_error)
    assert _proc_state(res.init_pid) is None           # killed and reaped: the namespace is gone
    assert _proc_state(res.pid) is None
    assert "PASS" not in t.log(since_mark=True)


SERVER = textwrap.dedent("""
    import sys
    from nbcheckpoint.engine import Options, restore
    res = restore(sys.argv[1], options=Options(pidns=True, lazy_pages=True))
    print(res.pid, res.init_pid, flush=True)
    res.lazy.serve(stream_after=600)
""")


def test_engine_killed_while_serving_kills_the_tree(engine, launch, images, tmp_path):
    """The page server dies with pages still to come: the namespace's init sees its
    lifeline end and takes the tree down -- no process ever reads zeros for its memory."""
    t = launch("lazy_mem")
    img = images()
    t.checkpoint(img)
    p = subprocess.Popen([sys.executable, "-c", SERVER, str(img)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        pid, init_pid = map(int, p.stdout.readline().split())
        assert _proc_state(pid) not in (None, "Z")
        p.kill()
        p.wait()
        deadline = time.monotonic() + 10
        while _proc_state(pid) is not None or _proc_state(init_pid) not in (None, "Z"):
            assert time.monotonic() < deadline, f"the tree outlived its page server ({_proc_state(pid)})"
            time.sleep(0.02)
    finally:
        p.kill()
        p.wait()
    assert "PASS" not in t.log() and "FAIL" not in t.log()


def test_cli_detached(engine, launch, images, tmp_path):
    """`nbcheckpoint restore -d --pidns --lazy-pages` prints the pid at once, serves the
    pages, exits once all are in; the tree goes on under its init."""
    t = launch("lazy_mem")
    img = images()
    t.checkpoint(img)
    p = subprocess.run([sys.executable, "-m", "nbcheckpoint.cli", "restore", "-D", str(img), "-d",
                        "--pidns", "--lazy-pages", "-v"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    pid = int(p.stdout.split()[0])
    assert "lazy pages:" in p.stderr, p.stderr
    t.pid, t.restored, t.is_child, t.status = pid, True, False, None
    try:
        t.expect_pass()
    finally:
        if _proc_state(pid) is not None:
            os.kill(pid, signal.SIGKILL)
