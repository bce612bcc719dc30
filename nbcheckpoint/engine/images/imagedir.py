"""The image directory: how files are written, named, checksummed and read.

Layout (one directory per image, 0700; files 0600)::

    inventory.img          table of contents, written last (checksums of all files)
    pstree.img             Process messages
    task-PID.img           TaskCore (per-process state)
    core-PID.img           one ThreadCore per thread, the main thread first
    mm-PID.img             Mm
    files-PID.img          FdEntry messages
    pagemap-NAME.img       PagemapHead, then PagemapEntry runs
    pages-NAME.img         raw page bytes of the LOCAL runs, in order
    file-ID.img            content of a file deleted while open

A message file is: magic (8 bytes), the message type's full name (u16 length +
utf-8), then messages each prefixed by a u32 length.  The type name makes a
foreign or mixed-up file fail loudly instead of parsing as garbage.

Atomicity: everything is written into a hidden sibling directory, fsynced,
then renamed onto the final name; an image is complete or absent.
"""
from __future__ import annotations

import os
import shutil
import struct
import tempfile
import time

import xxhash

from ..errors import ImageError
from . import inventory_pb2

FORMAT_VERSION = 1
MAGIC = b"NBCKIMG\x01"
INVENTORY = "inventory.img"
_LEN = struct.Struct("<I")
MAX_MESSAGE = 64 << 20


class _HashingFile:
    """A file opened for writing that checksums what goes through it."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.hash = xxhash.xxh3_128()
        self.size = 0

    def write(self, data) -> None:
        self.hash.update(data)
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.size += len(data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class MessageWriter(_HashingFile):
    def __init__(self, path: str, type_name: str):
        super().__init__(path)
        name = type_name.encode()
        self.write(MAGIC + struct.pack("<H", len(name)) + name)

    def add(self, msg) -> None:
        data = msg.SerializeToString()
        self.write(_LEN.pack(len(data)) + data)


class ImageWriter:
    """Builds an image in a hidden temporary directory, then commits it."""

    def __init__(self, final_dir: str):
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

    def messages(self, name: str, type_name: str) -> MessageWriter:
        w = MessageWriter(self.path(name), type_name)
        self._files.append(w)
        return w

    def raw(self, name: str) -> _HashingFile:
        w = _HashingFile(self.path(name))
        self._files.append(w)
        return w

    def finish_files(self) -> None:
        """fsync and close every data file (the slow part on a real disk)."""
        for f in self._files:
            if f.fd >= 0:
                os.fsync(f.fd)
                f.close()
            self._sums.append(inventory_pb2.FileSum(name=os.path.basename(f.path), size=f.size,
                                                    xxh3_128=f.hash.digest()))
        self._files = []

    def commit(self, inv: inventory_pb2.Inventory) -> str:
        self.finish_files()
        inv.format_version = FORMAT_VERSION
        inv.files.extend(self._sums)
        w = MessageWriter(self.path(INVENTORY), "nbcheckpoint.images.Inventory")
        w.add(inv)
        # The inventory checks itself: a trailing checksum of all bytes before it.
        digest = w.hash.digest()
        w.write(digest)
        os.fsync(w.fd)
        w.close()
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


def _remove_abandoned(parent: str, name: str) -> None:
    """Partial images of `name` left by a dump whose engine died (its pid is in the name)."""
    prefix = f".{name}.partial-"
    for entry in os.listdir(parent):
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading -------------------------------------------------------------------
class ImageReader:
    """Opens an image dir, verifying its inventory; files are verified on use."""

    def __init__(self, images_dir: str):
        self.dir = os.path.abspath(images_dir)
        if not os.path.isdir(self.dir):
            raise ImageError(f"no image at {self.dir}: not a directory")
        inv_path = os.path.join(self.dir, INVENTORY)
        if not os.path.exists(inv_path):
            raise ImageError(f"{self.dir} holds no {INVENTORY}: not an nbcheckpoint image, "
                             "or a dump that did not complete")
        with open(inv_path, "rb") as f:
            raw = f.read()
        if len(raw) < 16 + len(MAGIC) or raw[:len(MAGIC)] != MAGIC:
            raise ImageError(f"{inv_path} is not an nbcheckpoint inventory (bad magic)")
        body, digest = raw[:-16], raw[-16:]
        if xxhash.xxh3_128_digest(body) != digest:
            raise ImageError(f"{inv_path} is corrupted (checksum mismatch)")
        msgs = list(_parse_messages(body, inv_path, "nbcheckpoint.images.Inventory", inventory_pb2.Inventory))
        if len(msgs) != 1:
            raise ImageError(f"{inv_path} holds {len(msgs)} inventories, expected 1")
        self.inventory = msgs[0]
        if self.inventory.format_version != FORMAT_VERSION:
            raise ImageError(f"image {self.dir} has format version {self.inventory.format_version}; "
                             f"this nbcheckpoint reads version {FORMAT_VERSION}")
        self.sums = {s.name: s for s in self.inventory.files}

    def has(self, name: str) -> bool:
        return name in self.sums

    def _sum(self, name: str):
        s = self.sums.get(name)
        if s is None:
            raise ImageError(f"image {self.dir} lacks {name} (not listed in its inventory)")
        return s

    def check_size(self, name: str) -> str:
        s = self._sum(name)
        path = os.path.join(self.dir, name)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise ImageError(f"image file {path} is missing") from None
        if size != s.size:
            raise ImageError(f"image file {path} is {size} bytes, the inventory says {s.size}: truncated or damaged")
        return path

    def read_bytes(self, name: str) -> bytes:
        path = self.check_size(name)
        with open(path, "rb") as f:
            data = f.read()
        if xxhash.xxh3_128_digest(data) != self._sum(name).xxh3_128:
            raise ImageError(f"image file {path} is corrupted (checksum mismatch)")
        return data

    def messages(self, name: str, msg_cls) -> list:
        data = self.read_bytes(name)
        return list(_parse_messages(data, os.path.join(self.dir, name), msg_cls.DESCRIPTOR.full_name, msg_cls))

    def open_raw(self, name: str) -> "RawReader":
        return RawReader(self.check_size(name), self._sum(name).xxh3_128)

    def verify_all_metadata(self) -> None:
        """Check every file's size, and the checksum of all but page data (see RawReader)."""
        for name in self.sums:
            self.check_size(name)
            if not name.startswith("pages-"):
                self.read_bytes(name)


class RawReader:
    """Sequential reader of a raw data file; checks its checksum at the end.

    Page data is verified while it streams into the restored process (reading
    1 GiB twice would halve restore speed); a mismatch is raised before that
    process ever runs, and restore then kills it.
    """

    def __init__(self, path: str, digest: bytes):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.digest = digest
        self.hash = xxhash.xxh3_128()

    def readinto(self, buf) -> int:
        view = memoryview(buf)
        got = 0
        while got < len(view):
            n = os.readv(self.fd, [view[got:]])
            if n == 0:
                raise ImageError(f"image file {self.path} ends early: truncated")
            got += n
        self.hash.update(view[:got])
        return got

    def verify(self, chunk: int = 16 << 20) -> None:
        """Read what is left to the end and check the checksum (restore.verify)."""
        while True:
            data = os.read(self.fd, chunk)
            if not data:
                break
            self.hash.update(data)
        self.finish()

    def finish(self) -> None:
        extra = os.read(self.fd, 1)
        self.close()
        if extra:
            raise ImageError(f"image file {self.path} has trailing data: damaged")
        if self.hash.digest() != self.digest:
            raise ImageError(f"image file {self.path} is corrupted (checksum mismatch)")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _parse_messages(data: bytes, path: str, type_name: str, msg_cls):
    from google.protobuf.message import DecodeError
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
        pos += ln
        yield msg


def now() -> float:
    return time.time()
