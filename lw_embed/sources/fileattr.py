"""Who changed a file: the join of traced file syscalls with changes, and the /proc guess.

Interface: ``R.FILEOP`` records (lw_embed.sources.filetrace) through :meth:`Attribution.record`,
kept per path (the last 8 of each, at most ``MAX_FILEOPS`` in all); the process of each is
resolved at once from the worker's process table (it may have exited by the time its
change is emitted). :meth:`Attribution.attribute` picks, for one change, the latest
syscall on its path whose class can explain the action, within ``files.attribution_window``
before the change and a little after (the syscall is recorded at entry).
:meth:`Attribution.heuristic` is the best effort without a tracer: a process holding the
path open, from ``readlink /proc/<pid>/fd/*``.

Capability: none for the join; reading other processes' ``/proc/<pid>/fd`` needs the same
user or ``CAP_SYS_PTRACE`` (those that cannot be read are skipped).

Cost: a dict append per record; a few comparisons per change. The /proc walk is at most
``HEURISTIC_MAX_FDS`` readlinks, at most every ``HEURISTIC_EVERY`` s (a burst of changes
shares one walk).

Failure modes: records beyond the bound evict the oldest (``files.fileop_evicted`` in the
losses); a change whose syscall record is missing or late is ``attribution: none``.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from lw_embed.pipeline.enrich import ProcessTable
from lw_embed.sources.filetrace import CLASS, O_CREAT, O_TRUNC

MAX_FILEOPS = 20000
HEURISTIC_EVERY = 0.5  # s between two /proc fd walks
HEURISTIC_MAX_FDS = 20000
#: a syscall is recorded at entry: it may be stamped a little after the change it made
LATE = 0.2

#: which syscall classes can explain which action
WHO_FOR: Mapping[str, frozenset[str]] = {
    "create": frozenset({"open_create", "creat", "mkdir", "symlink", "link", "rename_to"}),
    "modify": frozenset({"open_write", "open_create", "creat", "truncate"}),
    "attrib": frozenset({"chmod", "chown", "utime"}),
    "delete": frozenset({"unlink", "rmdir"}),
    "rename": frozenset({"rename"}),
}

@dataclass(frozen=True, slots=True)
class FileOp:
    t: int
    pid: int
    syscall: str
    cls: str
    exec_id: str | None
    exe: str | None
    uid: int | None


class Attribution:
    """Recent traced file syscalls by path, and the /proc fd index."""

    def __init__(self, table: ProcessTable, proc: str, own_pids: Iterable[int], window: float,
                 mono: Callable[[], float] = time.monotonic,
                 counters: dict[str, int] | None = None, lost: dict[str, int] | None = None,
                 ) -> None:  # fmt: skip
        self.table = table
        self.proc = proc
        self.own_pids = frozenset(own_pids)
        self.window = window
        self.mono = mono
        self.counters = {} if counters is None else counters
        self.lost = {} if lost is None else lost
        self.ops: dict[str, deque[FileOp]] = {}
        self.ops_order: deque[str] = deque()
        self.ops_dirs: dict[str, set[str]] = {}  # parent dir -> paths in self.ops
        self._fd_index: dict[str, tuple[int, str]] = {}  # path -> (pid, fd)
        self._fd_index_at = -1e9

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def record(self, rec: Sequence[Any]) -> tuple[str, FileOp] | None:
        """Keep one FILEOP record; (path, op) when it is kept."""
        _, t, pid, _tid, syscall, path, path2, flags = rec
        cls = CLASS.get(syscall, syscall)
        if cls == "open":
            if not flags & (O_CREAT | O_TRUNC | 3):
                return None
            cls = "open_create" if flags & O_CREAT else "open_write"
        p = self.table.get(pid)
        op = FileOp(t, pid, syscall, cls, p.exec_id if p else None, p.exe if p else None,
                    p.uid if p else None)  # fmt: skip
        self._count("fileops")
        self.add(path, op)
        if cls == "rename" and path2:
            self.add(path2, replace(op, cls="rename_to"))
        return path, op

    def paths_in(self, d: str) -> list[str]:
        return sorted(self.ops_dirs.get(d, ()))

    def ops_of(self, path: str) -> list[FileOp]:
        return list(self.ops.get(path, ()))

    def add(self, path: str, op: FileOp) -> None:
        q = self.ops.get(path)
        if q is None:
            q = self.ops[path] = deque(maxlen=8)
            self.ops_dirs.setdefault(os.path.dirname(path), set()).add(path)
        q.append(op)
        self.ops_order.append(path)
        while len(self.ops_order) > MAX_FILEOPS:
            old = self.ops_order.popleft()
            oq = self.ops.get(old)
            if oq:
                oq.popleft()
                if not oq:
                    del self.ops[old]
                    self.ops_dirs.get(os.path.dirname(old), set()).discard(old)
                self.lost["files.fileop_evicted"] = self.lost.get("files.fileop_evicted", 0) + 1

    def attribute(self, kw: dict[str, Any], path: str | None) -> bool:
        """Join the change with the latest traced syscall that explains it (in place)."""
        ops = self.ops.get(path) if path else None
        want = WHO_FOR.get(kw["action"])
        if not ops or not want:
            return False
        lo = (kw.get("first_seen") or kw["time"]) - int(self.window * 1e9)
        hi = kw["time"] + int(LATE * 1e9)
        best = None
        for op in ops:
            if op.cls in want and lo <= op.t <= hi:
                best = op
        if best is None:
            return False
        self._count("attributed")
        kw.update(attribution="syscall", pid=best.pid, exec_id=best.exec_id, exe=best.exe,
                  uid=best.uid, syscall=best.syscall)  # fmt: skip
        return True

    def heuristic(self, path: str) -> dict[str, Any] | None:
        """Best effort without the tracer: a process holding ``path`` open. The /proc fd
        index is rebuilt at most every ``HEURISTIC_EVERY`` s (and bounded), so a burst of
        changes costs one /proc walk, not one per file."""
        now = self.mono()
        pid = self._holder(path)
        if pid is None and now - self._fd_index_at >= HEURISTIC_EVERY:
            self._fd_index_at = now
            self._fd_index = self._build_index()
            pid = self._holder(path)
        if pid is None:
            return None
        p = self.table.get(pid)
        try:
            exe = p.exe if p else os.readlink(f"{self.proc}/{pid}/exe")
        except OSError:
            exe = None
        self._count("heuristic_attributed")
        return {"attribution": "heuristic", "pid": pid, "exe": exe,
                "exec_id": p.exec_id if p else None, "uid": p.uid if p else None}  # fmt: skip

    def _holder(self, path: str) -> int | None:
        """The pid of the index entry for ``path`` if it still holds the file open (the
        index may be seconds old: the process may have closed it, or exited)."""
        got = self._fd_index.get(path)
        if got is None:
            return None
        pid, fd = got
        try:
            if os.readlink(f"{self.proc}/{pid}/fd/{fd}") == path:
                return pid
        except OSError:
            pass
        del self._fd_index[path]
        return None

    def _build_index(self) -> dict[str, tuple[int, str]]:
        index: dict[str, tuple[int, str]] = {}
        budget = HEURISTIC_MAX_FDS
        try:
            pids = [int(n) for n in os.listdir(self.proc) if n.isdigit()]
        except OSError:
            return index
        self._count("heuristic_scans")
        for pid in pids:
            if pid in self.own_pids:
                continue
            base = f"{self.proc}/{pid}/fd"
            try:
                fds = os.listdir(base)
            except OSError:
                continue
            for fd in fds:
                budget -= 1
                if budget < 0:
                    return index
                try:
                    target = os.readlink(f"{base}/{fd}")
                except OSError:
                    continue
                if target.startswith("/"):
                    index.setdefault(target, (pid, fd))
        return index
