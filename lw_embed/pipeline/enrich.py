"""The worker's process table: joins records to processes (exec_id) and their ancestry.

Interface: none (pure Python, no I/O). Inputs are the core's records
(:mod:`lw_embed.records`: FORK, EXEC, EXIT, CONNECT, already unpacked) and what the /proc
reconciler saw (:class:`lw_embed.sources.procfs.ProcInfo`); outputs are events
(:mod:`lw_embed.events`). Times are passed in by the caller (the record's time, or the
caller's clock for /proc observations), so tests need no clock.

Capability: none.

Cost: O(1) dict operations per record, plus O(ancestors_max) to build the ancestry of a
``process.exec``. Memory is bounded by ``max_entries`` (about 0.5 KB an entry).

Failure modes: nothing raises on odd input. Identity is (pid, start_ticks), never the pid
alone: a record for a pid whose live entry has another start time is a new process, and
the old one is ended with a synthesised ``process.exit`` (``source="procfs"``,
``exit_code=None``) that the caller collects with :meth:`ProcessTable.drain_missed`.
An EXIT for a pid with no live entry cannot be attributed and is counted
(``unknown_exits``). When the table is full, exited entries are evicted oldest first
(``evictions``); only if none is left a live entry is evicted (``evicted_live``, a loss).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lw_embed.errors import RecordError
from lw_embed.events import Ancestor, NetConnect, ProcessExec, ProcessExit, Source
from lw_embed.kernel.procfs import exec_id, ticks_to_ns
from lw_embed.records import R

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from lw_embed.sources.procfs import ProcInfo

DEFAULT_MAX_ENTRIES = 65536
#: The record types :meth:`ProcessTable.apply` takes.
PROCESS_RECORDS = frozenset({R.FORK, R.EXEC, R.EXIT, R.CONNECT})


def _int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise RecordError(f"expected an int, got {type(v).__name__}")
    return v


def _opt_int(v: Any) -> int | None:
    return None if v is None else _int(v)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise RecordError(f"expected a str, got {type(v).__name__}")
    return v


@dataclass(slots=True)
class Proc:
    """One process as the worker knows it (mutable: an exec updates it in place)."""

    exec_id: str
    pid: int
    start_ticks: int
    start_time: int
    ppid: int
    parent_exec_id: str | None
    exe: str
    argv: tuple[str, ...]
    truncated: bool
    cwd: str
    uid: int
    gid: int
    euid: int
    exited: bool = False
    container_id: str = ""  # sidecar mode: the container it runs in ("" unknown)

    def record(self) -> dict[str, Any]:
        """The batch's process record for this process (keys in sorted order)."""
        rec: dict[str, Any] = {"argv": list(self.argv)}
        if self.container_id:
            rec["container_id"] = self.container_id
        rec["exe"], rec["exec_id"] = self.exe, self.exec_id
        if self.parent_exec_id is not None:
            rec["parent_exec_id"] = self.parent_exec_id
        rec["pid"] = self.pid
        rec["ppid"] = self.ppid
        rec["start_time"] = self.start_time
        return rec


class ProcessTable:
    """Processes by exec_id, with the current identity of each pid."""

    __slots__ = (
        "_by_pid", "_container", "_entries", "_exited", "_missed", "ancestors_max", "boot_id",
        "boot_time_ns", "evicted_live", "evictions", "max_entries", "pidns", "unknown_exits",
    )  # fmt: skip

    def __init__(
        self,
        boot_id: str,
        pidns: int,
        boot_time_ns: int,
        ancestors_max: int,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        container: Callable[[int], str] | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.boot_id = boot_id
        self.pidns = pidns
        self.boot_time_ns = boot_time_ns
        self.ancestors_max = ancestors_max
        self.max_entries = max_entries
        #: pid -> container id, asked when a process is first seen (the caller's I/O)
        self._container = container
        self._entries: OrderedDict[str, Proc] = OrderedDict()  # creation order
        self._by_pid: dict[int, str] = {}  # pid -> exec_id of its newest entry
        self._exited: OrderedDict[str, None] = OrderedDict()  # exit order
        self._missed: list[ProcessExit] = []
        self.evictions = 0
        self.evicted_live = 0
        self.unknown_exits = 0

    # -- lookups ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def get(self, pid: int) -> Proc | None:
        """The live entry of ``pid``, or None."""
        eid = self._by_pid.get(pid)
        if eid is None:
            return None
        p = self._entries[eid]
        return None if p.exited else p

    def by_exec_id(self, eid: str) -> Proc | None:
        return self._entries.get(eid)

    def live_start_ticks(self, pid: int) -> int | None:
        p = self.get(pid)
        return None if p is None else p.start_ticks

    def live(self) -> list[tuple[int, int]]:
        """(pid, start_ticks) of every live entry."""
        return [(p.pid, p.start_ticks) for p in self._entries.values() if not p.exited]

    @property
    def live_count(self) -> int:
        return len(self._entries) - len(self._exited)

    def record(self, eid: str | None) -> dict[str, Any] | None:
        """The process record of ``eid`` for a batch, or None when unknown."""
        if eid is None:
            return None
        p = self._entries.get(eid)
        return None if p is None else p.record()

    def drain_missed(self) -> list[ProcessExit]:
        """Exits synthesised because a pid was reused without an exit record."""
        out, self._missed = self._missed, []
        return out

    # -- records ------------------------------------------------------------------------
    def apply(self, rec: Sequence[Any]) -> ProcessExec | ProcessExit | NetConnect | None:
        """Apply one decoded FORK/EXEC/EXIT/CONNECT record (see :mod:`lw_embed.records`).

        Raises RecordError when a field has the wrong type (the table is then unchanged).
        """
        rtype, t, f = rec[0], _int(rec[1]), rec[2:]
        if rtype == R.FORK:
            self.on_fork(t, _int(f[0]), _int(f[1]), _int(f[2]))
            return None
        if rtype == R.EXEC:
            argv = f[4]
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                raise RecordError("EXEC argv is not a list of str")
            return self.on_exec(
                t, _int(f[0]), _int(f[1]), _int(f[2]), _str(f[3]), argv, bool(f[5]),
                _str(f[6]), _int(f[7]), _int(f[8]), _int(f[9]),
            )  # fmt: skip
        if rtype == R.EXIT:
            return self.on_exit(t, _int(f[0]), _opt_int(f[1]), _opt_int(f[2]), bool(f[3]))
        if rtype == R.CONNECT:
            fam = f[3] if isinstance(f[3], str) else str(f[3])
            return self.on_connect(
                t, _int(f[0]), _int(f[1]), _int(f[2]), fam, _str(f[4]), _int(f[5])
            )
        raise RecordError(f"record type {rtype!r} is not a process record")

    def on_fork(self, time_ns: int, parent_pid: int, child_pid: int, child_ticks: int) -> None:
        """A child was forked: it inherits the parent's image until it execs."""
        cur = self.get(child_pid)
        if cur is not None and cur.start_ticks == child_ticks:
            return  # already known (its exec or a /proc observation came first)
        parent = self.get(parent_pid)
        self._add(
            time_ns,
            Proc(
                exec_id=self._eid(child_pid, child_ticks),
                pid=child_pid,
                start_ticks=child_ticks,
                start_time=ticks_to_ns(child_ticks, self.boot_time_ns),
                ppid=parent_pid,
                parent_exec_id=parent.exec_id if parent else None,
                exe=parent.exe if parent else "",
                argv=parent.argv if parent else (),
                truncated=parent.truncated if parent else False,
                cwd=parent.cwd if parent else "",
                uid=parent.uid if parent else -1,
                gid=parent.gid if parent else -1,
                euid=parent.euid if parent else -1,
                container_id=parent.container_id if parent else "",
            ),
        )

    def on_exec(
        self,
        time_ns: int,
        pid: int,
        ppid: int,
        start_ticks: int,
        exe: str,
        argv: Sequence[str],
        truncated: bool,
        cwd: str,
        uid: int,
        gid: int,
        euid: int,
        source: Source = "ptrace",
    ) -> ProcessExec:
        """A process image started: update (or create) the entry, return its event."""
        parent = self.get(ppid)
        cur = self.get(pid)
        if cur is not None and cur.start_ticks == start_ticks:
            if parent is not None:
                cur.parent_exec_id = parent.exec_id
            elif cur.ppid != ppid:
                cur.parent_exec_id = None
            cur.ppid = ppid
            cur.exe, cur.argv, cur.truncated, cur.cwd = exe, tuple(argv), truncated, cwd
            cur.uid, cur.gid, cur.euid = uid, gid, euid
            p = cur
        else:
            p = Proc(
                exec_id=self._eid(pid, start_ticks),
                pid=pid,
                start_ticks=start_ticks,
                start_time=ticks_to_ns(start_ticks, self.boot_time_ns),
                ppid=ppid,
                parent_exec_id=parent.exec_id if parent else None,
                exe=exe,
                argv=tuple(argv),
                truncated=truncated,
                cwd=cwd,
                uid=uid,
                gid=gid,
                euid=euid,
                container_id=self._container(pid) if self._container is not None else "",
            )
            self._add(time_ns, p)
        return ProcessExec(
            time=time_ns,
            exec_id=p.exec_id,
            parent_exec_id=p.parent_exec_id,
            pid=pid,
            ppid=ppid,
            exe=p.exe,
            argv=p.argv,
            truncated=p.truncated,
            cwd=p.cwd,
            uid=uid,
            gid=gid,
            euid=euid,
            start_time=p.start_time,
            ancestors=self._ancestors(p),
            source=source,
        )

    def on_exit(
        self,
        time_ns: int,
        pid: int,
        exit_code: int | None,
        signal: int | None,
        core_dumped: bool,
    ) -> ProcessExit | None:
        """A traced process ended; None (and counted) when the pid has no live entry."""
        p = self.get(pid)
        if p is None:
            self.unknown_exits += 1
            return None
        self._mark_exited(p)
        return ProcessExit(
            time=time_ns,
            exec_id=p.exec_id,
            pid=pid,
            exit_code=exit_code,
            signal=signal,
            core_dumped=core_dumped,
            duration_ns=max(0, time_ns - p.start_time),
            source="ptrace",
        )

    def on_connect(
        self, time_ns: int, pid: int, tid: int, fd: int, family: str, address: str, port: int
    ) -> NetConnect:
        p = self.get(pid)
        return NetConnect(
            time=time_ns,
            exec_id=p.exec_id if p else None,
            pid=pid,
            tid=tid,
            fd=fd,
            family=family,
            address=address,
            port=port,
        )

    # -- /proc ----------------------------------------------------------------------------
    def observe_procfs(self, info: ProcInfo, time_ns: int) -> ProcessExec | None:
        """A process the reconciler found: its ``process.exec`` (source procfs) if new."""
        cur = self.get(info.pid)
        if cur is not None and cur.start_ticks == info.start_ticks:
            return None
        return self.on_exec(
            time_ns, info.pid, info.ppid, info.start_ticks, info.exe, info.argv,
            info.truncated, info.cwd, info.uid, info.gid, info.euid, source="procfs",
        )  # fmt: skip

    def procfs_exit(
        self, pid: int, time_ns: int, start_ticks: int | None = None
    ) -> ProcessExit | None:
        """A live process vanished from /proc with no exit record: end it (code unknown).

        With ``start_ticks`` the exit applies only to that identity of ``pid``.
        """
        p = self.get(pid)
        if p is None or (start_ticks is not None and p.start_ticks != start_ticks):
            return None
        self._mark_exited(p)
        return self._missed_exit(p, time_ns)

    # -- internals ------------------------------------------------------------------------
    def _eid(self, pid: int, start_ticks: int) -> str:
        return exec_id(self.boot_id, self.pidns, pid, start_ticks)

    def _missed_exit(self, p: Proc, time_ns: int) -> ProcessExit:
        return ProcessExit(
            time=time_ns, exec_id=p.exec_id, pid=p.pid, exit_code=None, signal=None,
            core_dumped=False, duration_ns=None, source="procfs",
        )  # fmt: skip

    def _mark_exited(self, p: Proc) -> None:
        if not p.exited:
            p.exited = True
            self._exited[p.exec_id] = None

    def _add(self, time_ns: int, p: Proc) -> None:
        old = self.get(p.pid)
        if old is not None:  # the pid was reused: its previous process ended unseen
            self._mark_exited(old)
            self._missed.append(self._missed_exit(old, time_ns))
        stale = self._entries.pop(p.exec_id, None)  # same identity seen exited (rare)
        if stale is not None:
            self._exited.pop(p.exec_id, None)
        self._entries[p.exec_id] = p
        self._by_pid[p.pid] = p.exec_id
        while len(self._entries) > self.max_entries:
            if self._exited:
                eid, _ = self._exited.popitem(last=False)
                self.evictions += 1
            else:
                eid = next(iter(self._entries))
                self.evicted_live += 1
            gone = self._entries.pop(eid)
            if self._by_pid.get(gone.pid) == eid:
                del self._by_pid[gone.pid]

    def _ancestors(self, p: Proc) -> tuple[Ancestor, ...]:
        out: list[Ancestor] = []
        seen = {p.exec_id}
        eid = p.parent_exec_id
        while eid is not None and len(out) < self.ancestors_max and eid not in seen:
            a = self._entries.get(eid)
            if a is None:
                break
            out.append(Ancestor(exec_id=a.exec_id, pid=a.pid, exe=a.exe))
            seen.add(eid)
            eid = a.parent_exec_id
        return tuple(out)
