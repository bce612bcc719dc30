"""Exceptions raised by the engine.  Each says who raises it.

All derive from :class:`EngineError`, so callers can catch one type; the
message is written for the user: what happened, which object, what fixes it.
"""
from __future__ import annotations

import errno as _errno
import os


class NbcheckpointError(Exception):
    """Base class of every error nbcheckpoint raises on purpose (engine, store, shim, kernel
    side); here because the engine imports nothing above it."""


class EngineError(NbcheckpointError):
    """Base class of every error the engine raises on purpose."""


class SysError(EngineError, OSError):
    """A system call or ptrace request failed.

    Raised by ``engine.sys`` (the chokepoint in ``sys/libc.py`` and
    ``sys/ptrace.py``); carries ``errno``, the ``request`` name and ``pid``.
    As ``OSError`` does, ``SysError(errno, ...)`` builds the typed subclass for that
    errno (:class:`ProcessGone`, :class:`AccessDenied`), so callers catch what they mean.
    """

    def __new__(cls, err: int = 0, *args, **kwargs):
        if cls is SysError:
            cls = _TYPED.get(err, SysError)
        return OSError.__new__(cls)

    def __init__(self, err: int, request: str, pid: int | None = None, detail: str = ""):
        self.errno = err
        self.request = request
        self.pid = pid
        where = f" (pid {pid})" if pid is not None else ""
        name = _errno.errorcode.get(err, str(err))
        msg = f"{request}{where} failed: {name} ({os.strerror(err)})"
        if detail:
            msg += f": {detail}"
        OSError.__init__(self, err, msg)
        self.strerror = msg

    def __str__(self) -> str:
        return self.strerror


class ProcessGone(SysError, ProcessLookupError):
    """The process or thread a request was about no longer exists (ESRCH)."""


class AccessDenied(SysError, PermissionError):
    """The kernel refused the request for lack of privilege (EPERM, EACCES)."""


_TYPED = {_errno.ESRCH: ProcessGone, _errno.EPERM: AccessDenied, _errno.EACCES: AccessDenied}


class UnsupportedError(EngineError):
    """The dump met an object the engine cannot save.

    Raised by the dump phases (``files``, ``mm``, ``seize``); the message names
    the process, the fd or address, and the kind.  The target is left running.
    """


class ImageError(EngineError):
    """An image is missing, truncated, corrupted, of another version or not ours.

    Raised by ``images`` readers and by restore's verification phase, before any
    process is created.
    """


class RestoreError(EngineError):
    """Restore cannot proceed (PID taken, a file changed since the dump ...).

    Raised by ``restore``; when raised no restored process is left behind.
    """


class LazyError(EngineError):
    """A lazy restore's page server could not go on (a damaged block of page data, an
    unexpected kernel error).

    Raised by ``lazy.PageServer.serve``; the restored tree has been killed by then, before
    any of its processes could read a wrong page.
    """


class DumpError(EngineError):
    """The dump failed for a reason other than an unsupported object.

    Raised by ``dump``; the target is left running as it was.
    """
