"""Who may restore lazily (engine/sys/uffd.py check_lazy(), engine/lazy.py).

A lazy restore needs userfaultfds with fork events (a process that forks while pages are
still to come must pass them to its child), which the kernel gives only to CAP_SYS_PTRACE
in the initial user namespace -- however the userfaultfd is made (userfaultfd(2) with
vm.unprivileged_userfaultfd=1, or /dev/userfaultfd).  So it is root's: in a user namespace
of its own (where the shim runs an ordinary user's kernel) even root is refused, up front,
before any process is created, with a message that says why; the shim then restores in full
(test_jupyter_provisioner.py).  Both tests run the same as root and as an ordinary user.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from nbcheckpoint.engine import RestoreError, lazy

WHY = "lazy restore needs CAP_SYS_PTRACE in the initial user namespace"

# Restores image argv[1] lazily (into a PID namespace) from a user namespace of its own.
RESTORE_IN_USERNS = textwrap.dedent("""
    import json, os, sys
    from nbcheckpoint.engine import Options, RestoreError, lazy, restore
    from nbcheckpoint.engine.sys import userns
    userns.enter()
    out = {"uid": os.getuid(), "unavailable": lazy.unavailable()}
    try:
        restore(sys.argv[1], options=Options(pidns=True, lazy_pages=True))
    except RestoreError as e:
        out["refused"] = str(e)
    out["children"] = open(f"/proc/self/task/{os.getpid()}/children").read().split()
    print(json.dumps(out))
""")


def test_lazy_restore_refused_up_front_in_a_user_namespace(launch, images):
    t = launch("lazy_mem")
    img = images()
    t.checkpoint(img)
    r = subprocess.run([sys.executable, "-c", RESTORE_IN_USERNS, str(img)], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["uid"] == os.getuid(), out                 # the identity map: our own uid in there
    assert WHY in (out["unavailable"] or ""), out
    assert out["refused"].startswith("lazy restore (--lazy-pages) is not possible here: "), out
    assert WHY in out["refused"] and "without --lazy-pages" in out["refused"], out
    assert out["children"] == [], out                     # nothing created, nothing left


def test_lazy_restore_as_the_caller_may():
    """Here: root may (the engine's lazy tests run as root); an ordinary user may not, and
    PageServer (what restore builds first for --lazy-pages) says why."""
    if os.geteuid() == 0:
        assert lazy.unavailable() is None
        lazy.PageServer(None).close()
    else:
        assert WHY in lazy.unavailable()
        with pytest.raises(RestoreError, match="CAP_SYS_PTRACE in the initial user namespace"):
            lazy.PageServer(None)
