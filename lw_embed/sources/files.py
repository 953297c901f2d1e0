"""File integrity monitoring: what changed (inotify, scans), who changed it (traced syscalls).

Interface: an inotify fd (:mod:`lw_embed.kernel.inotify`) watching the directories of
``[[files.rules]]``; ``lstat``/``scandir``/``read`` of the monitored trees; the SQLite
baseline (:mod:`lw_embed.pipeline.baseline`); ``R.FILEOP`` records from the tracer
(:mod:`lw_embed.sources.filetrace`) through :meth:`FilesSource.observe`; without them,
``/proc/*/fd`` links (heuristic attribution). Events: ``file.change`` and
``agent.degraded`` (docs/files.md, docs/schema.md). Parts: the watch table
(:mod:`~lw_embed.sources.filewatch`), the rate-limited scanner
(:mod:`~lw_embed.sources.filescan`), the who-data join (:mod:`~lw_embed.sources.fileattr`),
hashing and event fields (:mod:`~lw_embed.sources.filechange`), package owners
(:mod:`~lw_embed.sources.fileowners`).

How: a directory is watched before it is listed, and exclusions are decided before a
watch is created. A new directory is watched, then scanned (what was created in it before
the watch existed becomes ``create`` events). ``IN_MOVED_FROM``/``IN_MOVED_TO`` are paired
by cookie into one ``rename``; a FROM unpaired after ``rename_timeout`` is a ``delete``
(moved out), an unpaired TO a ``create`` (moved in). ``IN_MODIFY`` never emits by itself:
a write session counts when its ``IN_CLOSE_WRITE`` arrives, and changes to one path fold
into one pending change until it is quiet for ``coalesce_quiet`` s (or ``coalesce_max`` s
old); then it is stat'ed, hashed, compared with the baseline and emitted with ``count``
(the number of notifications folded: creates, write sessions, attribute changes). An
open-for-write without a write emits nothing. Every event waits ``JOIN_GRACE`` s before it
goes out, so the traced syscall (sent at syscall entry, over another fd) is joined by path
and time. At start every tree is scanned against the baseline (rate-limited by
``scan_files_per_s`` and ``scan_bytes_per_s``): what changed while the agent was not
running is reported with ``detected_by: scan`` (a root never baselined is recorded
silently). ``IN_Q_OVERFLOW`` or a read error of the fd: ``agent.degraded`` and a rescan of
every tree; a watch that fails (ENOSPC, ...) or does not fit the budget
(``max_watches``, default half of ``max_user_watches``): ``agent.degraded`` and that
directory is scanned every ``periodic_interval`` s instead (its changes are then
``detected_by: scan``, never claimed real time).

Capability: read access to the monitored trees; the tracer's for syscall attribution.

Cost: per inotify event a dict update; per emitted change one lstat, one hash of the file
(at most ``hash_max_bytes``; skipped when size, mtime and inode are unchanged) and one
SQLite upsert. A watch costs ~1 KiB of kernel memory. The scan's rate is bounded.

Failure modes: nothing raises out of :meth:`poll`. Losses (``losses()``):
``files.inotify_overflow`` (kernel queue overflows; recovered by rescan),
``files.fileop_evicted`` (attribution records dropped: table full). A root that does not
exist is reported (``root_missing``) and retried every ``periodic_interval``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from lw_embed.config import FilesConfig
from lw_embed.events import AgentDegraded, Event, FileChange
from lw_embed.kernel import inotify as ino
from lw_embed.pipeline.baseline import (
    Baseline,
    compare,
    entry_of,
)
from lw_embed.pipeline.enrich import ProcessTable
from lw_embed.pipeline.filerules import CompiledRule, RuleSet
from lw_embed.records import R
from lw_embed.sources.base import seccomp_traced
from lw_embed.sources.fileattr import WHO_FOR, Attribution, FileOp
from lw_embed.sources.filechange import Changes
from lw_embed.sources.fileowners import PackageOwners, owners_for
from lw_embed.sources.filescan import Bucket, Job, Scanner
from lw_embed.sources.filewatch import Watches

log = logging.getLogger("lw_embed.files")

MASK = (ino.IN_CREATE | ino.IN_DELETE | ino.IN_MOVED_FROM | ino.IN_MOVED_TO | ino.IN_MODIFY
        | ino.IN_CLOSE_WRITE | ino.IN_ATTRIB | ino.IN_DELETE_SELF | ino.IN_MOVE_SELF
        | ino.IN_ONLYDIR
        | ino.IN_DONT_FOLLOW | ino.IN_EXCL_UNLINK)  # fmt: skip
JOIN_GRACE = 0.1
#: traced: how much longer an event not yet attributed waits for its syscall record
JOIN_WAIT = 1.0
READS_PER_POLL = 64
MAX_GAPS = 1024
_FOLD = {"create": {"create", "modify", "attrib"}, "modify": {"modify", "attrib"},
         "attrib": {"attrib"}, "read": {"read"}}  # fmt: skip


@dataclass(slots=True)
class Pending:
    path: str
    action: str
    rule: CompiledRule
    first: float
    last: float
    first_wall: int
    last_wall: int
    count: int = 0
    written: bool = False
    actions: list[str] = field(default_factory=list)
    who: dict[str, Any] | None = None
    detected_by: str = "inotify"


class FilesSource:
    """The ``files`` worker source."""

    name = "files"

    def __init__(self, cfg: FilesConfig, table: ProcessTable, baseline_path: str, *,
                 proc: str = "/proc", traced: bool = False,
                 wall: Callable[[], int] = time.time_ns,
                 mono: Callable[[], float] = time.monotonic, ignore: Sequence[str] = (),
                 own_pids: Sequence[int] = (), owners: PackageOwners | None = None,
                 ) -> None:  # fmt: skip
        self.cfg = cfg
        self.table = table
        self.proc = proc
        self.traced = traced
        self.wall = wall
        self.mono = mono
        self.own_pids = frozenset(own_pids) | {os.getpid()}
        self.ignore = tuple(p.rstrip("/") + "/" for p in ignore if p)
        self.rules = RuleSet(cfg.effective_rules(), cfg.secret_paths)
        self.baseline = Baseline(baseline_path)
        self.ino = ino.Inotify()
        self.reads = any("read" in r.actions for r in self.rules.rules)
        self.mask = MASK | (ino.IN_CLOSE_NOWRITE if self.reads else 0)
        limit = ino.limits(proc).get("max_user_watches", 8192)
        self.budget = cfg.max_watches or max(1, limit // 2)
        self.w = Watches(self.ino, self.mask, self.budget, self.degraded)
        self.missing: set[str] = set()
        self.pending: OrderedDict[str, Pending] = OrderedDict()
        self.moves: OrderedDict[int, tuple[str, bool, float]] = OrderedDict()
        self.ready: deque[tuple[float, dict[str, Any], str, str | None]] = deque()
        #: new directories' blind spots: dir -> (since, watched at, paths listed)
        self._gaps: OrderedDict[str, tuple[int, int, set[str]]] = OrderedDict()
        self.counters: dict[str, int] = {}
        self.lost: dict[str, int] = {}
        self.who = Attribution(table, proc, self.own_pids, cfg.attribution_window, mono,
                               self.counters, self.lost)  # fmt: skip
        self._degraded: dict[tuple[str, str], tuple[list[str], int, str]] = {}
        self.scanner = Scanner(self, Bucket(cfg.scan_files_per_s), Bucket(cfg.scan_bytes_per_s))
        self.ch = Changes(cfg, self.rules, owners, self._count,
                          lambda n: self.scanner.bytes.take(n, self.mono()), self.reads)
        now = self._polled = mono()
        self._next_periodic = now + cfg.periodic_interval
        self._anchors: set[str] = set()
        self._root_set = frozenset(self.rules.roots)
        if self.baseline.reset:  # changes made while stopped can no longer be told apart
            self.degraded("baseline_corrupt", "rebaseline", baseline_path, self.baseline.reset)
        self._setup_roots(startup=True)

    # -- the seam -------------------------------------------------------------------------
    def fileno(self) -> int | None:
        return self.ino.fd

    def next_due(self) -> float | None:
        due = [self._next_periodic]
        if self.scanner.busy:
            due.append(self.scanner.due)
        if self.ready:
            # a head past due still waits for its syscall record (see _release): look again
            # 20 ms after the last poll (a fixed time: "now + 20 ms" would never be due)
            head = self.ready[0][0]
            due.append(head if head > self._polled else self._polled + 0.02)
        if self.moves:
            due.append(next(iter(self.moves.values()))[2] + self.cfg.rename_timeout)
        if self.pending:
            if len(self.pending) > 256:
                due.append(self._polled + 0.05)
            else:
                q, m = self.cfg.coalesce_quiet, self.cfg.coalesce_max
                due.append(min(min(p.last + q, p.first + m) for p in self.pending.values()))
        return min(due)

    def poll(self, now: float) -> Iterable[Event]:
        self._polled = now
        out: list[Event] = []
        self._read(now, out)
        self._expire_moves(now, out)
        self._flush_due(now, out)
        self.scanner.run(now, out)
        if now >= self._next_periodic:
            self._next_periodic = now + self.cfg.periodic_interval
            self._periodic()
        self._release(now, out, force=False)
        self._emit_degraded(out)
        self.baseline.commit()
        return out

    def observe(self, rec: Sequence[Any]) -> Iterable[Event]:
        if rec[0] != R.FILEOP:
            return ()
        got = self.who.record(rec)
        if got is not None and self._gaps:
            path, op = got
            gap = self._gaps.get(os.path.dirname(path))
            if gap is not None and path not in gap[2]:  # late news of a dir's blind spot
                self._replay(path, op, gap[0], gap[1], self.mono())
        return ()

    def technique(self) -> tuple[str, str]:
        who = "syscall" if self.traced else "heuristic"
        if self.periodic:
            return "inotify+scan", (f"{len(self.periodic)} directories by periodic scan "
                                    f"(watch budget {self.budget}); attribution {who}")  # fmt: skip
        return "inotify", f"{len(self.dirs)} watches; attribution {who}"

    def metrics(self) -> Mapping[str, int | float]:
        m: dict[str, int | float] = {f"files.{k}": v for k, v in self.counters.items()}
        m.update({"files.watches": len(self.dirs), "files.periodic_dirs": len(self.periodic),
                  "files.pending": len(self.pending), "files.scan_queue": self.scanner.queued,
                  "files.watch_budget": self.budget,
                  "files.roots_missing": len(self.missing)})  # fmt: skip
        return m

    def losses(self) -> Mapping[str, int]:
        return dict(self.lost)

    def close(self) -> Iterable[Event]:
        out: list[Event] = []
        self._read(self.mono(), out)
        for p in list(self.pending.values()):
            self._flush(p, out)
        for cookie in list(self.moves):
            path, isdir, _ = self.moves.pop(cookie)
            self._deleted(path, isdir, out)
        self._release(self.mono(), out, force=True)
        self._emit_degraded(out)
        self.scanner.close()
        self.baseline.close()
        self.ino.close()
        return out

    # -- helpers --------------------------------------------------------------------------
    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def rule_of(self, path: str) -> CompiledRule | None:
        if self.ignore and (path + "/").startswith(self.ignore):
            return None
        return self.rules.rule_of(path)

    def watch_rule(self, path: str) -> CompiledRule | None:
        if self.ignore and (path + "/").startswith(self.ignore):
            return None
        return self.rules.watch_rule(path)

    def degraded(self, reason: str, action: str, path: str, detail: str = "") -> None:
        paths, n, d = self._degraded.get((reason, action), ([], 0, detail))
        if len(paths) < 20 and path not in paths:
            paths.append(path)
        self._degraded[(reason, action)] = (paths, n + 1, d or detail)

    def _emit_degraded(self, out: list[Event]) -> None:
        t = self.wall()
        for (reason, action), (paths, n, detail) in self._degraded.items():
            out.append(AgentDegraded(t, "files", reason, action, tuple(paths), n, detail or None))
        self._degraded.clear()

    # -- watches --------------------------------------------------------------------------
    def watch(self, d: str) -> bool:
        """Watch directory ``d`` (budget permitting); False: it is scanned periodically or
        it went away."""
        return self.w.add(d)

    @property
    def dirs(self) -> dict[str, int]:
        return self.w.dirs

    @property
    def periodic(self) -> set[str]:
        return self.w.periodic

    def _setup_roots(self, startup: bool) -> None:
        for rule in self.rules.rules:
            root = rule.root
            if rule.file_only:
                parent = os.path.dirname(root)
                if parent not in self._anchors and self.watch(parent):
                    self._anchors.add(parent)
                report = startup and self.baseline.meta("root:" + root) is not None
                self.scanner.add(Job(root, report, "scan", single=True, rule=rule))
            elif os.path.isdir(root):
                self.missing.discard(root)
                report = self.baseline.meta("root:" + root) is not None
                self.scanner.add(Job(root, report, "scan", rule=rule))
            elif root not in self.missing:
                self._missing(root, "not a directory", quiet=not self.cfg.rules)

    def _missing(self, root: str, why: str, quiet: bool = False) -> None:
        """A root that is not there: its parent (when it exists) is watched, so the root
        is set up the moment it appears (``mkdir /root/.ssh``), not at the next periodic
        check. ``quiet``: a default root this image does not have is no loss of coverage
        (counted in ``files.roots_missing``, not an ``agent.degraded``)."""
        self.missing.add(root)
        if not quiet:
            self.degraded("root_missing", "retry", root, why)
        parent = os.path.dirname(root)
        if parent not in self._anchors and os.path.isdir(parent) and self.watch(parent):
            self._anchors.add(parent)
            if os.path.isdir(root):  # already back (a swap: mv app.new app)
                self.missing.discard(root)
                self.scanner.add(Job(root, True, "inotify", rule=self.rules.rule_of(root),
                                     since=self._since(self.wall())), urgent=True)

    def rescan(self, reason: str, detail: str = "") -> None:
        """Scan every tree again against the baseline (after lost events)."""
        queued = self.scanner.queued_roots()  # a burst of overflows: one rescan each
        for rule in self.rules.rules:
            self.degraded(reason, "rescan", rule.root, detail)
            if rule.root not in queued and (rule.file_only or os.path.isdir(rule.root)):
                self.scanner.add(Job(rule.root, True, "scan", single=rule.file_only, rule=rule))

    def _periodic(self) -> None:
        for d in sorted(self.periodic):
            self.scanner.add(Job(d, True, "scan", recurse=False))
        if self.missing:
            for root in list(self.missing):
                if os.path.isdir(root):
                    self.missing.discard(root)
                    rule = self.rules.rule_of(root)
                    self.scanner.add(Job(root, True, "inotify", rule=rule))

    def root_done(self, job: Job) -> None:
        """The scanner finished a root's job: the root is baselined from now on."""
        if job.rule is not None and job.path == job.rule.root:
            self.baseline.set_meta("root:" + job.path, str(self.wall()))

    # -- inotify --------------------------------------------------------------------------
    def _read(self, now: float, out: list[Event]) -> None:
        for _ in range(READS_PER_POLL):
            try:
                events = self.ino.read()
            except OSError as exc:
                self._count("read_errors")
                self.rescan("read_error", str(exc))
                return
            if not events:
                return
            wall = self.wall()
            for ev in events:
                self._on_event(ev, now, wall, out)

    def _on_event(self, ev: ino.InotifyEvent, now: float, wall: int, out: list[Event]) -> None:
        mask = ev.mask
        if mask & ino.IN_Q_OVERFLOW:
            self._count("overflows")
            self.lost["files.inotify_overflow"] = self.lost.get("files.inotify_overflow", 0) + 1
            self.rescan("overflow", "inotify queue overflow (IN_Q_OVERFLOW)")
            return
        d = self.w.wds.get(ev.wd)
        if d is None:
            return
        if mask & ino.IN_IGNORED:
            self.w.ignored(ev.wd)
            return
        path = f"{d}/{ev.name}" if ev.name else d
        if not ev.name and mask & (ino.IN_DELETE_SELF | ino.IN_MOVE_SELF):
            # a root deleted or moved away (its parent is not watched: no other event says
            # so); the watches of a moved tree follow its inodes, so they are dropped
            if path in self._root_set:
                moved = bool(mask & ino.IN_MOVE_SELF)
                self._deleted(path, True, out, moved_out=moved)
                self._missing(path, "moved away" if moved else "deleted")
            return
        isdir = bool(mask & ino.IN_ISDIR)
        if ev.name and d in self._anchors and path in self._root_set:
            # a root seen from its parent's anchor watch (see _missing)
            if mask & (ino.IN_MOVED_FROM | ino.IN_DELETE):
                if path not in self.dirs:  # not watched itself: nothing else will say so
                    self._missing(path, "moved away" if mask & ino.IN_MOVED_FROM else "deleted")
                return  # else its own watch reports IN_MOVE_SELF / IN_DELETE_SELF
            if isdir and mask & (ino.IN_CREATE | ino.IN_MOVED_TO):
                self.missing.discard(path)  # it is back
        rule = self.rule_of(path)
        if rule is None:
            return
        if mask & ino.IN_CREATE:
            self.touch(path, rule, "create", now, wall)
            if isdir:
                self.scanner.add(Job(path, True, "inotify", rule=rule, since=self._since(wall)),
                                 urgent=True)
        if mask & ino.IN_MODIFY:
            p = self.touch(path, rule, "modify", now, wall, count=0)
            if p is not None:
                p.written = True
        if mask & ino.IN_CLOSE_WRITE:
            p = self.pending.get(path)
            if p is not None and p.written:
                p.written = False
                p.count += 1
                p.last, p.last_wall = now, wall
        if mask & ino.IN_ATTRIB:
            self.touch(path, rule, "attrib", now, wall)
        if (mask & ino.IN_CLOSE_NOWRITE and not isdir and "read" in rule.actions
                and not self.ch.own_read_closed(path)):  # not the close of our own hashing
            self.touch(path, rule, "read", now, wall)
        if mask & ino.IN_MOVED_FROM:
            self._flush_path(path, out)
            self.moves[ev.cookie] = (path, isdir, now)
        if mask & ino.IN_MOVED_TO:
            src = self.moves.pop(ev.cookie, None)
            if src is not None:
                self._renamed(src[0], path, isdir, wall, out)
            else:
                self.touch(path, rule, "create", now, wall, moved_in=True)
                if isdir:
                    self.scanner.add(Job(path, True, "inotify", rule=rule, since=self._since(wall)),
                                 urgent=True)
        if mask & ino.IN_DELETE:
            self._deleted(path, isdir, out)

    def _since(self, wall: int) -> int:
        return wall - int(self.cfg.attribution_window * 1e9)

    def touch(self, path: str, rule: CompiledRule, action: str, now: float, wall: int,
              count: int = 1, moved_in: bool = False, detected_by: str = "inotify",
              ) -> Pending | None:  # fmt: skip
        """Fold one notification into the path's pending change (or start one); which
        actions the rule reports is decided when it is flushed."""
        p = self.pending.get(path)
        if p is not None and action in _FOLD.get(p.action, ()):
            if action == "create":
                count = 0  # the same creation seen by a scan and by inotify
            p.count += count
            p.last, p.last_wall = now, wall
            if action not in p.actions:
                p.actions.append(action)
            return p
        if p is not None:
            self._flush(p, [])  # not foldable: the earlier change goes first
        p = Pending(path, action, rule, now, now, wall, wall, count, actions=[action],
                    detected_by=detected_by)  # fmt: skip
        if moved_in:
            p.actions.append("moved_in")
        if not self.traced and action in ("create", "modify"):
            p.who = self.who.heuristic(path)
        self.pending[path] = p
        if len(self.pending) > self.cfg.max_pending:
            _, oldest = next(iter(self.pending.items()))
            self._count("pending_flushed_early")
            self._flush(oldest, [])
        return p

    def _flush_path(self, path: str, out: list[Event]) -> None:
        p = self.pending.get(path)
        if p is not None:
            self._flush(p, out)

    def _flush_due(self, now: float, out: list[Event]) -> None:
        q, m = self.cfg.coalesce_quiet, self.cfg.coalesce_max
        for p in [p for p in self.pending.values() if now - p.last >= q or now - p.first >= m]:
            self._flush(p, out)

    def _expire_moves(self, now: float, out: list[Event]) -> None:
        while self.moves:
            cookie, (path, isdir, t) = next(iter(self.moves.items()))
            if now - t < self.cfg.rename_timeout:
                break
            del self.moves[cookie]
            self._deleted(path, isdir, out, moved_out=True)

    # -- changes --------------------------------------------------------------------------
    def queue(self, kw: dict[str, Any], now: float, old_path: str | None = None) -> None:
        """Hold a change for the join grace, then attribute it and send it."""
        self._count(f"{kw['detected_by']}.{kw['action']}")
        self.ready.append((now + JOIN_GRACE, kw, kw["path"], old_path))

    def _flush(self, p: Pending, out: list[Event]) -> None:
        self.pending.pop(p.path, None)
        rule = p.rule
        try:
            st: os.stat_result | None = os.lstat(p.path)
        except OSError:
            st = None
        old = self.baseline.get(p.path)
        action: str | None = p.action
        new = None
        skipped = None
        if st is not None:
            digest, skipped = self.ch.hash_of(p.path, st, rule, old)
            new = entry_of(p.path, st, digest)
            diff = compare(old, new)
            if p.action == "create" and old is not None and old.inode == new.inode:
                action = diff  # already reported (by a scan) unless it changed since
            elif p.action == "attrib" and diff == "modify":
                action = "modify"  # inotify is trusted that something happened; we say what
            self.baseline.put(new)
        if action is None:
            self._count("unchanged")
            return
        if action not in rule.actions and not (action == "create" and "moved_in" in p.actions):
            self._count("filtered_action")
            return
        kw = self.ch.fields(p.path, action, rule, old, new, p.detected_by, p.last_wall, skipped,
                         count=max(p.count, 1), first_seen=p.first_wall,
                         actions=tuple(a for a in p.actions if a != action))  # fmt: skip
        if p.who is not None:
            kw.update(p.who)
        self.queue(kw, self.mono())

    def _deleted(self, path: str, isdir: bool, out: list[Event], moved_out: bool = False,
                 detected_by: str = "inotify", t: int | None = None) -> None:  # fmt: skip
        self._flush_path(path, out)
        rule = self.rule_of(path)
        old = self.baseline.get(path)
        gone = self.baseline.delete_tree(path)
        if isdir or moved_out:
            self.w.forget(path, tree=moved_out)
        if rule is None:
            return
        wall = self.wall() if t is None else t
        now = self.mono()
        for q in gone:
            if q != path:
                self.queue(self.ch.fields(q, "delete", rule, None, None, detected_by, wall), now)
        if "delete" in rule.actions:
            kw = self.ch.fields(path, "delete", rule, old, None, detected_by, wall,
                             actions=("moved_out",) if moved_out else ())
            kw["previous_hash"] = old.hash if old else None
            self.queue(kw, now)

    def _renamed(self, old: str, new: str, isdir: bool, wall: int, out: list[Event]) -> None:
        self._flush_path(old, out)
        self._flush_path(new, out)
        rule_new = self.rule_of(new)
        rule_old = self.rule_of(old)
        if rule_new is None:
            self._deleted(old, isdir, out, moved_out=True)
            return
        prev = self.baseline.get(old)
        self.baseline.rename_tree(old, new)
        if isdir:
            self.w.move(old, new)
        if rule_old is None:
            self.touch(new, rule_new, "create", self.mono(), wall, moved_in=True)
            return
        try:
            st = os.lstat(new)
        except OSError:
            st = None
        # the moved entry as it was: what changed since (chmod, write) is its own event
        entry = replace(prev, path=new) if prev else None
        if entry is None and st is not None:
            entry = entry_of(new, st, self.ch.hash_of(new, st, rule_new, None)[0])
            self.baseline.put(entry)
        if "rename" in rule_new.actions:
            kw = self.ch.fields(new, "rename", rule_new, prev, entry, "inotify", wall, old_path=old)
            self.queue(kw, self.mono(), old_path=old)

    # -- attribution ------------------------------------------------------------------------
    def _release(self, now: float, out: list[Event], force: bool) -> None:
        while self.ready and (force or self.ready[0][0] <= now):
            due, kw, path, old_path = self.ready[0]
            if "attribution" not in kw and kw["detected_by"] != "scan":
                found = self.who.attribute(kw, old_path if kw["action"] == "rename" else path)
                if not found and self.traced and not force and now < due + JOIN_WAIT:
                    return  # traced: its syscall record may still be on its way (FIFO)
            self.ready.popleft()
            out.append(FileChange(**kw))

    def replay_gap(self, d: str, listed: set[str], since: int, watched_at: int,
                   now: float) -> None:  # fmt: skip
        """A new directory ``d`` was just watched (at wall time ``watched_at``) and listed:
        what the traced workload created in it *before* the watch existed and removed
        again (``mkdir -p d/e; echo > d/e/f; rm d/e/f``) is invisible to inotify and to the
        listing; replay those paths' syscalls (``detected_by: syscall``). Records of such
        syscalls that arrive later are replayed by :meth:`observe`."""
        self._gaps[d] = (since, watched_at, listed)
        while len(self._gaps) > MAX_GAPS:
            self._gaps.pop(next(iter(self._gaps)))
        for path in self.who.paths_in(d):
            if path in listed or path in self.pending:
                continue
            for op in self.who.ops_of(path):
                self._replay(path, op, since, watched_at, now)

    def _replay(self, path: str, op: FileOp, since: int, watched_at: int, now: float) -> None:
        if not since <= op.t <= watched_at:
            return
        rule = self.rule_of(path)
        if rule is None:
            return
        if op.cls in WHO_FOR["create"]:
            self.touch(path, rule, "create", now, op.t, detected_by="syscall")
        elif op.cls in WHO_FOR["modify"] and path in self.pending:
            self.touch(path, rule, "modify", now, op.t)
        elif op.cls in WHO_FOR["delete"] and path in self.pending:
            self._deleted(path, False, [], detected_by="syscall", t=op.t)

SIDECAR_NO_DEFAULTS = ("sidecar: the default trees would be this container's own; "
                       "--watch /proc/<pid>/root/PATH or [[files.rules]] name the workload's")


IN_APP = ("in-app mode: the audit hook reports the host's own file writes; whole-tree "
          "monitoring (scans and hashing under the host's GIL, once per forked worker) "
          "belongs to the wrapper or a sidecar")


def _traced(cfg: Any, mode: str) -> bool:
    """Whether the tracer sends this mode's file syscalls (attribution ``syscall``)."""
    return bool(cfg.files.trace and seccomp_traced(cfg, mode))


def probe(cfg: Any, mode: str) -> tuple[str, str]:
    """(technique, reason) for ``lw-embed env --mode``: the rules and inotify's limits."""
    fc: FilesConfig = cfg.files
    if not fc.enabled:
        return "none", "[files] enabled = false (--watch PATH monitors a tree)"
    rules = fc.effective_rules()
    if not rules:
        return "none", "no [[files.rules]] and default_rules = false"
    if mode == "sidecar" and not fc.rules:
        return "none", SIDECAR_NO_DEFAULTS
    if mode == "in-app":
        return "none", IN_APP
    try:
        ino.Inotify().close()
    except OSError as exc:
        return "scan", f"inotify unavailable ({exc}): periodic scans only"
    traced = _traced(cfg, mode)
    lim = ino.limits()
    return "inotify", (f"{len(rules)} rules, max_user_watches {lim.get('max_user_watches', '?')}"
                       f"; attribution {'syscall' if traced else 'heuristic'}")  # fmt: skip


def factory(ctx: Any) -> FilesSource | None:
    """The ``files`` source of the worker (None when ``[files] enabled`` is false)."""
    fc: FilesConfig = ctx.config.files
    if (not fc.enabled or not fc.effective_rules() or ctx.mode == "in-app"
            or (ctx.mode == "sidecar" and not fc.rules)):
        return None
    path = fc.baseline or os.path.join(ctx.data_dir, "files", "baseline.sqlite")
    traced = _traced(ctx.config, ctx.mode)
    return FilesSource(fc, ctx.table, path, proc=ctx.proc, traced=traced, wall=ctx.wall,
                       mono=ctx.mono, ignore=(ctx.data_dir, os.path.dirname(path)),
                       own_pids=(ctx.core_pid,),
                       owners=owners_for(ctx.config, ctx.peers.get("packages")))  # fmt: skip
