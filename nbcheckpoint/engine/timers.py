"""Interval timers (setitimer) and POSIX timers (timer_create) of a process.

Dump (inside the injection phase, ``remote.scratch`` is a RW area in the target):
getitimer(ITIMER_REAL/VIRTUAL/PROF), and for every timer of /proc/PID/timers
(id, signal, sigev value, notification, clock) timer_gettime and
timer_getoverrun.  Saved in ``timers-PID.img`` (images/timers.proto).

Restore (injected into the restored process after its threads exist, since a
SIGEV_THREAD_ID timer names a thread): the process knows its timers by id, so
they come back with the same ids.  Linux >= 6.16 has
``prctl(PR_TIMER_CREATE_RESTORE_IDS, PR_TIMER_CREATE_RESTORE_IDS_ON)``, after
which timer_create() *reads* the wanted id from its timer_t pointer (and fails
if it is taken); it is switched off again afterwards.  Older kernels hand out
ids sequentially from 0 and never reuse one until they wrap, so timers are
created in id order and a gap is closed by creating and deleting a throw-away
timer; an id that still comes back different fails the restore.

Times are relative: each timer gets the time that remained at dump, counted
from the restore, and its interval.  An interval timer that had expired with its
SIGALRM/SIGVTALRM/SIGPROF still pending shows 0 remaining (the kernel re-arms it
when the signal is taken): it is armed one interval ahead.  Overruns and a timer signal that was
already queued are not timer state (the queued signal is restored with the
pending signals).  A CLOCK_THREAD_CPUTIME_ID timer measures the thread that
created it, which /proc does not tell: one is only accepted in a
single-threaded process.
"""
from __future__ import annotations

import struct

from .errors import RestoreError, SysError, UnsupportedError
from .images import names, timers_pb2
from .sys import proc

ITIMERS = (0, 1, 2)                    # ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF
SIGEV_THREAD_ID = 4
CLOCK_THREAD_CPUTIME_ID = 3
PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_OFF, RESTORE_IDS_ON = 77, 0, 1
MAX_ID_GAP = 1 << 16                   # throw-away timers to close one gap, at most


def dump(pid: int, remote) -> timers_pb2.Timers:
    """Read every timer of `pid`; `remote` is a Remote in one of its threads, with scratch.
    A SIGEV_THREAD_ID timer's thread (notify_tid) is the engine's view of its TID (/proc's):
    the caller records it as the process sees it (dump.PidView)."""
    out = timers_pb2.Timers()
    buf = remote.scratch
    for which in ITIMERS:
        remote.syscall("getitimer", which, buf)
        isec, iusec, vsec, vusec = struct.unpack("<4q", remote.read(buf, 32))   # struct itimerval
        if vsec or vusec or isec or iusec:
            out.itimers.add(which=which, value_sec=vsec, value_usec=vusec, interval_sec=isec,
                            interval_usec=iusec)
    posix = proc.posix_timers(pid)
    if any(t.clockid == CLOCK_THREAD_CPUTIME_ID for t in posix) and len(proc.tids(pid)) > 1:
        raise UnsupportedError(f"process {pid} has a POSIX timer on CLOCK_THREAD_CPUTIME_ID and several "
                               "threads: which thread it measures cannot be read, so it cannot be restored")
    for t in posix:
        remote.syscall("timer_gettime", t.id, buf)
        isec, insec, vsec, vnsec = struct.unpack("<4q", remote.read(buf, 32))   # struct itimerspec
        overrun = remote.syscall("timer_getoverrun", t.id)
        out.posix.add(id=t.id, clockid=t.clockid, signo=t.signo, sigev_value=t.sigev_value,
                      notify=t.notify, notify_tid=t.notify_pid if t.notify & SIGEV_THREAD_ID else 0,
                      value_sec=vsec, value_nsec=vnsec, interval_sec=isec, interval_nsec=insec,
                      overrun=max(overrun, 0))
    return out


def write(img, pid: int, timers: timers_pb2.Timers) -> None:
    """Into the image being written (an imagedir.ImageWriter)."""
    img.messages(names.timers(pid), timers_pb2.Timers).add(timers)


def read(reader, pid: int) -> timers_pb2.Timers:
    """From an image (imagedir.ImageReader); an image without the file has no timers."""
    name = names.timers(pid)
    if not reader.has(name):
        return timers_pb2.Timers()
    msgs = reader.messages(name, timers_pb2.Timers)
    if len(msgs) != 1:
        from .errors import ImageError
        raise ImageError(f"{name} holds {len(msgs)} messages, expected 1")
    return msgs[0]


def restore(remote, timers: timers_pb2.Timers) -> None:
    """Recreate and arm every timer, by syscalls injected through `remote` (with scratch).

    Call it once every thread of the process exists (SIGEV_THREAD_ID timers name one).
    """
    buf = remote.scratch
    for it in timers.itimers:
        vsec, vusec = it.value_sec, it.value_usec
        if not (vsec or vusec):
            # Expired with its signal still pending: the kernel re-arms it when the signal
            # is taken.  Zero would disarm it; the next period is what it would get.
            vsec, vusec = it.interval_sec, it.interval_usec
        remote.write(buf, struct.pack("<4q", it.interval_sec, it.interval_usec, vsec, vusec))
        remote.syscall("setitimer", it.which, buf, 0)
    if not timers.posix:
        return
    by_id = sorted(timers.posix, key=lambda t: t.id)
    explicit = _restore_ids(remote, True)
    try:
        for t in by_id:
            _create(remote, t, explicit)
    finally:
        if explicit:
            _restore_ids(remote, False)
    for t in by_id:
        if t.value_sec or t.value_nsec:
            remote.write(buf, struct.pack("<4q", t.interval_sec, t.interval_nsec, t.value_sec, t.value_nsec))
            remote.syscall("timer_settime", t.id, 0, buf, 0)


def _restore_ids(remote, on: bool) -> bool:
    try:
        remote.syscall("prctl", PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_ON if on else RESTORE_IDS_OFF)
        return True
    except SysError:
        if on:
            return False           # before Linux 6.16: sequential ids
        raise


def _sigevent(t: timers_pb2.PosixTimer) -> bytes:
    # struct sigevent (64 bytes): sigev_value, sigev_signo, sigev_notify, then the
    # union whose first int is sigev_notify_thread_id.
    return struct.pack("<Qiii", t.sigev_value, t.signo, t.notify, t.notify_tid).ljust(64, b"\0")


def _create(remote, t: timers_pb2.PosixTimer, explicit: bool) -> None:
    buf = remote.scratch
    idp = buf + 64
    remote.write(buf, _sigevent(t))
    for _ in range(MAX_ID_GAP + 1):
        remote.write(idp, struct.pack("<i", t.id))     # read by timer_create in explicit mode
        try:
            remote.syscall("timer_create", t.clockid, buf, idp)
        except SysError as e:
            raise RestoreError(f"timer_create for POSIX timer {t.id} (clock {t.clockid}, signal {t.signo}) "
                               f"failed: {e}") from None
        got = struct.unpack("<i", remote.read(idp, 4))[0]
        if got == t.id:
            return
        if explicit or got > t.id:
            break
        remote.syscall("timer_delete", got)            # below the wanted id: burn it
    raise RestoreError(f"POSIX timer {t.id} came back with id {got}: the process knows its timers by id, "
                       "and this kernel could not give that one back")
