"""Per-process state: signal handlers and process-directed pending signals,
rlimits, credentials, cwd/root, umask, personality, pdeathsig, dumpable,
child subreaper, THP disable.

Signal handlers have no /proc interface: rt_sigaction(2) is injected, one call
per signal.  Credentials are per thread in Linux (glibc's setuid() signals
every thread); raw injected calls set them thread by thread, last, because
restoring threads with clone3(set_tid) needs our privileges.
"""
from __future__ import annotations

import logging
import os
import resource
import struct

from .errors import ImageError, UnsupportedError
from .images import core_pb2
from .inject import Remote
from .sys import proc, ptrace, userns
from .sys.libc import prlimit
from .errors import AccessDenied, RestoreError

log = logging.getLogger(__name__)

NSIG = 64
_SIGACTION = struct.Struct("<QQQQ")     # handler, flags, restorer, mask (kernel struct sigaction)
PR_GET_PDEATHSIG, PR_SET_PDEATHSIG = 2, 1
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37
PR_SET_THP_DISABLE, PR_GET_THP_DISABLE = 41, 42
RLIM_NLIMITS = 16


def dump_task(pid: int, remote: Remote) -> core_pb2.TaskCore:
    t = core_pb2.TaskCore(pid=pid, personality=proc.personality(pid))
    st = proc.status(pid)
    t.umask = int(st["Umask"], 8)
    t.creds.uids.extend(int(x) for x in st["Uid"].split())
    t.creds.gids.extend(int(x) for x in st["Gid"].split())
    t.creds.groups.extend(int(x) for x in st["Groups"].split())
    for f in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        setattr(t.creds, "cap_" + f[3:].lower(), int(st[f], 16))
    for res in range(RLIM_NLIMITS):
        cur, mx = prlimit(pid, res)
        t.rlimits.append(core_pb2.Rlimit(resource=res, cur=cur, max=mx))
    t.cwd = _fs_path(pid, "cwd")
    t.root = _fs_path(pid, "root")
    s = remote.scratch
    for sig in range(1, NSIG + 1):
        if sig in (9, 19):      # SIGKILL, SIGSTOP cannot have handlers
            continue
        remote.syscall("rt_sigaction", sig, 0, s, 8)
        h, fl, rst, mask = _SIGACTION.unpack(remote.read(s, _SIGACTION.size))
        if h or fl or mask:
            t.sigactions.append(core_pb2.SigAction(sig=sig, handler=h, flags=fl, restorer=rst, mask=mask))
    remote.syscall("prctl", PR_GET_PDEATHSIG, s)
    t.pdeathsig = struct.unpack("<i", remote.read(s, 4))[0]
    t.dumpable = remote.syscall("prctl", PR_GET_DUMPABLE) == 1
    remote.syscall("prctl", PR_GET_CHILD_SUBREAPER, s)
    t.child_subreaper = struct.unpack("<i", remote.read(s, 4))[0] != 0
    t.thp_disable = remote.syscall("prctl", PR_GET_THP_DISABLE)
    t.shared_pending.extend(ptrace.peek_pending(pid, shared=True))
    return t


def _fs_path(pid: int, which: str) -> str:
    path = proc.link(pid, which)
    if path.endswith(" (deleted)"):
        raise UnsupportedError(f"process {pid}: its {which} directory {path} was deleted; not supported")
    return path


def fs_fds(t: core_pb2.TaskCore) -> dict[str, int]:
    """Engine fds of cwd (and root if not '/'), inherited by the stub for fchdir."""
    out = {"cwd": os.open(t.cwd, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)}
    if t.root != "/":
        out["root"] = os.open(t.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return out


def restore_fs(remote: Remote, t: core_pb2.TaskCore, fds: dict[str, int]) -> None:
    if "root" in fds:
        remote.syscall("fchdir", fds["root"])
        remote.write(remote.scratch, b".\0")
        remote.syscall("chroot", remote.scratch)
    remote.syscall("fchdir", fds["cwd"])
    remote.syscall("umask", t.umask)
    remote.syscall("personality", t.personality)


def restore_sigactions(remote: Remote, t: core_pb2.TaskCore) -> None:
    by_sig = {a.sig: a for a in t.sigactions}
    with remote.batch() as b:
        for sig in range(1, NSIG + 1):
            if sig in (9, 19):
                continue
            a = by_sig.get(sig)
            act = b.put(_SIGACTION.pack(a.handler, a.flags, a.restorer, a.mask) if a else bytes(_SIGACTION.size))
            b.syscall("rt_sigaction", sig, act, 0, 8)


def restore_misc(remote: Remote, t: core_pb2.TaskCore) -> None:
    remote.syscall("prctl", PR_SET_PDEATHSIG, t.pdeathsig)
    remote.syscall("prctl", PR_SET_DUMPABLE, 1 if t.dumpable else 0)
    # not inherited by fork; setting it also marks the descendants (the stubs exist already)
    remote.syscall("prctl", PR_SET_CHILD_SUBREAPER, 1 if t.child_subreaper else 0)


def restore_thp_disable(remote: Remote, t: core_pb2.TaskCore) -> None:
    """Set (or clear) the mm's THP disable: the stub inherited the engine's by fork.

    Before the memory is mapped and filled, so that its pages fault in (and khugepaged
    treats them) as the original's did.  An image without the field (0) clears it."""
    remote.syscall("prctl", PR_SET_THP_DISABLE, t.thp_disable & 1, t.thp_disable & ~1)


def check_task(t: core_pb2.TaskCore, where: str) -> None:
    """Before any process exists: credentials of the shape the restore sets (real, effective,
    saved, fs ids), a group list setgroups(2) takes, siginfos of their size."""
    c = t.creds
    if len(c.uids) != 4 or len(c.gids) != 4 or len(c.groups) > 65536:
        raise ImageError(f"{where}: credentials with {len(c.uids)} uids, {len(c.gids)} gids and "
                         f"{len(c.groups)} groups (want 4, 4, at most 65536): damaged image")
    if any(len(info) != ptrace.SIGINFO_SIZE for info in t.shared_pending):
        raise ImageError(f"{where}: a pending signal is not a {ptrace.SIGINFO_SIZE}-byte siginfo: damaged image")


def restore_rlimits(pid: int, t: core_pb2.TaskCore) -> None:
    for r in t.rlimits:
        try:
            prlimit(pid, r.resource, (r.cur, r.max))
        except AccessDenied:         # the stub has the engine's limits; raising a hard one needs CAP_SYS_RESOURCE
            hard = prlimit(pid, r.resource)[1]
            name = next((n for n in dir(resource) if n.startswith("RLIMIT_") and getattr(resource, n) == r.resource),
                        f"rlimit {r.resource}")
            lim = lambda v: "unlimited" if v == (1 << 64) - 1 else str(v)    # noqa: E731 (RLIM64_INFINITY)
            raise RestoreError(f"the image's {name} (soft {lim(r.cur)}, hard {lim(r.max)}) is above the hard limit "
                               f"this restore runs under ({lim(hard)}), and raising a hard limit needs "
                               f"CAP_SYS_RESOURCE: run the restore where the hard {name} is at least {lim(r.max)} "
                               "(ulimit -H, prlimit, systemd's Limit*= of the service)") from None


def queue_signal(remote: Remote, info: bytes, tid: int | None) -> None:
    """Queue a saved siginfo again: to the thread of `remote`, or to the process if tid is None.

    rt_(tg)sigqueueinfo accepts any si_code when a process signals itself,
    which is why this runs inside the restored process.
    """
    if len(info) != ptrace.SIGINFO_SIZE:
        raise ImageError(f"a pending signal of process {remote.vpid} is {len(info)} bytes, "
                         f"not a {ptrace.SIGINFO_SIZE}-byte siginfo: damaged image")
    sig = struct.unpack_from("<i", info, 0)[0]
    remote.write(remote.scratch, info)
    if tid is None:
        remote.syscall("rt_sigqueueinfo", remote.vpid, sig, remote.scratch)
    else:
        remote.syscall("rt_tgsigqueueinfo", remote.vpid, remote.vtid, sig, remote.scratch)


def check_identity(tasks, inv, privileged: bool, where: str) -> None:
    """Before any process exists: a checkpoint restores for the user who took it (one taken as
    root, as root only); without root, only processes that ran as that user's own uid and gid
    (the only ids our user namespace maps, sys/userns.py)."""
    me = userns.outer_id("uid", os.getuid())
    if inv.HasField("owner_uid") and inv.owner_uid != me:
        raise RestoreError(f"{where} was taken by {userns.who(inv.owner_uid)}, and you are {userns.who(me)}: a checkpoint "
                           "restores only for the user who took it (one taken as root, only as root). Restore it "
                           "as that user, or take a new checkpoint as yourself")
    if privileged:
        return
    uid, gid = os.getuid(), os.getgid()
    for t in tasks:
        c = t.creds
        if set(c.uids) != {uid} or set(c.gids) != {gid}:
            raise RestoreError(f"{where}: process {t.pid} ran with uids {list(c.uids)} and gids {list(c.gids)} "
                               "(real, effective, saved, filesystem); without root, nbcheckpoint restores only "
                               f"processes that ran with your own uid {uid} and gid {gid} (your user namespace "
                               "maps no other id): restore it as root")


def _groups_here(groups) -> list[int]:
    """The image's supplementary groups as this user namespace shows them (unmapped: overflow)."""
    if userns.in_initial():
        return list(groups)
    return sorted(g if (g := userns.inner_id("gid", gid)) is not None else userns.overflow_id("gid")
                  for gid in groups)


def restore_creds(remote: Remote, t: core_pb2.TaskCore) -> None:
    """Set credentials in the thread behind `remote` (skipped if already equal).

    In a user namespace of ours, setgroups(2) is denied: the processes keep the restoring
    user's supplementary groups (a warning says so if the image's differ)."""
    c = t.creds
    cur = proc.status(remote.pid, remote.tid)
    groups = [int(x) for x in cur["Groups"].split()]
    same_groups = sorted(groups) == sorted(_groups_here(c.groups))
    if ([int(x) for x in cur["Uid"].split()] == list(c.uids) and [int(x) for x in cur["Gid"].split()] == list(c.gids)
            and same_groups and int(cur["CapEff"], 16) == c.cap_eff and int(cur["CapPrm"], 16) == c.cap_prm
            and int(cur["CapInh"], 16) == c.cap_inh):
        return
    s = remote.scratch
    if userns.in_initial():
        remote.write(s, struct.pack(f"<{len(c.groups)}I", *c.groups) if c.groups else b"\0" * 4)
        remote.syscall("setgroups", len(c.groups), s)
    elif not same_groups and remote.tid == remote.pid:
        log.warning("process %d: its supplementary groups were %s, and are now yours, %s: an ordinary user "
                    "cannot set groups (setgroups is denied in a user namespace)", remote.vpid,
                    list(c.groups), groups)
    remote.syscall("setresgid", c.gids[0], c.gids[1], c.gids[2])
    remote.syscall("setresuid", c.uids[0], c.uids[1], c.uids[2])
    # capset(2): header {version 3, pid 0} then two {effective, permitted, inheritable} words
    hdr = struct.pack("<Ii", 0x20080522, 0)
    lo = struct.pack("<III", c.cap_eff & 0xFFFFFFFF, c.cap_prm & 0xFFFFFFFF, c.cap_inh & 0xFFFFFFFF)
    hi = struct.pack("<III", c.cap_eff >> 32, c.cap_prm >> 32, c.cap_inh >> 32)
    remote.write(s, hdr + lo + hi)
    remote.syscall("capset", s, s + len(hdr))
