"""Mutations of an image directory (a copy of a seed image), each returning a Mutant.

Every mutant says how it was sealed, which decides what a right outcome is:

* ``resealed`` -- changed, then sealed with the caller's key (`imagedir.reseal`): the
  checksum/MAC layer cannot hide a parser bug; the image is the user's own, so any outcome
  but a clear refusal or a restore is a bug (a wrong restore is only counted: the content
  of a sealed image is trusted, docs/security.md);
* ``damaged`` -- changed and not resealed (or a special file in place of an image file):
  must be refused;
* ``forged`` -- changed and made consistent WITHOUT the key (checksums recomputed, the old
  or a random MAC), or sealed with another key: must be refused ("forged accepted" else).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import random
import shutil
import stat
import struct
from pathlib import Path

import xxhash
from google.protobuf.descriptor import FieldDescriptor as FD

import conftest
from nbcheckpoint.engine import images as images_pkg
from nbcheckpoint.engine.images import imagedir, key as keys
from nbcheckpoint.engine.images.names import INVENTORY
from nbcheckpoint.engine.sys import userns


@dataclasses.dataclass
class Mutant:
    kind: str           # family: struct, bytes, special, forged (the report groups by it)
    trust: str          # resealed / damaged / forged
    what: str           # the exact change, to replay it by hand


def _message_classes() -> dict[str, type]:
    out = {}
    for m in pkgutil.iter_modules(images_pkg.__path__):
        if m.name.endswith("_pb2"):
            mod = importlib.import_module(f"{images_pkg.__name__}.{m.name}")
            for cls in vars(mod).values():
                if isinstance(cls, type) and hasattr(cls, "DESCRIPTOR") and hasattr(cls, "SerializeToString"):
                    out[cls.DESCRIPTOR.full_name] = cls
    return out


CLASSES = _message_classes()
_HEAD = len(imagedir.MAGIC)


# ----------------------------------------------------------------------------- message files

def read_messages(path: Path):
    """(class, [messages]) of a message file, or None if it is not one (page data, raw)."""
    data = path.read_bytes()
    if not data.startswith(imagedir.MAGIC):
        return None
    (n,) = struct.unpack_from("<H", data, _HEAD)
    cls = CLASSES[data[_HEAD + 2:_HEAD + 2 + n].decode()]
    pos, msgs = _HEAD + 2 + n, []
    while pos < len(data):
        (ln,) = struct.unpack_from("<I", data, pos)
        m = cls()
        m.ParseFromString(data[pos + 4:pos + 4 + ln])
        msgs.append(m)
        pos += 4 + ln
    return cls, msgs


def write_messages(path: Path, cls, msgs) -> None:
    """The same layout as imagedir.MessageWriter (magic, type name, u32-prefixed messages)."""
    name = cls.DESCRIPTOR.full_name.encode()
    out = bytearray(imagedir.MAGIC + struct.pack("<H", len(name)) + name)
    for m in msgs:
        data = m.SerializeToString()
        out += struct.pack("<I", len(data)) + data
    path.write_bytes(bytes(out))


def message_files(img: Path) -> list[Path]:
    return sorted(p for p in img.iterdir() if p.name != INVENTORY and p.read_bytes()[:_HEAD] == imagedir.MAGIC)


# ----------------------------------------------------------------------------- field values

_INT_LIMITS = {FD.TYPE_INT32: (-2**31, 2**31 - 1), FD.TYPE_SINT32: (-2**31, 2**31 - 1),
               FD.TYPE_SFIXED32: (-2**31, 2**31 - 1), FD.TYPE_INT64: (-2**63, 2**63 - 1),
               FD.TYPE_SINT64: (-2**63, 2**63 - 1), FD.TYPE_SFIXED64: (-2**63, 2**63 - 1),
               FD.TYPE_UINT32: (0, 2**32 - 1), FD.TYPE_FIXED32: (0, 2**32 - 1),
               FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1)}


def _int_value(rng: random.Random, old: int, lo: int, hi: int) -> int:
    v = rng.choice([0, -1, 1, hi, lo, hi // 2 + 1, 2**31, 2**32, 2**47, old + 1, old - 1, old + 4096,
                    old - 4096, old * 2, old // 2, old ^ (1 << rng.randrange(64)), rng.randint(lo, hi),
                    rng.randrange(1 << 16)])
    return v % (hi + 1) if lo == 0 else max(lo, min(hi, v))


def _string_value(rng: random.Random, old: str) -> str:
    return rng.choice(["", "\0", old + "\0x", "x" * rng.choice([256, 4097, 1 << 20]), "../" * 40 + "etc/passwd",
                       "/proc/self/status", "/dev/zero", old[: len(old) // 2], old * 2, "\u2603" * 100])


def _bytes_value(rng: random.Random, old: bytes) -> bytes:
    return rng.choice([b"", old[: len(old) // 2], old + old, old + b"\0" * rng.choice([1, 7, 4096]),
                       os.urandom(len(old)), b"\xff" * rng.choice([1, 64, 1 << 16])])


_DEFAULTS = {FD.TYPE_STRING: "", FD.TYPE_BYTES: b"", FD.TYPE_BOOL: False, FD.TYPE_DOUBLE: 0.0, FD.TYPE_FLOAT: 0.0}


def _scalar(rng: random.Random, f, old):
    if f.type == FD.TYPE_BOOL:
        return not old
    if f.type == FD.TYPE_ENUM:
        known = [v.number for v in f.enum_type.values]
        return rng.choice([max(known) + 1, max(known) + rng.randrange(1, 1000), -1, 2**31 - 1, rng.choice(known)])
    if f.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return rng.choice([0.0, -1.0, float("inf"), float("nan"), 1e300, old * 2])
    if f.type == FD.TYPE_STRING:
        return _string_value(rng, old)
    if f.type == FD.TYPE_BYTES:
        return _bytes_value(rng, old)
    lo, hi = _INT_LIMITS[f.type]
    return _int_value(rng, old, lo, hi)


def _fields(msg, prefix=""):
    """(owner message, field, path) for every field of msg, nested ones included (set or not)."""
    for f in msg.DESCRIPTOR.fields:
        path = f"{prefix}{f.name}"
        yield msg, f, path
        if f.type == FD.TYPE_MESSAGE:
            if f.is_repeated:
                for i, sub in enumerate(getattr(msg, f.name)):
                    yield from _fields(sub, f"{path}[{i}].")
            elif msg.HasField(f.name):
                yield from _fields(getattr(msg, f.name), f"{path}.")


def mutate_field(rng: random.Random, msg) -> str:
    """Change one field of msg (anywhere in it); returns what was done."""
    cands = [c for c in _fields(msg)
             if c[1].is_repeated or c[1].type != FD.TYPE_MESSAGE]
    owner, f, path = rng.choice(cands)
    if f.is_repeated:
        rep = getattr(owner, f.name)
        op = rng.choice(["drop", "dup", "clear", "add", "elem", "elem", "swap"])
        if len(rep) == 0 or op == "add":
            if f.type == FD.TYPE_MESSAGE:
                rep.add()
            else:
                rep.append(_scalar(rng, f, _DEFAULTS.get(f.type, 0)))
            return f"{path}: one element added"
        i = rng.randrange(len(rep))
        if op == "drop":
            del rep[i]
            return f"{path}[{i}] dropped"
        if op == "clear":
            del rep[:]
            return f"{path} cleared"
        if op == "dup":
            if f.type == FD.TYPE_MESSAGE:
                rep.add().CopyFrom(rep[i])
            else:
                rep.append(rep[i])
            return f"{path}[{i}] duplicated"
        if op == "swap" and len(rep) > 1:
            j = rng.randrange(len(rep))
            if f.type == FD.TYPE_MESSAGE:
                a, b = type(rep[i])(), type(rep[j])()
                a.CopyFrom(rep[i]), b.CopyFrom(rep[j])
                rep[i].CopyFrom(b), rep[j].CopyFrom(a)
            else:
                rep[i], rep[j] = rep[j], rep[i]
            return f"{path}[{i}] and [{j}] swapped"
        if f.type == FD.TYPE_MESSAGE:
            return mutate_field(rng, rep[i]).join([f"{path}[{i}].", ""])
        old = rep[i]
        rep[i] = _scalar(rng, f, old)
        return f"{path}[{i}]: {_short(old)} -> {_short(rep[i])}"
    old = getattr(owner, f.name)
    new = _scalar(rng, f, old)
    setattr(owner, f.name, new)
    return f"{path}: {_short(old)} -> {_short(new)}"


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


# ----------------------------------------------------------------------------- targeted changes

def _targeted(rng: random.Random, img: Path, pid: int) -> str | None:
    """Changes a random field mutation rarely makes: pagemap runs, VMA ranges, pids, fds."""
    choice = rng.choice(["pagemap", "vma", "pids", "fd", "ids"])
    if choice == "pagemap" and (img / f"pagemap-{pid}.img").exists():
        p = img / f"pagemap-{pid}.img"
        cls, ents = read_messages(p)
        if not ents:
            return None
        i = rng.randrange(len(ents))
        e = ents[i]
        op = rng.choice(["overlap", "beyond", "huge", "zero", "unaligned", "reverse"])
        if op == "overlap" and len(ents) > 1:
            j = (i + 1) % len(ents)
            ents[j].vaddr = e.vaddr + 4096 * max(0, e.nr_pages - 1)
        elif op == "beyond":
            e.vaddr += 4096 * (e.nr_pages + rng.choice([0, 1, 1 << 20]))
        elif op == "huge":
            e.nr_pages = rng.choice([2**32, 2**52, 2**64 - 1, e.nr_pages + 1])
        elif op == "zero":
            e.nr_pages = 0
        elif op == "unaligned":
            e.vaddr += rng.choice([1, 8, 2048])
        else:
            ents.reverse()
        write_messages(p, cls, ents)
        return f"pagemap-{pid}.img entry {i}: {op}"
    if choice == "vma":
        p = img / f"mm-{pid}.img"
        cls, (mm,) = read_messages(p)
        i = rng.randrange(len(mm.vmas))
        v = mm.vmas[i]
        op = rng.choice(["inverted", "empty", "overlap", "kernel", "unaligned"])
        if op == "inverted":
            v.start, v.end = v.end, v.start
        elif op == "empty":
            v.end = v.start
        elif op == "overlap" and len(mm.vmas) > 1:
            v.end = mm.vmas[(i + 1) % len(mm.vmas)].end
        elif op == "kernel":
            v.start, v.end = 0xffff800000000000, 0xffff800000001000
        else:
            v.end += 1
        write_messages(p, cls, [mm])
        return f"mm-{pid}.img vma {i}: {op}"
    if choice == "pids":
        p = img / "pstree.img"
        cls, procs = read_messages(p)
        pr = procs[rng.randrange(len(procs))]
        op = rng.choice(["tid-dup", "tid-swap", "pid-collide", "ppid-self", "pid-0", "pid-1"])
        if op == "tid-dup":
            pr.tids.append(pr.tids[0] if pr.tids else pr.pid)
        elif op == "tid-swap" and len(pr.tids) > 1:
            pr.tids[0], pr.tids[1] = pr.tids[1], pr.tids[0]
        elif op == "pid-collide" and len(procs) > 1:
            procs[-1].pid = procs[0].pid
        elif op == "ppid-self":
            pr.ppid = pr.pid
        elif op == "pid-0":
            pr.pid = 0
        else:
            pr.pid = 1
        write_messages(p, cls, procs)
        return f"pstree.img pid {pr.pid}: {op}"
    if choice == "fd" and (img / f"fds-{pid}.img").exists():
        p = img / f"fds-{pid}.img"
        cls, fds = read_messages(p)
        if not fds:
            return None
        e = fds[rng.randrange(len(fds))]
        fields = {f.name for f in e.DESCRIPTOR.fields}
        name = "fd" if "fd" in fields else rng.choice(sorted(fields))
        f = e.DESCRIPTOR.fields_by_name[name]
        old = getattr(e, name)
        if f.type in _INT_LIMITS:
            setattr(e, name, rng.choice([2**31 - 1, 1 << 20, 65535, 0, 1, 2]) % (_INT_LIMITS[f.type][1] + 1))
        write_messages(p, cls, fds)
        return f"fds-{pid}.img {name}: {old} -> {getattr(e, name)}"
    if choice == "ids":                 # an fd pointing to no file description, or two
        p = img / f"fds-{pid}.img"
        if not p.exists():
            return None
        cls, fds = read_messages(p)
        if not fds:
            return None
        e = fds[rng.randrange(len(fds))]
        ids = [f.name for f in e.DESCRIPTOR.fields if f.name.endswith("id")]
        if not ids:
            return None
        name = rng.choice(ids)
        setattr(e, name, rng.choice([0, 2**32 - 1, getattr(e, name) + 1000]))
        write_messages(p, cls, fds)
        return f"fds-{pid}.img {name} -> {getattr(e, name)}"
    return None


def _length_prefix(rng: random.Random, p: Path) -> str:
    """A message's u32 length (or the type name's u16 length) made wrong."""
    data = bytearray(p.read_bytes())
    (n,) = struct.unpack_from("<H", data, _HEAD)
    offs, pos = [], _HEAD + 2 + n
    while pos < len(data):
        offs.append(pos)
        pos += 4 + struct.unpack_from("<I", data, pos)[0]
    if not offs or rng.random() < 0.2:
        new = rng.choice([0, n - 1, n + 1, 0xFFFF])
        struct.pack_into("<H", data, _HEAD, new)
        p.write_bytes(bytes(data))
        return f"{p.name}: type name length {n} -> {new}"
    i = rng.randrange(len(offs))
    old = struct.unpack_from("<I", data, offs[i])[0]
    new = rng.choice([0, old - 1 if old else 1, old + 1, 2**32 - 1, imagedir.MAX_MESSAGE + 1, len(data)])
    struct.pack_into("<I", data, offs[i], new)
    p.write_bytes(bytes(data))
    return f"{p.name}: message {i}'s length {old} -> {new}"


# ----------------------------------------------------------------------------- families

def structural(rng: random.Random, img: Path, pid: int) -> Mutant:
    """Decode a message file (or the inventory), change it, write it back, reseal."""
    what = None
    if rng.random() < 0.3:
        what = _targeted(rng, img, pid)
    if what is None and rng.random() < 0.08:          # the inventory's own fields
        inv = imagedir.ImageReader(str(img)).inventory
        skip = {"format_version"}
        for _ in range(10):
            what = "inventory: " + mutate_field(rng, inv)
            if not any(s in what for s in skip):
                break
        imagedir.reseal(img, inv)
        return Mutant("struct", "resealed", what)
    if what is None and rng.random() < 0.06:
        what = _length_prefix(rng, rng.choice(message_files(img)))
    if what is None:
        p = rng.choice(message_files(img))
        cls, msgs = read_messages(p)
        op = rng.random()
        if op < 0.1 and msgs:
            i = rng.randrange(len(msgs))
            del msgs[i]
            what = f"{p.name}: message {i} dropped"
        elif op < 0.18 and msgs:
            i = rng.randrange(len(msgs))
            msgs.insert(i, msgs[i])
            what = f"{p.name}: message {i} duplicated"
        elif op < 0.22:
            msgs.append(cls())
            what = f"{p.name}: an empty message appended"
        elif msgs:
            i = rng.randrange(len(msgs))
            what = f"{p.name} message {i}: {mutate_field(rng, msgs[i])}"
        else:
            msgs.append(cls())
            what = f"{p.name}: an empty message added"
        write_messages(p, cls, msgs)
    imagedir.reseal(img)
    return Mutant("struct", "resealed", what)


def byte_level(rng: random.Random, img: Path, pid: int) -> Mutant:
    """Flip, truncate or extend a file; resealed or not."""
    p = rng.choice(sorted(img.iterdir()))
    data = bytearray(p.read_bytes())
    op = rng.choice(["flip", "flip", "flips", "truncate", "extend", "zero-run"])
    if op == "flip" and data:
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
        what = f"{p.name}: bit flipped at {i}"
    elif op == "flips" and data:
        for _ in range(rng.randint(2, 32)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        what = f"{p.name}: random bytes"
    elif op == "truncate" and data:
        n = rng.randrange(len(data))
        del data[n:]
        what = f"{p.name}: truncated to {n}"
    elif op == "zero-run" and data:
        i = rng.randrange(len(data))
        n = rng.randint(1, 64)
        data[i:i + n] = bytes(len(data[i:i + n]))
        what = f"{p.name}: {n} bytes zeroed at {i}"
    else:
        n = rng.choice([1, 4, 4096, 65536])
        data += os.urandom(n)
        what = f"{p.name}: extended by {n}"
    if data == p.read_bytes():                      # e.g. zeroes written over zeroes
        data += b"\0"
        what += ", extended by 1"
    p.write_bytes(bytes(data))
    if p.name != INVENTORY and rng.random() < 0.5:
        imagedir.reseal(img)
        return Mutant("bytes-resealed", "resealed", what)
    return Mutant("bytes", "damaged", what)


def special(rng: random.Random, img: Path, pid: int) -> Mutant:
    """A special file in place of an image file (not resealed: reseal would read it)."""
    p = rng.choice(sorted(img.iterdir()))
    copy = img.parent / f".{img.name}-{p.name}.orig"
    shutil.copyfile(p, copy)
    p.unlink()
    op = rng.choice(["fifo", "symlink-zero", "symlink-copy", "symlink-loop", "dir", "chardev-zero",
                     "chardev-null", "sparse", "socket", "hardlink"])
    if op == "fifo":
        os.mkfifo(p)
    elif op == "symlink-zero":
        os.symlink("/dev/zero", p)
    elif op == "symlink-copy":        # same bytes, so only the refusal of links can tell
        os.symlink(copy, p)
    elif op == "symlink-loop":
        os.symlink(p.name, p)
    elif op == "dir":
        p.mkdir()
    elif op.startswith("chardev-"):
        dev = "/dev/zero" if op == "chardev-zero" else "/dev/null"
        if userns.privileged():
            os.mknod(p, stat.S_IFCHR | 0o600, os.stat(dev).st_rdev)
        else:               # no mknod without root: the device bound there, in the run's mount namespace
            p.touch(0o600)
            conftest.bind(dev, p)
    elif op == "socket":
        import socket
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()
    elif op == "hardlink":            # a regular file, same bytes: accepted is right
        os.link(copy, p)
        return Mutant("special-hardlink", "pristine", f"{p.name}: a hard link to a copy")
    else:
        with open(p, "wb") as f:
            f.truncate(rng.choice([1 << 30, 1 << 40]))
    if op != "symlink-copy" and op != "hardlink":
        copy.unlink()
    return Mutant("special", "damaged", f"{p.name}: {op}")


def forged(rng: random.Random, img: Path, pid: int, other_key: str) -> Mutant:
    """A change made consistent without the key, or sealed with another one."""
    op = rng.choice(["other-key", "old-mac", "random-mac", "our-id-other-mac", "unsealed-format", "no-change-other-key"])
    orig = (img / INVENTORY).read_bytes()
    head_len = imagedir._SEAL.size
    if op != "no-change-other-key":
        for _ in range(10):                     # resealed with our key: the base to forge from
            structural(rng, img, pid)
            raw = (img / INVENTORY).read_bytes()
            if raw[head_len + keys.MAC_SIZE:] != orig[head_len + keys.MAC_SIZE:]:
                break
    raw = (img / INVENTORY).read_bytes()
    if op in ("other-key", "no-change-other-key", "our-id-other-mac"):
        try:
            inv = imagedir.ImageReader(str(img)).inventory  # read under our key...
        except imagedir.ImageError:                         # (the change made it unreadable)
            _with_mac(img, raw, os.urandom(keys.MAC_SIZE))
            return Mutant("forged", "forged", "random-mac")
        old = os.environ[keys.KEY_ENV]
        os.environ[keys.KEY_ENV] = other_key
        try:
            imagedir.reseal(img, inv)                       # ...sealed under the other
        finally:
            os.environ[keys.KEY_ENV] = old
        if op == "our-id-other-mac":            # another key's MAC under our key's id
            forged_raw = (img / INVENTORY).read_bytes()
            ours = keys.load()
            head = imagedir._SEAL.pack(imagedir.SEAL_MAGIC, imagedir.FORMAT_VERSION, ours.id)
            raw2 = head + forged_raw[head_len:-16]
            (img / INVENTORY).write_bytes(raw2 + xxhash.xxh3_128_digest(raw2))
    elif op in ("old-mac", "random-mac"):
        # the seed's MAC (or random bytes) over the changed body, checksums consistent
        _with_mac(img, raw, orig[head_len:head_len + keys.MAC_SIZE] if op == "old-mac" else os.urandom(keys.MAC_SIZE))
    else:                                       # the unsealed layout of format 2
        (img / INVENTORY).write_bytes(raw[head_len + keys.MAC_SIZE:-16])
    return Mutant("forged", "forged", op)


def _with_mac(img: Path, raw: bytes, mac: bytes) -> None:
    """inventory.img (raw) with another MAC, its outer checksum made consistent."""
    head_len = imagedir._SEAL.size
    raw2 = raw[:head_len] + mac + raw[head_len + keys.MAC_SIZE:-16]
    (img / INVENTORY).write_bytes(raw2 + xxhash.xxh3_128_digest(raw2))
