"""The package source: inventory of the root, usage state per package, and its events.

Interface: the worker seam (:mod:`lw_embed.sources.base`). ``poll`` drives, one at a time
and in slices of at most :data:`SLICE` seconds, the scan (:class:`~.inventory.Scanner`:
reading, merging and indexing are all steps) and the usage passes
(:meth:`~.usage.ProcScanner.steps`, one process a step); ``observe`` takes the tracer's
EXEC records (evidence ``exec`` for the executable, for ``argv[0]`` when it is another
path, and for the script an interpreter runs -- ``#!`` scripts reach the tracer as
``interpreter [option] script``; and package managers run inside the container). Events:
``package.inventory`` (a full snapshot in parts sharing a ``snapshot_id``: on the poll
after the first scan and its usage pass, then every ``[packages] snapshot_interval``),
``package.active`` (a package's first evidence) and ``package.change`` (installed /
removed / upgraded, found when a database's mtime changed at a check every
``check_interval``, by a re-discovery every ``rediscover_every`` checks, or at a
snapshot).

Which processes are joined follows the worker's scope: ``tree``, the live processes the
ProcessTable knows (the workload; in-app, plus the host process itself); ``namespace``,
every process of the PID namespace but the agent's own and kernel threads (as the /proc
reconciler, :func:`lw_embed.sources.procfs.in_scope`); ``none``, no process (then nothing
is measurable from /proc).

Capability: read access to the root and to /proc (another uid's maps and fds need
``CAP_SYS_PTRACE``); nothing is written.

Cost: the scan reads at most ``scan_rate`` files and directories a second; no poll runs
longer than about :data:`SLICE` plus one step (a file read, 5000 index entries, 200 stats
or one process: a few ms). The OS databases are read first: EXEC records that arrived
before are joined as soon as their owner index exists (well under a second on a Debian
root). A check is one stat per database; a usage pass every ``usage_interval`` reads only
new processes (all of them every ``full_refresh``).

Failure modes: see the modules; EXEC records that arrive before the OS owner index are
kept (at most 10,000; beyond that dropped and counted as ``packages.exec_backlog_full``).
``close`` spends at most :func:`close_budget` seconds: it finishes the OS part of a first
scan still running, joins the backlog, and when no snapshot was sent yet sends one of
what it has (``totals.complete`` 0 when the language databases were not read).
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Generator, Iterable, Mapping, Sequence
from typing import Any

from lw_embed.config import PackagesConfig
from lw_embed.events import Event, PackageActive, PackageChange, PackageInventory
from lw_embed.kernel.procfs import Stat
from lw_embed.records import R
from lw_embed.sources.base import SourceContext
from lw_embed.sources.packages.inventory import Change, Inventory, Scanner, diff
from lw_embed.sources.packages.model import Package, Steps
from lw_embed.sources.packages.usage import (
    Hit,
    PassStats,
    ProcScanner,
    Tracker,
    agent_modules,
    import_hits,
    split_deleted,
)
from lw_embed.sources.procfs import in_scope

PART_SIZE = 500
SLICE = 0.03
CLOSE_BUDGET = 0.25  # at least; half of [shutdown] flush when that is more


def close_budget(flush: float) -> float:
    """What :meth:`PackagesSource.close` may spend: the OS index of a first scan takes
    about a CPU-second on a Debian root, and a short job's EXEC evidence waits for it."""
    return max(CLOSE_BUDGET, flush / 2)
EXEC_BACKLOG = 10000
ERRORS_SHIPPED = 20
#: programs whose run inside a production container is worth knowing
MANAGERS = frozenset({
    "dpkg", "apt", "apt-get", "aptitude", "rpm", "dnf", "yum", "microdnf", "zypper", "apk",
    "pip", "pip3", "npm", "yarn", "pnpm", "conda", "uv",
})  # fmt: skip
#: executables that run a script named by their first non-option argument
INTERPRETERS = re.compile(
    r"(ba|da|a|z|k|mk)?sh|busybox|perl[\d.]*|python[\d.]*m?|ruby[\d.]*|node(js)?|"
    r"php[\d.]*|lua[\d.]*|tclsh[\d.]*|[gm]?awk|Rscript"
)


def manager_of(exe: str, argv: Sequence[str]) -> str | None:
    """The package manager a command line runs (``python -m pip``, ``python /usr/bin/pip``
    too), or None."""
    words = [os.path.basename(exe), os.path.basename(argv[0]) if argv else ""]
    if len(argv) >= 2 and INTERPRETERS.fullmatch(os.path.basename(exe)):
        words.append(os.path.basename(argv[1]))
    for word in words:
        if word in MANAGERS:
            return word
    if len(argv) >= 3 and argv[1] == "-m" and argv[2] in MANAGERS:
        return argv[2]
    return None


def exec_paths(exe: str, argv: Sequence[str], cwd: str) -> list[str]:
    """The paths an EXEC record says were executed: the executable, ``argv[0]`` when it is
    another path (busybox links), and the script of an interpreter (its first
    non-option argument among the first two), relative ones resolved against ``cwd``."""
    out = [split_deleted(exe)[0]] if exe else []

    def add(a: str) -> None:
        if not a or "\0" in a:
            return
        if not a.startswith("/"):
            if not cwd.startswith("/"):
                return
            a = os.path.join(cwd, a)
        a = os.path.normpath(a)
        if a not in out:
            out.append(a)

    if argv and "/" in argv[0]:
        add(argv[0])
    if INTERPRETERS.fullmatch(os.path.basename(exe)):
        for a in argv[1:3]:
            if not a.startswith("-"):
                add(a)
                break
    return out


def snapshot_events(inv: Inventory, tracker: Tracker, t: int, snapshot_id: str,
                    part_size: int = PART_SIZE) -> list[PackageInventory]:  # fmt: skip
    """The ``package.inventory`` parts of one snapshot."""
    recs = [tracker.record(p, inv.reasons[i] if i < len(inv.reasons) else "")
            for i, p in enumerate(inv.packages)]  # fmt: skip
    totals: dict[str, int] = {
        "packages": len(recs), "paths": inv.paths, "os_owned": inv.os_owned,
        "errors": len(inv.errors), "active": 0, "dormant": 0, "unmeasurable": 0,
        "complete": int(inv.complete), "paths_dropped": inv.dropped,
        "usage_passes": tracker.passes, "observed_since": tracker.observed_since or 0,
        "observed_s": tracker.observed_s, "procs_measured": tracker.measured,
        "procs_unreadable": tracker.unreadable,
    }  # fmt: skip
    for r in recs:
        totals[str(r["state"])] += 1
        eco = f"ecosystem.{r['ecosystem']}"
        totals[eco] = totals.get(eco, 0) + 1
    chunks = [recs[i : i + part_size] for i in range(0, len(recs), part_size)] or [[]]
    unsupported = tuple(inv.unsupported)
    errors = tuple(inv.errors[:ERRORS_SHIPPED])
    return [PackageInventory(time=t, snapshot_id=snapshot_id, part=i, parts=len(chunks),
                             root=inv.root, packages=tuple(c), totals=totals,
                             unsupported=unsupported, errors=errors if i == 0 else ())
            for i, c in enumerate(chunks)]  # fmt: skip


class PackagesSource:
    """The worker source (see the module docstring)."""

    name = "packages"

    def __init__(self, cfg: PackagesConfig, ctx: SourceContext,
                 scanner: Scanner | None = None) -> None:  # fmt: skip
        self.cfg, self.ctx = cfg, ctx
        self.scanner = scanner or Scanner(cfg.root, cfg.search_depth, cfg.npm_depth)
        inapp = ctx.mode == "in-app"
        exclude = () if inapp else (ctx.core_pid, os.getpid())
        self.procs = ProcScanner(ctx.proc, cfg.root, exclude, self._select)
        self.tracker = Tracker(min_passes=2, imports=inapp,
                               blind="scope none: no process is read" if ctx.scope == "none"
                               else "")  # fmt: skip
        self.inv: Inventory | None = None
        self.gen = 0
        self._steps: Steps[Inventory | None] | None = self.scanner.full()
        self._purpose = "first"
        self._pass: Generator[list[Hit], None, PassStats] | None = None
        self._pass_inv: Inventory | None = None
        self._pass_snapshot = False
        self._snapshot_pending = False
        now = ctx.mono()
        self._due = now
        self._usage_at = self._check_at = self._snapshot_at = self._full_at = now
        self._checks = 0
        self._backlog: deque[tuple[int, list[str], int, bool]] = deque()
        self._modules: set[str] = set(agent_modules()) if inapp else set()
        self._managers: deque[dict[str, Any]] = deque(maxlen=16)
        self.backlog_full = 0
        self.usage_passes = 0
        self.snapshots = 0
        self.max_poll = 0.0

    def _select(self, stats: dict[int, Stat]) -> Iterable[int]:
        scope = self.ctx.scope
        if scope == "none":
            return ()
        if scope == "namespace":
            return in_scope(stats, "namespace", self.ctx.core_pid, os.getpid())
        table, me = self.ctx.table, os.getpid() if self.ctx.mode == "in-app" else -1
        return [pid for pid, st in stats.items()
                if pid == me or table.live_start_ticks(pid) == st.start_ticks]  # fmt: skip

    # -- the seam ---------------------------------------------------------------------
    def fileno(self) -> int | None:
        return None

    def next_due(self) -> float | None:
        return self._due

    def poll(self, now: float) -> Iterable[Event]:
        start = self.ctx.mono()
        out = self._poll(now, start + SLICE)
        self.max_poll = max(self.max_poll, self.ctx.mono() - start)
        return out

    def observe(self, rec: Sequence[Any]) -> Iterable[Event]:
        if rec[0] != R.EXEC or len(rec) < 13:
            return ()
        t, pid, exe, argv, cwd, euid = rec[1], rec[2], rec[5], rec[6], rec[8], rec[11]
        if not isinstance(exe, str) or not isinstance(pid, int):
            return ()
        args = [a for a in argv if isinstance(a, str)] if isinstance(argv, list) else []
        self.procs.stale.add(pid)
        mgr = manager_of(exe, args)
        if mgr is not None:
            p = self.ctx.table.get(pid)
            self._managers.append({"manager": mgr, "exe": exe, "pid": pid, "time": t,
                                   **({"exec_id": p.exec_id} if p else {})})  # fmt: skip
        paths = exec_paths(exe, args, cwd if isinstance(cwd, str) else "")
        if self.inv is None:
            if len(self._backlog) >= EXEC_BACKLOG:
                self.backlog_full += 1
            else:
                self._backlog.append((t, paths, pid, euid == 0))
            return ()
        return self._exec(t, paths, pid, euid == 0)

    def technique(self) -> tuple[str, str]:
        what = f"exe, mmap, open from /proc (scope {self.ctx.scope}); exec from the tracer"
        if self.ctx.mode == "in-app":
            what += "; import from sys.modules"
        return "inventory", f"root {self.cfg.root}: {what}"

    def metrics(self) -> Mapping[str, int | float]:
        inv = self.inv
        return {
            "packages.packages": len(inv.packages) if inv else 0,
            "packages.paths": inv.paths if inv else 0,
            "packages.paths_dropped": inv.dropped if inv else 0,
            "packages.active": len(self.tracker.seen),
            "packages.scans": self.scanner.scans,
            "packages.rescans": self.scanner.rescans,
            "packages.discoveries": self.scanner.discoveries,
            "packages.snapshots": self.snapshots,
            "packages.usage_passes": self.usage_passes,
            "packages.proc_reads": self.procs.reads,
            "packages.proc_unreadable": self.procs.unreadable,
            "packages.max_poll_ms": round(self.max_poll * 1000, 1),
        }

    def losses(self) -> Mapping[str, int]:
        return {"packages.exec_backlog_full": self.backlog_full}

    def close(self) -> Iterable[Event]:
        """At most :func:`close_budget` s: finish the OS part of a first scan, join the
        backlog, and send a snapshot when none was sent (see the module docstring)."""
        deadline = self.ctx.mono() + close_budget(self.ctx.config.shutdown.flush)
        out: list[Event] = []
        if self._steps is not None and self._purpose == "first":
            out += self._drive(deadline, 1 << 62, until_interim=True)
        self._steps = self._pass = None
        out += self._flush_backlog()
        if self.snapshots == 0 and self.inv is not None:
            out += self._snapshot()
        return out

    # -- internals --------------------------------------------------------------------
    def _poll(self, now: float, deadline: float) -> list[Event]:
        out: list[Event] = []
        if self._snapshot_pending:
            self._snapshot_pending = False
            out += self._snapshot()
        elif self._steps is not None:
            out += self._drive(deadline, max(1, int(self.cfg.scan_rate * SLICE)))
        elif self._pass is not None:
            out += self._drive_pass(deadline)
        elif self.inv is not None:
            if now >= self._snapshot_at:
                self._start(self.scanner.full(), "snapshot")
            elif now >= self._usage_at:
                self._start_pass(now, snapshot=False)
            elif now >= self._check_at:
                self._check_at = now + self.cfg.check_interval
                self._checks += 1
                rediscover = self._checks % self.cfg.rediscover_every == 0
                keys = self.scanner.changed()
                if keys or rediscover:
                    self._start(self.scanner.recheck(keys, rediscover), "change")
        busy = self._snapshot_pending or self._steps is not None or self._pass is not None
        if busy:
            self._due = now + SLICE
        else:
            self._due = min(self._usage_at, self._check_at, self._snapshot_at)
        return out

    def _start(self, steps: Steps[Any], purpose: str) -> None:
        self._steps, self._purpose = steps, purpose

    def _drive(self, deadline: float, budget: int, until_interim: bool = False) -> list[Event]:
        assert self._steps is not None
        out: list[Event] = []
        new: Inventory | None = None
        try:
            while budget > 0:
                budget -= next(self._steps)
                if self.inv is None and self.scanner.interim is not None:
                    self.inv = self.scanner.interim  # the first scan's OS owner index
                    out += self._flush_backlog()
                    if until_interim:
                        return out
                if self.ctx.mono() >= deadline:
                    break
            return out
        except StopIteration as stop:
            new = stop.value
        self._steps = None
        purpose = self._purpose
        if new is None:
            return out
        old, self.inv = self.inv, new
        self.gen += 1
        t = self.ctx.wall()
        if old is not None and old.complete and old is not new:
            out += self._changes(diff(old.packages, new.packages), t)
        out += self._flush_backlog()
        if purpose in ("first", "snapshot"):
            self._snapshot_at = self.ctx.mono() + self.cfg.snapshot_interval
            self._check_at = self.ctx.mono() + self.cfg.check_interval
            self._start_pass(self.ctx.mono(), snapshot=True)
        return out

    def _start_pass(self, now: float, snapshot: bool) -> None:
        assert self.inv is not None
        full = now >= self._full_at
        if full:
            self._full_at = now + self.cfg.full_refresh
            if self.ctx.mode == "in-app":
                self._modules = set(agent_modules())
        self._pass_inv = self.inv
        self._pass = self.procs.steps(self.inv, self.gen, full)
        self._pass_snapshot = snapshot

    def _drive_pass(self, deadline: float) -> list[Event]:
        assert self._pass is not None and self._pass_inv is not None
        inv = self._pass_inv
        t = self.ctx.wall()
        out: list[Event] = []
        try:
            while True:
                for hit in next(self._pass):
                    out += self._active(inv.packages[hit.idx], hit, t)
                if self.ctx.mono() >= deadline:
                    return out
        except StopIteration as stop:
            stats: PassStats = stop.value
        self._pass = None
        if self.ctx.mode == "in-app":
            for hit in import_hits(inv, self._modules):
                out += self._active(inv.packages[hit.idx], hit, t)
        self.tracker.note_pass(self.ctx.wall(), stats, len(self.procs.never_read))
        self.usage_passes += 1
        self._usage_at = self.ctx.mono() + self.cfg.usage_interval
        if self._pass_snapshot:
            self._snapshot_pending = True
        return out

    def _snapshot(self) -> list[Event]:
        assert self.inv is not None
        self.snapshots += 1
        return list(snapshot_events(self.inv, self.tracker, self.ctx.wall(),
                                    os.urandom(8).hex()))  # fmt: skip

    def _flush_backlog(self) -> list[Event]:
        out: list[Event] = []
        while self.inv is not None and self._backlog:
            t, paths, pid, root = self._backlog.popleft()
            out += self._exec(t, paths, pid, root)
        return out

    def _changes(self, changes: list[Change], t: int) -> list[Event]:
        managers = tuple(self._managers)
        if changes:
            self._managers.clear()
        return [PackageChange(time=t, action=c.action, ecosystem=c.ecosystem, name=c.name,
                              source=c.source, old_version=c.old_version,
                              new_version=c.new_version, managers=managers,
                              arch=c.arch or None, location=c.location or None)
                for c in changes]  # fmt: skip

    def _active(self, pkg: Package, hit: Hit, t: int) -> list[Event]:
        if not self.tracker.add(pkg, hit, t):
            return []
        p = self.ctx.table.get(hit.pid) if hit.pid is not None else None
        return [PackageActive(time=t, ecosystem=pkg.ecosystem, name=pkg.name,
                              version=pkg.version, evidence=hit.kind, path=hit.path,
                              pid=hit.pid, exec_id=p.exec_id if p else None, root=hit.root,
                              deleted=hit.deleted, arch=pkg.arch or None,
                              location=pkg.location or None)]  # fmt: skip

    def _exec(self, t: int, paths: list[str], pid: int, root: bool) -> list[Event]:
        assert self.inv is not None
        out: list[Event] = []
        for path in paths:
            idx = self.inv.owner_of(path)
            if idx is not None:
                out += self._active(self.inv.packages[idx], Hit(idx, "exec", path, pid, root), t)
        return out


def probe(cfg: Any, mode: str) -> tuple[str, str]:
    """(technique, reason) for ``lw-embed env --mode``: which OS databases exist under the
    root (a few stats; the scan itself is what the source does)."""
    pc = getattr(cfg, "packages", None)
    if not isinstance(pc, PackagesConfig) or not pc.enabled:
        return "none", "[packages] enabled = false"
    from lw_embed.sources.packages import apk, dpkg, rpm

    found = [name for name, mod in (("dpkg", dpkg), ("rpm", rpm), ("apk", apk))
             if any(os.path.exists(p) for p in mod.db_paths(pc.root))]  # fmt: skip
    usage = "imports of the host" if mode == "in-app" else "/proc exe, maps and fds"
    dbs = ", ".join(found) or "no OS package database"
    return "inventory", f"{dbs} + language packages under {pc.root}; usage from {usage}"


def make(ctx: SourceContext) -> PackagesSource | None:
    """The factory named in :data:`lw_embed.sources.base.FACTORIES`."""
    cfg = ctx.config.packages
    return PackagesSource(cfg, ctx) if cfg.enabled else None
