"""Options of a dump or a restore.  Names follow CRIU's flags where the meaning is the same."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import EngineError


@dataclass
class Options:
    leave_running: bool = False     # --leave-running: the tree goes on after the dump
    ext_unix_sk: bool = False       # --ext-unix-sk: unix sockets with peers outside may be dumped
    tcp_established: bool = False   # --tcp-established: dump/restore established TCP connections
    tcp_close: bool = False         # --tcp-close: restore connections to outside peers closed
    file_locks: bool = False        # --file-locks: dump and re-acquire file locks
    shell_job: bool = False         # --shell-job: session leader and tty master may be outside
    pidns: bool = False             # --pidns: restore into a new PID namespace (PIDs free there)
    # --lazy-pages: the tree runs before its big anonymous memory is in; the caller must
    # then call RestoreResult.lazy.serve() (lazy.py).  Needs a PID namespace.
    lazy_pages: bool = False
    # with --pidns: the namespace dies with the calling process (its init watches a pipe
    # to us) until RestoreResult.release() -- for a caller that owns the tree, like the
    # Jupyter shim
    lifeline: bool = False
    # leave-running dumps: copy private memory from a copy-on-write snapshot after the
    # thaw (snapshot.py); False copies it all while the tree is frozen (--no-snapshot)
    snapshot: bool = True
    # --inherit-fd fd[N]:KEY -- on restore, the object KEY (e.g. "socket:[1234]",
    # "pipe:[99]") is not recreated: the engine's fd N is used in its place.
    inherit_fd: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def parse_inherit_fd(spec: str) -> tuple[str, int]:
        m = re.fullmatch(r"fd\[(\d+)\]:(.+)", spec)
        if not m:
            raise EngineError(f"bad --inherit-fd {spec!r}: expected fd[N]:KEY, e.g. fd[3]:socket:[12345]")
        return m.group(2), int(m.group(1))
