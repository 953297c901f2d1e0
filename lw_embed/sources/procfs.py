"""The /proc source: a snapshot at start and a reconciler for what the tracer did not say.

Interface: ``<proc>/<pid>/{stat,status,cmdline,exe,cwd}`` through the readers of
:mod:`lw_embed.kernel.procfs`, always under the ``proc`` root given (tests pass a fake
tree). Scope decides which processes are reported:

- ``tree``: the descendants of ``core_pid`` (by the ppid chain), the worker's subtree
  excluded; with ``roots`` (the sidecar's ``--pid``), those pids and their descendants
  instead;
- ``namespace``: every process visible in proc, kernel threads excluded;
- ``none``: nothing (and no reads at all).

In every scope the agent's own processes are left out: ``core_pid``, ``worker_pid`` and
the worker's descendants (a tree is not followed through them); so are the pids of
``exclude`` (the sidecar's: the task's pause/init process, its own ancestors), which
leaves their descendants in scope.

Capability: none for the listing and ``stat``; another user's ``exe``/``cwd`` needs
``CAP_SYS_PTRACE`` (without it they are reported as ``""``).

Cost: one ``stat`` read per visible process per pass, plus ``cmdline``/``status``/two
readlinks and a second ``stat`` per process reported as new. At a few hundred processes
and a pass every few seconds this is well under 1 % of a core.

Failure modes: a process that vanishes mid-read (missing or truncated files, a changed
start time) is skipped, never an exception; a proc root that cannot be listed makes the
pass report nothing (``scan_errors``), so it is never mistaken for every process exiting.
Grace: a process unknown to the table is reported only when it is still there and still
unknown at the next pass (its FORK/EXEC records may be in flight), and a known live
process that vanished is reported as gone only when it is still vanished and still live
in the table one pass later (its EXIT record may be in flight); a ``final`` pass, after
the record stream ended, has no grace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from lw_embed.kernel import procfs

SCOPES = ("tree", "namespace", "none")
_DEAD = frozenset({"Z", "X", "x"})
_PARSE_ERRORS = (OSError, ValueError, IndexError, UnicodeDecodeError)


class KnownProcesses(Protocol):
    """What the reconciler needs of the process table."""

    def live_start_ticks(self, pid: int) -> int | None: ...

    def live(self) -> Iterable[tuple[int, int]]: ...


@dataclass(frozen=True, slots=True)
class ProcInfo:
    """One process as read from /proc."""

    pid: int
    ppid: int
    start_ticks: int
    exe: str
    argv: tuple[str, ...]
    truncated: bool
    cwd: str
    uid: int
    gid: int
    euid: int


@dataclass(frozen=True, slots=True)
class Reconciled:
    """The outcome of one pass: processes to report as new, and (pid, start_ticks) gone."""

    new: list[ProcInfo] = field(default_factory=list)
    gone: list[tuple[int, int]] = field(default_factory=list)


class Reconciler:
    """Finds in-scope processes the table does not know, and known ones that vanished."""

    def __init__(
        self,
        table: KnownProcesses,
        scope: str,
        core_pid: int,
        worker_pid: int,
        proc: str = procfs.PROC,
        argv_max_bytes: int = 4096,
        argv_max_args: int = 256,
        roots: Iterable[int] = (),
        exclude: Iterable[int] = (),
    ) -> None:
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        self.table = table
        self.scope = scope
        self.core_pid = core_pid
        self.worker_pid = worker_pid
        self.roots = tuple(roots)
        self.exclude = frozenset(exclude)
        self.proc = proc
        self.argv_max_bytes = argv_max_bytes
        self.argv_max_args = argv_max_args
        self._pending_new: set[tuple[int, int]] = set()
        self._pending_gone: set[tuple[int, int]] = set()
        self.passes = 0
        self.scan_errors = 0
        self.last_pass = 0.0

    # -- public ---------------------------------------------------------------------------
    def snapshot(self) -> list[ProcInfo]:
        """Every in-scope process now, parents before children (oldest first)."""
        if self.scope == "none":
            return []
        stats = self._scan()
        if stats is None:
            return []
        infos = (self.read_info(st) for st in self._in_scope(stats).values())
        return _ordered(i for i in infos if i is not None)

    def reconcile(self, now: float, final: bool = False) -> Reconciled:
        """One pass at monotonic time ``now``: new processes and vanished ones, with grace.

        ``final``: no grace (the record stream has ended, so nothing is in flight).
        """
        self.passes += 1
        self.last_pass = now
        if self.scope == "none":
            return Reconciled()
        stats = self._scan()
        if stats is None:
            return Reconciled()
        table = self.table
        new: list[ProcInfo] = []
        pending_new: set[tuple[int, int]] = set()
        for pid, st in self._in_scope(stats).items():
            if table.live_start_ticks(pid) == st.start_ticks:
                continue
            ident = (pid, st.start_ticks)
            if final or ident in self._pending_new:
                info = self.read_info(st)
                if info is not None:
                    new.append(info)
            else:
                pending_new.add(ident)
        self._pending_new = pending_new
        gone: list[tuple[int, int]] = []
        pending_gone: set[tuple[int, int]] = set()
        for ident in table.live():
            now_st = stats.get(ident[0])
            if now_st is not None and now_st.start_ticks == ident[1] and now_st.state not in _DEAD:
                continue
            if final or ident in self._pending_gone:
                gone.append(ident)
            else:
                pending_gone.add(ident)
        self._pending_gone = pending_gone
        gone.sort()
        return Reconciled(new=_ordered(new), gone=gone)

    def read_info(self, st: procfs.Stat) -> ProcInfo | None:
        """The details of the process ``st`` describes; None if it vanished meanwhile."""
        pid, proc = st.pid, self.proc
        try:
            argv, truncated = procfs.read_cmdline(
                pid, self.argv_max_bytes, self.argv_max_args, proc
            )
            uid, gid, euid = procfs.read_ids(pid, proc)
        except _PARSE_ERRORS:
            return None
        exe = _link(procfs.read_exe, pid, proc)
        cwd = _link(procfs.read_cwd, pid, proc)
        try:  # still the same process? (a pid reused between the reads would mix two)
            again = procfs.read_stat(pid, proc)
        except _PARSE_ERRORS:
            return None
        if again.start_ticks != st.start_ticks or again.state in _DEAD:
            return None
        return ProcInfo(
            pid=pid, ppid=again.ppid, start_ticks=st.start_ticks, exe=exe, argv=tuple(argv),
            truncated=truncated, cwd=cwd, uid=uid, gid=gid, euid=euid,
        )  # fmt: skip

    # -- internals ------------------------------------------------------------------------
    def _scan(self) -> dict[int, procfs.Stat] | None:
        """``stat`` of every process in proc; None when proc itself cannot be listed."""
        out = scan(self.proc)
        if out is None:
            self.scan_errors += 1
        return out

    def _in_scope(self, stats: dict[int, procfs.Stat]) -> dict[int, procfs.Stat]:
        """The live (not zombie) processes of the scope, the agent's own excluded."""
        return in_scope(stats, self.scope, self.core_pid, self.worker_pid, self.roots,
                        self.exclude)  # fmt: skip


def scan(proc: str = procfs.PROC) -> dict[int, procfs.Stat] | None:
    """``stat`` of every process in proc; None when proc itself cannot be listed."""
    try:
        pids = procfs.list_pids(proc)
    except OSError:
        return None
    out: dict[int, procfs.Stat] = {}
    for pid in pids:
        try:
            st = procfs.read_stat(pid, proc)
        except _PARSE_ERRORS:
            continue  # vanished or half-written: not there
        if st.pid == pid:
            out[pid] = st
    return out


def in_scope(stats: dict[int, procfs.Stat], scope: str, core_pid: int, worker_pid: int,
             roots: Iterable[int] = (), exclude: frozenset[int] = frozenset(),
             ) -> dict[int, procfs.Stat]:  # fmt: skip
    """The live (not zombie) processes of ``scope`` among ``stats``: the agent's own
    (``core_pid``, the worker's subtree) and the pids of ``exclude`` left out."""
    if scope == "none":
        return {}
    children: dict[int, list[int]] = {}
    for pid, st in stats.items():
        children.setdefault(st.ppid, []).append(pid)
    own = _subtree(children, worker_pid) | {core_pid}
    if scope == "tree":
        picked: set[int] = set()
        for root in tuple(roots) or (core_pid,):
            if root in stats or root == core_pid:
                picked |= _subtree(children, root, skip=own)
        picked -= own
    else:
        kthreadd = stats.get(2)
        kernel = kthreadd is not None and kthreadd.comm == "kthreadd"
        picked = {
            pid
            for pid, st in stats.items()
            if pid not in own and not (kernel and (pid == 2 or st.ppid == 2))
        }
    return {pid: stats[pid] for pid in picked - exclude if stats[pid].state not in _DEAD}


def _subtree(
    children: dict[int, list[int]], root: int, skip: set[int] | frozenset[int] = frozenset()
) -> set[int]:
    """``root`` and its descendants, not descending into the pids in ``skip``."""
    out = {root}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in out and child not in skip:
                out.add(child)
                todo.append(child)
    return out


def _link(reader: Callable[[int, str], str], pid: int, proc: str) -> str:
    try:
        return reader(pid, proc)
    except OSError:
        return ""  # no permission (another user's process) or a kernel thread


def _ordered(infos: Iterable[ProcInfo]) -> list[ProcInfo]:
    """Oldest first: a parent starts no later than its children."""
    return sorted(infos, key=lambda i: (i.start_ticks, i.pid))
