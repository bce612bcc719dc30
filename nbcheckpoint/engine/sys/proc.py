"""All /proc parsing lives here (proc(5)); callers get plain Python values."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import SysError


def _read(path: str, pid: int | None = None) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SysError(e.errno or 0, f"read {path}", pid) from None


def exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def tids(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError as e:
        raise SysError(e.errno or 0, f"list /proc/{pid}/task", pid) from None


@dataclass
class MapLine:
    start: int
    end: int
    perms: str          # e.g. "rw-p"
    offset: int
    dev: str            # "fd:01"
    inode: int
    path: str           # "" for anonymous; "[heap]", "/lib/x (deleted)" ...
    vmflags: set = field(default_factory=set)

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def deleted(self) -> bool:
        return self.path.endswith(" (deleted)")


def maps(pid: int) -> list[MapLine]:
    """/proc/PID/smaps: every VMA with its VmFlags (proc(5), "smaps")."""
    out: list[MapLine] = []
    for line in _read(f"/proc/{pid}/smaps", pid).decode("utf-8", "surrogateescape").splitlines():
        head = line.split(None, 1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            parts = line.split(None, 5)
            lo, hi = parts[0].split("-")
            out.append(MapLine(int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16), parts[3],
                               int(parts[4]), parts[5] if len(parts) > 5 else ""))
        elif head == "VmFlags:" and out:
            out[-1].vmflags = set(line.split()[1:])
    return out


def status(pid: int, tid: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/task/{tid}/status" if tid else f"/proc/{pid}/status"
    out = {}
    for line in _read(path, pid).decode().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def stat(pid: int, tid: int | None = None) -> list[str]:
    """Fields of /proc/PID/stat, 1-based like proc(5) (index 0 is unused)."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    raw = _read(path, pid).decode("utf-8", "surrogateescape")
    lpar, rpar = raw.index("("), raw.rindex(")")
    return ["", raw[:lpar].strip(), raw[lpar + 1:rpar]] + raw[rpar + 2:].split()


# proc(5) field numbers of /proc/PID/stat that PR_SET_MM_MAP needs.
MM_STAT_FIELDS = dict(start_code=26, end_code=27, start_stack=28, start_data=45, end_data=46,
                      start_brk=47, arg_start=48, arg_end=49, env_start=50, env_end=51)


def mm_fields(pid: int) -> dict[str, int]:
    st = stat(pid)
    out = {k: int(st[i]) for k, i in MM_STAT_FIELDS.items()}
    return out


def auxv(pid: int) -> bytes:
    return _read(f"/proc/{pid}/auxv", pid)


def readlink(path: str, pid: int | None = None) -> str:
    try:
        return os.readlink(path)
    except OSError as e:
        raise SysError(e.errno or 0, f"readlink {path}", pid) from None


def exe(pid: int) -> str:
    return readlink(f"/proc/{pid}/exe", pid)


def comm(pid: int, tid: int) -> str:
    return _read(f"/proc/{pid}/task/{tid}/comm", pid).decode("utf-8", "surrogateescape").rstrip("\n")


def personality(pid: int) -> int:
    return int(_read(f"/proc/{pid}/personality", pid), 16)


def fds(pid: int) -> list[int]:
    try:
        return sorted(int(f) for f in os.listdir(f"/proc/{pid}/fd"))
    except OSError as e:
        raise SysError(e.errno or 0, f"list /proc/{pid}/fd", pid) from None


def fdinfo(pid: int, fd: int) -> dict[str, str]:
    """fdinfo as key -> value; repeated keys (e.g. 'lock') are joined by newlines."""
    out: dict[str, str] = {}
    for line in _read(f"/proc/{pid}/fdinfo/{fd}", pid).decode("utf-8", "surrogateescape").splitlines():
        k, _, v = line.partition(":")
        v = v.strip()
        out[k] = out[k] + "\n" + v if k in out else v
    return out


def fdlink(pid: int, fd: int) -> str:
    return readlink(f"/proc/{pid}/fd/{fd}", pid)


def pid_state(pid: int) -> str:
    """The one-letter state (R, S, D, Z, T, t ...) or '' if the pid is gone."""
    try:
        return stat(pid)[3]
    except SysError:
        return ""


def ppid(pid: int) -> int:
    return int(stat(pid)[4])


def mnt_root_ok(pid: int) -> bool:
    return os.path.samefile(f"/proc/{pid}/root", "/")
