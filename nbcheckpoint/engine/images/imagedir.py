"""The image directory: how files are written, named, checksummed and read.

Layout (one directory per image, 0700; files 0600; every name is made by names.py)::

    inventory.img          table of contents, written last (checksums of all files)
    pstree.img             Process messages
    files.img              FileEntry per open file description
    task-PID.img           TaskCore (per-process state)
    core-PID.img           one ThreadCore per thread, the main thread first
    mm-PID.img             Mm
    fds-PID.img            FdEntry per fd
    pagemap-NAME.img       PagemapEntry runs (NAME: a pid, or shmem-ID)
    pages-NAME.img         raw page bytes of the runs, in order, checked per block
    file-ID.img            content of a file deleted while open
    pipe-data-ID.img       bytes queued in a pipe (fifo-data-DEV-ID.img: in a FIFO)
    locks-PID.img          FileLock messages (--file-locks; absent if none)
    timers-PID.img         Timers

A message file is: magic (8 bytes), the message type's full name (u16 length +
utf-8), then messages each prefixed by a u32 length.  The type name makes a
foreign or mixed-up file fail loudly instead of parsing as garbage.

Page data files carry one xxh3-64 per BLOCK bytes (in the inventory) instead of one
checksum of the whole: a sequential reader checks each block as it passes, and lazy
restore (lazy.py) reads and checks any single block on demand.

inventory.img is sealed with the user's key (key.py): a header (SEAL_MAGIC, the format
version as u32, the key's id), HMAC-SHA256 under the key of the header and the body, the
body (a message file holding the Inventory), and an xxh3-128 of all that (damage is then
told apart from forgery).  A reader checks the MAC before it parses anything, then every
file against the checksum the inventory holds for it.  `reseal` is for tests that change
an image on purpose.

Every file is opened without following a symbolic link, relative to the directory opened
once, non-blocking (a FIFO cannot block), and must be a regular file of the size the
inventory says (the inventory: at most MAX_INVENTORY bytes) before a byte is read.

Atomicity: everything is written into a hidden sibling directory, fsynced,
then renamed onto the final name; an image is complete or absent.
"""
from __future__ import annotations

import contextlib
import functools
import hmac
import os
import shutil
import stat
import struct
import tempfile
import time

import xxhash

from ..errors import DumpError, ImageError
from ..sys import proc
from ..sys.fd import Fd
from . import inventory_pb2, key as keys
from .names import INVENTORY

FORMAT_VERSION = 3          # 2: page data checked per block; 3: the inventory is sealed
MAGIC = b"NBCKIMG\x01"
SEAL_MAGIC = b"NBCKSEAL"
_SEAL = struct.Struct(f"<8sI{keys.ID_SIZE}s")      # magic, format version, key id; then the MAC
_LEN = struct.Struct("<I")
MAX_MESSAGE = 64 << 20
MAX_INVENTORY = MAX_MESSAGE + 4096      # its block sums: 2 TiB of page data
BLOCK = 256 << 10           # page data checksum block: what lazy restore reads per fault


class _HashingFile:
    """A file opened for writing that checksums what goes through it."""

    def __init__(self, path: str):
        self.path = path
        self.fd = Fd(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        self.hash = xxhash.xxh3_128()
        self.size = 0

    def write(self, data) -> None:
        self.hash.update(data)
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd.fileno(), view)
            except OSError as e:
                _no_space(e, self.path, f"{len(view):,} bytes of a {len(data):,}-byte write were not written, "
                                        f"after {self.size + len(data) - len(view):,} bytes of this file")
                raise
            view = view[n:]
        self.size += len(data)

    def close(self) -> None:
        self.fd.close()

    def summary(self) -> inventory_pb2.FileSum:
        return inventory_pb2.FileSum(name=os.path.basename(self.path), size=self.size,
                                     xxh3_128=self.hash.digest())


def _no_space(e: OSError, path: str, what: str) -> None:
    """Raise a DumpError that says where and how much if E is a full disk (or quota)."""
    import errno                 # here: the rest of the module has no use for it
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return
    st = os.statvfs(os.path.dirname(path))
    free = "no inode" if st.f_favail == 0 else f"{st.f_bavail * st.f_frsize:,} bytes"
    raise DumpError(f"no space left for the image file {path} ({e.strerror}): {what}; {free} free on "
                    f"its filesystem: free some space, or dump into a directory on another filesystem") from None


class _BlockSums:
    """xxh3-64 of every BLOCK bytes of a stream, the last block possibly short."""

    def __init__(self):
        self.hash = xxhash.xxh3_64()
        self.fill = 0
        self.sums = bytearray()

    def update(self, data) -> None:
        view = memoryview(data)
        while view:
            n = min(len(view), BLOCK - self.fill)
            self.hash.update(view[:n])
            self.fill += n
            view = view[n:]
            if self.fill == BLOCK:
                self._close_block()

    def _close_block(self) -> None:
        self.sums += self.hash.digest()
        self.hash.reset()
        self.fill = 0

    def finish(self) -> bytes:
        if self.fill:
            self._close_block()
        return bytes(self.sums)


class PagesWriter(_HashingFile):
    """A page data file: checksummed per block (see the module's docstring)."""

    def __init__(self, path: str):
        super().__init__(path)
        self.hash = _BlockSums()

    def summary(self) -> inventory_pb2.FileSum:
        sums = self.hash.finish()
        return inventory_pb2.FileSum(name=os.path.basename(self.path), size=self.size,
                                     xxh3_128=xxhash.xxh3_128_digest(sums), block_size=BLOCK,
                                     block_sums=sums)


class MessageWriter(_HashingFile):
    def __init__(self, path: str, msg_cls):
        super().__init__(path)
        name = msg_cls.DESCRIPTOR.full_name.encode()
        self.write(MAGIC + struct.pack("<H", len(name)) + name)

    def add(self, msg) -> None:
        data = msg.SerializeToString()
        self.write(_LEN.pack(len(data)) + data)


class ImageWriter:
    """Builds an image in a hidden temporary directory, then commits it."""

    def __init__(self, final_dir: str):
        self._key = keys.load(create=True)      # first: a refused key fails the dump before any work
        self.final = os.path.abspath(final_dir)
        parent = os.path.dirname(self.final)
        if os.path.exists(self.final):
            if not os.path.isdir(self.final) or os.listdir(self.final):
                raise ImageError(f"{self.final} already exists and is not an empty directory; "
                                 "choose a new images dir or remove the old image")
        os.makedirs(parent, exist_ok=True)
        _remove_abandoned(parent, os.path.basename(self.final))
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.final)}.partial-{os.getpid()}-", dir=parent)
        os.chmod(self.tmp, 0o700)
        self._files: list[_HashingFile] = []
        self._sums: list[inventory_pb2.FileSum] = []

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def messages(self, name: str, msg_cls) -> MessageWriter:
        return self._keep(MessageWriter(self.path(name), msg_cls))

    def raw(self, name: str) -> _HashingFile:
        return self._keep(_HashingFile(self.path(name)))

    def pages(self, name: str) -> PagesWriter:
        return self._keep(PagesWriter(self.path(name)))

    def _keep(self, w):
        self._files.append(w)
        return w

    def finish_files(self) -> None:
        """fsync and close every data file (the slow part on a real disk)."""
        for f in self._files:
            if not f.fd.closed:
                try:
                    os.fsync(f.fd.fileno())
                except OSError as e:
                    _no_space(e, f.path, f"its {f.size:,} bytes could not all be stored")
                    raise
                f.close()
            self._sums.append(f.summary())
        self._files = []

    def commit(self, inv: inventory_pb2.Inventory) -> str:
        self.finish_files()
        inv.format_version = FORMAT_VERSION
        inv.files.extend(self._sums)
        _seal(self.path(INVENTORY), inv, self._key)
        _fsync_dir(self.tmp)
        if os.path.isdir(self.final):
            os.rmdir(self.final)  # empty (checked in __init__)
        os.rename(self.tmp, self.final)
        _fsync_dir(os.path.dirname(self.final))
        self.tmp = ""
        return self.final

    def abort(self) -> None:
        for f in self._files:
            f.close()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = ""


def _seal(path: str, inv: inventory_pb2.Inventory, key: keys.Key) -> None:
    """Write inventory.img, sealed (the layout: the module's docstring), and fsync it."""
    name = inventory_pb2.Inventory.DESCRIPTOR.full_name.encode()
    data = inv.SerializeToString()
    body = MAGIC + struct.pack("<H", len(name)) + name + _LEN.pack(len(data)) + data
    head = _SEAL.pack(SEAL_MAGIC, FORMAT_VERSION, key.id)
    raw = head + key.mac(head, body) + body
    w = _HashingFile(path)
    try:                        # closed even on a full disk: nothing may keep the filesystem busy
        w.write(raw + xxhash.xxh3_128_digest(raw))
        os.fsync(w.fd.fileno())
    finally:
        w.close()


def reseal(images_dir, inventory: inventory_pb2.Inventory | None = None) -> None:
    """Make an image changed on purpose whole again, for tests and fuzzing: every file the
    inventory lists that exists is checksummed anew, then the inventory (or `inventory`, an
    edited one) is sealed with the caller's key.  Never on a real image: it makes a damaged
    or forged image restorable."""
    d = os.path.abspath(images_dir)
    inv = inventory if inventory is not None else ImageReader(d).inventory
    for s in inv.files:
        p = os.path.join(d, s.name)
        if not os.path.isfile(p):
            continue
        with open(p, "rb") as f:
            data = f.read()
        s.size = len(data)
        if s.name.startswith("pages-"):
            sums = _BlockSums()
            sums.update(data)
            s.block_size, s.block_sums = BLOCK, sums.finish()
            s.xxh3_128 = xxhash.xxh3_128_digest(s.block_sums)
        else:
            s.xxh3_128 = xxhash.xxh3_128_digest(data)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(d, INVENTORY))
    _seal(os.path.join(d, INVENTORY), inv, keys.load(create=True))


def _remove_abandoned(parent: str, name: str) -> None:
    """Partial images of `name` left by a dump whose engine died (its pid is in the name)."""
    prefix = f".{name}.partial-"
    for entry in os.listdir(parent):
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not proc.exists(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading -------------------------------------------------------------------
_NOT_REGULAR = {stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device",
                stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFLNK: "a symbolic link"}


def _check_owner(st: os.stat_result, path: str, what: str) -> None:
    """An image is read only if it is the caller's and nobody else can change it (as ssh
    treats its keys): the seal says who wrote it, this that nobody swaps it meanwhile."""
    if st.st_uid != os.geteuid():
        raise ImageError(f"{what} {path} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}): "
                         "nbcheckpoint reads only images you own")
    if st.st_mode & 0o022:
        raise ImageError(f"{what} {path} can be changed by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                         f"`chmod go-w {path}` if you trust its content, then try again")


class ImageReader:
    """Opens an image dir (the caller's, changed by nobody else), verifying its seal; files
    are verified on use."""

    def __init__(self, images_dir: str):
        self.dir = os.path.abspath(images_dir)
        try:
            # once, not following a link: every file is opened relative to it, so a
            # directory renamed or swapped meanwhile cannot redirect a read
            self._dirfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ImageError(f"no image at {self.dir}: no such directory") from None
        except NotADirectoryError:
            what = "a symbolic link: give the directory itself" if os.path.islink(self.dir) else "not a directory"
            raise ImageError(f"no image at {self.dir}: {self.dir} is {what}") from None
        except OSError as e:
            raise ImageError(f"cannot open the image directory {self.dir}: {e.strerror}") from None
        _check_owner(os.fstat(self._dirfd), self.dir, "image directory")
        inv_path = os.path.join(self.dir, INVENTORY)
        if not os.path.lexists(inv_path):
            raise ImageError(f"{self.dir} holds no {INVENTORY}: not an nbcheckpoint image, "
                             "or a dump that did not complete")
        with self._open(INVENTORY) as fd:
            size = os.fstat(fd.fileno()).st_size
            if size > MAX_INVENTORY:
                raise ImageError(f"image file {inv_path} has {size} bytes, more than an inventory may hold "
                                 f"({MAX_INVENTORY}): damaged, or not an nbcheckpoint image")
            raw = _read(fd, size, inv_path)
        body = self._unseal(raw, inv_path)
        msgs = list(_parse_messages(body, inv_path, inventory_pb2.Inventory))
        if len(msgs) != 1:
            raise ImageError(f"{inv_path} holds {len(msgs)} inventories, expected 1")
        self.inventory = msgs[0]
        if self.inventory.format_version != FORMAT_VERSION:
            raise ImageError(f"image {self.dir} has format version {self.inventory.format_version}; "
                             f"this nbcheckpoint reads version {FORMAT_VERSION}")
        self.sums = {s.name: s for s in self.inventory.files}
        bad = [s.name for s in self.inventory.files if s.name in ("", ".", "..", INVENTORY) or "/" in s.name]
        if bad or len(self.sums) != len(self.inventory.files):
            raise ImageError(f"{inv_path} lists a file twice, or a name that is not a file of the image "
                             f"({bad[0]!r}): damaged" if bad else f"{inv_path} lists a file twice: damaged")

    def _unseal(self, raw: bytes, inv_path: str) -> bytes:
        """The inventory's body, once its seal is the caller's: nothing is parsed before."""
        if raw.startswith(MAGIC):
            raise ImageError(f"image {self.dir} has format version 2 or older (images were not sealed "
                             f"then); this nbcheckpoint reads version {FORMAT_VERSION}: restore it with the "
                             "nbcheckpoint that wrote it, or take a new checkpoint")
        n = _SEAL.size + keys.MAC_SIZE
        if len(raw) < n + 16 or not raw.startswith(SEAL_MAGIC):
            raise ImageError(f"{inv_path} is not an nbcheckpoint inventory (bad magic)")
        if xxhash.xxh3_128_digest(raw[:-16]) != raw[-16:]:
            raise ImageError(f"{inv_path} is corrupted (checksum mismatch)")
        _, version, key_id = _SEAL.unpack_from(raw)
        if version != FORMAT_VERSION:
            raise ImageError(f"image {self.dir} has format version {version}; "
                             f"this nbcheckpoint reads version {FORMAT_VERSION}")
        key = keys.load()
        head, mac, body = raw[:_SEAL.size], raw[_SEAL.size:n], raw[n:-16]
        if not hmac.compare_digest(key.mac(head, body), mac):
            why = ("it was changed since it was written" if key_id == key.id else
                   "it was written by another user, or with another key")
            raise ImageError(f"image {self.dir} was not sealed with your key ({key.path}): {why}; "
                             "nbcheckpoint restores only images you wrote")
        return body

    def __del__(self):
        if getattr(self, "_dirfd", -1) >= 0:
            os.close(self._dirfd)
            self._dirfd = -1

    def _open(self, name: str, size: int | None = None) -> Fd:
        """NAME in the image, a regular file (of SIZE bytes if given), opened for reading."""
        path = os.path.join(self.dir, name)
        fd = None
        try:
            st = os.stat(name, dir_fd=self._dirfd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):        # (nothing else is opened: a device could act on open)
                fd = Fd(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                                dir_fd=self._dirfd))
                st = os.fstat(fd.fileno())      # what was opened, if it was swapped since
        except FileNotFoundError:
            raise ImageError(f"image file {path} is missing") from None
        except OSError as e:                    # ELOOP: swapped for a link meanwhile
            raise ImageError(f"cannot open image file {path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            if fd is not None:
                fd.close()
            what = _NOT_REGULAR.get(stat.S_IFMT(st.st_mode), "a special file")
            raise ImageError(f"image file {path} is {what}, not a regular file")
        try:
            _check_owner(st, path, "image file")
        except ImageError:
            fd.close()
            raise
        if size is not None and st.st_size != size:
            fd.close()
            raise ImageError(f"image file {path} has {st.st_size} bytes, the inventory says {size}: "
                             "truncated or damaged")
        return fd

    def has(self, name: str) -> bool:
        return name in self.sums

    def _sum(self, name: str):
        s = self.sums.get(name)
        if s is None:
            raise ImageError(f"image {self.dir} lacks {name} (not listed in its inventory)")
        return s

    def read_bytes(self, name: str) -> bytes:
        s = self._sum(name)
        path = os.path.join(self.dir, name)
        with self._open(name, s.size) as fd:
            data = _read(fd, s.size, path)
        if xxhash.xxh3_128_digest(data) != s.xxh3_128:
            raise ImageError(f"image file {path} is corrupted (checksum mismatch)")
        return data

    def messages(self, name: str, msg_cls) -> list:
        data = self.read_bytes(name)
        return list(_parse_messages(data, os.path.join(self.dir, name), msg_cls))

    def open_pages(self, name: str) -> "PagesReader":
        s = self._sum(name)
        path = os.path.join(self.dir, name)
        if s.block_size != BLOCK or len(s.block_sums) != 8 * ((s.size + BLOCK - 1) // BLOCK):
            raise ImageError(f"image file {path}: its block checksums are "
                             "missing or do not match its size: damaged")
        return PagesReader(path, self._open(name, s.size), s.size, s.block_sums)

    def verify_all_metadata(self) -> None:
        """Check every file's type and size, and the checksum of all but page data (see PagesReader)."""
        for name, s in self.sums.items():
            if name.startswith("pages-"):
                self._open(name, s.size).close()
            else:
                self.read_bytes(name)


def _read(fd: Fd, size: int, path: str) -> bytes:
    """Exactly SIZE bytes (checked against fstat before): no more, whatever the file does."""
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = os.readv(fd.fileno(), [view[got:]])
        if n == 0:
            raise ImageError(f"image file {path} ends early: truncated")
        got += n
    return bytes(buf)


class PagesReader:
    """A page data file, read in order (readinto) or anywhere (read_at), every block checked.

    Page data is verified as it streams into the restored process (reading 1 GiB
    twice would halve restore speed); a mismatch is raised before that process
    ever runs, and restore then kills it.  Lazy restore reads at the offsets the
    restored processes touch, in any order; a block only partly wanted is read
    whole (to check it) and kept, as the next read usually wants the rest.
    """

    def __init__(self, path: str, fd: Fd, size: int, sums: bytes):
        self.path = path
        self.size = size
        self.sums = sums
        self.fd = fd
        self.pos = 0                        # readinto's position
        self._blk = bytearray(BLOCK)        # the last block read for a partial request...
        self._blk_index = -1                # ...and its number

    def _check(self, index: int, data) -> None:
        if xxhash.xxh3_64_digest(data) != self.sums[8 * index:8 * index + 8]:
            raise ImageError(f"image file {self.path} is corrupted (checksum mismatch in bytes "
                             f"{index * BLOCK}-{min(self.size, (index + 1) * BLOCK)})")

    def _pread(self, view, off: int) -> None:
        got = 0
        while got < len(view):
            n = os.preadv(self.fd.fileno(), [view[got:]], off + got)
            if n == 0:
                raise ImageError(f"image file {self.path} ends early: truncated")
            got += n

    def read_at(self, off: int, buf) -> None:
        """Fill buf with the bytes at `off`, every block they touch checked."""
        view = memoryview(buf)
        if off + len(view) > self.size:
            raise ImageError(f"image file {self.path}: {len(view)} bytes at {off} lie beyond its end "
                             f"({self.size} bytes): truncated, or the pagemap does not match")
        end = off + len(view)
        while off < end:
            b = off // BLOCK
            if off == b * BLOCK and min(end, self.size) - off >= min(BLOCK, self.size - off):
                # whole blocks: read them straight into place, then check each
                n = min(end, self.size) - off
                n = n - n % BLOCK if n >= BLOCK else n
                part = view[:n]
                self._pread(part, off)
                for i in range(0, n, BLOCK):
                    self._check(b + i // BLOCK, part[i:i + BLOCK])
            else:
                if self._blk_index != b:
                    blk = memoryview(self._blk)[:min(BLOCK, self.size - b * BLOCK)]
                    self._blk_index = -1
                    self._pread(blk, b * BLOCK)
                    self._check(b, blk)
                    self._blk_index = b
                n = min(end, (b + 1) * BLOCK) - off
                view[:n] = self._blk[off - b * BLOCK:off - b * BLOCK + n]
            view = view[n:]
            off += n

    def readinto(self, buf) -> int:
        """The next len(buf) bytes (sequential restore)."""
        self.read_at(self.pos, buf)
        self.pos += len(buf)
        return len(buf)

    def verify(self, progress=None, chunk: int = 16 << 20) -> None:
        """Check every block (restore.verify); progress(bytes checked so far) after each chunk."""
        buf = bytearray(chunk)
        for off in range(0, self.size, chunk):
            n = min(chunk, self.size - off)
            self.read_at(off, memoryview(buf)[:n])
            if progress:
                progress(off + n)
        self.close()

    def finish(self) -> None:
        """After the last readinto: everything was read."""
        pos = self.pos
        self.close()
        if pos != self.size:
            raise ImageError(f"image file {self.path} has {self.size - pos} bytes no pagemap entry "
                             "accounts for: damaged")

    def close(self) -> None:
        self.fd.close()


def _parse_messages(data: bytes, path: str, msg_cls):
    from google.protobuf.message import DecodeError
    type_name = msg_cls.DESCRIPTOR.full_name
    if data[:len(MAGIC)] != MAGIC:
        raise ImageError(f"{path} is not an nbcheckpoint image file (bad magic)")
    pos = len(MAGIC)
    if pos + 2 > len(data):
        raise ImageError(f"{path} is truncated")
    (nlen,) = struct.unpack_from("<H", data, pos)
    pos += 2
    name = data[pos:pos + nlen].decode("utf-8", "replace")
    pos += nlen
    if name != type_name:
        raise ImageError(f"{path} holds {name!r} messages, expected {type_name!r}")
    while pos < len(data):
        if pos + 4 > len(data):
            raise ImageError(f"{path} is truncated (partial length at byte {pos})")
        (ln,) = _LEN.unpack_from(data, pos)
        pos += 4
        if ln > MAX_MESSAGE or pos + ln > len(data):
            raise ImageError(f"{path} is truncated or corrupted (message of {ln} bytes at byte {pos})")
        msg = msg_cls()
        try:
            msg.ParseFromString(data[pos:pos + ln])
        except DecodeError as e:
            raise ImageError(f"{path} is corrupted: {e}") from None
        bad = _has_strings(msg.DESCRIPTOR) and _nul_field(msg)
        if bad:
            raise ImageError(f"{path} is corrupted: {bad} (message at byte {pos}) holds a NUL byte")
        pos += ln
        yield msg


@functools.cache
def _has_strings(desc) -> bool:
    return any(f.type == f.TYPE_STRING or (f.type == f.TYPE_MESSAGE and _has_strings(f.message_type))
               for f in desc.fields)


def _nul_field(msg) -> str:
    """The first string field holding a NUL (no path, name or address may: the OS would
    refuse it far from here), or ''."""
    for f, v in msg.ListFields():
        for item in (v if f.is_repeated else [v]):
            if f.type == f.TYPE_STRING and "\0" in item:
                return f.name
            if f.type == f.TYPE_MESSAGE and _has_strings(f.message_type) and (bad := _nul_field(item)):
                return f"{f.name}.{bad}"
    return ""


def now() -> float:
    return time.time()
