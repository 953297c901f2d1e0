"""Alpine packages: ``lib/apk/db/installed`` (apk v2), and the v3 ``installed.adb`` detected.

Interface: a text file of records separated by blank lines; each line is ``X:value`` with
a one-letter key: ``P`` name, ``V`` version, ``A`` architecture, ``o`` origin, ``F`` a
directory (relative to the root) and ``R`` a file in the directory of the last ``F``.
apk-tools 3 keeps a binary ``lib/apk/db/installed.adb``: reported in ``unsupported``
(``apk-adb``) unless the v2 file is there too.

Capability: read access to the root's ``lib/apk/db``.

Cost: one read and one pass over the file (an Alpine base image: 15 packages, ~100 KB).

Failure modes: short or key-less lines are skipped (stray blank lines inside a record end
it early, as in apk itself); a record without ``P`` is dropped; an unreadable file is an
entry of ``errors``.
"""

from __future__ import annotations

import os

from lw_embed.sources.packages.model import DbResult, Package, Steps, inside, read_text

INSTALLED = "/lib/apk/db/installed"
ADB = "/lib/apk/db/installed.adb"


def db_paths(root: str) -> list[str]:
    return [inside(root, INSTALLED), inside(root, ADB)]


def parse(text: str, location: str) -> list[Package]:
    """The packages of an apk v2 installed database."""
    out: list[Package] = []
    rec: dict[str, str] = {}
    files: list[str] = []
    cur_dir = ""

    def flush() -> None:
        if rec.get("P"):
            out.append(Package(ecosystem="apk", name=rec["P"], version=rec.get("V", ""),
                               arch=rec.get("A", ""), source="apk", location=location,
                               files=tuple(files)))  # fmt: skip

    for line in text.splitlines():
        if not line.strip():
            flush()
            rec, files, cur_dir = {}, [], ""
            continue
        if len(line) < 2 or line[1] != ":":
            continue
        key, value = line[0], line[2:]
        if key == "F":
            cur_dir = "/" + value.strip("/")
            files.append(cur_dir)
        elif key == "R":
            files.append(("" if cur_dir == "/" else cur_dir) + "/" + value)
        elif key not in rec:
            rec[key] = value
    flush()
    return out


def scan(root: str) -> Steps[DbResult]:
    res = DbResult()
    path = inside(root, INSTALLED)
    try:
        text = read_text(path)
    except FileNotFoundError:
        adb = inside(root, ADB)
        if os.path.exists(adb):
            res.unsupported.append({"source": "apk-adb", "path": adb,
                                    "reason": "apk v3 installed.adb is not read"})  # fmt: skip
        yield 1
        return res
    except OSError as exc:
        res.errors.append(f"apk: {path}: {exc.strerror or exc}")
        yield 1
        return res
    yield 1
    res.packages = parse(text, path)
    return res
