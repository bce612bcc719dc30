"""Pipes and FIFOs through the engine (files/pipe.py): queued data, sizes, flags, dup'd
ends, a thread blocked reading, FIFOs by path, pipes between parent and child, ipykernel-like
stdout capture, external pipes (the other end outside the dump) and --inherit-fd."""
import os
import subprocess
import time

import pytest

from conftest import Target, wait_pid_free

RUN_BEFORE_DUMP = 0.3


@pytest.fixture(scope="module")
def engine():
    import nbcheckpoint.engine as engine
    return engine


def test_image_contents(engine, launch, images):
    """One FileEntry per description, the data once per pipe, internal vs external ends."""
    from nbcheckpoint.engine.images import files_pb2, imagedir
    t = launch("pipes")
    img = images()
    t.checkpoint(img, leave_running=True)
    rd = imagedir.ImageReader(str(img))
    files = {f.id: f for f in rd.messages("files.img", files_pb2.FileEntry)}
    fds = {e.fd: files[e.id] for e in rd.messages(f"fds-{t.pid}.img", files_pb2.FdEntry)}
    pipes = [f for f in files.values() if f.kind == files_pb2.PIPE]
    fifos = [f for f in files.values() if f.kind == files_pb2.FIFO]
    assert len(fifos) == 3, fifos
    # big (2), empty (2), blk (2), nb (2), wgone (1), rgone (1)
    assert len(pipes) == 10, pipes
    big = fds[3]
    assert big.pipe.size == 1 << 20 and big.pipe.data_bytes == 201500 - 1500
    assert fds[5].id == fds[3].id, "dup'd read end must share its FileEntry"
    assert fds[100].id == fds[7].id, "dup2'd write end must share its FileEntry"
    assert not big.pipe.write_end and fds[4].pipe.write_end
    data_files = sorted(n for n in rd.sums if n.startswith(("pipe-data-", "fifo-data-")))
    assert len(data_files) == 5, data_files          # big, nb, wgone, fifo, fifo2
    assert len(rd.read_bytes(f"pipe-data-{big.pipe.pipe_id}.img")) == 200000
    external = sorted(f.pipe.write_end for f in pipes if f.pipe.external)
    assert external == [False, True], "only wgone's read end and rgone's write end are external"
    fifo = next(f for f in fifos if f.pipe.path.endswith("/fifo"))
    assert fifo.pipe.size == 128 << 10 and fifo.pipe.data_bytes == 10000
    t.expect_pass()


def test_fifo_gone(engine, launch, images):
    """A FIFO that was removed fails the restore before any process exists, by name; put
    back (a new, empty FIFO), the restore works and its data is queued again."""
    t = launch("pipes")
    time.sleep(RUN_BEFORE_DUMP)
    img = images()
    t.checkpoint(img)
    path = t.workdir / "data" / "fifo"
    os.unlink(path)
    wait_pid_free(t.pid)
    with pytest.raises(engine.RestoreError, match="fifo"):
        engine.restore(str(img))
    assert not os.path.exists(f"/proc/{t.pid}"), "a failed restore left a process behind"
    os.mkfifo(path, 0o600)
    t.restore(img)
    t.expect_pass()


class StdinPipeTarget(Target):
    """A target whose stdin is the read end of a pipe whose write end the test holds."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        r, self.stdin_w = os.pipe()
        self._stdin_r = r
        self.stdin_ino = os.fstat(r).st_ino

    def start(self):
        env = {k: v for k, v in os.environ.items() if k != "ZDTM_CORRUPT"}
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv, stdin=self._stdin_r, stdout=log, stderr=log, cwd=self.workdir,
                env=env, close_fds=True, start_new_session=True)
        os.close(self._stdin_r)
        self.pid = self.vpid = self.popen.pid
        self.pids_seen.add(self.pid)
        return self

    def close(self):
        try:
            os.close(self.stdin_w)
        except OSError:
            pass


@pytest.fixture
def stdin_target(target_bins, tmp_path):
    made = []

    def _make():
        t = StdinPipeTarget("pipe_stdin", tmp_path / f"pipe_stdin-{len(made)}")
        made.append(t)
        t.start()
        t.wait_ready()
        return t

    yield _make
    for t in made:
        t.kill()
        t.close()


def _got(t) -> bytes:
    line = next(ln for ln in t.log(since_mark=True).splitlines() if ln.startswith("GOT"))
    return bytes.fromhex(line[3:].strip())


def test_external_pipe_eof(engine, stdin_target, images):
    """stdin is a pipe from the test: the dump succeeds (its writer is outside); restored
    without a replacement, the target reads the data that was queued, then EOF -- while
    the test still holds the original write end."""
    t = stdin_target()
    os.write(t.stdin_w, b"queued before the dump")
    img = images()
    t.checkpoint(img)
    with pytest.raises(BrokenPipeError):       # the original reader is gone for good
        os.write(t.stdin_w, b"x")
    t.restore(img)
    t.expect_pass()
    assert _got(t) == b"queued before the dump"


def test_external_pipe_inherit_fd(engine, stdin_target, images):
    """--inherit-fd pipe:[INO]: the test's new pipe end replaces the external one."""
    t = stdin_target()
    os.write(t.stdin_w, b"old")
    img = images()
    t.checkpoint(img)
    r, w = os.pipe()
    try:
        wait_pid_free(t.pid)
        opts = engine.Options(inherit_fd={f"pipe:[{t.stdin_ino}]": r})
        res = engine.restore(str(img), options=opts)
        t.adopt_restored(res, is_child=True)
        os.close(r)
        r = -1
        os.write(w, b"new data from the test")
    finally:
        if r >= 0:
            os.close(r)
        os.close(w)                            # EOF for the restored reader
    t.expect_pass()
    assert _got(t) == b"new data from the test"


def test_show(engine, launch, images):
    """`nbcheckpoint show` describes pipe and FIFO entries."""
    t = launch("pipes")
    img = images()
    t.checkpoint(img, leave_running=True)
    text = engine.show(str(img))
    assert " pipe " in text and "/fifo2" in text, text
    t.expect_pass()
