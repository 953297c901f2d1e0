"""Which packages are in use: evidence from /proc, the tracer and the host's sys.modules.

Interface: ``/proc/<pid>/stat`` (start time: identity), ``/proc/<pid>/root`` (only
processes whose root is the inventoried root are joined), ``/proc/<pid>/exe`` (evidence
``exe``), ``/proc/<pid>/maps`` (file-backed mappings with their ``major:minor`` and inode
columns: ``mmap``), ``/proc/<pid>/fd/*`` (``open``), ``/proc/<pid>/status`` (the
effective uid: ``root``); the tracer's EXEC records (``exec``, even for a process that
lived a millisecond); in-app, ``sys.modules`` ``__file__`` paths (``import``). Paths are
joined to packages by :meth:`Inventory.owner_of` with the mapping's (dev, inode), so
usr-merge aliases, renamed files and ``(deleted)`` mappings (an upgraded library still
mapped by an old process: ``deleted`` in the evidence) are handled.

Capability: reading another user's maps and fds needs ``CAP_SYS_PTRACE`` (or the same
uid); what cannot be read is counted (``unreadable``), not guessed.

Cost: a pass lists /proc and reads one ``stat`` per process; maps, exe and fds are read
once per (pid, start time) -- again only after an exec seen by the tracer or at the slow
full refresh. 200 processes: a cold pass of tens of ms, a warm one of a few ms.

Failure modes: a process that exits mid-read is skipped; a state is never inferred from
what was not measured: a package is ``dormant`` only when it has a file list, at least one
pass completed, and it was never seen; without a file list it is ``unmeasurable`` unless
evidence makes it ``active``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

from lw_embed.sources.packages.inventory import Identity, Inventory
from lw_embed.sources.packages.model import Package

DELETED = " (deleted)"
MAX_FDS = 4096
EVIDENCE = ("exe", "mmap", "open", "exec", "import")


@dataclass(frozen=True, slots=True)
class Hit:
    """One piece of evidence: ``kind`` seen for the package at index ``idx``."""

    idx: int
    kind: str
    path: str
    pid: int | None
    root: bool
    deleted: bool = False


@dataclass(slots=True)
class Seen:
    """What is known of one package's use (kept by package key across rescans)."""

    first_seen: int
    last_seen: int
    evidence: set[str]
    root: bool
    path: str


@dataclass(slots=True)
class _Proc:
    exe: tuple[str, Identity | None] | None
    files: list[tuple[str, str, Identity | None]]  # (kind, path, identity)
    root: bool
    hits: list[Hit] | None = None
    gen: int = -1


def _split_deleted(path: str) -> tuple[str, bool]:
    if path.endswith(DELETED):
        return path[: -len(DELETED)], True
    return path, False


def parse_maps(text: str) -> list[tuple[str, Identity]]:
    """(path, (st_dev, inode)) of each file-backed mapping, once per path."""
    out: dict[str, Identity] = {}
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or parts[4] == "0" or not parts[5].startswith("/"):
            continue
        major, _, minor = parts[3].partition(":")
        try:
            ident = (os.makedev(int(major, 16), int(minor, 16)), int(parts[4]))
        except ValueError:
            continue
        out.setdefault(parts[5], ident)
    return list(out.items())


class ProcScanner:
    """Evidence from the processes in /proc, cached per (pid, start time)."""

    def __init__(self, proc: str, root: str, exclude: Iterable[int] = ()) -> None:
        self.proc = proc
        self.root = root
        self.exclude = set(exclude)
        self.cache: dict[tuple[int, int], _Proc] = {}
        self.stale: set[int] = set()  # pids that exec'd since they were read
        self.unreadable = 0
        self.reads = 0
        try:
            st = os.stat(root)
            self._root_id: Identity | None = (st.st_dev, st.st_ino)
        except OSError:
            self._root_id = None

    def _ticks(self, pid: int) -> int | None:
        try:
            with open(f"{self.proc}/{pid}/stat", "rb") as f:
                data = f.read(4096)
            return int(data[data.rindex(b")") + 2 :].split()[19])
        except (OSError, ValueError, IndexError):
            return None

    def _read(self, pid: int) -> _Proc | None:
        base = f"{self.proc}/{pid}"
        try:
            st = os.stat(f"{base}/root")
            if self._root_id is not None and (st.st_dev, st.st_ino) != self._root_id:
                return None  # another mount namespace's files: not this root's packages
        except OSError:
            pass
        self.reads += 1
        euid = -1
        try:
            with open(f"{base}/status", "rb") as f:
                for line in f.read(8192).splitlines():
                    if line.startswith(b"Uid:"):
                        euid = int(line.split()[2])
                        break
        except (OSError, ValueError, IndexError):
            return None
        exe: tuple[str, Identity | None] | None = None
        files: list[tuple[str, str, Identity | None]] = []
        try:
            exe = (os.readlink(f"{base}/exe"), None)
        except FileNotFoundError:
            pass  # a kernel thread
        except OSError:
            self.unreadable += 1
        try:
            with open(f"{base}/maps") as f:
                files += [("mmap", p, ident) for p, ident in parse_maps(f.read())]
        except OSError:
            pass
        try:
            fds = os.listdir(f"{base}/fd")[:MAX_FDS]
        except OSError:
            fds = []
        for fd in fds:
            try:
                target = os.readlink(f"{base}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("/"):
                files.append(("open", target, None))
        return _Proc(exe, files, euid == 0)

    def _join(self, inv: Inventory, gen: int, pid: int, p: _Proc) -> list[Hit]:
        if p.hits is not None and p.gen == gen:
            return p.hits
        hits: dict[tuple[int, str], Hit] = {}
        items: list[tuple[str, str, Identity | None]] = list(p.files)
        if p.exe is not None:
            items.insert(0, ("exe", p.exe[0], p.exe[1]))
        for kind, raw, ident in items:
            path, deleted = _split_deleted(raw)
            idx = inv.owner_of(path, ident)
            if idx is not None and (idx, kind) not in hits:
                hits[(idx, kind)] = Hit(idx, kind, path, pid, p.root, deleted)
        p.hits, p.gen = list(hits.values()), gen
        return p.hits

    def scan(self, inv: Inventory, gen: int, full: bool = False) -> list[Hit]:
        """Evidence of every live process (new ones read, others from the cache)."""
        try:
            pids = [int(n) for n in os.listdir(self.proc) if n.isdigit()]
        except OSError:
            return []
        live: dict[tuple[int, int], _Proc] = {}
        out: list[Hit] = []
        for pid in pids:
            if pid in self.exclude:
                continue
            ticks = self._ticks(pid)
            if ticks is None:
                continue
            key = (pid, ticks)
            p = None if (full or pid in self.stale) else self.cache.get(key)
            if p is None:
                p = self._read(pid)
                if p is None:
                    continue
            live[key] = p
            out += self._join(inv, gen, pid, p)
        self.cache = live
        self.stale.clear()
        return out


def import_hits(inv: Inventory, done: set[str]) -> list[Hit]:
    """In-app: packages of the modules loaded in this process since the last call."""
    out: list[Hit] = []
    root = os.geteuid() == 0
    for name, mod in list(sys.modules.items()):
        if name in done:
            continue
        done.add(name)
        f = getattr(mod, "__file__", None)
        if isinstance(f, str) and f:
            path = os.path.abspath(f)
            idx = inv.owner_of(path)
            if idx is not None:
                out.append(Hit(idx, "import", path, os.getpid(), root))
    return out


@dataclass(slots=True)
class Tracker:
    """Usage per package key, and the states derived from it."""

    seen: dict[tuple[str, str, str, str], Seen] = field(default_factory=dict)
    observed_since: int | None = None  # time of the first completed pass

    def add(self, pkg: Package, hit: Hit, t: int) -> bool:
        """Record evidence; True when the package just became active."""
        s = self.seen.get(pkg.key)
        if s is None:
            self.seen[pkg.key] = Seen(t, t, {hit.kind}, hit.root, hit.path)
            return True
        s.last_seen = max(s.last_seen, t)
        s.evidence.add(hit.kind)
        s.root = s.root or hit.root
        return False

    def state(self, pkg: Package) -> str:
        if pkg.key in self.seen:
            return "active"
        if pkg.files is None or self.observed_since is None:
            return "unmeasurable"
        return "dormant"

    def record(self, pkg: Package) -> dict[str, object]:
        """The package as the snapshot and ``lw-embed inventory --json`` show it."""
        rec: dict[str, object] = {
            "ecosystem": pkg.ecosystem, "name": pkg.name, "version": pkg.version,
            "source": pkg.source, "location": pkg.location, "state": self.state(pkg),
        }  # fmt: skip
        if pkg.arch:
            rec["arch"] = pkg.arch
        if pkg.files is not None:
            rec["files"] = len(pkg.files)
        s = self.seen.get(pkg.key)
        if s is not None:
            rec.update(evidence=sorted(s.evidence), first_seen=s.first_seen,
                       last_seen=s.last_seen, root=s.root)  # fmt: skip
        return rec
