"""A bounded, seeded sample of the fuzzing and fault-injection suite (tests/fuzz), run by CI
on every submission: ~300 image mutants (100 structural, resealed), 20 engine kills across
dump and restore, each resource-limit case once -- about a minute on a 2-core VM.

A new seed every run, printed; NBCHECKPOINT_FUZZ_SEED=N replays one.  The suite exits 1 on
any hang, traceback, stray process, wrong restore of an image it should have refused, or
forged image accepted; its report (counts per class and kind, each finding with its
mutant kept) is shown when this test fails.  The long run: docs/security.md, "Fuzzing".
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fuzz_sample(target_bins):
    seed = int(os.environ.get("NBCHECKPOINT_FUZZ_SEED") or random.randrange(1 << 31))
    print(f"NBCHECKPOINT_FUZZ_SEED={seed}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-m", "tests.fuzz", "--seed", str(seed), "--mutants", "300",
                        "--structural", "100", "--kills", "20", "--limits", "1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    print(r.stdout[-6000:])
    assert r.returncode == 0, f"fuzz seed {seed} (replay: NBCHECKPOINT_FUZZ_SEED={seed}):\n" \
                              f"{r.stdout[-20000:]}\n{r.stderr[-5000:]}"
    assert "all held" in r.stdout
