"""Alpine packages: ``lib/apk/db/installed`` (apk v2), and the v3 ``installed.adb`` detected.

Interface: a text file of records separated by blank lines; each line is ``X:value`` with
a one-letter key: ``P`` name, ``V`` version, ``A`` architecture, ``o`` origin, ``F`` a
directory (relative to the root) and ``R`` a file in the directory of the last ``F``.
apk-tools 3 keeps a binary ``lib/apk/db/installed.adb``: reported in ``unsupported``
(``apk-adb``) unless the v2 file is there too.

Capability: read access to the root's ``lib/apk/db``.

Cost: one read and one pass over the file (an Alpine base image: 15 packages, ~100 KB).

Failure modes: short or key-less lines are skipped (stray blank lines inside a record end
it early, as in apk itself); a record without ``P`` is dropped; an unreadable file, one
over 64 MB, and a package over the file cap of :mod:`.model` are entries of ``errors``;
paths with a NUL byte are dropped and counted.
"""

from __future__ import annotations

import os

from lw_embed.sources.packages.model import (
    MAX_DB_BYTES,
    MAX_FILES,
    DbResult,
    Package,
    Steps,
    collect,
    inside,
    read_capped,
    run,
)

INSTALLED = "/lib/apk/db/installed"
ADB = "/lib/apk/db/installed.adb"


def db_paths(root: str) -> list[str]:
    return [inside(root, INSTALLED), inside(root, ADB)]


def parse(text: str, location: str, res: DbResult | None = None) -> list[Package]:
    """The packages of an apk v2 installed database (bad paths dropped and counted in
    ``res``, a package's list over the cap not indexed)."""
    return run(parse_steps(text, location, res if res is not None else DbResult()))


def parse_steps(text: str, location: str, res: DbResult) -> Steps[list[Package]]:
    out: list[Package] = []
    rec: dict[str, str] = {}
    files: list[str] = []
    cur_dir = ""

    def flush() -> Steps[None]:
        if rec.get("P"):
            got = yield from collect(files, res, f"apk: {location}: {rec['P']}")
            out.append(Package(ecosystem="apk", name=rec["P"], version=rec.get("V", ""),
                               arch=rec.get("A", ""), source="apk", location=location,
                               files=got[0], reason=got[1]))  # fmt: skip

    for line in text.splitlines():
        if not line.strip():
            yield from flush()
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
        if len(files) > MAX_FILES + 1:
            files.pop()  # collect() reports the package over the cap
    yield from flush()
    return out


def scan(root: str) -> Steps[DbResult]:
    res = DbResult()
    path = inside(root, INSTALLED)
    try:
        text = read_capped(path, MAX_DB_BYTES, res, "apk")
    except FileNotFoundError:
        adb = inside(root, ADB)
        if os.path.exists(adb):
            res.unsupported.append({"source": "apk-adb", "path": adb,
                                    "reason": "apk v3 installed.adb is not read"})  # fmt: skip
        yield 1
        return res
    except (OSError, ValueError) as exc:
        res.errors.append(f"apk: {path}: {getattr(exc, 'strerror', None) or exc}")
        yield 1
        return res
    yield 1
    res.packages = yield from parse_steps(text, path, res)
    return res
