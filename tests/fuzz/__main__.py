"""python -m tests.fuzz [--seed N] [--mutants N] [--structural N] [--kills N] [--limits N]

Fuzzing and fault injection of nbcheckpoint (docs/security.md, "Fuzzing"): image mutants
(structural resealed, byte-level, special files, forged), the engine SIGKILLed during dump
and restore, restores under resource limits.  Prints the counts per class and per kind;
exits 1 if anything hung, printed a traceback, left a process, restored wrong from an
image it should have refused, or accepted a forged image.  Run from the project directory,
with PYTHONPATH set to it, as root or as an ordinary user (limits/runner say what differs).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[1])
    p.add_argument("--seed", type=int, default=None, help="random seed (default: $NBCHECKPOINT_FUZZ_SEED, else new)")
    p.add_argument("--mutants", type=int, default=150, help="image mutants in all")
    p.add_argument("--structural", type=int, default=50, help="of which structural, resealed")
    p.add_argument("--kills", type=int, default=10, help="engine kills, half in dump, half in restore")
    p.add_argument("--limits", type=int, default=1, help="rounds of the resource-limit cases")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before a command counts as hung")
    p.add_argument("--dir", help="work directory (default: a new one in /tmp, removed unless something failed)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every case")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else int(os.environ.get("NBCHECKPOINT_FUZZ_SEED") or
                                                         random.randrange(1 << 31))
    print(f"fuzz seed {seed} (replay: NBCHECKPOINT_FUZZ_SEED={seed} or --seed {seed})", flush=True)

    from .runner import Runner
    r = Runner(seed, args.dir, args.timeout, args.verbose)
    try:
        return _run(r, args, seed)
    finally:
        for pid in r.marked():          # whatever happened: nothing of the run stays behind
            r.kill(pid)


def _run(r, args, seed: int) -> int:
    from .runner import FAILURES
    from . import kills, limits
    t0 = time.monotonic()
    r.build()
    for name in ["counter", "threads", "pipes", "unix_sockets", "tree"]:
        r.make_seed(name)
    if len(os.sched_getaffinity(0)) >= 2:
        r.make_seed("threads", tag="pinned", pin={1})
    print(f"seeds: {', '.join(f'{s.name} ({s.restore_s:.2f}s)' for s in r.seeds.values())}", flush=True)

    rest = max(0, args.mutants - args.structural)
    families = ["struct"] * args.structural + ["bytes"] * (rest // 2) + ["special"] * (rest // 4)
    families += ["forged"] * (args.mutants - len(families))
    r.rng.shuffle(families)
    for i, fam in enumerate(families):
        r.mutant(fam)
        if (i + 1) % 100 == 0:
            _progress(r, f"{i + 1}/{len(families)} mutants", t0)
    n_dump = args.kills // 2
    k = kills.Killer(r)
    for name in ["counter", "threads"]:
        k.dump_series(name, n_dump // 2 + (name == "counter") * (n_dump % 2))
    for i in range(args.kills - n_dump):
        k.restore_once(r.rng.choice(["counter", "threads", "tree", "pipes"]))
    _progress(r, "kills done", t0)
    for _ in range(args.limits):
        for case in limits.CASES:
            limits.run_case(r, case)

    _report(r, time.monotonic() - t0)
    failed = sum(c[f] for c in r.counts.values() for f in FAILURES)
    print(f"fuzz seed {seed}: {'FAILED: ' + str(failed) + ' bad outcomes' if failed else 'all held'}", flush=True)
    from . import runner
    if not failed and args.dir is None:
        shutil.rmtree(r.dir, ignore_errors=True)
        if runner.KEY_DIR:
            shutil.rmtree(runner.KEY_DIR, ignore_errors=True)
    elif failed:
        print(f"work directory kept: {r.dir} (replay a kept mutant: NBCHECKPOINT_KEY_FILE="
              f"{os.environ['NBCHECKPOINT_KEY_FILE']} nbcheckpoint restore -D DIR)")
    return 1 if failed else 0


def _progress(r, what: str, t0: float) -> None:
    totals = _totals(r)
    print(f"{time.monotonic() - t0:7.0f}s {what}: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())),
          flush=True)


def _totals(r):
    import collections
    t = collections.Counter()
    for c in r.counts.values():
        t.update(c)
    return t


def _report(r, seconds: float) -> None:
    classes = sorted(_totals(r))
    w = max(len(k) for k in r.counts) + 2
    print(f"\n{'kind':<{w}}" + "".join(f"{c:>16}" for c in classes))
    for kind in sorted(r.counts):
        print(f"{kind:<{w}}" + "".join(f"{r.counts[kind][c] or '':>16}" for c in classes))
    tot = _totals(r)
    print(f"{'total':<{w}}" + "".join(f"{tot[c]:>16}" for c in classes))
    print(f"{seconds:.0f}s; {len(r.findings)} findings")
    for f in r.findings:
        print("  " + f[:2000])


if __name__ == "__main__":
    sys.exit(main())
