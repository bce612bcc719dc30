"""Minimal mutants the fuzzer (tests/fuzz) found, each once a traceback (or worse): resealed
with the suite's key, so only the parsers and the checks behind the seal can refuse them.

Each must be refused by `restore` and by `show --verify` with exit 1 and one
"nbcheckpoint: error: ..." line naming what is wrong, no traceback, and nothing left
running (the image's PIDs free).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Target, wait_pid_free
from fuzz import mutate
from nbcheckpoint.engine.images import imagedir


@pytest.fixture(scope="module")
def seed(target_bins, tmp_path_factory):
    """(image, pid) of a kill-mode dump of `threads` (threads, regular files, fds)."""
    work = tmp_path_factory.mktemp("mutants")
    t = Target("threads", work)
    t.start()
    try:
        t.wait_ready()
        img = work / "seed"
        t.checkpoint(img)
    finally:
        t.kill()
    wait_pid_free(t.pid)
    return img, t.pid


def _edit(img: Path, name: str, change) -> None:
    """change(messages) on the message file NAME, written back, the image resealed."""
    cls, msgs = mutate.read_messages(img / name)
    change(msgs)
    mutate.write_messages(img / name, cls, msgs)
    imagedir.reseal(img)


def _fd_to_nowhere(msgs):
    msgs[0].id = 2**32 - 1


def _file_nul_path(msgs):
    reg = next(m for m in msgs if m.HasField("reg"))
    reg.reg.stat.path = "/tmp/x\0y"


def _file_pos_huge(msgs):
    next(m for m in msgs if m.HasField("reg")).reg.pos = 2**64 - 1


def _file_flags_huge(msgs):
    msgs[0].flags = 2**32 - 1


def _file_kind_unknown(msgs):
    msgs[0].kind = 563


def _files_dropped(msgs):
    del msgs[:]


def _mm_dropped(msgs):
    del msgs[:]


def _vma_kind_unknown(msgs):
    msgs[0].vmas[0].kind = 802


def _vma_inverted(msgs):
    v = msgs[0].vmas[1]
    v.start, v.end = v.end, v.start


def _vma_path_nul(msgs):
    v = next(v for v in msgs[0].vmas if v.HasField("file"))
    v.file.path += "\0"


def _thread_empty(msgs):
    msgs.append(type(msgs[0])())


def _sched_priority_huge(msgs):
    msgs[0].sched_priority = 2**31


def _pending_empty(msgs):
    msgs[0].pending.append(b"")


def _fd_huge(msgs):
    msgs[0].fd = 2**31


def _pagemap_runs_overlap(msgs):
    """A run moved onto the pages of a larger one: sizes still add up."""
    big = max(msgs, key=lambda e: e.nr_pages)
    small = next(e for e in msgs if e is not big and e.nr_pages <= big.nr_pages)
    small.vaddr = big.vaddr


def _anon_read_only(msgs):
    """Writable private anonymous memory (stacks, heap) mapped read-only: the injected code
    faults there (restore waited for ever, resuming the fault)."""
    for v in msgs[0].vmas:
        if v.kind == 0 and v.prot == 3:         # ANON_PRIVATE, rw-
            v.prot = 1


def _anon_made_shared(msgs):
    """Private anonymous memory relabelled shared, with no shared memory object behind it
    (restore looked up a mapped file named '' -- KeyError -- found by the long run)."""
    next(v for v in msgs[0].vmas if v.kind == 0).kind = 1      # ANON_PRIVATE -> ANON_SHARED


def _uids_dropped(msgs):
    del msgs[0].creds.uids[:]


MUTANTS = {         # name: (file (PID: the seed's), change, words the error must hold)
    "fd-to-nowhere": ("fds-PID.img", _fd_to_nowhere, ["4294967295"]),
    "file-path-nul": ("files.img", _file_nul_path, ["files.img", "path", "NUL"]),
    "file-flags-huge": ("files.img", _file_flags_huge, ["flags"]),
    "file-pos-huge": ("files.img", _file_pos_huge, ["position 18446744073709551615"]),
    "file-kind-unknown": ("files.img", _file_kind_unknown, ["kind 563"]),
    "files-dropped": ("files.img", _files_dropped, ["lacks"]),
    "mm-dropped": ("mm-PID.img", _mm_dropped, ["mm-PID.img", "0 messages"]),
    "vma-kind-unknown": ("mm-PID.img", _vma_kind_unknown, ["mm-PID.img", "kind 802"]),
    "vma-inverted": ("mm-PID.img", _vma_inverted, ["mm-PID.img", "VMA 1"]),
    "vma-path-nul": ("mm-PID.img", _vma_path_nul, ["mm-PID.img", "NUL"]),
    "vma-anon-made-shared": ("mm-PID.img", _anon_made_shared, ["mm-PID.img", "ANON_SHARED but names neither"]),
    "thread-empty": ("core-PID.img", _thread_empty, ["core-PID.img"]),
    "sched-priority-huge": ("core-PID.img", _sched_priority_huge, ["sched_priority"]),
    "pending-signal-empty": ("core-PID.img", _pending_empty, ["siginfo"]),
    "uids-dropped": ("task-PID.img", _uids_dropped, ["task-PID.img", "0 uids"]),
    # found by restore only: show --verify reads no pagemap and opens no fd
    "fd-huge": ("fds-PID.img", _fd_huge, ["2147483648", "RLIMIT_NOFILE hard limit"]),
    "pagemap-runs-overlap": ("pagemap-PID.img", _pagemap_runs_overlap, ["pagemap-PID.img", "overlap"]),
    "anon-read-only": ("mm-PID.img", _anon_read_only, ["SIGSEGV in the injected code"]),
}
RESTORE_ONLY = {"pagemap-runs-overlap", "fd-huge", "anon-read-only"}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "nbcheckpoint", *map(str, args)], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_mutant_refused_clearly(seed, tmp_path, mutant):
    img, pid = seed
    bad = tmp_path / mutant
    shutil.copytree(img, bad)
    name, change, words = MUTANTS[mutant]
    name = name.replace("PID", str(pid))
    _edit(bad, name, change)
    for cmd in (["restore", "-d", "-D", bad], ["show", "--verify", bad])[:1 if mutant in RESTORE_ONLY else 2]:
        r = _cli(*cmd)
        if cmd[0] == "restore" and r.returncode == 0:       # restored (detached): it must not stay
            os.kill(int(r.stdout.split()[0]), signal.SIGKILL)
        assert "Traceback" not in r.stderr, r.stderr
        assert r.returncode == 1 and r.stderr.startswith("nbcheckpoint: error: "), (cmd, r.returncode, r.stderr)
        for w in words:
            assert w.replace("PID", str(pid)) in r.stderr, (cmd, w, r.stderr)
        wait_pid_free(pid, timeout=5)


def test_inventory_names_only_files_of_the_image(seed, tmp_path):
    """A sealed inventory naming a file outside the image directory is refused."""
    img, pid = seed
    bad = tmp_path / "outside"
    shutil.copytree(img, bad)
    inv = imagedir.ImageReader(str(bad)).inventory
    os.rename(bad / "files.img", tmp_path / "files.img")
    next(s for s in inv.files if s.name == "files.img").name = "../files.img"
    imagedir.reseal(bad, inv)
    for cmd in (["restore", "-d", "-D", bad], ["show", bad]):
        r = _cli(*cmd)
        assert r.returncode == 1 and r.stderr.startswith("nbcheckpoint: error: "), r.stderr
        assert "'../files.img'" in r.stderr and "Traceback" not in r.stderr, r.stderr
