"""RPM packages: the SQLite rpmdb, its header blobs parsed here; BDB and NDB detected.

Interface: ``rpmdb.sqlite`` in ``var/lib/rpm`` or ``usr/lib/sysimage/rpm``, opened
read-only with the stdlib :mod:`sqlite3`; table ``Packages(hnum, blob)`` holds one header
per package. A header blob is ``il`` (u32 BE, number of index entries), ``dl`` (u32 BE,
data size), ``il`` entries of 16 bytes (tag, type, offset, count: u32 BE each) and ``dl``
bytes of data. Types read here: INT32 (4), STRING (6), STRING_ARRAY (8), I18NSTRING (9).
Tags: NAME 1000, VERSION 1001, RELEASE 1002, EPOCH 1003, ARCH 1022, DIRINDEXES 1116,
BASENAMES 1117, DIRNAMES 1118 (files are ``dirnames[dirindexes[i]] + basenames[i]``),
OLDFILENAMES 1027. ``gpg-pubkey`` pseudo-packages are skipped (no files, not software).
Older formats are detected and reported in ``unsupported``, not read: Berkeley DB
``Packages`` (hash magic 0x00061561 or btree 0x00053162 at offset 12, either byte order)
as ``rpm-bdb``, NDB ``Packages.db`` (magic ``RpmP``) as ``rpm-ndb``.

Capability: read access to the rpmdb (a read-only SQLite open needs no lock; a WAL
database may need its ``-shm`` file: then it is opened ``immutable``).

Cost: one SQL scan; parsing is a few struct unpacks per tag (about 20 us a header).

Failure modes: a corrupt header (offsets beyond the data, counts beyond the blob) is
skipped and named in ``errors``; an unreadable database is an error, never an exception.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import urllib.parse
from typing import Any

from lw_embed.sources.packages.model import DbResult, Package, Steps, inside

DIRS = ("/var/lib/rpm", "/usr/lib/sysimage/rpm")
NAME, VERSION, RELEASE, EPOCH, ARCH = 1000, 1001, 1002, 1003, 1022
OLDFILENAMES, DIRINDEXES, BASENAMES, DIRNAMES = 1027, 1116, 1117, 1118
T_INT32, T_STRING, T_STRING_ARRAY, T_I18NSTRING = 4, 6, 8, 9
_HEAD = struct.Struct(">II")
_ENTRY = struct.Struct(">iiii")
_BDB_MAGICS = (0x00061561, 0x00053162)
_MAX_HEADER = 64 << 20


class HeaderError(ValueError):
    """A header blob that does not parse."""


def parse_header(blob: bytes) -> dict[int, Any]:
    """Tags of one header blob: int -> str | list[str] | list[int] (other types skipped)."""
    if len(blob) < 8:
        raise HeaderError("header shorter than 8 bytes")
    il, dl = _HEAD.unpack_from(blob, 0)
    start = 8 + il * 16
    if il > 100000 or start + dl > len(blob) or dl > _MAX_HEADER:
        raise HeaderError(f"header of {il} entries, {dl} data bytes does not fit {len(blob)}")
    data = memoryview(blob)[start : start + dl]
    out: dict[int, Any] = {}
    for i in range(il):
        tag, typ, off, count = _ENTRY.unpack_from(blob, 8 + i * 16)
        if off < 0 or off > dl or count < 0:
            raise HeaderError(f"tag {tag}: offset {off} beyond the data ({dl})")
        if typ == T_INT32:
            if off + 4 * count > dl:
                raise HeaderError(f"tag {tag}: {count} ints beyond the data")
            out[tag] = list(struct.unpack_from(f">{count}i", data, off))
        elif typ in (T_STRING, T_STRING_ARRAY, T_I18NSTRING):
            n = 1 if typ == T_STRING else count
            strs: list[str] = []
            pos = off
            for _ in range(n):
                end = bytes(data[pos:]).find(b"\0") if pos < dl else -1
                if end < 0:
                    raise HeaderError(f"tag {tag}: unterminated string")
                strs.append(bytes(data[pos : pos + end]).decode("utf-8", "replace"))
                pos += end + 1
            out[tag] = strs[0] if typ == T_STRING else strs
    return out


def _str(tags: dict[int, Any], tag: int) -> str:
    v = tags.get(tag)
    if isinstance(v, list):
        v = v[0] if v else ""
    return v if isinstance(v, str) else ""


def package_of(tags: dict[int, Any], location: str) -> Package | None:
    """The package a parsed header describes (None for gpg-pubkey)."""
    name = _str(tags, NAME)
    if not name:
        raise HeaderError("no NAME tag")
    if name == "gpg-pubkey":
        return None
    version = _str(tags, VERSION)
    release = _str(tags, RELEASE)
    epoch = tags.get(EPOCH)
    full = f"{version}-{release}" if release else version
    if isinstance(epoch, list) and epoch and epoch[0]:
        full = f"{epoch[0]}:{full}"
    files: list[str] = []
    bases, dirs, idx = tags.get(BASENAMES), tags.get(DIRNAMES), tags.get(DIRINDEXES)
    if isinstance(bases, list) and isinstance(dirs, list) and isinstance(idx, list):
        if len(bases) != len(idx):
            raise HeaderError(f"{name}: {len(bases)} basenames, {len(idx)} dirindexes")
        for b, i in zip(bases, idx, strict=True):
            if not 0 <= i < len(dirs):
                raise HeaderError(f"{name}: dirindex {i} beyond {len(dirs)} dirnames")
            files.append(dirs[i] + b)
    elif isinstance(tags.get(OLDFILENAMES), list):
        files = list(tags[OLDFILENAMES])
    return Package(ecosystem="rpm", name=name, version=full, arch=_str(tags, ARCH),
                   source="rpm-sqlite", location=location, files=tuple(files))  # fmt: skip


def db_paths(root: str) -> list[str]:
    out = []
    for d in DIRS:
        base = inside(root, d)
        out += [os.path.join(base, n) for n in ("rpmdb.sqlite", "Packages", "Packages.db")]
    return out


def _unsupported(path: str) -> dict[str, str] | None:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if os.path.basename(path) == "Packages.db" or head[:4] == b"RpmP":
        return {"source": "rpm-ndb", "path": path, "reason": "NDB rpmdb is not read"}
    if len(head) >= 16:
        for order in ("<", ">"):
            if struct.unpack_from(order + "I", head, 12)[0] in _BDB_MAGICS:
                return {"source": "rpm-bdb", "path": path,
                        "reason": "Berkeley DB rpmdb is not read"}  # fmt: skip
    return {"source": "rpm-unknown", "path": path, "reason": "unrecognised rpmdb file"}


def _rows(path: str) -> list[tuple[int, bytes]]:
    uri = "file:" + urllib.parse.quote(path)
    try:
        con = sqlite3.connect(uri + "?mode=ro", uri=True)
        try:
            return list(con.execute("SELECT hnum, blob FROM Packages"))
        finally:
            con.close()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            raise
        con = sqlite3.connect(uri + "?immutable=1", uri=True)
        try:
            return list(con.execute("SELECT hnum, blob FROM Packages"))
        finally:
            con.close()


def scan(root: str) -> Steps[DbResult]:
    """Read every rpmdb of ``root`` (see the module docstring)."""
    res = DbResult()
    for d in DIRS:
        base = inside(root, d)
        sqlite_path = os.path.join(base, "rpmdb.sqlite")
        if os.path.isfile(sqlite_path):
            yield 1
            try:
                rows = _rows(sqlite_path)
            except (sqlite3.Error, OSError) as exc:
                res.errors.append(f"rpm: {sqlite_path}: {exc}")
                rows = []
            for hnum, blob in rows:
                try:
                    pkg = package_of(parse_header(bytes(blob)), sqlite_path)
                except (HeaderError, struct.error, TypeError) as exc:
                    res.errors.append(f"rpm: {sqlite_path}: header {hnum}: {exc}")
                    continue
                if pkg is not None:
                    res.packages.append(pkg)
            continue
        for n in ("Packages", "Packages.db"):
            path = os.path.join(base, n)
            if os.path.isfile(path):
                yield 1
                u = _unsupported(path)
                if u is not None:
                    res.unsupported.append(u)
    return res
