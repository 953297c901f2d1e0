"""Python distributions of one ``site-packages`` / ``dist-packages`` directory.

Interface: plain files. ``<name>-<version>.dist-info/`` (PEP 376/627): ``METADATA`` (RFC
822 headers ``Name``, ``Version``, up to the first blank line) and ``RECORD`` (CSV rows
``path,hash,size``, paths relative to the site directory, ``../../bin/x`` for scripts).
``<name>.egg-info/``: ``PKG-INFO`` (same headers) and ``installed-files.txt`` (paths
relative to the egg-info directory); an ``.egg-info`` *file* is PKG-INFO alone and has no
file list (``unmeasurable``).

Capability: read access to the directory.

Cost: one listdir, then two small reads per distribution (the scan's units).

Failure modes: a distribution without a readable name is skipped and named in
``errors``; one without ``RECORD`` keeps ``files=None``; bad CSV rows are skipped; paths
with a NUL byte, or not absolute once joined and normalised, are dropped and counted; a
list over the cap of :mod:`.model` is not indexed (``files=None`` with a ``reason``).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable

from lw_embed.sources.packages.model import DbResult, Package, Steps, collect, lines_of, read_text

SITE_DIR_NAMES = ("site-packages", "dist-packages")


def _headers(text: str) -> tuple[str, str]:
    name = version = ""
    for line in text.splitlines():
        if not line.strip():
            break
        k, sep, v = line.partition(":")
        if not sep:
            continue
        if k == "Name" and not name:
            name = v.strip()
        elif k == "Version" and not version:
            version = v.strip()
    return name, version


def _record(lines: Iterable[str], base: str) -> Iterable[str]:
    try:
        for row in csv.reader(lines):
            if row and row[0]:
                yield os.path.join(base, row[0])
    except csv.Error:
        pass  # keep the rows read so far


def _lines(lines: Iterable[str], base: str) -> Iterable[str]:
    return (os.path.join(base, p) for p in lines if p)


def scan(root: str, site: str) -> Steps[DbResult]:
    """The distributions of the site directory ``site`` (a host path under ``root``)."""
    res = DbResult()
    rel = site[len(root.rstrip("/")) :] if root not in ("", "/") else site
    rel = rel or "/"
    try:
        entries = sorted(os.listdir(site))
    except (OSError, ValueError) as exc:
        res.errors.append(f"python: {site}: {getattr(exc, 'strerror', None) or exc}")
        return res
    yield 1
    for entry in entries:
        path = os.path.join(site, entry)
        if entry.endswith(".dist-info"):
            meta, listing, source = "METADATA", "RECORD", "python-dist-info"
        elif entry.endswith(".egg-info"):
            meta, listing, source = "PKG-INFO", "installed-files.txt", "python-egg-info"
        else:
            continue
        is_dir = os.path.isdir(path)
        meta_host = os.path.join(path, meta) if is_dir else path
        try:
            name, version = _headers(read_text(meta_host, 1 << 20))
        except (OSError, ValueError) as exc:
            res.errors.append(f"python: {meta_host}: {getattr(exc, 'strerror', None) or exc}")
            continue
        yield 1
        if not name:
            res.errors.append(f"python: {meta_host}: no Name")
            continue
        got: tuple[tuple[str, ...] | None, str] = (None, "")
        if is_dir:
            list_host = os.path.join(path, listing)
            try:
                lines = lines_of(list_host, res, "python")
            except (OSError, ValueError):
                lines = None
            if lines is not None:
                yield 1
                paths = (_record(lines, rel) if source == "python-dist-info"
                         else _lines(lines, os.path.join(rel, entry)))  # fmt: skip
                got = yield from collect(paths, res, f"python: {list_host}")
        meta_rel = os.path.join(rel, entry, meta) if is_dir else os.path.join(rel, entry)
        res.packages.append(Package(ecosystem="pypi", name=name, version=version, arch="",
                                    source=source, location=site, files=got[0],
                                    meta_path=meta_rel, reason=got[1]))  # fmt: skip
    return res
