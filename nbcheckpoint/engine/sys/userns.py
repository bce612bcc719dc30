"""User namespaces: how an ordinary user gets the privileges a restore needs.

Creating processes with chosen PIDs (clone3 set_tid), PR_SET_MM_MAP with an exe fd and
mounting /proc for a new PID namespace need CAP_CHECKPOINT_RESTORE / CAP_SYS_ADMIN *over the
namespaces involved*.  An ordinary user has them in a user namespace of their own, and over
the PID and mount namespaces created inside it: so an unprivileged engine first enters a new
user namespace (:func:`enter`), mapping only its own uid and gid (the processes it restores see
their own ids, not 0), and restores into a new PID namespace there.  What stays out of reach
is anything checked against the initial user namespace (/proc/PID/map_files, TCP_REPAIR on
the host's network, nftables, raising a hard rlimit, userfaultfd under
vm.unprivileged_userfaultfd=0): the callers say so by name.
"""
from __future__ import annotations

import errno
import os
import pwd

from ..errors import EngineError, SysError
from . import proc
from .libc import syscall
from .x86_64 import NR

CLONE_NEWUSER = 0x10000000
CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_SYS_RESOURCE, CAP_CHECKPOINT_RESTORE = 12, 19, 21, 24, 40
NO_MAP_FILES = "NBCHECKPOINT_NO_MAP_FILES"

# what an administrator can look at, in the order they usually matter
SYSCTLS = ("user.max_user_namespaces", "kernel.unprivileged_userns_clone",
           "kernel.apparmor_restrict_unprivileged_userns")


class UserNamespaceError(EngineError):
    """This process could not get a user namespace of its own."""


def has_cap(cap: int) -> bool:
    """`cap` is in our effective set (over our own user namespace)."""
    return bool(int(proc.status("self")["CapEff"], 16) >> cap & 1)


def in_initial() -> bool:
    """We are in the initial user namespace (its uid_map maps the whole range to itself)."""
    return proc.id_map("uid") == [(0, 0, 4294967295)]


def privileged() -> bool:
    """Root as a restore needs it: CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE in the initial
    user namespace (what /proc/PID/map_files and clone3 set_tid on the host check)."""
    return in_initial() and (has_cap(CAP_SYS_ADMIN) or has_cap(CAP_CHECKPOINT_RESTORE))


def owns_namespaces() -> bool:
    """We may create PID namespaces and set PIDs in them: root, or inside a user namespace we
    entered with :func:`enter` (its creator has every capability over it)."""
    return has_cap(CAP_SYS_ADMIN) or has_cap(CAP_CHECKPOINT_RESTORE)


def map_files_allowed() -> bool:
    """May we use /proc/PID/map_files?  readlink, stat and open there need CAP_SYS_ADMIN or
    CAP_CHECKPOINT_RESTORE in the initial user namespace (fs/proc/base.c), which an ordinary
    user has nowhere, not even in a user namespace of their own (engine/mapped.py does
    without).  NBCHECKPOINT_NO_MAP_FILES=1 makes a privileged engine do without too (the
    tests run both ways)."""
    return privileged() and not os.environ.get(NO_MAP_FILES)


def who(uid: int) -> str:
    """"uid 1001 (alice)", for messages (the name only where the user database has one)."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _translate(kind: str, value: int, outward: bool) -> int | None:
    for inside, outside, n in proc.id_map(kind):
        src, dst = (inside, outside) if outward else (outside, inside)
        if src <= value < src + n:
            return dst + value - src
    return None


def outer_id(kind: str, inner: int) -> int | None:
    """The id `inner` (of this namespace) as the parent namespace sees it, through
    /proc/self/{uid,gid}_map; None if it is not mapped."""
    return _translate(kind, inner, outward=True)


def inner_id(kind: str, outer: int) -> int | None:
    """The parent namespace's id `outer` as this namespace sees it; None if not mapped."""
    return _translate(kind, outer, outward=False)


def overflow_id(kind: str) -> int:
    """What an unmapped id shows as (65534, "nobody", unless the sysctl says otherwise)."""
    try:
        return proc.sysctl_int(f"kernel/overflow{kind}")
    except SysError:
        return 65534


def sysctls() -> str:
    """The settings an administrator checks, with their values here ("" if none is readable)."""
    out = []
    for name in SYSCTLS:
        try:
            out.append(f"{name}={proc.sysctl_int(name.replace('.', '/'))}")
        except SysError:
            pass
    return ", ".join(out)


def explain(err: int) -> str:
    """Why unshare(CLONE_NEWUSER) (or writing the id maps after it) failed, and what to do."""
    here = sysctls()
    if err == errno.EINVAL:
        return ("the process is multi-threaded (a user namespace can only be entered by a "
                "single-threaded process): run the restore from the nbcheckpoint command")
    why = {errno.ENOSPC: "the limit of user namespaces is reached or is 0",
           errno.EPERM: "unprivileged user namespaces are disabled here",
           errno.EACCES: "a security module denies unprivileged user namespaces here"}.get(
        err, os.strerror(err))
    return (f"{why} ({here or 'no user-namespace sysctl readable'}). An administrator can allow "
            "them: sysctl user.max_user_namespaces=15000 (> 0); on kernels with "
            "kernel.unprivileged_userns_clone, set it to 1; on Ubuntu 24.04, "
            "kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile with 'userns,' "
            "for nbcheckpoint's Python. Or run as root")


def enter() -> None:
    """Enter a new user namespace owned by us, mapping only our uid and gid to themselves.

    setgroups(2) is denied in it (the kernel requires that before an unprivileged gid_map):
    the supplementary groups stay what they are.  Must be called while single-threaded."""
    uid, gid = os.getuid(), os.getgid()
    try:
        syscall(NR["unshare"], CLONE_NEWUSER, request="unshare(CLONE_NEWUSER)")
    except SysError as e:       # (os.unshare is Python >= 3.12)
        raise UserNamespaceError(f"cannot create a user namespace ({os.strerror(e.errno)}): "
                                 f"{explain(e.errno)}") from None
    try:
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1\n")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1\n")
    except OSError as e:
        raise UserNamespaceError(f"created a user namespace but could not map uid {uid} / gid {gid} "
                                 f"in it: {e.strerror}: {explain(e.errno)}") from None


def ensure() -> bool:
    """Enter a user namespace of our own unless we already hold what a restore needs.
    Returns True if it entered one (the caller must restore into a new PID namespace)."""
    if owns_namespaces():
        return False
    enter()
    return True
