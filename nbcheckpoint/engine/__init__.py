"""The checkpoint/restore engine.  Imports nothing from Jupyter.

Public API::

    dump(pid, images_dir, leave_running=False, progress=None, options=None) -> DumpStats
    restore(images_dir, progress=None, options=None) -> RestoreResult
    verify(images_dir, options=None, progress=None) -> (files, page bytes)
                                              # all of restore's checks, no process created
    show(images_dir) -> str

``progress``, when given, is called as ``progress(phase, done, total)``; a dump
reports ``frozen``, ``pages`` (bytes), ``no-snapshot`` (a process of a
leave-running dump could not be forked: it is copied while frozen),
``thawed`` (leave-running: the tree runs again while the image is written)
and ``sync``; verify reports ``verify`` (bytes of page data checked).
The restored process is a child of the calling process (reap it, or let the
CLI's ``--detach`` hand it to init).

With ``Options(pidns=True, lazy_pages=True)`` restore returns as soon as the tree
runs, and ``RestoreResult.lazy`` (a lazy.PageServer, or None when nothing was left
lazy) must then be served at once: ``res.lazy.serve(progress, stream_after=0)``
returns when every page is in (progress phase ``lazy pages``), raises LazyError
(tree killed) if it cannot go on.

Images are sealed with the caller's key (images/key.py; ``NBCHECKPOINT_KEY_FILE``):
dump creates the key if needed; restore, verify and show raise ImageError for an image
not sealed with it (docs/security.md).
"""
from .options import Options
from .errors import DumpError, EngineError, ImageError, LazyError, RestoreError, SysError, UnsupportedError
from .dump import DumpStats, dump
from .restore import RestoreResult, restore, verify
from .show import show

__all__ = [
    "dump", "restore", "verify", "show", "DumpStats", "RestoreResult", "Options",
    "EngineError", "DumpError", "RestoreError", "ImageError", "UnsupportedError", "SysError",
    "LazyError",
]
