"""The per-user image key: 32 random bytes that seal every image the user writes.

An image holds all of a process's memory; restoring one runs whatever it holds as the
caller.  Checksums alone let anyone who can write an image forge a valid one, so the
inventory (which holds the checksum of every other file) carries an HMAC-SHA256 under a
key only the user can read (imagedir.py), and a reader refuses an image its user did not
seal before parsing anything in it.

The key lives in ``$NBCHECKPOINT_KEY_FILE``, else ``$XDG_CONFIG_HOME/nbcheckpoint/image.key``
(``~/.config/...``): in the home directory, which an HPC cluster usually shares between its
nodes, so one user's images restore on any node.  The first dump creates it (directory
0700, file 0600); like ssh with its keys, a key file that is not a regular file of the
caller's, or that others may read or write, is refused.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import stat

from ..errors import ImageError

KEY_ENV = "NBCHECKPOINT_KEY_FILE"
KEY_SIZE = 32
MAC_SIZE = 32               # HMAC-SHA256
ID_SIZE = 8                 # key id: tells "another key" from "changed since"


def key_path() -> str:
    env = os.environ.get(KEY_ENV)
    if env:
        return os.path.abspath(os.path.expanduser(env))
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return os.path.join(config, "nbcheckpoint", "image.key")


class Key:
    """The caller's key: `mac(data)`; `id` names it without revealing it."""

    def __init__(self, secret: bytes, path: str):
        self._secret, self.path = secret, path
        self.id = hashlib.sha256(b"nbcheckpoint image key id\0" + secret).digest()[:ID_SIZE]

    def mac(self, *parts) -> bytes:
        h = hmac.new(self._secret, digestmod=hashlib.sha256)
        for p in parts:
            h.update(p)
        return h.digest()


def load(create: bool = False) -> Key:
    """The caller's key; `create` (a dump) makes it if there is none."""
    path = key_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        if not create:
            raise ImageError(f"you have no image key ({path}), so no image can be yours: nbcheckpoint "
                             "restores only images you wrote. If you dumped it on another machine, copy "
                             f"your key there (same path, mode 0600), or set {KEY_ENV}") from None
        return _create(path)
    except OSError as e:
        raise ImageError(f"cannot read your image key {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"your image key {path} is not a regular file: refused")
        if st.st_uid != os.geteuid():
            raise ImageError(f"your image key {path} belongs to uid {st.st_uid}, not to you "
                             f"(uid {os.geteuid()}): refused")
        if st.st_mode & 0o077:
            raise ImageError(f"your image key {path} has mode {stat.S_IMODE(st.st_mode):04o}: others may "
                             f"read or change it, so it is refused; `chmod 600 {path}` if no one else did")
        secret = os.read(fd, KEY_SIZE + 1)
    finally:
        os.close(fd)
    if len(secret) != KEY_SIZE:
        raise ImageError(f"your image key {path} has {len(secret)} bytes, not {KEY_SIZE}: damaged")
    return Key(secret, path)


def _create(path: str) -> Key:
    """Written under a temporary name and linked into place: a concurrent dump either
    wins or uses the winner's key, and no one ever reads half a key."""
    d = os.path.dirname(path)
    os.makedirs(d, mode=0o700, exist_ok=True)
    secret = os.urandom(KEY_SIZE)
    tmp = f"{path}.new-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, secret)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return load()
    finally:
        os.unlink(tmp)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return load()
