"""The checkpoint store: named checkpoints of kernels, each an engine image plus metadata.

Layout (docs/jupyter.md)::

    ROOT/NAME/image/         the engine image (atomic and checksummed by the engine)
    ROOT/NAME/meta.json      metadata, 0600: it holds the kernel's HMAC key (and its CurveZMQ
                             secret key when the kernel encrypts its transport)
    ROOT/.NAME.partial-PID   a checkpoint being written, renamed to NAME when complete

A checkpoint is listed only once it is complete: a crash leaves at most a hidden
partial directory, removed by the next writer once its PID is dead.

meta.json is sealed with the user's image key (engine/images/key.py) as the image is: its
"seal" is an HMAC-SHA256 of the rest; a checkpoint whose meta.json is not sealed with the
caller's key (planted by another user, or changed) is neither listed nor restored.
Files are trusted as sshd's StrictModes trusts them: ROOT owned by the caller (or root) and
not writable by group or others unless sticky (as /tmp: others cannot rename nor delete
what is ours there); every entry, its meta.json, image/ and image files owned by the caller
and writable by no one else. Anything else is neither listed nor restored.
"""
from __future__ import annotations

import hmac
import json
import os
import pwd
import stat
import re
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .engine.errors import NbcheckpointError
from .engine.images import key as keys, names
from .engine.sys import userns
from .engine.sys.proc import pid_alive

DIR_ENV = "NBCHECKPOINT_DIR"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_PARTIAL = re.compile(r"\.(.+)\.partial-(\d+)")
MAX_META = 1 << 20


class StoreError(NbcheckpointError):
    """The store or a checkpoint in it does not allow the request: a name already taken, a
    checkpoint that does not fit the kernel; and the two subclasses below."""


class BadName(StoreError):
    """Not a valid checkpoint name."""


class NoSuchCheckpoint(StoreError):
    """No complete checkpoint of that name: missing, or damaged (not listed either)."""


# connection-file fields that never leave meta.json (events, listings, the REST API)
SECRETS = ("key", "curve_secretkey")


def public_meta(meta: dict) -> dict:
    """META as shown to anyone: everything but the kernel's secrets."""
    out = json.loads(json.dumps(meta))
    conn = out.get("connection")
    if isinstance(conn, dict):
        for k in SECRETS:
            conn.pop(k, None)
    return out


def default_root() -> Path:
    env = os.environ.get(DIR_ENV)
    if env:
        return Path(env).expanduser()
    try:
        from jupyter_core.paths import jupyter_data_dir
        return Path(jupyter_data_dir()) / "nbcheckpoint"
    except ImportError:                                     # the engine alone, without Jupyter
        return Path(os.environ.get("XDG_DATA_HOME", "~/.local/share")).expanduser() / "jupyter" / "nbcheckpoint"


@dataclass
class CheckpointMeta:
    """meta.json: what is known of a checkpoint beside its image (fields: docs/jupyter.md).
    Built by the shim (jupyter/operations.py) and the helper (kernel/helper.py) through
    kernel_image.checkpoint_meta; name, hostname and size_bytes are set by Pending.commit."""
    name: str = ""
    created: float = 0.0                       # epoch seconds
    hostname: str = ""
    kernel_id: str | None = None
    kernel_name: str | None = None
    notebook: str | None = None
    execution_count: int | None = None
    size_bytes: int = 0                        # the image on disk
    pages_bytes: int = 0
    frozen_s: float = 0.0                      # the kernel was stopped this long
    total_s: float = 0.0
    parent: str | None = None                  # the checkpoint this kernel descends from
    lineage: str | None = None                 # the first kernel of the line, kept across restores
    pid: int = 0
    pidns: bool = False
    connection: dict = field(default_factory=dict)   # the connection file, with its secrets
    listeners: dict = field(default_factory=dict)    # {channel: socket inode}
    control_ino: int | None = None
    request_id: str | None = None              # the request pending in the image (restored event)
    engine_version: str = ""
    mode: str | None = None                    # "helper": taken by kernel/helper.py
    shell_job: bool | None = None              # helper mode: its terminal is outside the image

    @classmethod
    def from_json(cls, d: dict) -> "CheckpointMeta":
        """Unknown fields are dropped, missing ones get their default."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class Checkpoint:
    name: str
    path: Path
    info: CheckpointMeta

    @property
    def meta(self) -> dict:
        """meta.json as a dict (secrets included; public_meta() drops them)."""
        return asdict(self.info)

    @property
    def image(self) -> Path:
        return self.path / "image"


class Store:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root else default_root()

    @staticmethod
    def validate_name(name: str) -> str:
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name.endswith(".") or ".." in name:
            raise BadName(f"bad checkpoint name {name!r}: use up to 100 letters, digits, '.', '_' "
                          "or '-', starting with a letter or digit")
        return name

    def new_name(self, prefix: str = "ckpt") -> str:
        base = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
        name, n = base, 1
        while (self.root / name).exists():
            n += 1
            name = f"{base}-{n}"
        return name

    def path(self, name: str) -> Path:
        return self.root / self.validate_name(name)

    def untrusted(self) -> str | None:
        """Why ROOT may not be trusted (sshd's StrictModes), or None; a missing ROOT is trusted."""
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            return None
        # root's, as seen from a user namespace of ours (the shim's): the overflow uid
        root = 0 if userns.in_initial() else userns.overflow_id("uid")
        why = _not_ours(st, owners=(os.geteuid(), root), sticky_ok=True)
        if why:
            return (f"the checkpoint store {self.root} is {why}: nbcheckpoint neither writes, lists nor "
                    f"restores checkpoints there; `chmod 700 {self.root}` if it is yours, else use a "
                    f"store of your own (${DIR_ENV})")
        return None

    def _trusted_root(self) -> None:
        why = self.untrusted()
        if why:
            raise StoreError(why)

    def get(self, name: str) -> Checkpoint:
        p = self.path(name)
        self._trusted_root()
        if not p.is_dir():
            raise NoSuchCheckpoint(f"no checkpoint named {name!r} in {self.root} (`nbcheckpoint ls` lists them)")
        self._check_entry(name, [p, p / "meta.json"])
        meta = CheckpointMeta.from_json(self._read_meta(name, p / "meta.json"))
        if not (p / "image" / names.INVENTORY).is_file():
            raise NoSuchCheckpoint(f"checkpoint {name!r} in {self.root} is damaged: its image is missing")
        self._check_entry(name, [p / "image", *sorted((p / "image").iterdir())])   # what the engine opens
        return Checkpoint(name, p, meta)

    def _check_entry(self, name: str, paths: list[Path]) -> None:
        """Every one of PATHS is the caller's and writable by no one else (not a symbolic link)."""
        for q in paths:
            try:
                why = _not_ours(os.lstat(q), owners=(os.geteuid(),))
            except FileNotFoundError:
                continue                                   # said by the reader
            if why:
                raise NoSuchCheckpoint(f"checkpoint {name!r} is not trusted: {q} is {why}; nbcheckpoint "
                                       "restores only checkpoints that you own and no one else may write")

    def _read_meta(self, name: str, path: Path) -> dict:
        """meta.json as a dict, once its seal is the caller's (a regular file, bounded: like an image file)."""
        damaged = f"checkpoint {name!r} in {self.root} is damaged"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NoSuchCheckpoint(f"{damaged}: its meta.json is missing") from None
        except OSError as e:
            raise NoSuchCheckpoint(f"{damaged}: its meta.json cannot be opened ({e.strerror})") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_META:
                raise NoSuchCheckpoint(f"{damaged}: its meta.json is not a regular file of at most {MAX_META} bytes")
            raw = f.read(MAX_META)
        try:
            meta = json.loads(raw)
            seal = bytes.fromhex(meta.pop("seal", ""))
        except (ValueError, AttributeError, TypeError, RecursionError) as e:
            raise NoSuchCheckpoint(f"{damaged}: meta.json is not a sealed JSON object ({e})") from None
        key = keys.load()
        if not hmac.compare_digest(key.mac(_canonical(meta)), seal):
            raise NoSuchCheckpoint(f"checkpoint {name!r} in {self.root} was not sealed with your key "
                                   f"({key.path}): it was written by another user or changed since; "
                                   "nbcheckpoint restores only checkpoints you wrote")
        return meta

    def list(self) -> list[Checkpoint]:
        """Complete checkpoints sealed with the caller's key (none if the caller has no key)."""
        out = []
        if not os.path.exists(keys.key_path()) or self.untrusted():
            return out
        try:
            entries = list(self.root.iterdir())
        except FileNotFoundError:
            return []
        for p in entries:
            if p.name.startswith(".") or not p.is_dir():
                continue
            try:
                out.append(self.get(p.name))
            except StoreError:
                continue
        out.sort(key=lambda c: c.info.created or 0, reverse=True)
        return out

    def delete(self, name: str) -> None:
        """Remove checkpoint NAME; an entry that is a symbolic link: the link only, never its target."""
        p = self.path(name)
        if not p.is_symlink() and not p.is_dir():
            raise NoSuchCheckpoint(f"no checkpoint named {name!r} in {self.root}")
        # rename first: a half-deleted directory must not look like a checkpoint
        trash = self.root / f".{name}.partial-{os.getpid()}"
        os.rename(p, trash)
        _remove(trash)

    def begin(self, name: str) -> "Pending":
        """Reserve NAME for a checkpoint being written (see Pending)."""
        self.validate_name(name)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._trusted_root()
        for p in self.root.iterdir():
            m = _PARTIAL.fullmatch(p.name)
            if m and not pid_alive(int(m.group(2))):
                _remove(p)                                       # its writer died
            elif m and m.group(1) == name:
                raise StoreError(f"a checkpoint named {name!r} is being written right now (by pid {m.group(2)})")
        if (self.root / name).exists():
            raise StoreError(f"a checkpoint named {name!r} already exists in {self.root}: choose another "
                             f"name or delete it first (`nbcheckpoint rm {name}`)")
        tmp = self.root / f".{name}.partial-{os.getpid()}"
        tmp.mkdir(mode=0o700)
        return Pending(self, name, tmp)


class Pending:
    """A checkpoint being written: `image` is where the engine writes; `commit(meta)` publishes."""

    def __init__(self, store: Store, name: str, tmp: Path):
        self.store, self.name, self.tmp = store, name, tmp

    @property
    def image(self) -> Path:
        return self.tmp / "image"

    def commit(self, meta: CheckpointMeta) -> Checkpoint:
        meta.name = self.name
        meta.hostname = meta.hostname or socket.gethostname()
        meta.size_bytes = _du(self.image)
        f = self.tmp / "meta.json"
        d = asdict(meta)
        d["seal"] = keys.load(create=True).mac(_canonical(d)).hex()
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(d, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        final = self.store.root / self.name
        os.rename(self.tmp, final)
        dfd = os.open(self.store.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return Checkpoint(self.name, final, meta)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _not_ours(st: os.stat_result, owners: tuple, sticky_ok: bool = False) -> str | None:
    """Why a file of stat ST may not be trusted (sshd's StrictModes), or None."""
    mode = f"mode {stat.S_IMODE(st.st_mode):04o}"
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if st.st_uid not in owners:
        try:
            user = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            user = "?"
        return f"owned by uid {st.st_uid} ({user}, {mode}), not by you (uid {os.geteuid()})"
    if st.st_mode & 0o022 and not (sticky_ok and st.st_mode & stat.S_ISVTX and stat.S_ISDIR(st.st_mode)):
        return f"writable by group or others ({mode})"
    return None


def _remove(path: Path) -> None:
    """Remove PATH: a symbolic link (or file) itself, a directory with its content; never a link's target."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _canonical(meta: dict) -> bytes:
    """The bytes a seal covers: one spelling of META, whatever the file's layout."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def _du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total
