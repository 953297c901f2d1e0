"""The file source's scanner: walks monitored trees against the baseline, rate-limited.

Interface: ``os.listdir``/``os.lstat`` and the hashing of :mod:`lw_embed.pipeline.baseline`,
driven by :class:`lw_embed.sources.files.FilesSource` (its ``watch``, ``rule_of``,
``touch``, ``change``, ``queue`` and ``baseline``). A :class:`Job` is a directory to
walk (or one file): a start-up or recovery scan (``detected_by="scan"``: differences
with the baseline become events at once, with deletions found by comparing a
directory's recorded children with its listing), or the scan of a directory that just
appeared (``detected_by="inotify"``: what is found becomes a pending ``create``, folded
with the inotify events the new watch may report for the same files). Every directory
is watched *before* it is listed (so nothing created meanwhile is missed) and only if
the rules want it (excluded trees are never entered).

Capability: read access to the trees.

Cost: one token of ``scan_files_per_s`` per directory entry checked and the hashed bytes
from ``scan_bytes_per_s``; at most ``SLICE`` seconds of work per worker poll (a file
larger than ``HASH_STEP`` is hashed a step per turn, across polls), so the worker's
other duties (and the workload, the worker runs at nice 10) are never starved.
A file whose (inode, size, mtime, ctime) match the baseline is not read again (a baseline
written before ctime was kept re-reads every file once).

Failure modes: entries that vanish mid-scan are skipped; an unlistable directory is
skipped (its recorded children are kept).
"""

from __future__ import annotations

import os
import stat
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lw_embed.pipeline.baseline import Entry, Hasher, compare, entry_of
from lw_embed.pipeline.filerules import CompiledRule

if TYPE_CHECKING:
    from lw_embed.events import Event
    from lw_embed.sources.files import FilesSource

SLICE = 0.02
#: files larger than this are hashed a step at a time across polls (one step per turn)
HASH_STEP = 1 << 21


class Bucket:
    """A token bucket (``rate`` per second, burst of a tenth of a second)."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self.burst = max(1.0, self.rate / 10)
        self.tokens = self.burst
        self.last: float | None = None

    def _refill(self, now: float) -> None:
        if self.last is not None and now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now if self.last is None or now > self.last else self.last

    def ready(self, now: float) -> bool:
        self._refill(now)
        return self.tokens > 0

    def take(self, n: float, now: float) -> None:
        self._refill(now)
        self.tokens -= n

    def wait(self, now: float) -> float:
        self._refill(now)
        return 0.0 if self.tokens > 0 else (1e-9 - self.tokens) / self.rate


@dataclass(slots=True, eq=False)
class Job:
    path: str
    report: bool
    detected_by: str  # scan | inotify
    single: bool = False
    rule: CompiledRule | None = None
    recurse: bool = True
    outstanding: int = 0
    since: int = 0  # live jobs: replay traced syscalls from this wall time (ns)


def _key(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class Scanner:
    __slots__ = ("_cur", "_hashing", "bytes", "due", "files", "src", "stack")

    def __init__(self, src: FilesSource, files: Bucket, bytes_: Bucket) -> None:
        self.src = src
        self.files = files
        self.bytes = bytes_
        self.stack: deque[tuple[str, Job]] = deque()
        self._cur: list[Any] | None = None  # [dir, job, names, index, seen]
        #: a large file being hashed: (hasher, path, stat, rule, job, baseline entry)
        self._hashing: tuple[Hasher, str, os.stat_result, CompiledRule, Job, Entry | None] | None
        self._hashing = None
        self.due = 0.0

    @property
    def busy(self) -> bool:
        return bool(self.stack) or self._cur is not None or self._hashing is not None

    @property
    def queued(self) -> int:
        return len(self.stack) + (self._cur is not None)

    def queued_roots(self) -> set[str]:
        """The roots of scan jobs not started yet."""
        return {d for d, job in self.stack
                if d == job.path and job.detected_by == "scan" and job.recurse and job.report}

    def add(self, job: Job, urgent: bool = False) -> None:
        """Queue a job: urgent ones (a new directory) before everything else."""
        job.outstanding += 1
        if urgent:
            self.stack.append((job.path, job))
        else:
            self.stack.appendleft((job.path, job))
        self.due = 0.0

    def run(self, now: float, out: list[Event]) -> None:
        end = time.monotonic() + SLICE
        while self.busy:
            if not (self.files.ready(now) and self.bytes.ready(now)):
                self.due = now + max(self.files.wait(now), self.bytes.wait(now))
                return
            if time.monotonic() > end:
                self.due = now
                return
            if self._hashing is not None:
                self._hash_step(now)
            elif self._cur is None:
                self._start(now)
            else:
                self._step(now)

    def _start(self, now: float) -> None:
        d, job = self.stack.pop()
        src = self.src
        self.files.take(1, now)
        if job.single:
            rule = job.rule
            try:
                st = os.lstat(d)
            except OSError:
                st = None
            if rule is not None:
                if st is None:
                    self._gone(d, job, rule, now)
                else:
                    self._check(d, st, rule, job, now)
            self._done(job)
            return
        watched_at = src.wall()
        if src.watch_rule(d) is not None:
            src.watch(d)
        try:
            names = sorted(os.listdir(d))
        except OSError:
            self._done(job)
            return
        if job.detected_by == "inotify":
            prefix = d if d.endswith("/") else d + "/"
            src.replay_gap(d, {prefix + n for n in names}, job.since, watched_at, now)
        self._cur = [d, job, names, 0, set()]

    def _step(self, now: float) -> None:
        cur = self._cur
        assert cur is not None
        d, job, names, i, seen = cur
        if i >= len(names):
            self._cur = None
            if job.detected_by == "scan":
                self._deletions(d, job, seen, now)
            self._done(job)
            return
        cur[3] = i + 1
        path = f"{d}/{names[i]}" if d != "/" else f"/{names[i]}"
        src = self.src
        rule = src.rule_of(path)
        if rule is None:
            return  # excluded (or too deep): not even stat'ed
        self.files.take(1, now)
        try:
            st = os.lstat(path)
        except OSError:
            return
        seen.add(path)
        if (stat.S_ISDIR(st.st_mode) and src.watch_rule(path) is not None
                and (job.recurse or (path not in src.dirs and path not in src.periodic))):
            job.outstanding += 1
            self.stack.append((path, job))
        self._check(path, st, rule, job, now)

    def _check(self, path: str, st: os.stat_result, rule: CompiledRule, job: Job,
               now: float) -> None:  # fmt: skip
        src = self.src
        old = src.baseline.get(path)
        if job.detected_by == "inotify":
            if old is None or old.inode != st.st_ino:
                src.touch(path, rule, "create", now, src.wall())
            return
        known = src.ch.known_hash(path, st, rule, old)
        if known is None and st.st_size > HASH_STEP:
            job.outstanding += 1  # the job is not done before its last file is hashed
            self._hashing = (src.ch.hasher(path), path, st, rule, job, old)
            return
        digest, skipped = known if known is not None else src.ch.digest(path)
        self._record(path, st, rule, job, old, digest, skipped, now)

    def _hash_step(self, now: float) -> None:
        assert self._hashing is not None
        h, path, st, rule, job, old = self._hashing
        self.src.ch.hashed(h.step(HASH_STEP))
        if h.result is None:
            return
        self._hashing = None
        try:
            now_st: os.stat_result | None = os.lstat(path)
        except OSError:
            now_st = None
        if now_st is None:  # deleted while read: as if the walk had not found it
            if old is not None:
                self._gone(path, job, rule, now)
        elif _key(now_st) != _key(st):
            # changed while read: the digest is of neither version; record what is there
            # now, unhashed (a watched file's inotify events hash it again when quiet)
            self._record(path, now_st, rule, job, old, None, "changing", now)
        else:
            self._record(path, st, rule, job, old, h.result[0], h.result[1], now)
        self._done(job)

    def close(self) -> None:
        if self._hashing is not None:
            self._hashing[0].close()
            self._hashing = None

    def _record(self, path: str, st: os.stat_result, rule: CompiledRule, job: Job,
                old: Entry | None, digest: str | None, skipped: str | None,
                now: float) -> None:  # fmt: skip
        src = self.src
        wall = src.wall()
        new = entry_of(path, st, digest)
        diff = compare(old, new)
        if diff is None:
            if old is not None and (old.ctime != new.ctime or (old.hash is None and digest)):
                src.baseline.put(new)  # the same file: a fresh no-rehash key (or its hash)
            return
        src.baseline.put(new)
        # a path already in the baseline is reported even when the first scan of its root
        # never finished (the agent stopped during it): only unrecorded paths are quiet
        if (job.report or old is not None) and diff in rule.actions:
            src.queue(src.ch.fields(path, diff, rule, old, new, "scan", wall, skipped), now)

    def _gone(self, path: str, job: Job, rule: CompiledRule, now: float) -> None:
        src = self.src
        old = src.baseline.get(path)
        gone = src.baseline.delete_tree(path)
        if (job.report or old is not None) and "delete" in rule.actions:
            wall = src.wall()
            for q in gone:
                kw = src.ch.fields(q, "delete", rule, old if q == path else None, None, "scan",
                                   wall)
                src.queue(kw, now)

    def _deletions(self, d: str, job: Job, seen: set[str], now: float) -> None:
        src = self.src
        for child in src.baseline.children(d):
            if child in seen:
                continue
            rule = src.rule_of(child)
            if rule is None:
                src.baseline.delete_tree(child)  # no longer monitored: forget silently
                continue
            self._gone(child, job, rule, now)

    def _done(self, job: Job) -> None:
        job.outstanding -= 1
        if job.outstanding == 0:
            self.src.root_done(job)
