"""Debian packages: ``var/lib/dpkg/status`` (or distroless ``status.d/``) and file lists.

Interface: plain files under the root. ``var/lib/dpkg/status`` is a sequence of
RFC 822-like stanzas (``Package``, ``Status: want flag state``, ``Version``,
``Architecture``, ...); a package is reported when its state leaves files on disk
(``installed``, ``unpacked``, ``half-configured``, ``half-installed``,
``triggers-awaited``, ``triggers-pending``), not ``config-files`` or ``not-installed``.
Its files come from ``info/<name>:<arch>.list`` (Multi-Arch: same) or ``info/<name>.list``,
else from ``info/<name>.md5sums`` (``<md5>  <relative path>``). Distroless images have no
``status`` but ``status.d/<name>`` (one control stanza each, no ``Status`` field) with
``status.d/<name>.md5sums`` beside it.

Capability: read access to the root's ``var/lib/dpkg``.

Cost: one read of the status file plus one read per package's file list (the scan's
units); on this machine 710 lists and about 120k paths in about 0.2 s.

Failure modes: a missing status file is no dpkg database (an empty result); an unreadable
one, or an unreadable status.d entry, is an entry of ``errors``; so is a status file over
64 MB (read up to there) or a file list over the caps of :mod:`.model` (that package keeps
``files=None`` with a ``reason``). A package without any file list keeps ``files=None``
(its state is then ``unmeasurable``). Paths with a NUL byte are dropped and counted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from lw_embed.sources.packages.model import (
    MAX_DB_BYTES,
    DbResult,
    Package,
    Steps,
    collect,
    inside,
    lines_of,
    read_capped,
    stanzas,
)

DPKG_DIR = "/var/lib/dpkg"
#: dpkg states in which the package's files are on disk
_ON_DISK = frozenset({"installed", "unpacked", "half-configured", "half-installed",
                      "triggers-awaited", "triggers-pending"})  # fmt: skip


def db_paths(root: str) -> list[str]:
    """The host paths whose mtimes say the database changed."""
    base = inside(root, DPKG_DIR)
    return [os.path.join(base, "status"), os.path.join(base, "status.d")]


def _list_paths(path: str, res: DbResult) -> Steps[tuple[tuple[str, ...] | None, str] | None]:
    """A ``.list`` file's paths (see :func:`~.model.collect`), or None when unreadable."""
    try:
        lines = lines_of(path, res, "dpkg")
    except (OSError, ValueError):
        return None
    return (yield from collect((p for p in lines if p.startswith("/")), res, f"dpkg: {path}"))


def _md5_paths(path: str, res: DbResult) -> Steps[tuple[tuple[str, ...] | None, str] | None]:
    """A ``.md5sums`` file's paths (``<md5>  <relative path>``), or None when unreadable."""
    try:
        lines = lines_of(path, res, "dpkg")
    except (OSError, ValueError):
        return None

    def paths() -> Iterable[str]:
        for line in lines:
            parts = line.split(None, 1)
            if len(parts) == 2:
                rel = parts[1].strip()
                yield rel if rel.startswith("/") else "/" + rel

    return (yield from collect(paths(), res, f"dpkg: {path}"))


def _files(info: str, name: str, arch: str,
           res: DbResult) -> Steps[tuple[tuple[str, ...] | None, str]]:  # fmt: skip
    for cand in (f"{name}:{arch}.list", f"{name}.list"):
        got = yield from _list_paths(os.path.join(info, cand), res)
        yield 1
        if got is not None:
            return got
    for cand in (f"{name}:{arch}.md5sums", f"{name}.md5sums"):
        got = yield from _md5_paths(os.path.join(info, cand), res)
        if got is not None:
            yield 1
            return got
    return None, ""


def _package(st: dict[str, str], source: str, location: str,
             got: tuple[tuple[str, ...] | None, str]) -> Package:  # fmt: skip
    return Package(
        ecosystem="deb", name=st["Package"], version=st.get("Version", ""),
        arch=st.get("Architecture", ""), source=source, location=location, files=got[0],
        reason=got[1],
    )  # fmt: skip


def scan(root: str) -> Steps[DbResult]:
    """Read the dpkg database of ``root`` (see the module docstring)."""
    res = DbResult()
    base = inside(root, DPKG_DIR)
    status = os.path.join(base, "status")
    info = os.path.join(base, "info")
    text: str | None = None
    try:
        text = read_capped(status, MAX_DB_BYTES, res, "dpkg")
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        res.errors.append(f"dpkg: {status}: {getattr(exc, 'strerror', None) or exc}")
    yield 1
    if text is not None:
        for st in stanzas(text):
            if "Package" not in st:
                continue
            state = st.get("Status", "").split()
            if len(state) == 3 and state[2] not in _ON_DISK:
                continue
            got = yield from _files(info, st["Package"], st.get("Architecture", ""), res)
            res.packages.append(_package(st, "dpkg", status, got))
    yield from _status_d(os.path.join(base, "status.d"), info, res)
    return res


def _status_d(sdir: str, info: str, res: DbResult) -> Steps[None]:
    try:
        names = sorted(os.listdir(sdir))
    except FileNotFoundError:
        return
    except OSError as exc:
        res.errors.append(f"dpkg: {sdir}: {exc.strerror or exc}")
        return
    have = set(names)
    for entry in names:
        if entry.endswith(".md5sums") or entry.startswith("."):
            continue
        path = os.path.join(sdir, entry)
        try:
            text = read_capped(path, 1 << 20, res, "dpkg")
        except OSError as exc:
            res.errors.append(f"dpkg: {path}: {exc.strerror or exc}")
            continue
        yield 1
        for st in stanzas(text):
            if "Package" not in st:
                continue
            got: tuple[tuple[str, ...] | None, str] | None = None
            for cand in (f"{entry}.md5sums", f"{st['Package']}.md5sums"):
                if cand in have:
                    got = yield from _md5_paths(os.path.join(sdir, cand), res)
                    yield 1
                    break
            if got is None:
                got = yield from _files(info, st["Package"], st.get("Architecture", ""), res)
            res.packages.append(_package(st, "dpkg-status.d", path, got))
