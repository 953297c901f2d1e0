"""Which packages are in use: evidence from /proc, the tracer and the host's sys.modules.

Interface: ``/proc/<pid>/stat`` (start time: identity; through
:func:`lw_embed.sources.procfs.scan`), ``/proc/<pid>/root`` (only processes whose root is
the inventoried root are joined), ``/proc/<pid>/exe`` (evidence ``exe``; its ``stat`` gives
the executable's (st_dev, st_ino)), ``/proc/<pid>/maps`` (file-backed mappings with their
``major:minor`` and inode columns: ``mmap``), ``/proc/<pid>/fd/*`` (``open``, joined by
path only), ``/proc/<pid>/status`` (the effective uid: ``root``); the tracer's EXEC
records (``exec``, even for a process that lived a millisecond, joined by the source);
in-app, ``sys.modules`` ``__file__`` paths (``import``). Paths are joined to packages by
:meth:`Inventory.owner_of` with the (dev, inode) of the executable and of each mapping,
so usr-merge aliases, renamed or hard-linked executables and shared objects, and
``(deleted)`` mappings (an upgraded library still mapped by an old process: ``deleted``
in the evidence) are handled; a renamed file that is only held open is not.

Which processes: those the caller's ``select`` picks from the ``stat`` of every pid (the
worker: its scope, see :mod:`lw_embed.sources.packages`), minus ``exclude``.

Capability: reading another user's exe, maps and fds needs ``CAP_SYS_PTRACE`` (or the
same uid). What cannot be read is counted per in-scope process (``unreadable``: the
identities never read), and while any is, nothing is called dormant.

Cost: a pass lists /proc and reads one ``stat`` per process; exe, maps and fds are read
once per (pid, start time) -- again only after an exec seen by the tracer or at the slow
full refresh. :meth:`ProcScanner.steps` yields after each process read, so the worker
slices a pass. 274 processes on this machine: a cold pass of about 60 ms, a warm one of
5 ms.

Failure modes: a process that exits mid-read is skipped (not a failure); a state is never
inferred from what was not measured (see :class:`Tracker`).
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field

from lw_embed.kernel.procfs import Stat
from lw_embed.sources import procfs as procscan
from lw_embed.sources.packages.inventory import NOT_RUN, Identity, Inventory
from lw_embed.sources.packages.model import Package

DELETED = " (deleted)"
MAX_FDS = 4096
MAX_UNREAD = 10000
EVIDENCE = ("exe", "mmap", "open", "exec", "import")
_GONE = (errno.ENOENT, errno.ESRCH)
Select = Callable[[dict[int, Stat]], Iterable[int]]


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


class _Unreadable(Exception):
    """A file of an in-scope process exists but may not be read."""


def split_deleted(path: str) -> tuple[str, bool]:
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


@dataclass(slots=True)
class PassStats:
    """One usage pass: in-scope processes, read now or from the cache, and unreadable."""

    in_scope: int = 0
    measured: int = 0
    unreadable: int = 0


class ProcScanner:
    """Evidence from the processes in /proc, cached per (pid, start time)."""

    def __init__(self, proc: str, root: str, exclude: Iterable[int] = (),
                 select: Select | None = None) -> None:  # fmt: skip
        self.proc = proc
        self.root = root
        self.exclude = set(exclude)
        self.select = select
        self.cache: dict[tuple[int, int], _Proc] = {}
        self.stale: set[int] = set()  # pids that exec'd since they were read
        self.never_read: set[tuple[int, int]] = set()  # in-scope, read failed, never read
        self.unreadable = 0  # read failures (cumulative)
        self.reads = 0
        self.last = PassStats()
        try:
            st = os.stat(root)
            self._root_id: Identity | None = (st.st_dev, st.st_ino)
        except OSError:
            self._root_id = None

    def _read(self, pid: int) -> _Proc | None:
        """The process's evidence; None when it is gone or of another root; raises
        :class:`_Unreadable` when it may not be read."""
        base = f"{self.proc}/{pid}"
        try:
            st = os.stat(f"{base}/root")
            if self._root_id is not None and (st.st_dev, st.st_ino) != self._root_id:
                return None  # another mount namespace's files: not this root's packages
            euid = -1
            with open(f"{base}/status", "rb") as f:
                for line in f.read(8192).splitlines():
                    if line.startswith(b"Uid:"):
                        euid = int(line.split()[2])
                        break
            exe: tuple[str, Identity | None] | None = None
            try:
                path, _ = split_deleted(os.readlink(f"{base}/exe"))
                try:
                    est = os.stat(f"{base}/exe")
                    exe = (path, (est.st_dev, est.st_ino))
                except FileNotFoundError:
                    exe = (path, None)
            except FileNotFoundError:
                pass  # a kernel thread, or gone (then the reads below fail too)
            with open(f"{base}/maps") as f:
                files: list[tuple[str, str, Identity | None]] = [
                    ("mmap", p, ident) for p, ident in parse_maps(f.read())
                ]
            for fd in os.listdir(f"{base}/fd")[:MAX_FDS]:
                try:
                    target = os.readlink(f"{base}/fd/{fd}")
                except FileNotFoundError:
                    continue  # closed meanwhile
                if target.startswith("/"):
                    files.append(("open", target, None))
        except (ValueError, IndexError):
            return None
        except OSError as exc:
            if exc.errno in _GONE:
                return None
            raise _Unreadable(str(exc)) from exc
        self.reads += 1
        return _Proc(exe, files, euid == 0)

    def _join(self, inv: Inventory, gen: int, pid: int, p: _Proc) -> list[Hit]:
        if p.hits is not None and p.gen == gen:
            return p.hits
        hits: dict[tuple[int, str], Hit] = {}
        items: list[tuple[str, str, Identity | None]] = list(p.files)
        if p.exe is not None:
            items.insert(0, ("exe", p.exe[0], p.exe[1]))
        for kind, raw, ident in items:
            path, deleted = split_deleted(raw)
            idx = inv.owner_of(path, ident)
            if idx is not None and (idx, kind) not in hits:
                hits[(idx, kind)] = Hit(idx, kind, path, pid, p.root, deleted)
        p.hits, p.gen = list(hits.values()), gen
        return p.hits

    def _pids(self) -> list[tuple[int, int]]:
        stats = procscan.scan(self.proc)
        if stats is None:
            return []
        picked = self.select(stats) if self.select is not None else stats
        return [(pid, stats[pid].start_ticks) for pid in sorted(picked)
                if pid not in self.exclude and pid in stats]  # fmt: skip

    def steps(self, inv: Inventory, gen: int,
              full: bool = False) -> Generator[list[Hit], None, PassStats]:  # fmt: skip
        """One pass, yielding the evidence of each process (new ones read, others from the
        cache); returns the pass's :class:`PassStats` (also in ``last``)."""
        live: dict[tuple[int, int], _Proc] = {}
        stats = PassStats()
        for key in self._pids():
            pid = key[0]
            stats.in_scope += 1
            p = None if (full or pid in self.stale) else self.cache.get(key)
            if p is None:
                try:
                    p = self._read(pid)
                except _Unreadable:
                    self.unreadable += 1
                    stats.unreadable += 1
                    if len(self.never_read) < MAX_UNREAD:
                        self.never_read.add(key)
                    yield []
                    continue
                if p is None:
                    stats.in_scope -= 1  # gone, or another root's
                    continue
            self.never_read.discard(key)
            stats.measured += 1
            live[key] = p
            yield self._join(inv, gen, pid, p)
        self.cache = live
        self.stale.clear()
        self.last = stats
        return stats

    def scan(self, inv: Inventory, gen: int, full: bool = False) -> list[Hit]:
        """A whole pass at once (the command line, tests)."""
        out: list[Hit] = []
        it = self.steps(inv, gen, full)
        while True:
            try:
                out += next(it)
            except StopIteration:
                return out


def agent_modules() -> frozenset[str]:
    """Modules the agent itself imported (``lw_embed`` and its dependencies): not the
    host's evidence. Taken when the in-app source starts."""
    tops = {"lw_embed", "cbor2", "brotli", "psutil", "ptrace", "aiohttp", "tenacity",
            "multidict", "yarl", "aiosignal", "frozenlist", "attr", "idna"}  # fmt: skip
    return frozenset(n for n in list(sys.modules) if n.split(".")[0] in tops)


def import_hits(inv: Inventory, done: set[str]) -> list[Hit]:
    """In-app: packages of the modules loaded in this process since the last call (names
    already in ``done`` are skipped: seed it with :func:`agent_modules`)."""
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
    """Usage per package key, what was observed, and the states derived from them.

    A package is ``active`` once it has evidence. It is ``dormant`` only when all of these
    hold, else ``unmeasurable`` with a ``reason``: it is measurable (a file list with an
    executable or shared object; in-app, any Python distribution), at least ``min_passes``
    usage passes completed, at least one in-scope process was read, and no in-scope
    process is unreadable.
    """

    seen: dict[tuple[str, str, str, str], Seen] = field(default_factory=dict)
    observed_since: int | None = None  # time of the first completed pass
    last_pass: int | None = None
    passes: int = 0
    measured: int = 0  # in-scope processes read (the largest pass)
    unreadable: int = 0  # in-scope processes never read (now)
    min_passes: int = 1
    imports: bool = False  # in-app: Python imports are measured
    blind: str = ""  # why no process can be measured at all (scope "none")

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

    def note_pass(self, t: int, stats: PassStats, never_read: int) -> None:
        """A usage pass completed at ``t``."""
        if self.observed_since is None:
            self.observed_since = t
        self.last_pass = t
        self.passes += 1
        self.measured = max(self.measured, stats.measured)
        self.unreadable = never_read

    @property
    def observed_s(self) -> int:
        if self.observed_since is None or self.last_pass is None:
            return 0
        return (self.last_pass - self.observed_since) // 1_000_000_000

    def why_unmeasured(self) -> str:
        """Why nothing can be called dormant now, or ""."""
        if self.blind:
            return self.blind
        if self.passes < self.min_passes:
            return f"observed {self.passes} of {self.min_passes} usage passes so far"
        if self.unreadable:
            return f"{self.unreadable} in-scope processes could not be read (permission)"
        if not self.measured:
            return "no in-scope process was read"
        return ""

    def state(self, pkg: Package, reason: str = "") -> tuple[str, str]:
        """(state, reason): ``reason`` is the inventory's for this package ("" when it is
        measurable); the returned reason is "" unless the state is unmeasurable."""
        if pkg.key in self.seen:
            return "active", ""
        if reason == NOT_RUN and self.imports and pkg.ecosystem == "pypi" and pkg.files:
            reason = ""
        if reason:
            return "unmeasurable", reason
        why = self.why_unmeasured()
        return ("unmeasurable", why) if why else ("dormant", "")

    def record(self, pkg: Package, reason: str = "") -> dict[str, object]:
        """The package as the snapshot and ``lw-embed inventory --json`` show it."""
        state, why = self.state(pkg, reason)
        rec: dict[str, object] = {
            "ecosystem": pkg.ecosystem, "name": pkg.name, "version": pkg.version,
            "source": pkg.source, "location": pkg.location, "state": state,
        }  # fmt: skip
        if why:
            rec["reason"] = why
        if pkg.arch:
            rec["arch"] = pkg.arch
        if pkg.files is not None:
            rec["files"] = len(pkg.files)
        s = self.seen.get(pkg.key)
        if s is not None:
            rec.update(evidence=sorted(s.evidence), first_seen=s.first_seen,
                       last_seen=s.last_seen, root=s.root)  # fmt: skip
        return rec
