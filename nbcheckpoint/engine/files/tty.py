"""Pseudo-terminals: pty masters (/dev/ptmx), slaves (/dev/pts/N), /dev/tty, shell jobs; what
is saved and how it comes back: docs/engine.md, "Terminals".

One ``TtyFile`` per open file description, the pair's ``TtyState`` repeated in each.  The
slave's termios are read as ``struct termios2`` by TCGETS2 on the master (it reaches the
slave's), so odd speeds (BOTHER) survive.  Queued data is read and at once written back with
processing off (``_DumpState._save_data``): the live pty stays as it was.

Restore: Linux hands out the lowest free pty index and cannot be asked for one, so the master
is opened through the recorded ``ptmx_path`` until index N comes (:func:`_alloc_master`), the
slaves by TIOCGPTPEER (the master's devpts, wherever it is mounted).  A controlling terminal
is inherited at fork and acquired only by a session leader, so the leader takes it (TIOCSCTTY)
before it forks its session's members: :func:`after_setsid`, in each stub right after
``pstree.make_sessions`` (restore.py).  ``after_place`` sets the foreground group and turns
restored ``/dev/tty`` descriptions back into opens of /dev/tty.  A shell job's slaves
(``--shell-job``: their master was outside the tree) are external, ``tty[RDEV:DEV]``, and
attached to the terminal handed in with --inherit-fd, else to our stdin if it is a terminal,
else to our /dev/tty (:func:`_default_terminal`).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import stat
import struct
import termios
import time

from ..errors import DumpError, ImageError, RestoreError, SysError, UnsupportedError
from ..images import files_pb2, names, pstree_pb2, tty_pb2
from ..sys import proc, userns
from ..sys.fd import Fd
from ..sys.ioctl import get_int, ioctl, ioctl_buf, set_int
from .kind import FileKind, set_status_flags

log = logging.getLogger(__name__)

# ioctls (asm-generic/ioctls.h)
TCGETS2 = 0x802C542A
TCSETS2 = 0x402C542B
TIOCSCTTY = 0x540E
TIOCGPGRP = 0x540F
TIOCSPGRP = 0x5410
TIOCGWINSZ = 0x5413
TIOCSWINSZ = 0x5414
FIONREAD = 0x541B
TIOCPKT = 0x5420
TIOCGSID = 0x5429
TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431
TIOCGPKT = 0x80045438
TIOCGPTLCK = 0x80045439
TIOCGPTPEER = 0x5441

PTY_SLAVE_MAJORS = range(136, 144)          # UNIX98_PTY_SLAVE_MAJOR .. + 7
TTYAUX_MAJOR = 5                            # /dev/tty (5:0), /dev/console (5:1), /dev/ptmx (5:2)
N_TTY_BUF_SIZE = 4096
_SETFL = os.O_APPEND | os.O_NONBLOCK
TERMIOS2 = struct.Struct("=IIII B 19s II")  # iflag oflag cflag lflag line cc[19] ispeed ospeed
WINSIZE = struct.Struct("HHHH")
_SETTLE = 0.003                             # a pty's flip buffers reach the line discipline by a work item

_IN_RAW_IFLAG = (termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR
                 | termios.IGNCR | termios.ICRNL | termios.IUCLC)
_IN_RAW_LFLAG = (termios.ECHO | termios.ECHOE | termios.ECHOK | termios.ECHONL | termios.ISIG
                 | termios.IEXTEN | termios.ECHOCTL | termios.ECHOKE)


# ----------------------------------------------------------------------------- small helpers

def _fionread(fd: int) -> int:
    return get_int(fd, FIONREAD, "FIONREAD")


def slave_rdev(index: int) -> int:
    return os.makedev(PTY_SLAVE_MAJORS.start + index // 256, index % 256)


def _slave_index(rdev: int) -> int:
    return (os.major(rdev) - PTY_SLAVE_MAJORS.start) * 256 + os.minor(rdev)


def _no_processing(t2: bytes) -> bytes:
    """termios2 with input processing, echo, signals and output processing off; ICANON
    and IXON unchanged (toggling ICANON completes a partial line; toggling IXON posts
    packet-mode status bytes)."""
    i, o, c, lf, line, cc, isp, osp = TERMIOS2.unpack(t2)
    return TERMIOS2.pack(i & ~_IN_RAW_IFLAG, o & ~termios.OPOST, c, lf & ~_IN_RAW_LFLAG, line, cc, isp, osp)


def _canonical(t2: bytes) -> bool:
    return bool(TERMIOS2.unpack(t2)[3] & termios.ICANON)


def _write_all(fd: int, data: bytes, what: str) -> None:
    """Non-blocking (a full line discipline waits for a reader that is not there), 5 s at most."""
    view = memoryview(data)
    deadline = time.monotonic() + 5
    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
    try:
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SysError(errno.EAGAIN, f"write {what}", None,
                                   f"{len(view)} of {len(data)} bytes left") from None
                time.sleep(_SETTLE)
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, fl)


def _wait_queued(fd: int, want: int) -> None:
    """Until the line discipline behind fd holds `want` bytes (its buffer holds at most
    N_TTY_BUF_SIZE - 1; the rest waits in flip buffers, which is fine)."""
    want = min(want, N_TTY_BUF_SIZE - 1)
    deadline = time.monotonic() + 2
    while _fionread(fd) < want and time.monotonic() < deadline:
        time.sleep(_SETTLE)


def _drain(fd: int, packet: bool = False) -> bytes:
    """Everything queued for reading on fd (blocking or not: we only read what FIONREAD
    says is there), waiting a moment for flip buffers still on their way."""
    out = bytearray()
    idle = 0
    while idle < 3:
        n = _fionread(fd)
        if n <= 0:
            idle += 1
            time.sleep(_SETTLE)
            continue
        idle = 0
        try:
            data = os.read(fd, n + 1 if packet else n)
        except BlockingIOError:
            continue
        if packet:
            if not data or data[0] != 0:     # a status byte (TIOCPKT_FLUSH...), not data
                continue
            data = data[1:]
        out += data
    return bytes(out)


# ----------------------------------------------------------------------------- dump

class _DumpPair:
    """A pty pair as the tree holds it."""

    def __init__(self, key: tuple[int, int]):
        self.key = key                      # (devpts st_dev, index)
        self.masters: list[tuple[int, int]] = []     # (pid, fd)
        self.slaves: list[tuple[int, int]] = []
        self.ptmx_path = ""
        self.pts_dir = ""
        self.state: tty_pb2.TtyState | None = None

    @property
    def index(self) -> int:
        return self.key[1]

    @property
    def external(self) -> bool:
        return not self.masters


class _DumpState:
    """Per dump: every terminal fd of the frozen tree, the pairs, the sessions."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.tree = set(ctx.tree)
        self.separate = _ns(next(iter(ctx.tree))) != _ns("self")
        self.fdmap: dict[tuple[int, int], tuple[int, tuple[int, int] | None]] = {}   # (pid, fd) -> (type, pair)
        self.pairs: dict[tuple[int, int], _DumpPair] = {}
        self.procs: dict[int, tuple[int, int, int, int]] = {}     # pid -> (pgid, sid, tty_nr, tpgid)
        for p in sorted(self.tree):
            st = proc.stat(p)
            self.procs[p] = (int(st[5]), int(st[6]), int(st[7]), int(st[8]))
            self._scan(p, [t for t in ctx.tree[p] if t.kind == files_pb2.TTY])
        internal = {(k[0], slave_rdev(k[1])) for k, x in self.pairs.items() if not x.external}
        self.outside = _holders_outside(self.tree, internal) if internal else {}
        for pair in self.pairs.values():
            pair.state = self._pair_state(pair)
        self._check_cttys()

    # -- what the tree holds

    def _scan(self, p: int, ttys: list) -> None:
        for fd, _kind, s, link in ttys:
            major, minor = os.major(s.st_rdev), os.minor(s.st_rdev)
            if major in PTY_SLAVE_MAJORS:
                pair = self._pair((s.st_dev, _slave_index(s.st_rdev)))
                pair.slaves.append((p, fd))
                if not pair.pts_dir:
                    pair.pts_dir = os.path.dirname(link)
                self.fdmap[(p, fd)] = (tty_pb2.PTY_SLAVE, pair.key)
            elif (major, minor) == (TTYAUX_MAJOR, 2):
                info = proc.fdinfo(p, fd)
                if "tty-index" in info:
                    index = int(info["tty-index"])
                else:
                    with Fd(self.ctx.getfd(p, fd)) as dup:
                        index = get_int(dup.fileno(), TIOCGPTN, "TIOCGPTN", p)
                pts_dir, devpts = _master_devpts(p, fd, link, index)
                pair = self._pair((devpts, index))
                pair.masters.append((p, fd))
                pair.ptmx_path = pair.ptmx_path or link
                pair.pts_dir = pts_dir
                self.fdmap[(p, fd)] = (tty_pb2.PTY_MASTER, pair.key)
            elif (major, minor) == (TTYAUX_MAJOR, 0):
                self.fdmap[(p, fd)] = (tty_pb2.CTTY, None)      # resolved by the process's ctty

    def _pair(self, key) -> _DumpPair:
        return self.pairs.setdefault(key, _DumpPair(key))

    def v(self, host_pid: int) -> int:
        """A pid as the tree's processes see it (they may live in their own PID namespace)."""
        if not self.separate or host_pid <= 0:
            return host_pid
        try:
            return int(proc.status(host_pid)["NSpid"].split()[-1])
        except SysError:
            return 0                        # gone

    # -- the state of each pair

    def _pair_state(self, pair: _DumpPair) -> tty_pb2.TtyState:
        name = f"/dev/pts/{pair.index}" if not pair.pts_dir else f"{pair.pts_dir}/{pair.index}"
        if pair.external:
            return self._external_state(pair, name)
        mp, mfd = pair.masters[0]
        st = tty_pb2.TtyState()
        m = self.ctx.getfd(mp, mfd)
        try:
            _get_termios(st, m, mp)
            st.locked = bool(get_int(m, TIOCGPTLCK, "TIOCGPTLCK", mp))
            st.packet = bool(get_int(m, TIOCGPKT, "TIOCGPKT", mp))
            po = select.poll()
            po.register(m, select.POLLIN)
            hup = any(ev & select.POLLHUP for _, ev in po.poll(0))
            st.slave_closed = hup and not pair.slaves
            sid = _opt_int(m, TIOCGSID, "TIOCGSID", mp)
            if sid:
                if sid not in self.tree:
                    raise UnsupportedError(
                        f"process {mp}: fd {mfd} is the master of pty {name}, which is the controlling "
                        f"terminal of session {sid} ({_describe(sid)}), whose leader is outside the "
                        "checkpointed tree; checkpoint that session's leader too")
                st.session = self.v(sid)
                st.fg_pgrp = self.v(_opt_int(m, TIOCGPGRP, "TIOCGPGRP", mp))
            outside = self.outside.get((pair.key[0], slave_rdev(pair.index)))
            if outside:
                op, ofd = outside
                raise UnsupportedError(
                    f"process {mp}: fd {mfd} is the master of pty {name}, whose slave is open in process "
                    f"{op} ({_describe(op)}, fd {ofd}) outside the checkpointed tree; checkpoint that "
                    "process too, or close the slave there")
            self._save_data(pair, m, st, name)
        finally:
            os.close(m)
        return st

    def _external_state(self, pair: _DumpPair, name: str) -> tty_pb2.TtyState:
        sp, sfd = pair.slaves[0]
        users = [p for p, (_, _, tty_nr, _) in self.procs.items() if tty_nr == slave_rdev(pair.index)]
        if not self.ctx.options.shell_job:
            leader = self.procs[users[0]][1] if users else 0
            who = (f"; its session leader {leader} ({_describe(leader)}) is outside too"
                   if leader and leader not in self.tree else "")
            raise UnsupportedError(
                f"process {sp}: fd {sfd} is the terminal {name}, whose pty master is outside the "
                f"checkpointed tree{who}: it runs under a shell or terminal emulator. Dump (and "
                "restore) with --shell-job to checkpoint it as a shell job, restored onto another terminal")
        st = tty_pb2.TtyState()
        with Fd(self.ctx.getfd(sp, sfd)) as s:
            _get_termios(st, s.fileno(), sp)
        if users:
            _, sid, _, tpgid = self.procs[users[0]]
            st.session = self.v(sid)
            st.session_outside = sid not in self.tree
            st.fg_pgrp = self.v(tpgid) if tpgid in self.tree else 0
        return st

    def _save_data(self, pair: _DumpPair, m: int, st: tty_pb2.TtyState, name: str) -> None:
        """Queued data in both directions, read and written straight back (see the module doc)."""
        t2 = st.termios2
        out_n = _fionread(m)
        in_n = 0
        slave = None
        if pair.slaves:
            sp, sfd = pair.slaves[0]
            try:
                slave = os.open(f"/proc/{sp}/fd/{sfd}", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                raise DumpError(f"process {sp}: cannot open its fd {sfd} ({name}) to read queued input: "
                                f"{e.strerror}") from None
        try:
            if slave is not None:
                in_n = _fionread(slave)
                if in_n and _canonical(t2):
                    log.warning("%s: %d bytes of input typed ahead in canonical mode are not saved", name, in_n)
                    in_n = 0
            if not out_n and not in_n:
                return
            if out_n and slave is None:
                slave = _peer(m, os.O_RDWR | os.O_NONBLOCK, st.locked)
            _set_termios(m, _no_processing(t2))
            try:
                if in_n:
                    st.in_data = _drain(slave)
                if out_n:
                    st.out_data = _drain(m, st.packet)
                # ... and back, with processing off: the live pty is as it was
                if st.in_data:
                    _write_all(m, st.in_data, f"{name} (master)")
                    _wait_queued(slave, len(st.in_data))
                if st.out_data:
                    _write_all(slave, st.out_data, name)
                    _wait_queued(m, len(st.out_data))
            finally:
                _set_termios(m, t2)
        finally:
            if slave is not None:
                os.close(slave)

    def _check_cttys(self) -> None:
        """Every controlling terminal of the tree is one of its pairs, or a shell job's."""
        slaves = {slave_rdev(k[1]) for k in self.pairs}
        for p, (_, sid, tty_nr, _) in self.procs.items():
            if not tty_nr or tty_nr in slaves or self.ctx.options.shell_job:
                continue
            raise UnsupportedError(
                f"process {p}: its controlling terminal ({_tty_name(tty_nr)}) is outside the checkpointed "
                f"tree (its session leader is {sid}, {_describe(sid)}): it runs under a shell or terminal "
                "emulator. Dump (and restore) with --shell-job to checkpoint it as a shell job")

    def ctty_pair(self, p: int) -> _DumpPair | None:
        _, sid, tty_nr, _ = self.procs.get(p, (0, 0, 0, 0))
        cands = [x for x in self.pairs.values() if slave_rdev(x.index) == tty_nr]
        cands.sort(key=lambda x: x.state.session != self.v(sid))
        return cands[0] if cands else None


def _ns(pid) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


def _opt_int(fd: int, req: int, name: str, pid: int) -> int:
    """An int-returning ioctl that says ENOTTY when there is nothing to say (no session)."""
    try:
        return get_int(fd, req, name, pid)
    except SysError as e:
        if e.errno in (errno.ENOTTY, errno.EIO):
            return 0
        raise


def _describe(pid: int) -> str:
    try:
        return repr(proc.stat(pid)[2])
    except SysError:
        return "gone"


def _tty_name(rdev: int) -> str:
    if os.major(rdev) in PTY_SLAVE_MAJORS:
        return f"/dev/pts/{_slave_index(rdev)}"
    return f"tty {os.major(rdev)}:{os.minor(rdev)}"


def _master_devpts(p: int, fd: int, link: str, index: int) -> tuple[str, int]:
    """(slave directory, devpts st_dev) of a master opened as `link` by process p.  The kernel
    finds the devpts of a ptmx node that lives on a devpts in that directory, else in the
    "pts" next to it; the slave's node there must have the pair's rdev."""
    root = f"/proc/{p}/root"
    d = os.path.dirname(link)
    for cand in (d, os.path.join(d, "pts")):
        try:
            s = os.stat(f"{root}{cand}/{index}")
        except OSError:
            continue
        if stat.S_ISCHR(s.st_mode) and s.st_rdev == slave_rdev(index):
            return cand, s.st_dev
    raise UnsupportedError(f"process {p}: fd {fd} is a pty master ({link}, index {index}) whose slave is "
                           f"in neither {d}/ nor {d}/pts/ as the process sees them; cannot tell its devpts")


def _holders_outside(tree: set[int], wanted: set[tuple[int, int]]) -> dict[tuple[int, int], tuple[int, int]]:
    """{(devpts st_dev, slave rdev): (pid, fd)} for the wanted slaves open outside the tree
    (the engine's own fds are its transient duplicates)."""
    out: dict[tuple[int, int], tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in tree or int(name) == os.getpid():
            continue
        try:
            fds = proc.fd_stats(int(name))
        except SysError:
            continue
        for fd, s in fds:
            key = (s.st_dev, s.st_rdev)
            if key in wanted and stat.S_ISCHR(s.st_mode):
                out.setdefault(key, (int(name), fd))
    return out


def _peer(master: int, flags: int, locked: bool) -> int:
    """A new description of the slave, via the master (its devpts, wherever mounted)."""
    if locked:
        set_int(master, TIOCSPTLCK, "TIOCSPTLCK", 0)
    try:
        return ioctl(master, TIOCGPTPEER, "TIOCGPTPEER", flags | os.O_NOCTTY | os.O_CLOEXEC)
    finally:
        if locked:
            set_int(master, TIOCSPTLCK, "TIOCSPTLCK", 1)


def _get_termios(st: tty_pb2.TtyState, fd: int, pid: int) -> None:
    st.termios2 = ioctl_buf(fd, TCGETS2, "TCGETS2", TERMIOS2.size, pid)
    ws = ioctl_buf(fd, TIOCGWINSZ, "TIOCGWINSZ", WINSIZE.size, pid)
    st.rows, st.cols, st.xpixel, st.ypixel = WINSIZE.unpack(ws)


def _set_termios(fd: int, t2: bytes) -> None:
    ioctl_buf(fd, TCSETS2, "TCSETS2", t2)


def _dump(ctx, pid: int, fd: int, s: os.stat_result, link: str, info: dict, entry: files_pb2.FileEntry) -> None:
    major, minor = os.major(s.st_rdev), os.minor(s.st_rdev)
    if major not in PTY_SLAVE_MAJORS and (major, minor) not in ((TTYAUX_MAJOR, 0), (TTYAUX_MAJOR, 2)):
        raise UnsupportedError(f"process {pid}: fd {fd} is the terminal {link} (character device "
                               f"{major}:{minor}); only pseudo-terminals (/dev/ptmx, /dev/pts/N, /dev/tty "
                               "on one) can be checkpointed")
    st = ctx.state(KIND)
    typ, key = st.fdmap[(pid, fd)]      # prepare saw every tty fd of the frozen tree (none is in flight)
    if typ == tty_pb2.CTTY:
        pair = st.ctty_pair(pid)
        if pair is None:
            tty_nr = st.procs.get(pid, (0, 0, 0, 0))[2]
            if not tty_nr:
                raise UnsupportedError(f"process {pid}: fd {fd} is /dev/tty, but the process has no controlling "
                                       "terminal any more; close that fd before checkpointing")
            raise UnsupportedError(f"process {pid}: fd {fd} is /dev/tty, its controlling terminal "
                                   f"{_tty_name(tty_nr)}, of which the tree holds no other fd; this version "
                                   "cannot checkpoint that")
    else:
        pair = st.pairs[key]
    entry.tty.CopyFrom(tty_pb2.TtyFile(
        type=typ, master=typ == tty_pb2.PTY_MASTER, path=link, index=pair.index, rdev=slave_rdev(pair.index),
        devpts_dev=pair.key[0], pts_dir=pair.pts_dir, ptmx_path=pair.ptmx_path, external=pair.external,
        state=pair.state))


# ----------------------------------------------------------------------------- restore

def _key(f: files_pb2.FileEntry) -> tuple[int, int]:
    return (f.tty.devpts_dev, f.tty.index)


class _RestoreState:
    """Per restore: what the pairs became, which sessions map where, what is done."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.ident: dict[tuple[int, int], dict] = {}      # pair key -> identity of the restored tty
        self.sidmap: dict[int, int] = {}                 # image sid -> the restored session's leader
        self.fg_done: set[tuple[int, int]] = set()
        self.termios_done: set[tuple[int, int]] = set()
        self.default_terminal = ""                      # a shell job's (_default_terminal)
        self._pids: set[int] | None = None

    def pids(self) -> set[int]:
        """The image's processes."""
        if self._pids is None:
            self._pids = {p.pid for p in self.ctx.reader.messages(names.PSTREE, pstree_pb2.Process)}
        return self._pids

    def terminals(self) -> dict[tuple[int, int], files_pb2.FileEntry]:
        out = {}
        for f in self.ctx.files.values():
            if f.kind == files_pb2.TTY:
                out.setdefault(_key(f), f)
        return out


def _check(ctx, pid: int, fde, f: files_pb2.FileEntry) -> None:
    t = f.tty
    if t.state.termios2 and len(t.state.termios2) != TERMIOS2.size:
        raise ImageError(f"file {f.id}: termios of {t.path} are {len(t.state.termios2)} bytes, "
                         f"expected {TERMIOS2.size}")
    if not t.external or ctx.inherited(f) is not None:
        return
    if not ctx.options.shell_job:
        raise RestoreError(f"process {pid}: fd {fde.fd} was the terminal {t.path} of a shell job (its pty master "
                           "was outside the image); restore with --shell-job to attach it to this terminal, "
                           f"or hand one in with --inherit-fd fd[N]:{external_key(f)}")
    _default_terminal(ctx, external_key(f))


def _default_terminal(ctx, key: str = "tty[RDEV:DEV]") -> str:
    """The terminal a shell job is attached to: our stdin if a terminal, else our controlling tty."""
    st = ctx.state(KIND)
    if st.default_terminal:
        return st.default_terminal
    if os.isatty(0):
        path = os.ttyname(0)
    else:
        try:
            fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            raise RestoreError("the image is a shell job (--shell-job) and this restore has no terminal to "
                               "attach it to: run it from a terminal, or hand one in with --inherit-fd "
                               f"fd[N]:{key}") from None
        try:
            path = os.ttyname(fd)
        finally:
            os.close(fd)
    st.default_terminal = path
    return path


def _open(ctx, f: files_pb2.FileEntry) -> int:
    if f.tty.external:
        return _open_external(ctx, f)
    key = _key(f)
    group = [e for e in ctx.files.values()
             if e.kind == files_pb2.TTY and _key(e) == key and (e.id == f.id or e.id not in ctx.opened)]
    return ctx.open_group(f, group, lambda made: _open_pair(ctx, f, group, made))


def _open_external(ctx, f: files_pb2.FileEntry) -> int:
    path = _default_terminal(ctx, external_key(f))
    try:
        fd = os.open(path, (f.flags & (os.O_ACCMODE | os.O_NONBLOCK)) | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise RestoreError(f"cannot open the terminal {path} to attach the shell job to: {e.strerror}") from None
    set_status_flags(fd, f.flags, _SETFL)
    return fd


def wants_private_devpts(ctx) -> bool:
    """The image has a pty whose master is in the tree, on the usual /dev/pts, and no terminal
    outside it (a --shell-job's, reached through the host's /dev/pts): a devpts instance of the
    restore's own gives every pty its old index (sys/mountns.py)."""
    ttys = [f.tty for f in ctx.files.values() if f.kind == files_pb2.TTY]
    usual = lambda t: t.pts_dir in ("", "/dev/pts") and t.ptmx_path in ("", "/dev/ptmx", "/dev/pts/ptmx")  # noqa: E731
    return (any(t.type == tty_pb2.PTY_MASTER for t in ttys) and not any(t.external for t in ttys)
            and all(usual(t) for t in ttys if t.type in (tty_pb2.PTY_MASTER, tty_pb2.PTY_SLAVE)))


def _alloc_master(path: str, want: int) -> int:
    """A master with index `want` if it is free (the kernel hands out the lowest free one:
    open and hold until it comes), else the lowest free one."""
    held: list[int] = []
    try:
        while True:
            try:
                m = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            except OSError as e:
                if held:
                    break                 # out of ptys: the lowest one we hold will do
                raise RestoreError(f"cannot open {path} to create pty {want}: {e.strerror}") from None
            idx = get_int(m, TIOCGPTN, "TIOCGPTN")
            if idx == want:
                return m
            held.append(m)
            if idx > want or len(held) > 4096:
                break
        return held.pop(0)
    finally:
        for fd in held:
            os.close(fd)


def _open_pair(ctx, f: files_pb2.FileEntry, group, made: dict[int, int]) -> None:
    t, s = f.tty, f.tty.state
    masters = [e for e in group if e.tty.type == tty_pb2.PTY_MASTER]
    slaves = [e for e in group if e.tty.type != tty_pb2.PTY_MASTER]
    if len(masters) != 1:
        # one open of ptmx is one pty: a pair has exactly one master description
        raise ImageError(f"pty {t.index}: the image has {len(masters)} master descriptions of it "
                         "(expected one: its slave is not external)")
    ptmx = t.ptmx_path or (f"{t.pts_dir}/ptmx" if t.pts_dir else "/dev/ptmx")
    m = _alloc_master(ptmx, t.index)
    made[masters[0].id] = m
    index = get_int(m, TIOCGPTN, "TIOCGPTN")
    pts_dir = t.pts_dir or "/dev/pts"
    if index != t.index:
        log.warning("pty %s/%d is taken; restored as %s/%d", pts_dir, t.index, pts_dir, index)
    need_peer = bool(slaves) or s.slave_closed
    if need_peer:
        set_int(m, TIOCSPTLCK, "TIOCSPTLCK", 0)
    for e in slaves:
        made[e.id] = ioctl(m, TIOCGPTPEER, "TIOCGPTPEER", (e.flags & os.O_ACCMODE) | os.O_NOCTTY | os.O_CLOEXEC)
    tmp = None
    try:
        if need_peer and (s.slave_closed or s.in_data or s.out_data):
            tmp = ioctl(m, TIOCGPTPEER, "TIOCGPTPEER", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        if s.termios2:
            if tmp is not None and (s.in_data or s.out_data):
                # back into the queues with processing and echo off, then the real termios
                _set_termios(m, _no_processing(s.termios2))
                if s.in_data:
                    _write_all(m, s.in_data, f"pty {index} (master)")
                if s.out_data:
                    _write_all(tmp, s.out_data, f"pty {index}")
                    _wait_queued(m, len(s.out_data))
                if s.in_data:
                    _wait_queued(tmp, len(s.in_data))
            _set_termios(m, s.termios2)
        if s.rows or s.cols or s.xpixel or s.ypixel:
            ioctl_buf(m, TIOCSWINSZ, "TIOCSWINSZ", WINSIZE.pack(s.rows, s.cols, s.xpixel, s.ypixel))
        if s.packet:
            set_int(m, TIOCPKT, "TIOCPKT", 1)
    finally:
        if tmp is not None:
            os.close(tmp)             # with no other slave open, the master now reads EIO: a dead peer
    if s.locked:
        set_int(m, TIOCSPTLCK, "TIOCSPTLCK", 1)
    for e in group:
        set_status_flags(made[e.id], e.flags, _SETFL)
    pst = os.fstat(m)
    ident = dict(index=index, rdev=slave_rdev(index), devpts=None, ptmx=(pst.st_dev, pst.st_ino),
                 path=f"{pts_dir}/{index}")
    if slaves:
        ident["devpts"] = os.fstat(made[slaves[0].id]).st_dev
        ident["path"] = os.readlink(f"/proc/self/fd/{made[slaves[0].id]}")
    ctx.state(KIND).ident[_key(f)] = ident


def _find_in(pid: int, ident: dict) -> int | None:
    """An fd of process `pid` on the restored pair (slave, or master), for an injected ioctl."""
    try:
        fds = proc.fd_stats(pid)
    except SysError:
        return None
    master = None
    for fd, s in fds:
        if not stat.S_ISCHR(s.st_mode):
            continue
        if s.st_rdev == ident["rdev"] and ident.get("devpts") in (None, s.st_dev):
            return fd
        if ident.get("ptmx") == (s.st_dev, s.st_ino) and master is None:
            try:
                if int(proc.fdinfo(pid, fd).get("tty-index", -1)) == ident["index"]:
                    master = fd
            except SysError:
                pass                        # closed meanwhile
    return master


def _ext_ident(ctx, f: files_pb2.FileEntry) -> dict:
    """The identity of the terminal a shell job's entry is restored onto."""
    fd = ctx.inherited(f)
    if fd is not None:
        s = os.fstat(fd)
        path = os.ttyname(fd) if os.isatty(fd) else ""
    else:
        path = _default_terminal(ctx)
        s = os.stat(path)
    return dict(index=-1, rdev=s.st_rdev, devpts=s.st_dev, ptmx=None, path=path)


def _ident(ctx, f: files_pb2.FileEntry) -> dict | None:
    st = ctx.state(KIND)
    key = _key(f)
    if key not in st.ident and f.tty.external:
        st.ident[key] = _ext_ident(ctx, f)
    return st.ident.get(key)


def after_setsid(ctx, stub, process) -> None:
    """Wire into restore._create_tree right after each ``pstree.make_sessions(stub, p)``.

    1. --shell-job: the image's root, whose session leader was outside the image,
       starts a session of its own (and ``process.sid``/``pgid`` are updated so that
       join_groups treats it as the leader it now is);
    2. a session leader whose session had a controlling terminal acquires it now
       (TIOCSCTTY on an fd it inherited from the engine, else on the slave opened by
       injection), before it forks the session's other members: they inherit it.
    Idempotent.
    """
    st = ctx.state(KIND)
    pid = process.pid
    if (ctx.options.shell_job and pid == ctx.reader.inventory.root_pid and process.sid != pid
            and process.sid not in st.pids()):
        joins = _joins_our_session(ctx)
        if not joins and proc.stat(stub.pid)[6] != str(stub.pid):
            stub.syscall("setsid")
        st.sidmap[process.sid] = pid
        outside_pgid = process.pgid not in st.pids()
        process.sid = pid
        if outside_pgid:
            process.pgid = pid
        if joins:
            stub.syscall("setpgid", 0, 0)       # a job of our session, in a group of its own
    if process.sid != pid:
        return
    for key, f in st.terminals().items():
        s = f.tty.state
        if not s.session or st.sidmap.get(s.session, s.session) != pid:
            continue
        ident = _ident(ctx, f)
        if ident is None or _has_ctty(stub.pid, ident):
            continue
        with stub.remote() as r:
            stub.ensure_scratch(r)
            fd = _find_in(stub.pid, ident)
            opened = None
            if fd is None:
                opened = fd = _remote_open(r, stub.scratch, ident["path"], os.O_RDWR | os.O_NOCTTY)
            try:
                _set_ctty(r, fd, f.tty.external, ident["path"], pid)
            finally:
                if opened is not None:
                    r.syscall("close", opened)


def _joins_our_session(ctx) -> bool:
    """A shell job restored onto the terminal we run on takes it from our session's leader
    (TIOCSCTTY's steal), which needs CAP_SYS_ADMIN: without root it joins our session instead,
    as a job of our shell's, in a process group of its own that becomes the foreground one
    (getsid() then names our session, outside its PID namespace: 0)."""
    if userns.privileged():
        return False
    for f in ctx.state(KIND).terminals().values():
        if f.tty.external and ctx.inherited(f) is None:
            try:
                with Fd(os.open(_default_terminal(ctx), os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)) as fd:
                    return get_int(fd.fileno(), TIOCGSID, "TIOCGSID") == os.getsid(0)
            except (OSError, SysError):
                return False                # not our controlling terminal
    return False


def _remote_open(r, scratch: int, path: str, flags: int) -> int:
    r.write(scratch + 2048, path.encode() + b"\0")
    return r.syscall("open", scratch + 2048, flags | os.O_CLOEXEC, 0)


def _set_ctty(r, fd: int, external: bool, path: str, pid: int) -> None:
    res = r.syscall("ioctl", fd, TIOCSCTTY, 0, check=False)
    if res == -errno.EPERM and external:
        # the caller's terminal is another session's controlling tty (the shell that ran
        # the restore): take it over, as the restored job is now that terminal's job
        res = r.syscall("ioctl", fd, TIOCSCTTY, 1, check=False)
    if res < 0:
        raise RestoreError(f"process {pid}: cannot make {path} its controlling terminal: "
                           f"TIOCSCTTY failed with {errno.errorcode.get(-res, -res)}")


def _has_ctty(host_pid: int, ident: dict) -> bool:
    try:
        return int(proc.stat(host_pid)[7]) == ident["rdev"]
    except SysError:
        return False                        # gone


def _after_place(ctx, remote, pid: int, fds, f: files_pb2.FileEntry) -> None:
    """With the process's fds in place: termios of a shell job's terminal, the controlling
    terminal of a leader (if after_setsid was not wired), the foreground process group,
    and /dev/tty descriptions reopened as /dev/tty."""
    st = ctx.state(KIND)
    key = _key(f)
    t, s = f.tty, f.tty.state
    mine = [e for e in fds if e.id == f.id]
    if not mine:
        return
    fd = mine[0].fd
    ident = _ident(ctx, f)
    if ident is None:
        return
    if t.external and s.termios2 and key not in st.termios_done:
        st.termios_done.add(key)
        remote.write(remote.scratch, s.termios2)
        remote.syscall("ioctl", fd, TCSETS2, remote.scratch)
    leader = st.sidmap.get(s.session, s.session) if s.session else 0
    if leader == pid and not _has_ctty(remote.pid, ident):
        _set_ctty(remote, fd, t.external, ident["path"], pid)
    if leader and key not in st.fg_done and _has_ctty(remote.pid, ident):
        fg = s.fg_pgrp
        if t.external and (not fg or fg == s.session or fg not in st.pids()):
            fg = leader
        fg = st.sidmap.get(fg, fg)
        if fg:
            remote.write(remote.scratch, struct.pack("i", fg))
            if remote.syscall("ioctl", fd, TIOCSPGRP, remote.scratch, check=False) == 0:
                st.fg_done.add(key)
    if t.type == tty_pb2.CTTY and _has_ctty(remote.pid, ident):
        # /dev/tty was restored as a description of the slave; now that the process has
        # its controlling terminal, make it /dev/tty again (dups keep sharing it)
        flags = (f.flags & (os.O_ACCMODE | _SETFL)) | os.O_NOCTTY
        new = _remote_open(remote, remote.scratch, "/dev/tty", flags)
        for e in mine:
            remote.syscall("dup3", new, e.fd, os.O_CLOEXEC if e.cloexec else 0)
        remote.syscall("close", new)


def external_key(f: files_pb2.FileEntry) -> str | None:
    """``tty[RDEV:DEV]`` (hex, as CRIU) for a shell job's terminal, for --inherit-fd."""
    if f.kind == files_pb2.TTY and f.tty.external:
        return f"tty[{f.tty.rdev:x}:{f.tty.devpts_dev:x}]"
    return None


class Tty(FileKind):
    """Dump state: _DumpState, made by prepare for every tree (the controlling terminals are
    checked even when no process holds a terminal fd); restore state: _RestoreState."""

    new_dump_state = staticmethod(_DumpState)
    new_restore_state = staticmethod(_RestoreState)
    dump = staticmethod(_dump)
    check = staticmethod(_check)
    open = staticmethod(_open)
    after_place = staticmethod(_after_place)
    external_key = staticmethod(external_key)

    def prepare(self, ctx, tree) -> None:
        ctx.state(self)

    def facts(self, f) -> dict:
        return dict(external=bool(f.tty.external))


KIND = Tty()
