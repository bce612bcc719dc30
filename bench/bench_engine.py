#!/usr/bin/env python3
"""Benchmark of the nbcheckpoint engine: dump/restore speed, image size, engine RSS.

    python bench/bench_engine.py [--size-mib 1024] [--runs 5] [--images-dir DIR]

Run as root from the repository root (see docs/bench.md for how to read the
output).  The target is a CPython process holding --size-mib MiB of touched
random data (bench/engine_target.py).  Every run starts a fresh target and:

 1. dumps it with --leave-running to disk, then to tmpfs (/dev/shm), and
    checks it still answers: twice with the copy-on-write snapshot (the
    process frozen only until it is forked), once with --no-snapshot (frozen
    while its memory is copied), for comparison (after the two in even runs,
    before them in odd ones);
 2. dumps it (killing it) to disk;
 3. restores that image with a cold page cache (the image files evicted with
    posix_fadvise), then again with a warm one; after each restore, time
    until the restored process answers SIGUSR1 with PASS (sha256 of its data
    verified inside it);
 4. dumps the restored process to tmpfs and restores it from there;
 5. measures, for context, the raw speed of the same amount of data:
    write / write+fsync / cold read of a plain file in the images dir and in
    /dev/shm, and first touch vs reuse of fresh anonymous memory.

Then, once per size (256 MiB and --size-mib), the CLI (`nbcheckpoint dump`,
`nbcheckpoint restore -d`) runs in a child process and its peak RSS is read
with os.wait4.  CRIU is measured the same way when it is installed and works.

Medians over --runs (after --warmup discarded runs), min and max, are printed
as a table and written to bench/results/engine-<date>.json.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import mmap
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from nbcheckpoint.engine import Options, dump, restore  # noqa: E402
from common import BenchError, evict, Owned, private_dirty, reap, rm, set_subreaper, stat  # noqa: E402

MIB = 1 << 20
GB = 1e9
TARGET = os.path.join(HERE, "engine_target.py")
TARGETS = {"dump_gbps": 2.0, "restore_gbps": 2.0, "image_ratio": 1.05, "engine_rss_mb": 100.0}


# --- processes ----------------------------------------------------------------------


class Log:
    """The target's stdout: a regular file opened O_APPEND, read line by line."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        self.offset = 0
        self.pending = b""

    def wait_line(self, prefixes: tuple[str, ...], pid: int, timeout: float) -> tuple[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            self.offset += len(chunk)
            self.pending += chunk
            while b"\n" in self.pending:
                line, self.pending = self.pending.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith(prefixes):
                    return text, time.monotonic()
            if not os.path.exists(f"/proc/{pid}") or _zombie(pid):
                raise BenchError(f"process {pid} died before printing {'/'.join(prefixes)} (see {self.path})")
            if time.monotonic() > deadline:
                raise BenchError(f"process {pid}: no {'/'.join(prefixes)} within {timeout:.0f}s")
            time.sleep(0.001)

    def close(self) -> None:
        os.close(self.fd)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def start_target(size_mib: int, log: Log, timeout: float) -> tuple[subprocess.Popen, dict]:
    p = subprocess.Popen([sys.executable, TARGET, str(size_mib)], stdin=subprocess.DEVNULL,
                         stdout=log.fd, stderr=log.fd, start_new_session=True, close_fds=True)
    Owned.pids.add(p.pid)
    line, _ = log.wait_line(("READY",), p.pid, timeout)
    _, _, fill_s, hash_s = line.split()
    return p, {"fill_s": float(fill_s), "hash_s": float(hash_s)}


def ask(pid: int, log: Log, timeout: float) -> dict:
    """SIGUSR1 -> the process verifies its data: time until its PASS line."""
    t = time.monotonic()
    os.kill(pid, signal.SIGUSR1)
    line, t_end = log.wait_line(("PASS", "FAIL"), pid, timeout)
    if not line.startswith("PASS"):
        raise BenchError(f"process {pid} answered {line!r}: its data changed")
    return {"answer_s": t_end - t, "verify_s": float(line.split()[1])}


# --- one measured run ---------------------------------------------------------------------
def cpu_seconds() -> float:
    """user+sys of this process, all threads (the engine runs in it, I/O thread included)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _dump(pid: int, path: str, leave_running: bool = False, snapshot: bool = True) -> dict:
    pd = private_dirty(pid)
    c = cpu_seconds()
    stats = dump(pid, path, options=Options(leave_running=leave_running, snapshot=snapshot))
    if leave_running and stats.snapshot != snapshot:
        raise BenchError(f"leave-running dump with snapshot={snapshot} came back with snapshot={stats.snapshot}")
    return {"pages_bytes": stats.pages_bytes, "image_bytes": stats.image_bytes,
            "private_dirty": pd, "copy_s": stats.copy_seconds, "frozen_s": stats.frozen_seconds,
            "total_s": stats.total_seconds, "cpu_s": cpu_seconds() - c, "snapshot": stats.snapshot}


def _restore(path: str, log: Log, timeout: float) -> tuple[int, dict]:
    c = cpu_seconds()
    res = restore(path)
    cpu = cpu_seconds() - c
    Owned.pids.add(res.pid)
    rec = {"seconds": res.seconds, "pages_bytes": res.pages_bytes, "cpu_s": cpu}
    rec.update(ask(res.pid, log, timeout))
    rec["to_answer_s"] = rec["seconds"] + rec["answer_s"]
    return res.pid, rec


def one_run(idx: int, size_mib: int, disk: str, shm: str, work: str, timeout: float) -> dict:
    rec: dict = {"loadavg_before": os.getloadavg()[0]}
    log = Log(os.path.join(work, f"target-{idx}.log"))
    try:
        p, rec["target"] = start_target(size_mib, log, timeout)
        pid = p.pid

        # 1. --leave-running: what the user feels is the frozen time.  Then the
        #    same again at once: the image's page cache just freed is reused
        #    before the VM hands it back to the host (see the note on fresh memory).
        #    And --no-snapshot (frozen while the memory is copied): after them in even
        #    runs, before them in odd ones, so that neither always meets fresh memory.
        for where, base in (("disk", disk), ("shm", shm)):
            order = [(f"{where}_dump_lr", True), (f"{where}_dump_lr_again", True)]
            nosnap = (f"{where}_dump_lr_nosnap", False)
            for key, snap in (order + [nosnap] if idx % 2 == 0 else [nosnap] + order):
                path = os.path.join(base, f"lr-{idx}")
                rec[key] = _dump(pid, path, leave_running=True, snapshot=snap)
                rm(path)
            rec[f"{where}_dump_lr"].update(ask(pid, log, timeout))   # still runs, data intact

        # 2. dump to disk (kills the target)
        path = os.path.join(disk, f"img-{idx}")
        rec["disk_dump"] = _dump(pid, path)
        p.wait(timeout)
        Owned.pids.discard(pid)

        # 3. restore from disk: cold page cache, then warm
        evict(path)
        rpid, rec["disk_restore_cold"] = _restore(path, log, timeout)
        Owned.kill(rpid)
        rpid, rec["disk_restore_warm"] = _restore(path, log, timeout)
        rm(path)

        # 4. the restored process to tmpfs and back
        path = os.path.join(shm, f"img-{idx}")
        rec["shm_dump"] = _dump(rpid, path)
        reap(rpid, timeout)
        rpid, rec["shm_restore"] = _restore(path, log, timeout)
        Owned.kill(rpid)
        rm(path)
    finally:
        Owned.kill_all()
        log.close()
    # 5. raw speeds of the same amount of data, with no process around
    rec["raw"] = raw_speeds(size_mib * MIB, disk, shm)
    rec["loadavg_after"] = os.getloadavg()[0]
    return rec


# --- raw context: device, tmpfs, memory ---------------------------------------------
def raw_speeds(size: int, disk: str, shm: str) -> dict:
    out = {}
    chunk = 16 * MIB
    buf = os.urandom(chunk)
    for where, base in (("disk", disk), ("shm", shm)):
        path = os.path.join(base, "raw-write.tmp")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            t0 = time.monotonic()
            left = size
            while left > 0:
                left -= os.write(fd, buf[:min(chunk, left)])
            t1 = time.monotonic()
            os.fsync(fd)
            t2 = time.monotonic()
        finally:
            os.close(fd)
        evict(path)
        rbuf = bytearray(chunk)
        fd = os.open(path, os.O_RDONLY)
        try:
            t3 = time.monotonic()
            while os.readv(fd, [rbuf]) > 0:
                pass
            t4 = time.monotonic()
        finally:
            os.close(fd)
            os.unlink(path)
        out[where] = {"write_s": t1 - t0, "write_fsync_s": t2 - t0, "cold_read_s": t4 - t3}
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        t0 = time.monotonic()
        ctypes.memset(addr, 0x5A, size)
        t1 = time.monotonic()
        ctypes.memset(addr, 0xA5, size)
        t2 = time.monotonic()
    finally:
        del addr
        m.close()
    out["memory"] = {"first_touch_s": t1 - t0, "reuse_s": t2 - t1}
    out["bytes"] = size
    return out


# --- engine peak RSS through the CLI ---------------------------------------------------------
def run_rusage(argv: list[str], timeout: float, stdout=None) -> tuple[int, float, int]:
    """Run argv; returns (exit status, wall seconds, peak RSS bytes) of that child alone."""
    t = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout or subprocess.DEVNULL,
                         stderr=subprocess.PIPE, close_fds=True)
    deadline = t + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            p.kill()
            pid, status, ru = os.wait4(p.pid, 0)
            break
        time.sleep(0.002)
    wall = time.monotonic() - t
    p.returncode = os.waitstatus_to_exitcode(status)   # keep Popen from waiting again
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    if p.returncode != 0:
        raise BenchError(f"{' '.join(argv[:3])} ... exited {p.returncode}{': ' + err.strip()[-500:] if err.strip() else ''}")
    return p.returncode, wall, ru.ru_maxrss * 1024


def cli_rss(size_mib: int, disk: str, work: str, timeout: float) -> dict:
    cli = [sys.executable, "-m", "nbcheckpoint"]
    log = Log(os.path.join(work, f"rss-{size_mib}.log"))
    path = os.path.join(disk, f"rss-{size_mib}")
    rec: dict = {}
    try:
        p, _ = start_target(size_mib, log, timeout)
        rec["private_dirty"] = private_dirty(p.pid)
        _, rec["dump_wall_s"], rec["dump_rss"] = run_rusage(cli + ["dump", "-t", str(p.pid), "-D", path], timeout)
        p.wait(timeout)
        Owned.pids.discard(p.pid)
        pidfile = os.path.join(work, f"rss-{size_mib}.pid")
        _, rec["restore_wall_s"], rec["restore_rss"] = run_rusage(
            cli + ["restore", "-D", path, "-d", "--pidfile", pidfile], timeout)
        with open(pidfile) as f:
            rpid = int(f.read())
        Owned.pids.add(rpid)         # reparented to us: we are a child subreaper
        ask(rpid, log, timeout)
        Owned.kill(rpid)
    finally:
        Owned.kill_all()
        log.close()
        rm(path)
    return rec


def baseline_rss(timeout: float) -> int:
    """Peak RSS of the interpreter that has just imported the engine and the CLI."""
    _, _, rss = run_rusage([sys.executable, "-c", "import nbcheckpoint.cli, nbcheckpoint.engine"], timeout)
    return rss


# --- CRIU, when installed -------------------------------------------------------------------
def criu_probe(disk: str, work: str, timeout: float) -> dict:
    exe = shutil.which("criu")
    if not exe:
        return {"available": False, "reason": "criu is not installed (apt-get install criu)"}
    try:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout.split()
        version = version[1] if len(version) > 1 else "?"
    except (OSError, subprocess.SubprocessError):
        version = "?"
    try:
        criu_run(exe, 16, disk, work, timeout, "probe")
    except BenchError as e:
        return {"available": False, "version": version,
                "reason": f"criu {version} is installed but fails here: {e}"}
    return {"available": True, "version": version, "exe": exe}


def criu_run(exe: str, size_mib: int, disk: str, work: str, timeout: float, tag) -> dict:
    """criu dump (kills the target) and criu restore -d, same target and checks as ours."""
    log = Log(os.path.join(work, f"criu-{tag}.log"))
    path = os.path.join(disk, f"criu-{tag}")
    os.makedirs(path, mode=0o700)
    rec: dict = {}
    try:
        p, _ = start_target(size_mib, log, timeout)
        rec["private_dirty"] = private_dirty(p.pid)
        _, rec["dump_s"], rec["dump_rss"] = run_rusage(
            [exe, "dump", "-t", str(p.pid), "-D", path, "--shell-job", "-o", "dump.log", "-v2"], timeout)
        p.wait(timeout)
        Owned.pids.discard(p.pid)
        rec["image_bytes"] = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
                                 if n.endswith(".img"))
        t = time.monotonic()
        subprocess.run(["sync", "-f", path], check=False, timeout=timeout)
        rec["sync_s"] = time.monotonic() - t
        evict(path)
        pidfile = os.path.join(work, f"criu-{tag}.pid")
        _, rec["restore_s"], rec["restore_rss"] = run_rusage(
            [exe, "restore", "-D", path, "-d", "--shell-job", "--pidfile", pidfile,
             "-o", "restore.log", "-v2"], timeout)
        with open(pidfile) as f:
            rpid = int(f.read())
        Owned.pids.add(rpid)
        rec.update(ask(rpid, log, timeout))
        rec["to_answer_s"] = rec["restore_s"] + rec["answer_s"]
        Owned.kill(rpid)
    except BenchError as e:
        tail = ""
        for name in ("dump.log", "restore.log"):
            try:
                with open(os.path.join(path, name)) as f:
                    # the generic "exited, status=1" lines say nothing: keep the others
                    errs = [ln.strip() for ln in f if "Error" in ln and "exited, status" not in ln]
                tail = tail or "; ".join(dict.fromkeys(errs[:3]))
            except OSError:
                pass
        raise BenchError(f"{e}{' -- ' + tail if tail else ''}") from None
    finally:
        Owned.kill_all()
        log.close()
        rm(path)
    return rec


# --- statistics and table ---------------------------------------------------------------


def summarize(runs: list[dict]) -> dict:
    s: dict = {}

    def add(key, fn):
        vals = []
        for r in runs:
            try:
                vals.append(fn(r))
            except (KeyError, ZeroDivisionError, TypeError):
                pass
        s[key] = stat(vals)

    for where in ("disk", "shm"):
        d = f"{where}_dump"
        for phase in ("copy", "frozen", "total"):
            add(f"{d}.{phase}_s", lambda r, d=d, ph=phase: r[d][f"{ph}_s"])
            add(f"{d}.{phase}_gbps", lambda r, d=d, ph=phase: r[d]["pages_bytes"] / r[d][f"{ph}_s"] / GB)
        for lr in (f"{where}_dump_lr", f"{where}_dump_lr_again", f"{where}_dump_lr_nosnap"):
            for phase in ("frozen", "copy", "total"):
                add(f"{lr}.{phase}_s", lambda r, d=lr, ph=phase: r[d][f"{ph}_s"])
                add(f"{lr}.{phase}_gbps", lambda r, d=lr, ph=phase: r[d]["pages_bytes"] / r[d][f"{ph}_s"] / GB)
        add(f"{d}.image_ratio", lambda r, d=d: r[d]["image_bytes"] / r[d]["private_dirty"])
        add(f"{d}.cpu_s", lambda r, d=d: r[d]["cpu_s"])
    for key in ("disk_restore_cold", "disk_restore_warm", "shm_restore"):
        add(f"{key}.s", lambda r, k=key: r[k]["seconds"])
        add(f"{key}.gbps", lambda r, k=key: r[k]["pages_bytes"] / r[k]["seconds"] / GB)
        add(f"{key}.to_answer_s", lambda r, k=key: r[k]["to_answer_s"])
        add(f"{key}.verify_s", lambda r, k=key: r[k]["verify_s"])
        add(f"{key}.cpu_s", lambda r, k=key: r[k]["cpu_s"])
    add("pages_bytes", lambda r: r["disk_dump"]["pages_bytes"])
    add("image_bytes", lambda r: r["disk_dump"]["image_bytes"])
    add("private_dirty", lambda r: r["disk_dump"]["private_dirty"])
    for where in ("disk", "shm"):
        for k in ("write", "write_fsync", "cold_read"):
            add(f"raw.{where}.{k}_gbps", lambda r, w=where, k=k: r["raw"]["bytes"] / r["raw"][w][f"{k}_s"] / GB)
    for k in ("first_touch", "reuse"):
        add(f"raw.memory.{k}_gbps", lambda r, k=k: r["raw"]["bytes"] / r["raw"]["memory"][f"{k}_s"] / GB)
    add("loadavg", lambda r: (r["loadavg_before"] + r["loadavg_after"]) / 2)
    add("target.fill_s", lambda r: r["target"]["fill_s"])
    add("target.hash_s", lambda r: r["target"]["hash_s"])
    add("criu.dump_s", lambda r: r["criu"]["dump_s"])
    add("criu.dump_gbps", lambda r: r["criu"]["private_dirty"] / r["criu"]["dump_s"] / GB)
    add("criu.restore_s", lambda r: r["criu"]["restore_s"])
    add("criu.restore_gbps", lambda r: r["criu"]["private_dirty"] / r["criu"]["restore_s"] / GB)
    add("criu.to_answer_s", lambda r: r["criu"]["to_answer_s"])
    add("criu.image_ratio", lambda r: r["criu"]["image_bytes"] / r["criu"]["private_dirty"])
    add("criu.dump_rss_mb", lambda r: r["criu"]["dump_rss"] / 1e6)
    add("criu.restore_rss_mb", lambda r: r["criu"]["restore_rss"] / 1e6)
    return s


def fmt(st, digits=2, unit=""):
    if not st:
        return "n/a"
    d = digits
    if st["n"] == 1:
        return f"{st['median']:.{d}f}{unit}"
    return f"{st['median']:.{d}f}{unit} [{st['min']:.{d}f}-{st['max']:.{d}f}]"


def verdict(value, target, higher_is_better: bool) -> str:
    if value is None:
        return ""
    ok = value >= target if higher_is_better else value <= target
    return "OK" if ok else "MISS"


def render(res: dict) -> str:
    s = res["summary"]
    p = res["params"]
    W = (44, 34, 34, 12, 5)
    lines = []

    def row(label, disk="", shm="", target="", ok=""):
        lines.append(f"{label:<{W[0]}}{disk:<{W[1]}}{shm:<{W[2]}}{target:<{W[3]}}{ok}")

    def med(key):
        return (s.get(key) or {}).get("median")

    def both(key_fmt, digits=2, unit=""):
        return fmt(s.get(key_fmt.format("disk")), digits, unit), fmt(s.get(key_fmt.format("shm")), digits, unit)

    def ok2(key_fmt, target, hib=True):
        v = [verdict(med(key_fmt.format(w)), target, hib) for w in ("disk", "shm")]
        return "/".join(x for x in v if x)

    n_ok = res["runs_completed"]
    lines.append(f"nbcheckpoint engine benchmark -- target: CPython holding {p['size_mib']} MiB of random data")
    lines.append(f"{n_ok} measured run(s) after {p['warmup']} warm-up; median [min-max]; GB/s = 10^9 bytes/s "
                 f"of dumped pages ({fmt(s.get('pages_bytes') and _scale(s['pages_bytes'], 1 / MIB), 0, ' MiB')})")
    lines.append(f"disk images: {p['images_dir']}   tmpfs images: {p['shm_dir']}   "
                 f"1-min load average during the runs: {fmt(s.get('loadavg'), 1)} (2 CPUs; the benchmark "
                 f"itself ~1)")
    lines.append("")
    row("", "images on disk", "images on tmpfs (/dev/shm)", "target", "")
    row("-" * (W[0] - 2), "-" * (W[1] - 2), "-" * (W[2] - 2), "-" * (W[3] - 2), "----")
    tgt = f">= {TARGETS['dump_gbps']:.0f} GB/s"
    row("dump: copy (freeze -> page cache)  GB/s", *both("{}_dump.copy_gbps"), tgt, ok2("{}_dump.copy_gbps", TARGETS["dump_gbps"]))
    row("dump: frozen                        GB/s", *both("{}_dump.frozen_gbps"), tgt, ok2("{}_dump.frozen_gbps", TARGETS["dump_gbps"]))
    row("dump: total incl. fsync             GB/s", *both("{}_dump.total_gbps"), tgt, ok2("{}_dump.total_gbps", TARGETS["dump_gbps"]))
    row("dump: copy                           s", *both("{}_dump.copy_s"))
    row("dump: frozen                         s", *both("{}_dump.frozen_s"))
    row("dump: total incl. fsync              s", *both("{}_dump.total_s"))
    row("dump: engine CPU time (user+sys)     s", *both("{}_dump.cpu_s"))
    row("dump -R (CoW snapshot): frozen       s", *both("{}_dump_lr.frozen_s", 3))
    row("dump -R: copy done (runs meanwhile)  s", *both("{}_dump_lr.copy_s"))
    row("dump -R: total incl. fsync           s", *both("{}_dump_lr.total_s"))
    row("dump -R: total incl. fsync        GB/s", *both("{}_dump_lr.total_gbps"), tgt, ok2("{}_dump_lr.total_gbps", TARGETS["dump_gbps"]))
    row("  same, repeated at once: frozen     s", *both("{}_dump_lr_again.frozen_s", 3))
    row("  same, repeated at once: total      s", *both("{}_dump_lr_again.total_s"))
    row("dump -R --no-snapshot: frozen        s", *both("{}_dump_lr_nosnap.frozen_s"))
    row("dump -R --no-snapshot: frozen     GB/s", *both("{}_dump_lr_nosnap.frozen_gbps"), tgt,
        ok2("{}_dump_lr_nosnap.frozen_gbps", TARGETS["dump_gbps"]))
    row("dump -R --no-snapshot: total         s", *both("{}_dump_lr_nosnap.total_s"))
    tgt = f">= {TARGETS['restore_gbps']:.0f} GB/s"
    row("restore, cold page cache          GB/s", fmt(s.get("disk_restore_cold.gbps")), "", tgt,
        verdict(med("disk_restore_cold.gbps"), TARGETS["restore_gbps"], True))
    row("restore, warm page cache          GB/s", fmt(s.get("disk_restore_warm.gbps")), fmt(s.get("shm_restore.gbps")), tgt,
        "/".join(x for x in (verdict(med("disk_restore_warm.gbps"), TARGETS["restore_gbps"], True),
                             verdict(med("shm_restore.gbps"), TARGETS["restore_gbps"], True)) if x))
    row("restore, cold page cache             s", fmt(s.get("disk_restore_cold.s")))
    row("restore, warm page cache             s", fmt(s.get("disk_restore_warm.s")), fmt(s.get("shm_restore.s")))
    row("restore: engine CPU time (warm)      s", fmt(s.get("disk_restore_warm.cpu_s")), fmt(s.get("shm_restore.cpu_s")))
    row("restore -> process answers (cold)    s", fmt(s.get("disk_restore_cold.to_answer_s")))
    row("restore -> process answers (warm)    s", fmt(s.get("disk_restore_warm.to_answer_s")), fmt(s.get("shm_restore.to_answer_s")))
    row("  of which sha256 check in target    s", fmt(s.get("disk_restore_warm.verify_s")), fmt(s.get("shm_restore.verify_s")))
    tgt = f"<= {TARGETS['image_ratio']:.2f}x"
    row("image / private dirty (kill dump)", *both("{}_dump.image_ratio", 3, "x"), tgt,
        ok2("{}_dump.image_ratio", TARGETS["image_ratio"], False))
    pd, ib = s.get("private_dirty"), s.get("image_bytes")
    row("  private dirty / image            MiB",
        f"{pd['median'] / MIB:.1f} / {ib['median'] / MIB:.1f}" if pd and ib else "n/a")
    lines.append("")
    rss = res.get("engine_rss") or {}
    tgt = f"<= {TARGETS['engine_rss_mb']:.0f} MB"
    row("engine peak RSS (CLI child, wait4)", "dump", "restore -d", tgt, "")
    for size, r in sorted(rss.get("sizes", {}).items(), key=lambda kv: int(kv[0])):
        if "error" in r:
            row(f"  {size} MiB target", "error: " + r["error"][:60])
            continue
        row(f"  {size} MiB target                  MB", f"{r['dump_rss'] / 1e6:.1f}", f"{r['restore_rss'] / 1e6:.1f}", tgt,
            verdict(max(r["dump_rss"], r["restore_rss"]) / 1e6, TARGETS["engine_rss_mb"], False))
    if rss.get("baseline_rss"):
        row("  python + import nbcheckpoint       MB", f"{rss['baseline_rss'] / 1e6:.1f}")
    lines.append("")
    row("context: raw speed of the same size", "disk", "tmpfs", "", "")
    row("  write (to page cache)            GB/s", *both("raw.{}.write_gbps"))
    row("  write + fsync                    GB/s", *both("raw.{}.write_fsync_gbps"))
    row("  cold read                        GB/s", *both("raw.{}.cold_read_gbps"))
    row("  memory: first touch / reuse      GB/s", fmt(s.get("raw.memory.first_touch_gbps")), fmt(s.get("raw.memory.reuse_gbps")))
    row("  target start: urandom fill          s", fmt(s.get("target.fill_s")))
    row("  target start: sha256 of its data    s", fmt(s.get("target.hash_s")))
    lines.append("")
    criu = res.get("criu") or {}
    if criu.get("available"):
        lines.append(f"CRIU {criu.get('version')} (wall time of the criu command, images on disk, no fsync; "
                     f"GB/s of private dirty):")
        row("  criu dump               s  |  GB/s", fmt(s.get("criu.dump_s")), fmt(s.get("criu.dump_gbps")))
        row("  criu restore -d (cold)  s  |  GB/s", fmt(s.get("criu.restore_s")), fmt(s.get("criu.restore_gbps")))
        row("  criu restore -> answers            s", fmt(s.get("criu.to_answer_s")))
        row("  criu image / private dirty", fmt(s.get("criu.image_ratio"), 3, "x"))
        row("  criu peak RSS dump / restore     MB", fmt(s.get("criu.dump_rss_mb"), 1), fmt(s.get("criu.restore_rss_mb"), 1))
    else:
        lines.append(f"CRIU: not measured -- {criu.get('reason', 'not probed')}")
    lines.append("")
    lines.append("Note: fresh memory is slow and erratic on this VM (page_reporting hands freed guest memory back to")
    lines.append("the host, and touching it again costs a host fault per page: see 'memory: first touch' vs 'reuse').")
    lines.append("Dumps write into fresh page cache or tmpfs and restores fill a fresh address space, so both are")
    lines.append("bounded by first-touch speed, and the first big operation after a free is the slowest (compare")
    lines.append("'dump -R' with 'repeated at once'). Other sessions share the 2 CPUs (load average")
    lines.append("above). Read the medians, not single runs.")
    for e in res.get("errors", []):
        lines.append(f"error: {e}")
    return "\n".join(lines)


def _scale(st, k):
    return {kk: (v * k if kk != "n" else v) for kk, v in st.items()}


# --- main -------------------------------------------------------------------------
def machine_info() -> dict:
    info = {"kernel": platform.release(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
        with open("/proc/meminfo") as f:
            info["mem_total_kb"] = int(f.readline().split()[1])
        with open("/proc/cmdline") as f:
            info["page_reporting"] = "page_reporting" in f.read()
    except OSError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                                            text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "nbcheckpoint"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        info["engine_uncommitted_changes"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="data the target holds (default 1024)")
    ap.add_argument("--runs", type=int, default=5, help="measured runs (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="discarded runs first (default 1)")
    ap.add_argument("--images-dir", default="/var/tmp/nbcheckpoint-bench",
                    help="where disk images go (default /var/tmp/nbcheckpoint-bench)")
    ap.add_argument("--shm-dir", default="/dev/shm", help="tmpfs for the in-memory comparison (default /dev/shm)")
    ap.add_argument("--rss-sizes", default="256,SIZE",
                    help="target sizes in MiB for the engine RSS measurement (default 256,SIZE)")
    ap.add_argument("--no-criu", action="store_true", help="skip CRIU even when installed")
    ap.add_argument("--time-budget", type=float, default=540.0,
                    help="stop starting new runs past this many seconds (default 540)")
    ap.add_argument("--timeout", type=float, default=120.0, help="limit for each step (default 120 s)")
    ap.add_argument("--output", help="JSON file (default bench/results/engine-<date>.json)")
    ap.add_argument("--render", metavar="JSON", help="only print the table of a saved results file "
                    "(and refresh the table stored in it)")
    args = ap.parse_args(argv)

    if args.render:
        with open(args.render) as f:
            res = json.load(f)
        res["summary"] = summarize(res["runs"])
        table = render(res)
        res["table"] = table.splitlines()
        with open(args.render, "w") as f:
            json.dump(res, f, indent=1, sort_keys=True)
            f.write("\n")
        print(table)
        return 0

    if os.geteuid() != 0:
        print("bench_engine.py: run as root (ptrace of any process, clone3 with set_tid)", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    set_subreaper()
    os.makedirs(args.images_dir, mode=0o700, exist_ok=True)
    disk = tempfile.mkdtemp(prefix="run-", dir=args.images_dir)
    shm = tempfile.mkdtemp(prefix="nbcheckpoint-bench-", dir=args.shm_dir)
    work = tempfile.mkdtemp(prefix="nbcheckpoint-bench-logs-")
    rss_sizes = sorted({int(x.replace("SIZE", str(args.size_mib))) for x in args.rss_sizes.split(",") if x})
    res: dict = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "params": {"size_mib": args.size_mib, "runs": args.runs, "warmup": args.warmup,
                   "images_dir": args.images_dir, "shm_dir": args.shm_dir, "rss_sizes_mib": rss_sizes},
        "machine": machine_info(), "targets": TARGETS, "runs": [], "warmup_runs": [], "errors": [],
    }

    def log(msg):
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    try:
        criu = {"available": False, "reason": "skipped (--no-criu)"}
        if not args.no_criu:
            log("probing CRIU")
            criu = criu_probe(disk, work, args.timeout)
            log(f"CRIU: {'available ' + criu['version'] if criu['available'] else criu['reason']}")
        res["criu"] = criu

        # The RSS measurement first: it must not be skipped by the time budget.
        res["engine_rss"] = {"sizes": {}}
        try:
            res["engine_rss"]["baseline_rss"] = baseline_rss(args.timeout)
        except BenchError as e:
            res["errors"].append(f"baseline rss: {e}")
        for size in rss_sizes:
            log(f"engine peak RSS through the CLI, {size} MiB target")
            try:
                res["engine_rss"]["sizes"][str(size)] = cli_rss(size, disk, work, args.timeout)
            except Exception as e:                  # noqa: BLE001 -- report and go on
                res["engine_rss"]["sizes"][str(size)] = {"error": str(e)}
                res["errors"].append(f"rss {size} MiB: {e}")

        total = args.warmup + args.runs
        durations = []
        for i in range(total):
            elapsed = time.monotonic() - t_start
            if durations and elapsed + max(durations) > args.time_budget:
                res["errors"].append(f"time budget ({args.time_budget:.0f}s) reached: "
                                     f"{len(res['runs'])} measured run(s) of {args.runs}")
                log(res["errors"][-1])
                break
            kind = "warm-up" if i < args.warmup else "run"
            log(f"{kind} {i + 1}/{total}: {args.size_mib} MiB target")
            t = time.monotonic()
            try:
                rec = one_run(i, args.size_mib, disk, shm, work, args.timeout)
                if criu.get("available"):
                    try:
                        rec["criu"] = criu_run(criu["exe"], args.size_mib, disk, work, args.timeout, i)
                    except BenchError as e:
                        res["errors"].append(f"criu run {i}: {e}")
            except Exception as e:                  # noqa: BLE001 -- report and go on
                traceback.print_exc()
                res["errors"].append(f"{kind} {i + 1}: {type(e).__name__}: {e}")
                rec = None
            durations.append(time.monotonic() - t)
            if rec is not None:
                (res["warmup_runs"] if i < args.warmup else res["runs"]).append(rec)
                d = rec["disk_dump"]
                log(f"  dump {d['pages_bytes'] / d['copy_s'] / GB:.2f} GB/s copy, "
                    f"{d['pages_bytes'] / d['total_s'] / GB:.2f} GB/s total; restore "
                    f"{rec['disk_restore_warm']['pages_bytes'] / rec['disk_restore_warm']['seconds'] / GB:.2f} GB/s "
                    f"warm ({durations[-1]:.0f}s)")
    finally:
        Owned.kill_all()
        rm(disk)
        rm(shm)
        rm(work)
        try:
            os.rmdir(args.images_dir)
        except OSError:
            pass

    res["runs_completed"] = len(res["runs"])
    res["summary"] = summarize(res["runs"])
    res["seconds"] = time.monotonic() - t_start
    table = render(res)
    res["table"] = table.splitlines()
    out = args.output or os.path.join(HERE, "results", f"engine-{_dt.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1, sort_keys=True)
        f.write("\n")
    print(table)
    print(f"\nresults: {out}  ({res['seconds']:.0f} s)")
    return 0 if res["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
