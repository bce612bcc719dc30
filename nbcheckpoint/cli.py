"""The ``nbcheckpoint`` command.  Flags follow CRIU's where CRIU has one."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback

from . import engine
from .cli_progress import Progress
from .demo import run_demo
from .engine.errors import NbcheckpointError
from .engine.sys import waitstatus
from .engine.units import format_size


def _dump_summary(stats) -> str:
    return (f"dumped pid {stats.pid}: {stats.threads} threads, {stats.vmas} VMAs, "
            f"{format_size(stats.pages_bytes)} of pages, image {format_size(stats.image_bytes)}, "
            f"frozen {stats.frozen_seconds:.3f}s, total {stats.total_seconds:.2f}s")


def _options(args) -> engine.Options:
    o = engine.Options(leave_running=getattr(args, "leave_running", False),
                       snapshot=not getattr(args, "no_snapshot", False))
    for name in ("tcp_established", "tcp_close", "file_locks", "shell_job", "pidns", "lazy_pages"):
        setattr(o, name, getattr(args, name, False))
    for spec in getattr(args, "ext_unix_sk", None) or []:
        o.add_ext_unix_sk(spec)
    for spec in getattr(args, "inherit_fd", None) or []:
        key, fd = engine.Options.parse_inherit_fd(spec)
        o.inherit_fd[key] = fd
    return o


def _add_criu_options(p, restore: bool) -> None:
    """Options that CRIU spells the same way, meaning the same thing."""
    p.add_argument("--ext-unix-sk", nargs="?", const="", action="append", metavar="INO[=PATH]",
                   help="allow unix sockets whose peer is outside the tree (reconnected by path on restore); "
                        "=INO[,INO...] only those sockets (inodes as dumped), =INO=PATH on restore: "
                        "reconnect that one to PATH")
    p.add_argument("--tcp-established", action="store_true", help="checkpoint/restore established TCP connections")
    p.add_argument("--file-locks", action="store_true", help="checkpoint/restore file locks")
    p.add_argument("--shell-job", "-j", action="store_true",
                   help="the process was started from a shell: its session leader and terminal are outside")
    p.add_argument("--tcp-close", action="store_true",
                   help="restore connections to peers outside the tree closed (the process sees a reset); "
                        "on dump: save them without their state (needs no TCP_REPAIR)")
    if restore:
        p.add_argument("--pidns", action="store_true",
                       help="restore into a new PID namespace, where the image's PIDs are free")
        p.add_argument("--lazy-pages", action="store_true",
                       help="start the tree before its big anonymous memory is in; this command serves "
                            "those pages (first those the tree touches) until all are in (needs --pidns)")
        p.add_argument("--inherit-fd", action="append", metavar="fd[N]:KEY",
                       help="use our fd N in place of the object KEY (e.g. fd[3]:socket:[12345]); repeatable")


# --- subcommands -----------------------------------------------------------------
def cmd_dump(args) -> int:
    with Progress() as progress:
        stats = engine.dump(args.pid, args.images_dir, progress=progress, options=_options(args))
    print(_dump_summary(stats))
    return 0


def cmd_restore(args) -> int:
    with Progress() as progress:
        res = engine.restore(args.images_dir, progress=progress, options=_options(args))
    if args.pidfile:
        with open(args.pidfile, "w") as f:
            f.write(f"{res.pid}\n")
    if args.detach:
        print(res.pid, flush=True)
    if args.verbose:
        print(f"restored pid {res.pid} in {res.seconds:.2f}s", file=sys.stderr)
    if res.lazy is not None:
        # The tree runs already; it gets the rest of its memory from us (with -d too:
        # the pid is printed, and we exit once every page is in).
        t0 = time.monotonic()
        with progress:
            res.lazy.serve(progress=progress)
        if args.verbose:
            print(f"lazy pages: {format_size(res.lazy.done)} in {time.monotonic() - t0:.2f}s, "
                  f"{res.lazy.faults} faults served", file=sys.stderr)
    if args.detach:
        # We exit now; the restored child is reparented to init (or a subreaper).
        return 0
    # Like criu restore: stay its parent and exit with its status (with --pidns the
    # namespace's init is our child, and exits with the root's status).
    while True:
        try:
            _, status = os.waitpid(res.init_pid or res.pid, 0)
            break
        except InterruptedError:
            continue
    if args.shell_job:
        _take_terminal_back()
    return waitstatus.exit_code(status)


def _take_terminal_back() -> None:
    """A shell job restored onto our terminal was its foreground job: as a shell does, make our
    group the foreground one again once it is done (SIGTTOU ignored: we are in the background)."""
    from .engine.files.tty import TIOCGSID
    from .engine.sys.ioctl import get_int
    if not os.isatty(0):
        return
    old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        if get_int(0, TIOCGSID, "TIOCGSID") == os.getsid(0) and os.tcgetpgrp(0) != os.getpgrp():
            os.tcsetpgrp(0, os.getpgrp())
    except OSError:
        pass                    # not our session's terminal (any more)
    finally:
        signal.signal(signal.SIGTTOU, old)


def cmd_show(args) -> int:
    path = args.dir or args.images_dir
    if not path:
        args.parser.error("give the image directory (DIR or -D DIR)")
    print(engine.show(path))
    if args.verify:
        with Progress() as progress:
            files, pages = engine.verify(path, options=_options(args), progress=progress)
        print(f"verified: {files} files, {format_size(pages)} of page data, all checksums match")
    return 0


def cmd_unlock(args) -> int:
    """Let an image's outside TCP peers through again without restoring it (netlock.py)."""
    from .engine import netlock
    from .engine.images import imagedir
    path = args.dir or args.images_dir
    if not path:
        args.parser.error("give the image directory (DIR or -D DIR)")
    name = imagedir.ImageReader(path).inventory.network_lock
    if not name:
        print(f"{path} holds no network lock")
    elif netlock.unlock(name):
        print(f"removed the network lock {name}: the peers' packets pass again, the image's connections "
              "will be stale if it is restored")
    else:
        print(f"no network lock {name} on this machine (restored already, or taken elsewhere)")
    return 0


def cmd_check(args) -> int:
    from .engine.check import check, identity
    print(f"running as {identity()}")
    missing = 0
    for f in check():
        status = "OK" if f.ok else "MISSING"
        opt = "" if f.required else " (optional)"
        print(f"{status:<8} {f.name}{opt}: needed for {f.purpose} -- {f.detail}")
        missing += f.required and not f.ok
    print(f"{missing} required feature(s) missing" if missing else "all required features present")
    return 1 if missing else 0


def cmd_ls(args) -> int:
    from .store import Store
    st = Store(args.store)
    cks = st.list()
    if not cks:
        print(f"no checkpoints in {st.root}")
        why = st.untrusted()
        if why:
            print(f"nbcheckpoint: warning: {why}", file=sys.stderr)
        return 0
    print(f"{'NAME':<28} {'TAKEN':<19} {'SIZE':>10} {'FROZEN':>7}  {'PARENT':<20} NOTEBOOK")
    for c in cks:
        m = c.meta
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.get("created", 0)))
        nb = m.get("notebook") or ""
        if m.get("execution_count") is not None:
            nb += f" [{m['execution_count']}]"
        print(f"{c.name:<28} {when:<19} {format_size(m.get('size_bytes', 0)):>10} {m.get('frozen_s', 0):>6.2f}s"
              f"  {m.get('parent') or '-':<20} {nb}")
    return 0


def cmd_rm(args) -> int:
    from .store import Store
    st = Store(args.store)
    for name in args.names:
        st.delete(name)
        print(f"removed {name}")
    return 0


def cmd_demo(args) -> int:
    return run_demo(images=args.images_dir, keep=args.keep, verbose=args.verbose)


# --- parser -----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nbcheckpoint",
                                description="Process-level checkpoint/restore of Jupyter kernels.")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more output; tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # -v is accepted after the subcommand too; SUPPRESS keeps the global value otherwise.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more output; tracebacks on errors")
    images = dict(dest="images_dir", metavar="DIR", help="image directory")

    d = sub.add_parser("dump", parents=[common], help="checkpoint a process into an image")
    d.add_argument("-t", "--tree", "--pid", dest="pid", type=int, required=True, metavar="PID",
                   help="process to dump")
    d.add_argument("-D", "--images-dir", "--images", required=True, **images)
    d.add_argument("-R", "--leave-running", action="store_true",
                   help="let the process continue after the dump (default: kill it)")
    d.add_argument("--no-snapshot", action="store_true",
                   help="with --leave-running: copy the memory while the process is frozen, instead of "
                        "from a copy-on-write snapshot after it runs again")
    _add_criu_options(d, restore=False)
    d.set_defaults(func=cmd_dump)

    r = sub.add_parser("restore", parents=[common], help="restore a process from an image")
    r.add_argument("-D", "--images-dir", "--images", required=True, **images)
    r.add_argument("-d", "--restore-detached", "--detach", dest="detach", action="store_true",
                   help="print the pid and exit instead of waiting for the process")
    r.add_argument("--pidfile", metavar="FILE", help="write the restored pid to FILE")
    _add_criu_options(r, restore=True)
    r.set_defaults(func=cmd_restore)

    s = sub.add_parser("show", parents=[common], help="describe an image")
    s.add_argument("dir", nargs="?", metavar="DIR", help="image directory")
    s.add_argument("-D", "--images-dir", "--images", **images)
    s.add_argument("--verify", action="store_true",
                   help="also make every check a restore makes, with the restore options given here, "
                        "and read all page data against its checksums (creates nothing)")
    _add_criu_options(s, restore=True)
    s.set_defaults(func=cmd_show, parser=s)

    u = sub.add_parser("unlock", parents=[common],
                       help="drop an image's network lock (its outside TCP peers were locked out by a "
                            "--tcp-established dump) without restoring it")
    u.add_argument("dir", nargs="?", metavar="DIR", help="image directory")
    u.add_argument("-D", "--images-dir", "--images", **images)
    u.set_defaults(func=cmd_unlock, parser=u)

    store = dict(metavar="DIR", default=None,
                 help="checkpoint store (default: $NBCHECKPOINT_DIR, else <jupyter data dir>/nbcheckpoint)")
    ls = sub.add_parser("ls", parents=[common], help="list the checkpoints of kernels in the store")
    ls.add_argument("--store", **store)
    ls.set_defaults(func=cmd_ls)
    rm = sub.add_parser("rm", parents=[common], help="delete checkpoints from the store")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.add_argument("--store", **store)
    rm.set_defaults(func=cmd_rm)

    c = sub.add_parser("check", parents=[common], help="probe the kernel features the engine needs")
    c.set_defaults(func=cmd_check)

    m = sub.add_parser("demo", parents=[common],
                       help="checkpoint and restore a sample process, and verify its state")
    m.add_argument("-D", "--images-dir", "--images", **images)
    m.add_argument("--keep", action="store_true", help="keep the temporary directory")
    m.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (NbcheckpointError, OSError) as e:   # OSError: e.g. an unwritable --pidfile
        if args.verbose:
            traceback.print_exc()
        print(f"nbcheckpoint: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
