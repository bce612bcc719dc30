"""A readable summary of an image, like CRIU's `crit show` condensed."""
from __future__ import annotations

import datetime
import os

from .errors import ImageError
from .files import KINDS, kind_name
from .images import core_pb2, files_pb2, imagedir, mm_pb2, names, pagemap_pb2, pstree_pb2
from .sys.libc import PAGE_SIZE
from .units import format_size as _size

_PROT = lambda p: ("r" if p & 1 else "-") + ("w" if p & 2 else "-") + ("x" if p & 4 else "-")  # noqa: E731


def show(images_dir) -> str:
    rd = imagedir.ImageReader(os.fspath(images_dir))
    inv = rd.inventory
    total = sum(s.size for s in inv.files)
    when = datetime.datetime.fromtimestamp(inv.created).isoformat(timespec="seconds")
    out = [f"image {rd.dir}",
           f"  format {inv.format_version}, nbcheckpoint {inv.engine_version}, taken {when} on {inv.hostname} "
           f"(Linux {inv.kernel_release} {inv.arch})",
           f"  {len(inv.files)} files, {_size(total)}; frozen {inv.frozen_seconds:.3f} s"
           + ("; the process was left running" if inv.leave_running else "")]
    if inv.network_lock:
        out.append(f"  its outside TCP peers are locked out (nftables table inet {inv.network_lock}) until "
                   "it is restored, or `nbcheckpoint unlock` is run")
    files = {f.id: f for f in rd.messages(names.FILES, files_pb2.FileEntry)}
    for p in rd.messages(names.PSTREE, pstree_pb2.Process):
        if p.zombie:                    # it has no task, core, mm or fds files
            out.append(f"process {p.pid} (ppid {p.ppid}): zombie {p.comm!r}, wait status {p.exit_status:#x}")
            continue
        task = _one(rd, names.task(p.pid), core_pb2.TaskCore)
        out.append(f"process {p.pid} (ppid {p.ppid}, pgid {p.pgid}, sid {p.sid}), cwd {task.cwd}, "
                   f"uid {list(task.creds.uids)[:1]}, {len(task.sigactions)} signal handlers, "
                   f"{len(task.shared_pending)} pending signals"
                   + (", child subreaper" if task.child_subreaper else "")
                   + (", THP disabled" if task.thp_disable else "")
                   + (" except where advised" if task.thp_disable & 2 else ""))
        for t in rd.messages(names.core(p.pid), core_pb2.ThreadCore):
            from .sys.x86_64 import REGS_SIZE, regs_from_bytes
            if len(t.regs) != REGS_SIZE:
                raise ImageError(f"image {rd.dir}: {names.core(p.pid)}: registers of thread {t.tid} are damaged")
            r = regs_from_bytes(t.regs)
            out.append(f"  thread {t.tid} {t.comm!r}: rip {r.rip:#x} rsp {r.rsp:#x}, sigmask {t.sigmask:#x}, "
                       f"{len(t.pending)} pending" + (f", altstack {t.altstack_sp:#x}+{t.altstack_size}"
                                                       if t.altstack_size and not t.altstack_flags & 2 else ""))
        mm = _one(rd, names.mm(p.pid), mm_pb2.Mm)
        saved = {}
        for e in rd.messages(names.pagemap(p.pid), pagemap_pb2.PagemapEntry):
            saved[e.vaddr] = e.nr_pages
        starts = sorted(saved)
        out.append(f"  exe {mm.exe.path}; {len(mm.vmas)} mappings, {_size(sum(saved.values()) * PAGE_SIZE)} of pages saved")
        import bisect
        for v in mm.vmas:
            i = bisect.bisect_left(starts, v.start)
            npg = 0
            while i < len(starts) and starts[i] < v.end:
                npg += saved[starts[i]]
                i += 1
            kind = mm_pb2.VmaKind.Name(v.kind).lower() if v.kind in mm_pb2.VmaKind.values() else str(v.kind)
            out.append(f"    {v.start:#014x}-{v.end:#014x} {_PROT(v.prot)} {kind:<12} {_size(v.end - v.start):>10}"
                       f" saved {_size(npg * PAGE_SIZE):>10}  {v.name}")
        out.append("  fds:")
        for e in rd.messages(names.fds(p.pid), files_pb2.FdEntry):
            f = files.get(e.id)
            if f is None:
                raise ImageError(f"image {rd.dir}: fd {e.fd} of process {p.pid} refers to file description "
                                 f"{e.id}, which {names.FILES} lacks: damaged")
            out.append(f"    {e.fd:>4} {kind_name(f.kind).lower():<8} #{f.id:<4} {describe_file(f)}"
                       f"{' cloexec' if e.cloexec else ''}")
    return "\n".join(out)


def _one(rd, name: str, cls):
    msgs = rd.messages(name, cls)
    if len(msgs) != 1:
        raise ImageError(f"image {rd.dir}: {name} holds {len(msgs)} messages, expected 1")
    return msgs[0]


def describe_file(f) -> str:
    """One line about an open file description, as its kind describes it."""
    kind = KINDS.get(f.kind)
    return kind.describe(f) if kind is not None else f"flags {f.flags:#o}"


def objects(images_dir) -> list[dict]:
    """The image's open file descriptions as plain dicts, for callers that hand objects
    in on restore (--inherit-fd): ``key`` (the KEY of ``fd[N]:KEY``, or None), ``kind``,
    ``external`` (the peer or master was outside the tree), and per kind ``port`` and
    ``listening`` (inet), ``ino`` (sockets)."""
    rd = imagedir.ImageReader(os.fspath(images_dir))
    out = []
    for f in rd.messages(names.FILES, files_pb2.FileEntry):
        kind = KINDS.get(f.kind)
        d = {"id": f.id, "kind": files_pb2.FdKind.Name(f.kind).lower(), "key": None, "external": False}
        if kind is not None:
            d.update(key=kind.external_key(f), **kind.facts(f))
        out.append(d)
    return out
