"""Anonymous-inode fds (eventfd, epoll, timerfd, signalfd, inotify) and process timers
(setitimer, timer_create) through the engine: dump -> restore -> the target verifies itself.

The targets compare their own /proc/self/fdinfo before and after, so registrations, masks
and watch descriptors must come back exactly; they also exercise the objects (a thread
blocked in epoll_wait wakes, timers keep firing, inotify events carry the old wds)."""
from __future__ import annotations

import os
import re

import pytest

from nbcheckpoint.engine.files import anon
from nbcheckpoint.engine.images import anon_pb2, files_pb2
from nbcheckpoint.engine.sys import proc



def test_image_contents(launch, images):
    """What the dump recorded for eventfd_epoll, read back from files.img."""
    from nbcheckpoint.engine.images import imagedir
    t = launch("eventfd_epoll")
    img = images()
    t.checkpoint(img, leave_running=True)
    rd = imagedir.ImageReader(str(img))
    entries = rd.messages("files.img", files_pb2.FileEntry)
    evs = [e.eventfd for e in entries if e.kind == files_pb2.EVENTFD]
    assert sorted(e.count for e in evs) == sorted([7, 3, 0x123456789, 0, 1, 0, 0, 0])
    assert [e.count for e in evs if e.semaphore] == [3]
    eps = sorted((e.epoll for e in entries if e.kind == files_pb2.EPOLL), key=lambda e: len(e.targets))
    assert [len(e.targets) for e in eps] == [1, 8]
    assert all(e.owner_pid == t.pid for e in eps)
    big = eps[1]
    assert 0xDEADBEEFCAFEBABE in [x.data for x in big.targets]
    assert sum(x.HasField("via_fd") for x in big.targets) == 1
    assert any(x.events == 0x40000000 for x in big.targets)     # a fired EPOLLONESHOT
    assert any(e.kind == files_pb2.TIMERFD for e in entries)
    t.expect_pass()


def test_fdinfo_parsers():
    info = {"tfd": "5 events: 40000000 data: deadbeefcafe1234  pos:0 ino:40f sdev:10\n"
                   "3 events: 80000019 data:                3  pos:0 ino:40f sdev:10"}
    assert proc.epoll_targets(info) == [
        dict(tfd=5, events=0x40000000, data=0xDEADBEEFCAFE1234, ino=0x40F, sdev=0x10),
        dict(tfd=3, events=0x80000019, data=3, ino=0x40F, sdev=0x10)]
    info = {"inotify wd": "2 ino:3f7e8 sdev:fe00000 mask:2 ignored_mask:0 fhandle-bytes:8 "
                          "fhandle-type:1 f_handle:e8f7030000000000"}
    w, = proc.inotify_watches(info)
    assert (w["wd"], w["ino"], w["mask"], w["handle_type"]) == (2, 0x3F7E8, 2, 1)
    assert w["handle"] == bytes.fromhex("e8f7030000000000")
    assert proc.kernel_dev(0xFE00000) == os.makedev(254, 0)
    s = proc.timerfd_state({"clockid": "1", "ticks": "3", "settime flags": "03",
                            "it_value": "(0, 5)", "it_interval": "(2, 500)"})
    assert s == dict(clockid=1, ticks=3, settime_flags=3, value_sec=0, value_nsec=5,
                     interval_sec=2, interval_nsec=500)


def test_inotify_wd_gap_and_paths(tmp_path):
    """The engine half of inotify: watches come back with their wds, gaps burned."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    f = files_pb2.FileEntry(id=1, kind=files_pb2.INOTIFY, flags=0)
    f.inotify.CopyFrom(anon_pb2.InotifyFile(watches=[
        anon_pb2.InotifyWatch(wd=2, path=str(a), mask=0x100),
        anon_pb2.InotifyWatch(wd=7, path=str(b), mask=0x200)]))
    fd = anon.KIND.open(None, f)
    try:
        text = open(f"/proc/self/fdinfo/{fd}").read()
        got = {w["wd"]: w["ino"] for w in proc.inotify_watches(proc_fdinfo_dict(text))}
        assert got == {2: os.stat(a).st_ino, 7: os.stat(b).st_ino}
        os.set_blocking(fd, False)
        with pytest.raises(BlockingIOError):      # the throw-away watches' IN_IGNORED are gone
            os.read(fd, 4096)
        (a / "x").touch()
        ev = os.read(fd, 4096)
        assert int.from_bytes(ev[:4], "little", signed=True) == 2
    finally:
        os.close(fd)


@pytest.mark.ordinary_user_only      # root finds the path with open_by_handle_at: test_engine_targets[inotify]
def test_inotify_refused_by_name_without_root(launch, images):
    """An inotify watch names an inode, not a path; finding the path needs CAP_DAC_READ_SEARCH.
    Without it the dump is refused naming the process, the fd, the watch and why -- and the
    target runs on, untraced, and passes its own check."""
    from nbcheckpoint.engine import UnsupportedError, dump
    t = launch("inotify")
    img = images()
    with pytest.raises(UnsupportedError) as ei:
        dump(t.pid, str(img))
    msg = str(ei.value)
    watched = os.stat(t.workdir / "data")             # wd 1, the first the dump meets
    assert re.search(rf"^process {t.pid}: inotify fd \d+ watch 1 \(inode {watched.st_ino} on device "
                     rf"{os.major(watched.st_dev)}:{os.minor(watched.st_dev)}\): ", msg), msg
    assert "needs CAP_DAC_READ_SEARCH" in msg and "open_by_handle_at" in msg and "root only" in msg, msg
    assert "Dump as root" in msg, msg
    assert t.alive(), t.log()
    for tid in os.listdir(f"/proc/{t.pid}/task"):
        with open(f"/proc/{t.pid}/task/{tid}/status") as f:
            assert "TracerPid:\t0\n" in f.read(), f"thread {tid} still traced"
    t.expect_pass()


def proc_fdinfo_dict(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        v = v.strip()
        out[k] = out[k] + "\n" + v if k in out else v
    return out
