"""The fuzz runner: seed images, the CLI run in a forked child, outcomes classified.

The runner imports the engine once and runs every `nbcheckpoint` command in a forked child
(`cli.main(argv)`, stdout/stderr to files, killed after a timeout): the same code path as
the console script without 0.3 s of imports per run.  It is a child subreaper, so what a
restore leaves behind (the restored process after `-d`, stubs of a killed engine) is
reparented to it, reaped by it and seen by it.  Every process it starts carries a marker
in its environment (FUZZ_ENV), the targets run from a copy of their binaries in the run's
directory: a stray is a process with the marker or that binary, or one holding a seed's
PID, once a case is over.
"""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

KEY_DIR = None
if "NBCHECKPOINT_KEY_FILE" not in os.environ:          # a key of the run's own, kept for replays
    KEY_DIR = tempfile.mkdtemp(prefix="nbck-fuzz-key-")
    os.environ["NBCHECKPOINT_KEY_FILE"] = os.path.join(KEY_DIR, "image.key")
import conftest                                         # noqa: E402  (build_c)
from nbcheckpoint import cli                            # noqa: E402
from nbcheckpoint.engine.sys import userns              # noqa: E402

from . import mutate                                    # noqa: E402

FUZZ_ENV = "NBCK_FUZZ_RUN"
SEED_TARGETS = ["counter", "threads", "pipes", "unix_sockets", "tree"]
_WALL = 0x40000000
PR_SET_CHILD_SUBREAPER = 36

# outcome classes; FAILURES end the run non-zero
REFUSED, RESTORED, SHOWN, WRONG, WRONG_SEALED = "refused", "restored", "shown", "wrong", "wrong-resealed"
HUNG, TRACEBACK, STRAY, FORGED_ACCEPTED = "hung", "traceback", "stray", "forged-accepted"
KILLED_CLEAN = "killed-clean"
NOT_RUN = "not-run"         # a case the machine could not set up: not a pass
FAILURES = {WRONG, HUNG, TRACEBACK, STRAY, FORGED_ACCEPTED, NOT_RUN}


@dataclasses.dataclass
class Run:
    rc: int | None          # exit code, -signal, None if hung (then killed)
    out: str
    err: str
    seconds: float
    killed: bool = False    # killed by us on purpose (kill_after)


@dataclasses.dataclass
class Seed:
    name: str
    image: Path
    pid: int
    pids: set                       # every pid and tid of its tree
    log: Path
    restore_s: float = 0.0


class Runner:
    def __init__(self, seed: int, workdir: Path | None = None, timeout: float = 30.0, verbose: bool = False):
        self.seed = seed
        self.rng = random.Random(seed)
        self.timeout = timeout
        self.verbose = verbose
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="nbck-fuzz-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bin = self.dir / "bin"
        self.marker = f"{os.getpid()}-{seed}"
        os.environ[FUZZ_ENV] = self.marker
        self.statuses: dict[int, int] = {}
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.findings: list[str] = []
        self.seeds: dict[str, Seed] = {}
        self.other_key = str(self.dir / "other.key")
        with open(os.open(self.other_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(os.urandom(32))
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
        if not userns.privileged():
            # a user + mount namespace of the run's own (the one every restore would enter):
            # mutate.special binds devices there, as it cannot mknod them
            userns.ensure()
            if libc.unshare(0x00020000) != 0 or libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None) != 0:
                raise OSError(ctypes.get_errno(), "a mount namespace for the run")   # CLONE_NEWNS; MS_REC|MS_PRIVATE

    # -- processes -----------------------------------------------------------------------

    def reap_all(self) -> None:
        while True:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG | _WALL)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.statuses[pid] = st

    def wait(self, pid: int, timeout: float) -> int | None:
        """Exit code (or -signal) of our child pid, None if it still runs after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self.reap_all()
            if pid in self.statuses:
                return os.waitstatus_to_exitcode(self.statuses.pop(pid))
            if time.monotonic() > deadline:
                return None
            time.sleep(0.005)

    def cli(self, argv: list[str], timeout: float | None = None, *, limits=(), cgroup: Path | None = None,
            cpus: set | None = None, peak: Path | None = None, kill_after: float | None = None) -> Run:
        """`nbcheckpoint ARGV` in a forked child, with rlimits, in a cgroup, on CPUS (its
        affinity, as taskset sets it) if given; `peak`: the child writes its VmPeak there."""
        out, err = self.dir / "cli.out", self.dir / "cli.err"
        self.reap_all()
        self.statuses.clear()           # a new case: a pid reaped before is another incarnation
        sys.stdout.flush()
        sys.stderr.flush()
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:                                        # the child: never returns
            rc = 1
            try:
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 1)
                os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 2)
                if cgroup is not None:
                    (cgroup / "cgroup.procs").write_text(str(os.getpid()))
                if cpus is not None:
                    os.sched_setaffinity(0, cpus)
                if limits and not userns.privileged():
                    # a user namespace of the restore's own: RLIMIT_NPROC counts the tasks of the
                    # user namespace it is set in (there: only the restore's, not the run's)
                    userns.enter()
                for res, lim in limits:
                    resource.setrlimit(res, lim)
                rc = cli.main([str(a) for a in argv])
                if peak is not None:
                    peak.write_text(str(_vm_peak()))
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:                           # noqa: BLE001 - what python itself would print
                traceback.print_exc()
                rc = 1
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(rc)
        killed = False
        if kill_after is not None:
            rc = self.wait(pid, kill_after)
            if rc is None:
                os.kill(pid, signal.SIGKILL)
                killed = True
                rc = self.wait(pid, self.timeout)
        else:
            rc = self.wait(pid, self.timeout if timeout is None else timeout)
        if rc is None:                                      # hung: the stubs die with it (EXITKILL)
            os.kill(pid, signal.SIGKILL)
            self.wait(pid, 10)
        return Run(rc, out.read_text(errors="replace"), err.read_text(errors="replace"),
                   time.monotonic() - t0, killed)

    def start_target(self, name: str, pin: set | None = None) -> tuple[int, Path]:
        """A target from the run's copy of its binary, in a new session; READY seen."""
        work = self.dir / f"t-{name}"
        work.mkdir(exist_ok=True)
        log = work / f"{name}.log"
        argv = [str(self.bin / name)]
        if name in conftest.NEEDS_DIR:
            (work / "data").mkdir(exist_ok=True)
            argv.append(str(work / "data"))
        env = {k: v for k, v in os.environ.items() if k != "ZDTM_CORRUPT"}
        log.touch(0o600)
        mark = log.stat().st_size
        pid = os.fork()
        if pid == 0:
            try:
                os.setsid()
                os.chdir(work)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.closerange(3, 1 << 16)
                if pin:
                    os.sched_setaffinity(0, pin)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        deadline = time.monotonic() + conftest.READY_TIMEOUT
        while "READY\n" not in log.read_bytes()[mark:].decode(errors="replace"):
            if time.monotonic() > deadline or self.wait(pid, 0) is not None:
                raise RuntimeError(f"{name} did not get READY:\n{log.read_text()}")
            time.sleep(0.01)
        if pin:                                             # its threads inherit it
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), pin)
        return pid, log

    def verdict(self, pid: int, log: Path, timeout: float = 15.0) -> tuple[bool, str]:
        """SIGUSR1 to a restored (or original) target of ours: (passed, why)."""
        mark = log.stat().st_size
        reaped = _reaped_as(pid)
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
        status = self.wait(reaped, timeout)
        text = log.read_bytes()[mark:].decode(errors="replace")
        if status is None:
            self.kill(reaped)
            self.kill(pid)
            return False, f"no exit within {timeout}s after SIGUSR1; log: {text[-300:]!r}"
        lines = [ln for ln in text.splitlines() if ln == "PASS" or ln.startswith("FAIL")]
        ok = status == 0 and lines[:1] == ["PASS"]
        return ok, f"status {status}, {lines[:1] or 'no verdict'}" + ("" if ok else f"; log: {text[-300:]!r}")

    def kill(self, pid: int) -> None:
        """SIGKILL pid; reap it if it is our child, else wait until it is gone (its parent,
        a PID namespace's init, reaps it)."""
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.reap_all()
            if self.statuses.pop(pid, None) is not None or not os.path.exists(f"/proc/{pid}"):
                return
            time.sleep(0.005)

    def incarnation(self, vpid: int) -> int | None:
        """The running, complete target that sees itself as vpid, as we see it: vpid itself
        (restored with the host's PIDs), or -- restored into a PID namespace of its own, as
        every restore without root is -- another pid of ours."""
        if _running_target(vpid, self.bin):
            return vpid
        depth = len(conftest.nspids(os.getpid()))
        for pid in self.marked():
            try:
                ns = conftest.nspids(pid)
            except OSError:
                continue
            if len(ns) > depth and ns[-1] == vpid and _running_target(pid, self.bin):
                return pid
        return None

    def marked(self) -> list[int]:
        """Processes of this run still alive (or unreaped) besides the runner."""
        me, out = os.getpid(), []
        needle, exe_dir = f"{FUZZ_ENV}={self.marker}".encode(), str(self.bin) + "/"
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == me:
                continue
            try:
                if os.readlink(f"/proc/{d}/exe").startswith(exe_dir):
                    out.append(int(d))
                    continue
            except OSError:
                pass
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if needle in f.read():
                        out.append(int(d))
            except OSError:
                pass
        return out

    def strays(self, seed: Seed | None, grace: float = 5.0) -> str:
        """'' if nothing of the run is left (within grace seconds), else what is; then it
        is killed and reaped so that the next case starts clean."""
        deadline = time.monotonic() + grace
        while True:
            self.reap_all()
            left = set(self.marked())
            taken = {p for p in (seed.pids if seed else ()) if os.path.exists(f"/proc/{p}")}
            if not left and not taken:
                return ""
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        what = f"left running: {sorted(left)}; seed PIDs taken: {sorted(taken)}: " + \
            "; ".join(f"{p}: {_describe(p)}" for p in sorted(left | taken))
        for p in left | taken:
            self.kill(p)
        return what

    # -- seeds ---------------------------------------------------------------------------

    def build(self) -> None:
        self.bin.mkdir(exist_ok=True)
        for name in SEED_TARGETS:
            src = conftest.build_c(conftest.TARGETS_DIR / f"{name}.c", name)
            shutil.copy2(src, self.bin / name)

    def make_seed(self, name: str, tag: str | None = None, pin: set | None = None) -> Seed:
        pid, log = self.start_target(name, pin)
        time.sleep(0.1)
        img = self.dir / f"seed-{tag or name}"
        r = self.cli(["dump", "-t", pid, "-D", img])
        if r.rc != 0:
            raise RuntimeError(f"seed dump of {name} failed: {r}")
        self.wait(pid, 10)
        s = self.seed_of(tag or name, img, pid, log)
        # the seed must restore right, or nothing below means anything
        t0 = time.monotonic()
        cls, why = self.restore(s, img, "pristine")
        s.restore_s = time.monotonic() - t0
        if cls != RESTORED:
            raise RuntimeError(f"seed {name} does not restore right: {cls}: {why}")
        self.seeds[s.name] = s
        return s

    @staticmethod
    def seed_of(name: str, img: Path, pid: int, log: Path) -> Seed:
        _, procs = mutate.read_messages(img / "pstree.img")
        return Seed(name, img, pid, {p.pid for p in procs} | {t for p in procs for t in p.tids}, log)

    # -- cases ---------------------------------------------------------------------------

    def restore(self, seed: Seed, img: Path, trust: str, *, limits=(), cgroup=None, cpus=None, peak=None,
                kill_after=None, extra=()) -> tuple[str, str]:
        """Restore img (detached), check the target's verdict; (class, detail)."""
        r = self.cli(["restore", "-D", img, "-d", *extra], limits=limits, cgroup=cgroup, cpus=cpus, peak=peak,
                     kill_after=kill_after)
        cls, why = self.classify(r)
        if cls == "ok":
            pid = int(r.out.split()[0])
            ok, why = self.verdict(pid, seed.log)
            cls = RESTORED if ok else (WRONG_SEALED if trust == "resealed" else WRONG)
            if trust == "forged":
                cls, why = FORGED_ACCEPTED, f"restored as {pid} ({why})"
            elif trust == "damaged":
                cls, why = WRONG, f"damaged image restored as {pid} ({why})"
            if cls != RESTORED:             # a wrong process's children (its tree) go with it
                for p in self.marked():
                    self.kill(p)
        elif r.killed:
            cls = KILLED_CLEAN
            pid = self.incarnation(seed.pid)
            if pid is not None:                         # killed once its work was done: whole?
                ok, why = self.verdict(pid, seed.log)
                cls = "completed" if ok else WRONG
                for p in self.marked():
                    self.kill(p)
        left = self.strays(seed)
        if left:
            cls, why = STRAY, left + (f" (after: {cls}: {why})" if why else "")
        return cls, why

    def show(self, img: Path, trust: str) -> tuple[str, str]:
        r = self.cli(["show", "--verify", img])
        cls, why = self.classify(r)
        if cls == "ok":
            cls = {"forged": FORGED_ACCEPTED, "damaged": WRONG}.get(trust, SHOWN)
            why = "show --verify accepted it" if cls != SHOWN else ""
        return cls, why

    @staticmethod
    def classify(r: Run) -> tuple[str, str]:
        last = r.err.strip().splitlines()[-1:] or [""]
        if r.rc is None:
            return HUNG, f"no end within the timeout; stderr: {r.err[-500:]!r}"
        if "Traceback (most recent call last)" in r.err:
            return TRACEBACK, r.err[-1500:]
        if r.killed:
            return "killed", ""
        if r.rc == 0:
            return "ok", ""
        if r.rc == 1 and r.err.startswith("nbcheckpoint: error: "):
            return REFUSED, last[0]
        return TRACEBACK, f"exit {r.rc}; stderr: {r.err[-800:]!r}"

    def record(self, kind: str, cls: str, what: str, why: str, keep: Path | None = None) -> None:
        self.counts[kind][cls] += 1
        if cls in FAILURES:
            msg = f"[{cls}] {kind}: {what}: {why}"
            if keep is not None:
                dst = self.dir / "failures" / f"{len(self.findings):04d}-{kind}"
                dst.parent.mkdir(exist_ok=True)
                shutil.copytree(keep, dst, symlinks=True, ignore_dangling_symlinks=True,
                                copy_function=_copy_regular)
                msg += f" (mutant kept in {dst})"
            self.findings.append(msg)
            print(msg, flush=True)
        elif self.verbose:
            print(f"[{cls}] {kind}: {what}: {why}", flush=True)

    def mutant(self, family: str) -> None:
        seed = self.seeds[self.rng.choice(sorted(self.seeds))]
        img = self.dir / "mutant"
        _rmtree(img)
        shutil.copytree(seed.image, img)
        fn = {"struct": mutate.structural, "bytes": mutate.byte_level, "special": mutate.special}.get(family)
        m = mutate.forged(self.rng, img, seed.pid, self.other_key) if family == "forged" else \
            fn(self.rng, img, seed.pid)
        what = f"{seed.name}: {m.what}"
        cls, why = self.restore(seed, img, m.trust)
        self.record(m.kind, cls, what, why, img)
        if self.rng.random() < 0.5 or m.trust != "resealed":
            cls, why = self.show(img, m.trust)
            self.record(m.kind + " (show)", cls, what, why, img)
        _unbind(img)
        _rmtree(img)
        for p in self.dir.glob(".mutant-*.orig"):         # special(): the file a link points to
            p.unlink()


def _reaped_as(pid: int) -> int:
    """The child of ours whose end tells pid's: pid itself, or -- in a PID namespace below
    ours (a restore without root) -- that namespace's init, which exits with its root's
    status (it is the child of the restore, then ours: we are a subreaper)."""
    try:
        if len(conftest.nspids(pid)) > len(conftest.nspids(os.getpid())):
            with open(f"/proc/{pid}/status") as f:
                return int(next(ln.split()[1] for ln in f if ln.startswith("PPid:")))
    except (OSError, StopIteration):
        pass
    return pid


def _vm_peak() -> int:
    """This process's peak address space, in bytes."""
    with open("/proc/self/status") as f:
        return int(next(ln.split()[1] for ln in f if ln.startswith("VmPeak:"))) * 1024


def _running_target(pid: int, bin_dir: Path) -> bool:
    """pid runs a target, detached (no tracer), not stopped: a restore that was complete."""
    time.sleep(0.05)
    try:
        with open(f"/proc/{pid}/status") as f:
            st = dict(ln.split(":", 1) for ln in f if ":" in ln)
        return (os.readlink(f"/proc/{pid}/exe").startswith(str(bin_dir) + "/")
                and st["TracerPid"].strip() == "0" and st["State"].split()[0] in "RSD")
    except OSError:
        return False


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
        exe = os.readlink(f"/proc/{pid}/exe") if os.path.exists(f"/proc/{pid}/exe") else "?"
        return f"state {data[data.rindex(')') + 2]}, exe {exe}"
    except OSError:
        return "gone"


def _copy_regular(src, dst):
    """Keep a failing mutant (not the content of a device or a 1 TiB sparse file)."""
    if os.path.isfile(src) and os.path.getsize(src) <= 64 << 20:
        shutil.copy2(src, dst)
    else:
        Path(dst).write_text(f"(not copied: {src})\n")


def _unbind(img: Path) -> None:
    """Unmount what mutate.special bound in img (without root: a device)."""
    if userns.privileged() or not img.is_dir():
        return
    for p in img.iterdir():
        if p.is_char_device() and not p.is_symlink():
            conftest.umount(p)


def _rmtree(p: Path) -> None:
    if p.exists() or p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
