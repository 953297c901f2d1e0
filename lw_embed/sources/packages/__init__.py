"""The package source: inventory of the root, usage state per package, and its events.

Interface: the worker seam (:mod:`lw_embed.sources.base`). ``poll`` drives the scan
(:class:`~.inventory.Scanner`) in slices and the usage passes
(:class:`~.usage.ProcScanner`); ``observe`` takes the tracer's EXEC records (evidence
``exec``, and package managers run inside the container). Events: ``package.inventory``
(a full snapshot in parts sharing a ``snapshot_id``: once the first scan is done, then
every ``[packages] snapshot_interval``), ``package.active`` (a package's first evidence)
and ``package.change`` (installed / removed / upgraded, found when a database's mtime
changed at a check every ``check_interval`` or at a snapshot).

Capability: read access to the root and to /proc (another uid's maps and fds need
``CAP_SYS_PTRACE``); nothing is written.

Cost: the scan reads at most ``scan_rate`` files and directories a second, in slices of
at most 50 ms, so start-up never starves the workload (the first snapshot comes a few
seconds after start); a check is one stat per database; a usage pass every
``usage_interval`` reads only new processes (all of them every ``full_refresh``).

Failure modes: see the modules; EXEC records that arrive before the first inventory are
kept (at most 10,000; beyond that dropped and counted as ``packages.exec_backlog_full``)
and joined once it is ready. A workload that ends before the first scan does gets no
snapshot: ``close`` does not spend the shutdown budget on it.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lw_embed.config import PackagesConfig
from lw_embed.events import Event, PackageActive, PackageChange, PackageInventory
from lw_embed.records import R
from lw_embed.sources.base import SourceContext
from lw_embed.sources.packages.inventory import Change, Inventory, Scanner, diff
from lw_embed.sources.packages.model import Package, Steps
from lw_embed.sources.packages.usage import Hit, ProcScanner, Tracker, import_hits

PART_SIZE = 500
SLICE = 0.05
EXEC_BACKLOG = 10000
#: programs whose run inside a production container is worth knowing
MANAGERS = frozenset({
    "dpkg", "apt", "apt-get", "aptitude", "rpm", "dnf", "yum", "microdnf", "zypper", "apk",
    "pip", "pip3", "npm", "yarn", "pnpm", "conda", "uv",
})  # fmt: skip


def manager_of(exe: str, argv: Sequence[str]) -> str | None:
    """The package manager a command line runs (``python -m pip`` too), or None."""
    for word in (os.path.basename(exe), os.path.basename(argv[0]) if argv else ""):
        if word in MANAGERS:
            return word
    if len(argv) >= 3 and argv[1] == "-m" and argv[2] in MANAGERS:
        return argv[2]
    return None


def snapshot_events(inv: Inventory, tracker: Tracker, t: int, snapshot_id: str,
                    part_size: int = PART_SIZE) -> list[PackageInventory]:  # fmt: skip
    """The ``package.inventory`` parts of one snapshot."""
    recs = [tracker.record(p) for p in inv.packages]
    totals: dict[str, int] = {"packages": len(recs), "paths": inv.paths,
                              "os_owned": inv.os_owned, "errors": len(inv.errors),
                              "active": 0, "dormant": 0, "unmeasurable": 0}  # fmt: skip
    for r in recs:
        totals[str(r["state"])] += 1
        eco = f"ecosystem.{r['ecosystem']}"
        totals[eco] = totals.get(eco, 0) + 1
    chunks = [recs[i : i + part_size] for i in range(0, len(recs), part_size)] or [[]]
    unsupported = tuple(inv.unsupported)
    return [PackageInventory(time=t, snapshot_id=snapshot_id, part=i, parts=len(chunks),
                             root=inv.root, packages=tuple(c), totals=totals,
                             unsupported=unsupported)
            for i, c in enumerate(chunks)]


class PackagesSource:
    """The worker source (see the module docstring)."""

    name = "packages"

    def __init__(self, cfg: PackagesConfig, ctx: SourceContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.scanner = Scanner(cfg.root, cfg.search_depth, cfg.npm_depth)
        exclude = () if ctx.mode == "in-app" else (ctx.core_pid, os.getpid())
        self.procs = ProcScanner(ctx.proc, cfg.root, exclude)
        self.tracker = Tracker()
        self.inv: Inventory | None = None
        self.gen = 0
        self._steps: Steps[Inventory] | None = self.scanner.full()
        self._purpose = "first"
        now = ctx.mono()
        self._due = now
        self._usage_at = self._check_at = self._snapshot_at = self._full_at = now
        self._backlog: deque[tuple[int, str, int, bool]] = deque()
        self._modules: set[str] = set()
        self._managers: deque[dict[str, Any]] = deque(maxlen=16)
        self.backlog_full = 0
        self.usage_passes = 0
        self.snapshots = 0

    # -- the seam ---------------------------------------------------------------------
    def fileno(self) -> int | None:
        return None

    def next_due(self) -> float | None:
        return self._due

    def poll(self, now: float) -> Iterable[Event]:
        out: list[Event] = []
        if self._steps is not None:
            out += self._drive(now)
        if self._steps is None and self.inv is not None:
            if now >= self._usage_at:
                out += self._usage(now)
            if now >= self._snapshot_at:
                self._start(self.scanner.full(), "snapshot")
            elif now >= self._check_at:
                self._check_at = now + self.cfg.check_interval
                keys = self.scanner.changed()
                if keys:
                    self._start(self.scanner.recheck(keys), "change")
        if self._steps is not None:
            self._due = now + SLICE
        else:
            self._due = min(self._usage_at, self._check_at, self._snapshot_at)
        return out

    def observe(self, rec: Sequence[Any]) -> Iterable[Event]:
        if rec[0] != R.EXEC or len(rec) < 13:
            return ()
        t, pid, exe, argv, euid = rec[1], rec[2], rec[5], rec[6], rec[11]
        if not isinstance(exe, str) or not isinstance(pid, int):
            return ()
        self.procs.stale.add(pid)
        mgr = manager_of(exe, argv if isinstance(argv, list) else [])
        if mgr is not None:
            p = self.ctx.table.get(pid)
            self._managers.append({"manager": mgr, "exe": exe, "pid": pid, "time": t,
                                   **({"exec_id": p.exec_id} if p else {})})  # fmt: skip
        if self.inv is None:
            if len(self._backlog) >= EXEC_BACKLOG:
                self.backlog_full += 1
            else:
                self._backlog.append((t, exe, pid, euid == 0))
            return ()
        return self._exec(t, exe, pid, euid == 0)

    def technique(self) -> tuple[str, str]:
        what = "exe, mmap, open from /proc; exec from the tracer"
        if self.ctx.mode == "in-app":
            what += "; import from sys.modules"
        return "procfs", f"root {self.cfg.root}: {what}"

    def metrics(self) -> Mapping[str, int | float]:
        inv = self.inv
        return {
            "packages.packages": len(inv.packages) if inv else 0,
            "packages.paths": inv.paths if inv else 0,
            "packages.active": len(self.tracker.seen),
            "packages.scans": self.scanner.scans,
            "packages.rescans": self.scanner.rescans,
            "packages.snapshots": self.snapshots,
            "packages.usage_passes": self.usage_passes,
            "packages.proc_reads": self.procs.reads,
            "packages.proc_unreadable": self.procs.unreadable,
        }

    def losses(self) -> Mapping[str, int]:
        return {"packages.exec_backlog_full": self.backlog_full}

    def close(self) -> Iterable[Event]:
        """Nothing to flush: a scan still running is dropped (the shutdown budget belongs
        to shipping what was already accepted)."""
        self._steps = None
        return ()

    # -- internals --------------------------------------------------------------------
    def _start(self, steps: Steps[Inventory], purpose: str) -> None:
        self._steps, self._purpose = steps, purpose

    def _drive(self, now: float) -> list[Event]:
        assert self._steps is not None
        budget = max(1, int(self.cfg.scan_rate * SLICE))
        deadline = self.ctx.mono() + SLICE
        try:
            while budget > 0:
                budget -= next(self._steps)
                if self.ctx.mono() >= deadline:
                    break
            return []
        except StopIteration as stop:
            new: Inventory = stop.value
        self._steps = None
        old, self.inv = self.inv, new
        self.gen += 1
        purpose = self._purpose
        out: list[Event] = []
        t = self.ctx.wall()
        if old is not None:
            out += self._changes(diff(old.packages, new.packages), t)
        if purpose == "first":
            while self._backlog:
                bt, exe, pid, root = self._backlog.popleft()
                out += self._exec(bt, exe, pid, root)
        if purpose in ("first", "snapshot"):
            out += self._usage(now)
            self._snapshot_at = now + self.cfg.snapshot_interval
            self._check_at = now + self.cfg.check_interval
            self.snapshots += 1
            out += snapshot_events(new, self.tracker, self.ctx.wall(), os.urandom(8).hex())
        return out

    def _changes(self, changes: list[Change], t: int) -> list[Event]:
        managers = tuple(self._managers)
        if changes:
            self._managers.clear()
        return [PackageChange(time=t, action=c.action, ecosystem=c.ecosystem, name=c.name,
                              source=c.source, old_version=c.old_version,
                              new_version=c.new_version, managers=managers)
                for c in changes]

    def _active(self, pkg: Package, hit: Hit, t: int) -> list[Event]:
        if not self.tracker.add(pkg, hit, t):
            return []
        p = self.ctx.table.get(hit.pid) if hit.pid is not None else None
        return [PackageActive(time=t, ecosystem=pkg.ecosystem, name=pkg.name,
                              version=pkg.version, evidence=hit.kind, path=hit.path,
                              pid=hit.pid, exec_id=p.exec_id if p else None, root=hit.root,
                              deleted=hit.deleted)]  # fmt: skip

    def _exec(self, t: int, exe: str, pid: int, root: bool) -> list[Event]:
        assert self.inv is not None
        idx = self.inv.owner_of(exe)
        if idx is None:
            return []
        return self._active(self.inv.packages[idx], Hit(idx, "exec", exe, pid, root), t)

    def _usage(self, now: float) -> list[Event]:
        assert self.inv is not None
        inv = self.inv
        full = now >= self._full_at
        if full:
            self._full_at = now + self.cfg.full_refresh
        hits = self.procs.scan(inv, self.gen, full)
        if self.ctx.mode == "in-app":
            if full:
                self._modules.clear()
            hits += import_hits(inv, self._modules)
        t = self.ctx.wall()
        out: list[Event] = []
        for hit in hits:
            out += self._active(inv.packages[hit.idx], hit, t)
        if self.tracker.observed_since is None:
            self.tracker.observed_since = t
        self.usage_passes += 1
        self._usage_at = now + self.cfg.usage_interval
        return out


def make(ctx: SourceContext) -> PackagesSource | None:
    """The factory named in :data:`lw_embed.sources.base.FACTORIES`."""
    cfg = ctx.config.packages
    return PackagesSource(cfg, ctx) if cfg.enabled else None
