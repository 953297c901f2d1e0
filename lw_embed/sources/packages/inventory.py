"""The inventory of a root: every database read, merged, with an owner index path -> package.

Interface: plain files under the root (``[packages] root``; a sidecar points it at
``/proc/<pid>/root``). :meth:`Scanner.full` reads the OS databases (dpkg, rpm, apk at
their fixed places) first and publishes that partial inventory (``Scanner.interim``: the
worker joins early exec evidence to it), then finds the language databases by
:func:`discover` and reads each through its module. :class:`Scanner` keeps the result per
database with the mtimes it was read at, so :meth:`Scanner.recheck` re-reads only what
changed (dpkg ``status``, the rpmdb and its ``-wal``, apk ``installed``, a site
directory's own mtime, every node_modules directory an npm root read), and re-runs
discovery when asked (the worker does every ``rediscover_every`` checks).

Discovery walks ``search_depth`` levels (skipping ``/proc``, ``/sys``, ``/dev``, and any
directory already walked by (st_dev, st_ino): bind-mount loops end); a
``site-packages``/``dist-packages`` directory, or any directory holding a ``*.dist-info``
or ``*.egg-info`` entry, is a site directory; a directory holding ``pyvenv.cfg`` or named
``virtualenvs``/``.venv``/``venv`` gives :data:`VENV_DEPTH` more levels below it (poetry
keeps venvs deep in ``~/.cache``). A directory it may not list is an error, not silence.

Owner index: ``dict[path, package index]``, OS packages first (a path owned by dpkg, rpm or
apk is never given to a language package, and a language package whose own metadata file
an OS package owns -- Debian's ``python3-*`` -- is dropped and counted as ``os_owned``).
Directory entries of the file lists are left out; at most :data:`MAX_PATHS` paths (the
packages beyond are not indexed: ``unmeasurable``, and an error). :meth:`Inventory.owner_of`
joins a path seen in /proc to a package: the exact path; else, given a (st_dev, st_ino)
(of the executable or a ``maps`` line), the owned executable or shared object with that
identity (a renamed or hard-linked file; indexed at scan time for files under ``bin``/
``sbin``/``libexec`` directories and ``*.so*``/``*.node``); else the same name in an owned
directory with the same identity as the path's directory (usr-merge ``/bin`` vs
``/usr/bin``, bind mounts); else the npm package whose directory holds it. Both identity
indexes are built inside the scan's steps (:meth:`Inventory.index`).

Measurable: a package is measurable from /proc only when it owns a file that a process
executes or maps (the identity-indexed kinds above; for ``pypi``, only ``*.so``/``*.node``:
scripts alone do not show imports); :attr:`Inventory.reasons` says why not otherwise.

Capability: read access to the root.

Cost: a cold scan of this machine (919 packages / 160k paths, 31 databases) takes
about 1.1 s and 39 MB peak at full speed; every step (one file read, 5000 index entries or
200 stats) is a few ms; a recheck with nothing changed is one stat per database.

Failure modes: nothing raises; unreadable databases are ``errors``, unread formats
``unsupported``; a path that cannot be stat'ed (gone, a NUL byte) joins nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from lw_embed.sources.packages import apk, dpkg, npm, python, rpm
from lw_embed.sources.packages.model import DbResult, Package, Steps, inside, mtime_of

OS_DBS = ("dpkg", "rpm", "apk")
_SKIP_TOP = frozenset({"proc", "sys", "dev"})
_VENV_NAMES = frozenset({"virtualenvs", ".venv", "venv", ".virtualenvs"})
VENV_DEPTH = 5
MAX_PATHS = 2_000_000
MAX_WALK = 200_000  # directories one discovery lists
_NEG_MAX = 65536
_BUILD_SLICE = 1000
_STAT_SLICE = 200
_NATIVE = re.compile(r"\.so(\.[0-9][^/]*)?$|\.node$")
Identity = tuple[int, int]

NO_LIST = "no file list to join on"
NOT_RUN = ("no executable or shared object: its files are read and closed, which /proc "
           "does not show")  # fmt: skip


def runnable(path: str) -> bool:
    """A file a process would execute or map: under bin/sbin/libexec, or a shared object."""
    if _NATIVE.search(path):
        return True
    d = os.path.dirname(path)
    return d.endswith(("/bin", "/sbin")) or "/libexec/" in path


def _ident(path: str) -> Identity | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


@dataclass(slots=True)
class Found:
    """What :func:`discover` found."""

    sites: list[str] = field(default_factory=list)
    nms: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def discover(root: str, depth: int) -> Steps[Found]:
    """Host paths of the site directories and node_modules dirs under root (see the
    module docstring)."""
    found = Found()
    top = inside(root, "/") if root not in ("", "/") else "/"
    todo = [(top, depth, True)]
    walked: set[Identity] = set()
    sites: set[str] = set()
    while todo and len(walked) < MAX_WALK:
        path, left, is_top = todo.pop()
        ident = _ident(path)
        if ident is None or ident in walked:
            continue
        walked.add(ident)
        subs: list[tuple[str, str]] = []
        has_dist = venv = False
        try:
            with os.scandir(path) as it:
                for n, e in enumerate(it):
                    if n % _STAT_SLICE == _STAT_SLICE - 1:
                        yield 0  # a huge directory is listed over several steps
                    name = e.name
                    if name.endswith((".dist-info", ".egg-info")):
                        has_dist = True
                    elif name == "pyvenv.cfg":
                        venv = True
                    elif e.is_dir(follow_symlinks=False):
                        subs.append((name, e.path))
        except PermissionError as exc:
            found.errors.append(f"discover: {path}: {exc.strerror or exc}")
            continue
        except (OSError, ValueError):
            continue
        yield 1
        if has_dist:
            sites.add(path)
        if venv or os.path.basename(path) in _VENV_NAMES:
            left = max(left, VENV_DEPTH)
        for name, sub in sorted(subs, reverse=True):
            if is_top and name in _SKIP_TOP:
                continue
            if name in python.SITE_DIR_NAMES:
                sites.add(sub)
            elif name == "node_modules":
                found.nms.append(sub)
            elif left > 1:
                todo.append((sub, left - 1, False))
    if todo:
        found.errors.append(f"discover: more than {MAX_WALK} directories: the rest not walked")
    found.sites = sorted(sites)
    found.nms.sort()
    return found


@dataclass(slots=True)
class Inventory:
    """Packages of one root, and who owns which path (built by :meth:`add` and
    :meth:`index`, in steps)."""

    root: str
    packages: list[Package] = field(default_factory=list)
    unsupported: list[dict[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    os_owned: int = 0  # language packages dropped because an OS package owns them
    dropped: int = 0  # listed paths dropped by the readers (NUL byte, not absolute)
    owner: dict[str, int] = field(default_factory=dict)
    prefixes: dict[str, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)  # per package: why unmeasurable, or ""
    complete: bool = False  # every database read (not the interim OS-only inventory)
    _all_dirs: set[str] = field(default_factory=set)
    _new_dirs: list[str] = field(default_factory=list)
    _new_files: list[str] = field(default_factory=list)
    _dirs: dict[Identity, list[str]] = field(default_factory=dict)
    _ids: dict[Identity, int] = field(default_factory=dict)
    _neg: dict[tuple[str, Identity | None], int | None] = field(default_factory=dict)
    _capped: bool = False

    @property
    def paths(self) -> int:
        return len(self.owner)

    def add(self, res: DbResult) -> Steps[None]:
        """Merge one reader's result (OS databases must come first)."""
        self.unsupported += res.unsupported
        self.errors += res.errors
        self.dropped += res.dropped
        owner, n = self.owner, 0
        for pkg in res.packages:
            if pkg.meta_path and pkg.meta_path in owner:
                self.os_owned += 1
                continue
            idx = len(self.packages)
            self.packages.append(pkg)
            if pkg.prefix:
                self.prefixes.setdefault(pkg.prefix, idx)
            files = pkg.files or ()
            if len(owner) + len(files) > MAX_PATHS:
                if not self._capped:
                    self.errors.append(f"more than {MAX_PATHS} owned paths: later packages "
                                       "not indexed")  # fmt: skip
                self._capped = True
                self.reasons.append(f"owned-path cap ({MAX_PATHS}) reached")
                continue
            run_ok = False
            for p in files:
                n += 1
                if n % _BUILD_SLICE == 0:
                    yield 0
                if p in owner or p in self._all_dirs:
                    continue
                owner[p] = idx
                d = os.path.dirname(p)
                if d not in self._all_dirs:
                    self._all_dirs.add(d)
                    self._new_dirs.append(d)
                    owner.pop(d, None)  # directory entries are shared: not evidence
                if runnable(p) and (pkg.ecosystem != "pypi" or _NATIVE.search(p)):
                    run_ok = True
                    self._new_files.append(p)
            if pkg.files is None:
                self.reasons.append(pkg.reason or NO_LIST)
            else:
                self.reasons.append("" if run_ok else NOT_RUN)

    def index(self) -> Steps[None]:
        """Stat the directories and runnable files added since the last call (the
        identity indexes of :meth:`owner_of`)."""
        n = 0
        while self._new_dirs:
            d = self._new_dirs.pop()
            ident = _ident(inside(self.root, d))
            if ident is not None:
                self._dirs.setdefault(ident, []).append(d)
            n += 1
            if n % _STAT_SLICE == 0:
                yield 0
        while self._new_files:
            p = self._new_files.pop()
            idx = self.owner.get(p)
            ident = _ident(inside(self.root, p)) if idx is not None else None
            if ident is not None and idx is not None:
                self._ids.setdefault(ident, idx)
            n += 1
            if n % _STAT_SLICE == 0:
                yield 0
        self._neg.clear()

    def owner_of(self, path: str, ident: Identity | None = None) -> int | None:
        """The index of the package owning ``path`` (a path inside the root), or None."""
        idx = self.owner.get(path)
        if idx is not None:
            return idx
        key = (path, ident)
        if key in self._neg:
            return self._neg[key]
        found = self._slow(path, ident)
        if len(self._neg) >= _NEG_MAX:
            self._neg.clear()
        self._neg[key] = found
        return found

    def _slow(self, path: str, ident: Identity | None) -> int | None:
        if "\0" in path or not path.startswith("/"):
            return None
        if ident is not None:
            idx = self._ids.get(ident)
            if idx is not None:
                return idx
        d, base = os.path.split(path)
        dir_id = _ident(inside(self.root, d)) if self._dirs else None
        for alias in self._dirs.get(dir_id, ()) if dir_id is not None else ():
            idx = self.owner.get(os.path.join(alias, base))
            if idx is not None:
                return idx
        p = path
        while self.prefixes:
            up = os.path.dirname(p)
            if up == p:  # "/", "//": the top
                return None
            p = up
            idx = self.prefixes.get(p)
            if idx is not None:
                return idx
        return None


def build(root: str, results: Mapping[str, DbResult]) -> Steps[Inventory]:
    """Merge per-database results into one indexed inventory (OS databases first)."""
    inv = Inventory(root)
    for k in order_of(results):
        yield from inv.add(results[k])
    yield from inv.index()
    inv.complete = True
    return inv


def order_of(keys: Iterable[str]) -> list[str]:
    ks = set(keys)
    return [k for k in OS_DBS if k in ks] + sorted(k for k in ks if k not in OS_DBS)


@dataclass(frozen=True, slots=True)
class Change:
    """One package installed, removed or upgraded between two inventories."""

    action: str
    ecosystem: str
    name: str
    source: str
    old_version: str | None
    new_version: str | None
    arch: str = ""
    location: str = ""


def diff(old: Iterable[Package], new: Iterable[Package]) -> list[Change]:
    """What changed from ``old`` to ``new`` (by ecosystem, name, arch and location)."""
    before = {p.key: p for p in old}
    after = {p.key: p for p in new}
    out: list[Change] = []
    for k, p in after.items():
        o = before.get(k)
        if o is None:
            out.append(Change("installed", p.ecosystem, p.name, p.source, None, p.version,
                              p.arch, p.location))  # fmt: skip
        elif o.version != p.version:
            out.append(Change("upgraded", p.ecosystem, p.name, p.source, o.version, p.version,
                              p.arch, p.location))  # fmt: skip
    for k, o in before.items():
        if k not in after:
            out.append(Change("removed", o.ecosystem, o.name, o.source, o.version, None,
                              o.arch, o.location))  # fmt: skip
    return sorted(out, key=lambda c: (c.ecosystem, c.name, c.action, c.arch, c.location))


class Scanner:
    """Reads every database of a root and re-reads only those whose mtimes changed."""

    def __init__(self, root: str, search_depth: int = 7, npm_depth: int = 6) -> None:
        self.root = root
        self.search_depth = search_depth
        self.npm_depth = npm_depth
        self.results: dict[str, DbResult] = {}
        self.mtimes: dict[str, tuple[int, ...]] = {}
        self.inventory: Inventory | None = None
        self.interim: Inventory | None = None  # the OS databases of a full scan under way
        self.discover_errors: list[str] = []
        self.scans = 0
        self.rescans = 0
        self.discoveries = 0

    def _watched(self, key: str) -> list[str]:
        kind, _, path = key.partition(":")
        if kind == "dpkg":
            return dpkg.db_paths(self.root)
        if kind == "rpm":
            return rpm.db_paths(self.root)
        if kind == "apk":
            return apk.db_paths(self.root)
        res = self.results.get(key)
        return [path, *(res.watched if res is not None else ())]

    def _read(self, key: str) -> Steps[DbResult]:
        before = tuple(mtime_of(p) for p in self._watched(key))
        kind, _, path = key.partition(":")
        res: DbResult
        if kind == "dpkg":
            res = yield from dpkg.scan(self.root)
        elif kind == "rpm":
            res = yield from rpm.scan(self.root)
        elif kind == "apk":
            res = yield from apk.scan(self.root)
        elif kind == "python":
            res = yield from python.scan(self.root, path)
        else:
            res = yield from npm.scan(self.root, path, self.npm_depth)
        self.mtimes[key] = (before[0], *res.watched.values()) if kind == "npm" else before
        return res

    def _discover(self) -> Steps[list[str]]:
        found = yield from discover(self.root, self.search_depth)
        self.discover_errors = found.errors
        self.discoveries += 1
        return [*(f"python:{s}" for s in found.sites), *(f"npm:{n}" for n in found.nms)]

    def full(self) -> Steps[Inventory]:
        """Read everything (at start, and at each periodic snapshot): OS databases first
        (then ``interim`` is set), then discovery and the language databases."""
        self.interim = None
        inv = Inventory(self.root)
        results: dict[str, DbResult] = {}
        self.mtimes = {}
        for k in OS_DBS:
            results[k] = yield from self._read(k)
            yield from inv.add(results[k])
        yield from inv.index()
        self.interim = inv
        keys = yield from self._discover()
        inv.errors += self.discover_errors
        for k in keys:
            results[k] = yield from self._read(k)
            yield from inv.add(results[k])
        yield from inv.index()
        inv.complete = True
        self.results = results
        self.scans += 1
        self.inventory = inv
        return inv

    def changed(self) -> list[str]:
        """Databases whose mtimes differ from when they were read (a stat each)."""
        return [k for k, m in self.mtimes.items()
                if tuple(mtime_of(p) for p in self._watched(k)) != m]  # fmt: skip

    def recheck(self, keys: list[str], rediscover: bool = False) -> Steps[Inventory | None]:
        """Re-read ``keys`` (from :meth:`changed`) -- and, with ``rediscover``, the site and
        node_modules directories that appeared or went -- then rebuild the inventory; None
        when there was nothing to do."""
        keys = list(keys)
        gone: list[str] = []
        if rediscover:
            want = set((yield from self._discover()))
            have = {k for k in self.results if k not in OS_DBS}
            gone = sorted(have - want)
            keys += sorted(want - have - set(keys))
            for k in gone:
                self.results.pop(k, None)
                self.mtimes.pop(k, None)
        if not keys and not gone:
            return None
        for k in keys:
            self.results[k] = yield from self._read(k)
        inv = Inventory(self.root)
        for k in order_of(self.results):
            yield from inv.add(self.results[k])
        inv.errors += self.discover_errors
        yield from inv.index()
        inv.complete = True
        self.rescans += 1
        self.inventory = inv
        return inv
