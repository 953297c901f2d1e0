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

Cost: one SQL scan, rows fetched one at a time (one scan step each); parsing is linear
in the header (a few struct unpacks per tag, one bounded ``find`` per string: a header of
128k files parses in about 50 ms).

Failure modes: a corrupt header (offsets beyond the data, counts beyond the blob, more
than ``MAX_STRINGS`` strings in a tag) is skipped and named in ``errors``; a file list
over the cap of :mod:`.model` is not indexed; an unreadable database is an error, never
an exception.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import urllib.parse
from collections.abc import Iterator
from typing import Any

from lw_embed.sources.packages.model import DbResult, Package, Steps, collect, inside, run

DIRS = ("/var/lib/rpm", "/usr/lib/sysimage/rpm")
NAME, VERSION, RELEASE, EPOCH, ARCH = 1000, 1001, 1002, 1003, 1022
OLDFILENAMES, DIRINDEXES, BASENAMES, DIRNAMES = 1027, 1116, 1117, 1118
T_INT32, T_STRING, T_STRING_ARRAY, T_I18NSTRING = 4, 6, 8, 9
_HEAD = struct.Struct(">II")
_ENTRY = struct.Struct(">iiii")
_BDB_MAGICS = (0x00061561, 0x00053162)
_MAX_HEADER = 64 << 20
MAX_STRINGS = 500_000  # strings of one tag (BASENAMES of the largest packages: ~100k)


class HeaderError(ValueError):
    """A header blob that does not parse."""


def parse_header(blob: bytes) -> dict[int, Any]:
    """Tags of one header blob: int -> str | list[str] | list[int] (other types skipped).
    Linear in the blob: strings are found with ``bytes.find`` bounded to the data, no
    copies; a tag of more than :data:`MAX_STRINGS` strings is a :class:`HeaderError`."""
    if len(blob) < 8:
        raise HeaderError("header shorter than 8 bytes")
    il, dl = _HEAD.unpack_from(blob, 0)
    start = 8 + il * 16
    if il > 100000 or start + dl > len(blob) or dl > _MAX_HEADER:
        raise HeaderError(f"header of {il} entries, {dl} data bytes does not fit {len(blob)}")
    end = start + dl
    out: dict[int, Any] = {}
    for i in range(il):
        tag, typ, off, count = _ENTRY.unpack_from(blob, 8 + i * 16)
        if off < 0 or off > dl or count < 0:
            raise HeaderError(f"tag {tag}: offset {off} beyond the data ({dl})")
        if typ == T_INT32:
            if off + 4 * count > dl:
                raise HeaderError(f"tag {tag}: {count} ints beyond the data")
            out[tag] = list(struct.unpack_from(f">{count}i", blob, start + off))
        elif typ in (T_STRING, T_STRING_ARRAY, T_I18NSTRING):
            n = 1 if typ == T_STRING else count
            if n > MAX_STRINGS or n > dl:
                raise HeaderError(f"tag {tag}: {n} strings")
            strs: list[str] = []
            pos = start + off
            for _ in range(n):
                nul = blob.find(b"\0", pos, end)
                if nul < 0:
                    raise HeaderError(f"tag {tag}: unterminated string")
                strs.append(blob[pos:nul].decode("utf-8", "replace"))
                pos = nul + 1
            out[tag] = strs[0] if typ == T_STRING else strs
    return out


def _str(tags: dict[int, Any], tag: int) -> str:
    v = tags.get(tag)
    if isinstance(v, list):
        v = v[0] if v else ""
    return v if isinstance(v, str) else ""


def package_of(tags: dict[int, Any], location: str, res: DbResult | None = None) -> Package | None:
    """The package a parsed header describes (None for gpg-pubkey); bad paths are
    dropped and counted in ``res``, a list over the cap is not indexed."""
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
        files = [f for f in tags[OLDFILENAMES] if isinstance(f, str)]
    got = run(collect(files, res if res is not None else DbResult(), f"rpm: {location}: {name}"))
    return Package(ecosystem="rpm", name=name, version=full, arch=_str(tags, ARCH),
                   source="rpm-sqlite", location=location, files=got[0],
                   reason=got[1])  # fmt: skip


def db_paths(root: str) -> list[str]:
    out = []
    for d in DIRS:
        base = inside(root, d)
        out += [os.path.join(base, n) for n in ("rpmdb.sqlite", "rpmdb.sqlite-wal", "Packages",
                                                 "Packages.db")]  # fmt: skip
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


def _rows(path: str) -> Iterator[tuple[int, bytes]]:
    """The (hnum, blob) rows, fetched one at a time (a WAL database whose ``-shm`` cannot
    be made is opened ``immutable``)."""
    uri = "file:" + urllib.parse.quote(path)
    con = sqlite3.connect(uri + "?mode=ro", uri=True)
    try:
        try:
            cur = con.execute("SELECT hnum, blob FROM Packages")
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                raise
            con.close()
            con = sqlite3.connect(uri + "?immutable=1", uri=True)
            cur = con.execute("SELECT hnum, blob FROM Packages")
        yield from cur
    finally:
        con.close()


def scan(root: str) -> Steps[DbResult]:
    """Read every rpmdb of ``root`` (see the module docstring); one step per header."""
    res = DbResult()
    for d in DIRS:
        base = inside(root, d)
        sqlite_path = os.path.join(base, "rpmdb.sqlite")
        if os.path.isfile(sqlite_path):
            yield 1
            try:
                for hnum, blob in _rows(sqlite_path):
                    yield 1
                    try:
                        pkg = package_of(parse_header(bytes(blob)), sqlite_path, res)
                    except (HeaderError, struct.error, TypeError) as exc:
                        res.errors.append(f"rpm: {sqlite_path}: header {hnum}: {exc}")
                        continue
                    if pkg is not None:
                        res.packages.append(pkg)
            except (sqlite3.Error, OSError) as exc:
                res.errors.append(f"rpm: {sqlite_path}: {exc}")
            continue
        for n in ("Packages", "Packages.db"):
            path = os.path.join(base, n)
            if os.path.isfile(path):
                yield 1
                u = _unsupported(path)
                if u is not None:
                    res.unsupported.append(u)
    return res
