"""The rpm reader: a SQLite rpmdb made here, with header blobs this file encodes; Berkeley
DB and NDB databases reported unsupported; corrupt headers named, not fatal."""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path

import pytest

from lw_embed.sources.packages import rpm
from lw_embed.sources.packages.inventory import Scanner
from lw_embed.sources.packages.model import run

Tag = tuple[int, int, object]  # (tag, type, value)


def encode_header(tags: list[Tag]) -> bytes:
    """An rpm header blob (no lead magic, as rpmdb.sqlite stores it)."""
    index = b""
    data = b""
    for tag, typ, value in tags:
        if typ == rpm.T_INT32:
            while len(data) % 4:
                data += b"\0"
            ints = list(value)  # type: ignore[call-overload]
            off, count = len(data), len(ints)
            data += struct.pack(f">{count}i", *ints)
        elif typ == rpm.T_STRING:
            off, count = len(data), 1
            data += str(value).encode() + b"\0"
        else:
            strs = list(value)  # type: ignore[call-overload]
            off, count = len(data), len(strs)
            data += b"".join(s.encode() + b"\0" for s in strs)
        index += struct.pack(">iiii", tag, typ, off, count)
    return struct.pack(">II", len(tags), len(data)) + index + data


def pkg_header(name: str, version: str, release: str, arch: str, files: list[str],
               epoch: int | None = None) -> bytes:  # fmt: skip
    dirs: list[str] = []
    bases: list[str] = []
    idx: list[int] = []
    for f in files:
        d, b = f.rsplit("/", 1)
        d += "/"
        if d not in dirs:
            dirs.append(d)
        bases.append(b)
        idx.append(dirs.index(d))
    tags: list[Tag] = [
        (rpm.NAME, rpm.T_STRING, name), (rpm.VERSION, rpm.T_STRING, version),
        (rpm.RELEASE, rpm.T_STRING, release), (rpm.ARCH, rpm.T_STRING, arch),
        (1004, rpm.T_I18NSTRING, ["a summary"]), (1009, 7, []),  # BIN: skipped
    ]  # fmt: skip
    if epoch is not None:
        tags.append((rpm.EPOCH, rpm.T_INT32, [epoch]))
    if files:
        tags += [(rpm.DIRINDEXES, rpm.T_INT32, idx), (rpm.BASENAMES, rpm.T_STRING_ARRAY, bases),
                 (rpm.DIRNAMES, rpm.T_STRING_ARRAY, dirs)]  # fmt: skip
    return encode_header(tags)


def make_rpmdb(root: Path, blobs: list[bytes], where: str = "var/lib/rpm") -> Path:
    d = root / where
    d.mkdir(parents=True)
    path = d / "rpmdb.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE Packages (hnum INTEGER PRIMARY KEY AUTOINCREMENT, "
                "blob BLOB NOT NULL)")
    con.execute("CREATE TABLE Name (key TEXT NOT NULL, hnum INTEGER NOT NULL, idx INTEGER)")
    for b in blobs:
        cur = con.execute("INSERT INTO Packages (blob) VALUES (?)", (b,))
        con.execute("INSERT INTO Name VALUES (?, ?, 0)", ("x", cur.lastrowid))
    con.commit()
    con.close()
    return path


def test_sqlite_rpmdb_exact_packages(tmp_path: Path) -> None:
    make_rpmdb(tmp_path, [
        pkg_header("bash", "5.1.8", "9.el9", "x86_64", ["/usr/bin/bash", "/usr/bin/sh",
                                                         "/usr/share/doc/bash/README"]),
        pkg_header("openssl-libs", "3.0.7", "27.el9", "x86_64",
                   ["/usr/lib64/libssl.so.3"], epoch=1),
        pkg_header("filesystem", "3.16", "2.el9", "noarch", []),
        pkg_header("gpg-pubkey", "fd431d51", "4ae0493b", "(none)", []),
    ])  # fmt: skip
    res = run(rpm.scan(str(tmp_path)))
    assert res.errors == [] and res.unsupported == []
    got = {(p.name, p.version, p.arch): p.files for p in res.packages}
    assert got == {
        ("bash", "5.1.8-9.el9", "x86_64"): ("/usr/bin/bash", "/usr/bin/sh",
                                            "/usr/share/doc/bash/README"),
        ("openssl-libs", "1:3.0.7-27.el9", "x86_64"): ("/usr/lib64/libssl.so.3",),
        ("filesystem", "3.16-2.el9", "noarch"): (),
    }  # fmt: skip
    inv = run(Scanner(str(tmp_path)).full())
    assert inv.packages[inv.owner["/usr/lib64/libssl.so.3"]].name == "openssl-libs"
    assert {p.source for p in inv.packages} == {"rpm-sqlite"}


def test_sysimage_location_is_read(tmp_path: Path) -> None:
    make_rpmdb(tmp_path, [pkg_header("zypper", "1.14", "1", "x86_64", ["/usr/bin/zypper"])],
               where="usr/lib/sysimage/rpm")  # fmt: skip
    assert [p.name for p in run(rpm.scan(str(tmp_path))).packages] == ["zypper"]


def test_corrupt_header_is_named_and_the_rest_kept(tmp_path: Path) -> None:
    good = pkg_header("ok", "1", "1", "noarch", ["/a/b"])
    truncated = good[:-5]
    bad_index = pkg_header("bad", "1", "1", "noarch", ["/a/c"])
    # a dirindex that points beyond the dirnames
    tags: list[Tag] = [(rpm.NAME, rpm.T_STRING, "badidx"), (rpm.DIRINDEXES, rpm.T_INT32, [7]),
                       (rpm.BASENAMES, rpm.T_STRING_ARRAY, ["x"]),
                       (rpm.DIRNAMES, rpm.T_STRING_ARRAY, ["/d/"])]  # fmt: skip
    make_rpmdb(tmp_path, [good, truncated, b"\x00\x00", encode_header(tags),
                          bad_index[:8] + b"\xff" * 8 + bad_index[16:]])  # fmt: skip
    res = run(rpm.scan(str(tmp_path)))
    assert [p.name for p in res.packages] == ["ok"]
    assert len(res.errors) == 4 and all("header" in e for e in res.errors)


def test_not_an_rpmdb_is_an_error(tmp_path: Path) -> None:
    d = tmp_path / "var/lib/rpm"
    d.mkdir(parents=True)
    (d / "rpmdb.sqlite").write_bytes(b"garbage, not sqlite" * 100)
    res = run(rpm.scan(str(tmp_path)))
    assert res.packages == [] and len(res.errors) == 1


@pytest.mark.parametrize("order", ["<", ">"])
def test_berkeley_db_is_reported_unsupported(tmp_path: Path, order: str) -> None:
    d = tmp_path / "var/lib/rpm"
    d.mkdir(parents=True)
    (d / "Packages").write_bytes(b"\0" * 12 + struct.pack(order + "I", 0x00061561) + b"\0" * 500)
    res = run(rpm.scan(str(tmp_path)))
    assert res.packages == []
    assert res.unsupported == [{"source": "rpm-bdb", "path": str(d / "Packages"),
                                "reason": "Berkeley DB rpmdb is not read"}]  # fmt: skip
    inv = run(Scanner(str(tmp_path)).full())
    assert inv.unsupported == res.unsupported


def test_ndb_is_reported_unsupported(tmp_path: Path) -> None:
    d = tmp_path / "usr/lib/sysimage/rpm"
    d.mkdir(parents=True)
    (d / "Packages.db").write_bytes(b"RpmP" + b"\0" * 60)
    res = run(rpm.scan(str(tmp_path)))
    assert [u["source"] for u in res.unsupported] == ["rpm-ndb"]


def test_parse_header_rejects_lies() -> None:
    with pytest.raises(rpm.HeaderError):
        rpm.parse_header(struct.pack(">II", 5, 10))  # five entries, no room for them
    with pytest.raises(rpm.HeaderError):
        rpm.parse_header(encode_header([(rpm.NAME, rpm.T_STRING, "x")])[:-1])
