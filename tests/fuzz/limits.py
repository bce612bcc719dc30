"""Restores of the seeds under resource limits the image cannot know about.

Each must end refused clearly or restored right: RLIMIT_NOFILE low, RLIMIT_AS low (soft,
or hard: a hard limit below the image's is an expected clear refusal), a cpuset without
the dumped CPU, a pids cgroup, a memory cgroup near its limit (cgroup v1 or v2; every
cgroup made is removed).  Making a cgroup is root's: without root, the same limits are set
as an ordinary user can -- the engine's affinity (as taskset sets it) without the dumped CPU,
RLIMIT_NPROC (in the restore's own user namespace), RLIMIT_AS near the restore's own peak.
"""
from __future__ import annotations

import contextlib
import os
import resource
import time
from pathlib import Path

from nbcheckpoint.engine.sys import userns

from .runner import NOT_RUN, Runner

CASES = ["nofile", "as-soft", "as-hard", "cpuset", "pids", "memory"]


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith("VmSize:"):
                return int(ln.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def _cgroup_root(controller: str) -> Path | None:
    """This process's own cgroup of `controller` (v1, else v2 with it enabled), or None."""
    for ln in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = ln.split(":", 2)
        if controller in names.split(","):
            root = Path(f"/sys/fs/cgroup/{controller}") / path.lstrip("/")
            if (root / "cgroup.procs").exists():
                return root
    v2 = Path("/sys/fs/cgroup")
    try:
        if controller not in (v2 / "cgroup.controllers").read_text().split():
            return None
        (v2 / "cgroup.subtree_control").write_text(f"+{controller}")
    except OSError:
        return None
    return v2


@contextlib.contextmanager
def cgroup(controller: str, settings: dict[str, str]):
    root = _cgroup_root(controller)
    if root is None:
        yield None
        return
    cg = root / f"nbck-fuzz-{os.getpid()}-{time.monotonic_ns()}"
    cg.mkdir()
    try:
        for k, v in settings.items():
            (cg / k).write_text(v)
        yield cg
    finally:
        deadline = time.monotonic() + 10
        while True:
            try:
                cg.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def run_case(r: Runner, case: str) -> None:
    name = r.rng.choice(["threads", "counter", "tree", "pipes", "unix_sockets"])
    seed = r.seeds[name]
    inf = resource.RLIM_INFINITY
    limits, settings, controller, what, cpus = (), None, None, case, None
    if case == "nofile":
        n = r.rng.choice([4, 6, 8, 12, 16, 24, 32, 64])
        limits, what = [(resource.RLIMIT_NOFILE, (n, n))], f"RLIMIT_NOFILE {n}"
    elif case in ("as-soft", "as-hard"):
        n = _vm_size() + r.rng.choice([-(32 << 20), 0, 16 << 20, 64 << 20, 256 << 20])
        lim = (n, inf) if case == "as-soft" else (n, n)
        limits, what = [(resource.RLIMIT_AS, lim)], f"RLIMIT_AS {lim}"
    elif case == "cpuset":
        if len(os.sched_getaffinity(0)) < 2 or "pinned" not in r.seeds:
            r.record(f"limit {case}", NOT_RUN, "needs 2 CPUs", "")
            return
        seed = r.seeds["pinned"]
        if not userns.privileged():
            cpus, what = {0}, "the engine's affinity {0}, threads pinned to CPU 1 at the dump"
            cls, why = r.restore(seed, seed.image, "pristine", cpus=cpus)
            r.record(f"limit {case}", cls, f"{seed.name}: {what}", why)
            return
        controller = "cpuset"
        root = _cgroup_root("cpuset")
        settings = {"cpuset.cpus": "0"}
        if root is not None and (root / "cpuset.mems").exists():
            settings["cpuset.mems"] = (root / "cpuset.mems").read_text().strip()
        what = "cpuset {0}, threads pinned to CPU 1 at the dump"
    elif case == "pids":
        n = r.rng.choice([1, 2, 3, 4, 6, 8])
        if userns.privileged():
            controller, settings, what = "pids", {"pids.max": str(n)}, f"pids.max {n}"
        else:
            hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
            limits, what = [(resource.RLIMIT_NPROC, (n, hard))], f"RLIMIT_NPROC {n} in the restore's user namespace"
    elif case == "memory" and not userns.privileged():
        peak = _peak_as(r, seed)
        n = peak + r.rng.choice([-(16 << 20), 0, 1 << 20, 16 << 20])
        limits, what = [(resource.RLIMIT_AS, (n, inf))], f"RLIMIT_AS {n} (the restore's peak: {peak})"
    elif case == "memory":
        controller = "memory"
        limit_file = "memory.limit_in_bytes" if _cgroup_root("memory") and \
            (_cgroup_root("memory") / "memory.limit_in_bytes").exists() else "memory.max"
        peak = _peak_memory(r, seed)
        if peak is None:
            r.record(f"limit {case}", NOT_RUN, "no memory cgroup", "")
            return
        n = peak + r.rng.choice([256 << 10, 1 << 20, 4 << 20, 16 << 20])
        settings, what = {limit_file: str(n)}, f"{limit_file} {n} (the restore's peak: {peak})"
    with cgroup(controller, settings) if controller else contextlib.nullcontext() as cg:
        if controller and cg is None:
            r.record(f"limit {case}", NOT_RUN, f"no {controller} cgroup", "")
            return
        cls, why = r.restore(seed, seed.image, "pristine", limits=limits, cgroup=cg)
    r.record(f"limit {case}", cls, f"{seed.name}: {what}", why)


def _peak_memory(r: Runner, seed) -> int | None:
    """What a restore of seed charges to a memory cgroup without a limit (its peak)."""
    root = _cgroup_root("memory")
    if root is None:
        return None
    v1 = (root / "memory.max_usage_in_bytes").exists()
    with cgroup("memory", {}) as cg:
        r.restore(seed, seed.image, "pristine", cgroup=cg)
        peak = cg / ("memory.max_usage_in_bytes" if v1 else "memory.peak")
        return int(peak.read_text()) if peak.exists() else None


def _peak_as(r: Runner, seed) -> int:
    """The peak address space of a restore of seed without limits (VmPeak of the engine)."""
    out = r.dir / "peak"
    r.restore(seed, seed.image, "pristine", peak=out)
    return int(out.read_text())
