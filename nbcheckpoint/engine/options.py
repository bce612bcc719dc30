"""Options of a dump or a restore.  Names follow CRIU's flags where the meaning is the same."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import EngineError


@dataclass
class Options:
    leave_running: bool = False     # --leave-running: the tree goes on after the dump
    ext_unix_sk: bool = False       # --ext-unix-sk: unix sockets with peers outside may be dumped
    # --ext-unix-sk=INO[=PATH] (seed 004): only the socket with inode INO (as dumped) may have
    # its peer outside; on restore it is reconnected to PATH instead of its peer's old name
    ext_unix_sk_inodes: dict[int, str | None] = field(default_factory=dict)
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

    def ext_unix_allowed(self, ino: int) -> bool:
        return bool(self.ext_unix_sk) or ino in self.ext_unix_sk_inodes

    def ext_unix_path(self, ino: int) -> str | None:
        return self.ext_unix_sk_inodes.get(ino)

    def add_ext_unix_sk(self, spec: str) -> None:
        """One --ext-unix-sk value: empty (every socket), or INO[=PATH][,INO[=PATH]...]."""
        if not spec:
            self.ext_unix_sk = True
            return
        for item in spec.split(","):
            m = re.fullmatch(r"(?:socket:\[)?(\d+)\]?(?:=(.+))?", item.strip())
            if not m:
                raise EngineError(f"bad --ext-unix-sk {item!r}: expected a socket inode, optionally with "
                                  "=PATH to reconnect it to, e.g. --ext-unix-sk=11890815")
            self.ext_unix_sk_inodes[int(m.group(1))] = m.group(2)

    @staticmethod
    def parse_inherit_fd(spec: str) -> tuple[str, int]:
        m = re.fullmatch(r"fd\[(\d+)\]:(.+)", spec)
        if not m:
            raise EngineError(f"bad --inherit-fd {spec!r}: expected fd[N]:KEY, e.g. fd[3]:socket:[12345]")
        return m.group(2), int(m.group(1))
