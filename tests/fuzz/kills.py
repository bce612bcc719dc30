"""The engine SIGKILLed at a random point of a dump or of a restore.

Dump: the target must keep running (untraced, not stopped, and pass its own check
later), and the image is absent or whole -- unless the dump completed first (kill mode:
then the target is gone and the image restores right).  Restore: nothing half-restored
is left, the image's PIDs are free again within a few seconds, and a restore of the same
image then works.
"""
from __future__ import annotations

import os
import shutil
import time

from nbcheckpoint.engine.images import imagedir

from .runner import KILLED_CLEAN, RESTORED, STRAY, WRONG, Runner, _describe, _rmtree


def _whole(img) -> str:
    """'' if img is a complete image (every checksum, all page data), else why not."""
    try:
        rd = imagedir.ImageReader(str(img))
        rd.verify_all_metadata()
        for name in rd.sums:
            if name.startswith("pages-"):
                rd.open_pages(name).verify()
    except Exception as e:          # noqa: BLE001 - any failure means not whole
        return f"{type(e).__name__}: {e}"
    return ""


def _traced_or_stopped(pid: int) -> str:
    bad = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                st = dict(ln.split(":", 1) for ln in f if ":" in ln)
        except OSError:
            continue
        if st["TracerPid"].strip() != "0" or st["State"].split()[0] in "tT":
            bad.append(f"tid {tid}: {st['State'].strip()}, tracer {st['TracerPid'].strip()}")
    return "; ".join(bad)


class Killer:
    def __init__(self, runner: Runner):
        self.r = runner
        self.live: dict[str, tuple[int, object]] = {}      # target name -> (pid, log)
        self.calib: dict[str, float] = {}

    def _target(self, name: str):
        if name not in self.live:
            self.live[name] = self.r.start_target(name)
        return self.live[name]

    def dump_once(self, name: str) -> None:
        r = self.r
        pid, log = self._target(name)
        mode = r.rng.choice(["--leave-running", "--leave-running", "kill"])
        img = r.dir / "killed-dump"
        _rmtree(img)
        if name not in self.calib:
            t0 = time.monotonic()
            run = r.cli(["dump", "-t", pid, "-D", img, "--leave-running"])
            self.calib[name] = time.monotonic() - t0
            _rmtree(img)
            if run.rc != 0:
                raise RuntimeError(f"calibration dump of {name} failed: {run}")
        delay = r.rng.uniform(0, self.calib[name] * 1.3)
        argv = ["dump", "-t", pid, "-D", img] + ([mode] if mode != "kill" else [])
        run = r.cli(argv, kill_after=delay)
        what = f"{name} {mode} killed after {delay * 1000:.1f} ms"
        cls, why = r.classify(run)
        if cls not in ("ok", "killed"):
            r.record("kill-dump", cls, what, why)
            self._drop(name)
            return
        problems = []
        done = not run.killed           # or killed after the commit: then the image is whole
        if img.exists():
            bad = _whole(img)
            if bad:
                problems.append(f"{img} exists but is not whole: {bad}")
            done = not bad
        elif done:
            problems.append("the dump ended with 0 but left no image")
        for p in (r.dir).glob(".killed-dump.partial-*"):     # what SIGKILL leaves: the next dump's to remove
            shutil.rmtree(p, ignore_errors=True)
        time.sleep(0.05)
        gone = r.wait(pid, 0) is not None or not os.path.exists(f"/proc/{pid}")
        if done and mode == "kill" and not run.killed and not gone and r.wait(pid, 5) is None:
            problems.append("a completed kill-mode dump left the target running")
            self._drop(name)
        elif done and mode == "kill" and (gone or not run.killed):
            self.live.pop(name)
            if not problems:                 # the image is real: it restores right
                cls, why = r.restore(r.seed_of(name, img, pid, log), img, "pristine")
                if cls != RESTORED:
                    problems.append(f"the completed image does not restore right: {cls}: {why}")
        elif gone:
            problems.append(f"the target died ({_describe(pid)}; status {r.statuses.get(pid)}); "
                            f"image {'whole' if img.exists() else 'absent'}")
            self.live.pop(name)
        else:
            deadline = time.monotonic() + 2
            while (bad := _traced_or_stopped(pid)) and time.monotonic() < deadline:
                time.sleep(0.02)
            if bad:
                problems.append(f"target threads left traced or stopped: {bad}")
        _rmtree(img)
        r.record("kill-dump", WRONG if problems else KILLED_CLEAN if run.killed else "completed",
                 what, "; ".join(problems))
        if problems:
            self._drop(name)

    def _drop(self, name: str) -> None:
        if name in self.live:
            self.r.kill(self.live.pop(name)[0])

    def dump_series(self, name: str, n: int) -> None:
        """n killed dumps of one target (the same one while it lives), then its own check
        (one target at a time: a case's stray check would take another for a stray)."""
        for _ in range(n):
            self.dump_once(name)
        self.finish_dumps()

    def finish_dumps(self) -> None:
        """Every target that went through killed dumps passes its own check."""
        for name, (pid, log) in sorted(self.live.items()):
            ok, why = self.r.verdict(pid, log)
            self.r.record("kill-dump (target check)", "passed" if ok else WRONG, name, why)
        self.live.clear()
        left = self.r.strays(None)
        if left:
            self.r.record("kill-dump", STRAY, "after the killed dumps", left)

    def restore_once(self, name: str) -> None:
        r = self.r
        seed = r.seeds[name]
        delay = r.rng.uniform(0, seed.restore_s * 1.2)
        what = f"{name} restore killed after {delay * 1000:.1f} ms"
        cls, why = r.restore(seed, seed.image, "pristine", kill_after=delay)
        r.record("kill-restore", cls if cls != RESTORED else "completed", what, why)
        # the same image restores right afterwards
        cls, why = r.restore(seed, seed.image, "pristine")
        r.record("kill-restore (then restore)", cls, what, why)


__all__ = ["Killer", "KILLED_CLEAN"]
