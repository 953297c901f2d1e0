"""ProcessTable: records -> events, identity by (pid, start_ticks), ancestry, bounds."""

from __future__ import annotations

import pytest

from lw_embed.errors import RecordError
from lw_embed.events import Ancestor, NetConnect, ProcessExec, ProcessExit
from lw_embed.kernel.procfs import exec_id, ticks_to_ns
from lw_embed.pipeline.enrich import ProcessTable
from lw_embed.records import R
from lw_embed.sources.procfs import ProcInfo

BOOT = "8d1f0c6e-0000-4000-8000-000000000001"
NS = 4026531836
BOOT_NS = 1_700_000_000_000_000_000
T = 1_700_000_100_000_000_000


def eid(pid: int, ticks: int) -> str:
    return exec_id(BOOT, NS, pid, ticks)


def table(ancestors_max: int = 8, max_entries: int = 1000) -> ProcessTable:
    return ProcessTable(BOOT, NS, BOOT_NS, ancestors_max, max_entries)


def exec_(t: ProcessTable, pid: int, ppid: int, ticks: int, exe: str, time: int = T) -> ProcessExec:
    return t.on_exec(time, pid, ppid, ticks, exe, [exe, "-x"], False, "/w", 1000, 1000, 1000)


def test_exec_event_fields() -> None:
    t = table()
    ev = exec_(t, 100, 1, 500, "/bin/sh")
    assert ev == ProcessExec(
        time=T, exec_id=eid(100, 500), parent_exec_id=None, pid=100, ppid=1, exe="/bin/sh",
        argv=("/bin/sh", "-x"), truncated=False, cwd="/w", uid=1000, gid=1000, euid=1000,
        start_time=ticks_to_ns(500, BOOT_NS), ancestors=(), source="ptrace",
    )  # fmt: skip
    assert t.live_start_ticks(100) == 500
    rec = t.record(ev.exec_id)
    assert rec == {
        "argv": ["/bin/sh", "-x"], "exe": "/bin/sh", "exec_id": eid(100, 500), "pid": 100,
        "ppid": 1, "start_time": ticks_to_ns(500, BOOT_NS),
    }  # fmt: skip
    assert list(rec) == sorted(rec)


def test_fork_inherits_then_exec_links_parent_and_ancestors() -> None:
    t = table()
    exec_(t, 100, 1, 500, "/bin/sh")
    t.on_fork(T + 1, 100, 101, 510)
    child = t.get(101)
    assert child is not None
    assert (child.exe, child.argv, child.cwd) == ("/bin/sh", ("/bin/sh", "-x"), "/w")
    assert child.uid == 1000
    assert child.parent_exec_id == eid(100, 500)
    # a forked-not-exec'd process has its own identity and a process record
    rec = t.record(eid(101, 510))
    assert rec is not None and rec["parent_exec_id"] == eid(100, 500) and rec["exe"] == "/bin/sh"
    t.on_fork(T + 2, 101, 102, 520)
    ev = exec_(t, 102, 101, 520, "/usr/bin/curl", T + 3)
    assert ev.exec_id == eid(102, 520)
    assert ev.parent_exec_id == eid(101, 510)
    assert ev.ancestors == (
        Ancestor(eid(101, 510), 101, "/bin/sh"),
        Ancestor(eid(100, 500), 100, "/bin/sh"),
    )
    assert ev.start_time == ticks_to_ns(520, BOOT_NS)


def test_ancestors_bounded() -> None:
    t = table(ancestors_max=2)
    exec_(t, 10, 1, 1, "/a")
    for pid in range(11, 16):
        exec_(t, pid, pid - 1, pid, f"/p{pid}")
    ev = exec_(t, 16, 15, 16, "/leaf")
    assert [a.pid for a in ev.ancestors] == [15, 14]
    assert ev.source == "ptrace"
    assert table(ancestors_max=0).on_exec(T, 5, 1, 5, "/x", [], False, "/", 0, 0, 0).ancestors == ()


def test_duplicate_fork_is_ignored() -> None:
    t = table()
    exec_(t, 100, 1, 500, "/bin/sh")
    ev = exec_(t, 101, 100, 510, "/bin/ls")
    t.on_fork(T, 100, 101, 510)  # late FORK after the EXEC: keep the exec'd image
    p = t.get(101)
    assert p is not None and p.exe == "/bin/ls" and p.exec_id == ev.exec_id
    assert t.drain_missed() == []


def test_exit_duration_and_marks_exited() -> None:
    t = table()
    ev = exec_(t, 100, 1, 500, "/bin/sh")
    end = ev.start_time + 2_500_000_000
    ex = t.on_exit(end, 100, 3, None, False)
    assert ex == ProcessExit(
        time=end, exec_id=ev.exec_id, pid=100, exit_code=3, signal=None, core_dumped=False,
        duration_ns=2_500_000_000, source="ptrace",
    )  # fmt: skip
    assert t.get(100) is None and t.live_start_ticks(100) is None
    assert t.record(ev.exec_id) is not None  # kept for the batch and for ancestry
    assert t.on_exit(end, 100, 3, None, False) is None  # a second exit is no event
    assert t.unknown_exits == 1


def test_exit_of_unknown_pid_is_counted() -> None:
    t = table()
    assert t.on_exit(T, 999, 0, None, False) is None
    assert t.unknown_exits == 1


def test_connect_looks_up_exec_id() -> None:
    t = table()
    ev = exec_(t, 100, 1, 500, "/bin/sh")
    c = t.on_connect(T, 100, 103, 5, "inet", "10.0.0.1", 443)
    assert c == NetConnect(T, ev.exec_id, 100, 103, 5, "inet", "10.0.0.1", 443)
    assert t.on_connect(T, 555, 555, 3, "unix", "/s", 0).exec_id is None


def test_pid_reuse_is_a_new_process_and_ends_the_old_one() -> None:
    t = table()
    old = exec_(t, 100, 1, 500, "/bin/old")
    new = exec_(t, 100, 1, 900, "/bin/new")
    assert new.exec_id != old.exec_id and new.exec_id == eid(100, 900)
    (missed,) = t.drain_missed()
    assert missed.exec_id == old.exec_id and missed.exit_code is None
    assert missed.source == "procfs"
    assert t.drain_missed() == []
    assert t.live() == [(100, 900)]
    # an exit now ends the new process, never the old one
    ex = t.on_exit(T + 5, 100, 0, None, False)
    assert ex is not None and ex.exec_id == new.exec_id


def test_parent_exec_id_after_parent_pid_reuse() -> None:
    t = table()
    exec_(t, 100, 1, 500, "/bin/parent")
    t.on_exit(T, 100, 0, None, False)
    exec_(t, 100, 1, 800, "/bin/other")  # pid 100 reused
    ev = exec_(t, 101, 100, 810, "/bin/child")
    assert ev.parent_exec_id == eid(100, 800)


def test_exec_from_forked_child_of_unknown_parent() -> None:
    t = table()
    t.on_fork(T, 42, 43, 7)
    p = t.get(43)
    assert p is not None and p.exe == "" and p.parent_exec_id is None and p.uid == -1
    ev = exec_(t, 43, 42, 7, "/bin/true")
    assert ev.exec_id == eid(43, 7) and ev.parent_exec_id is None and ev.ancestors == ()


def info(pid: int, ppid: int, ticks: int, exe: str = "/bin/sleep") -> ProcInfo:
    return ProcInfo(pid, ppid, ticks, exe, (exe, "5"), False, "/", 0, 0, 0)


def test_observe_procfs() -> None:
    t = table()
    ev = t.observe_procfs(info(200, 1, 50), T)
    assert ev is not None and ev.source == "procfs" and ev.exec_id == eid(200, 50)
    assert ev.argv == ("/bin/sleep", "5")
    assert t.observe_procfs(info(200, 1, 50), T) is None  # known: nothing new
    child = t.observe_procfs(info(201, 200, 60, "/bin/ls"), T)
    assert child is not None and child.parent_exec_id == ev.exec_id
    assert child.ancestors == (Ancestor(ev.exec_id, 200, "/bin/sleep"),)
    # a traced exec of a process first seen in /proc keeps its identity
    again = exec_(t, 200, 1, 50, "/bin/sh")
    assert again.exec_id == ev.exec_id and again.source == "ptrace"


def test_procfs_exit() -> None:
    t = table()
    ev = t.observe_procfs(info(200, 1, 50), T)
    assert ev is not None
    assert t.procfs_exit(200, T + 1, start_ticks=99) is None  # another identity
    ex = t.procfs_exit(200, T + 1)
    assert ex is not None
    assert (ex.exec_id, ex.exit_code, ex.signal, ex.source) == (ev.exec_id, None, None, "procfs")
    assert t.procfs_exit(200, T + 2) is None
    assert t.procfs_exit(404, T + 2) is None


def test_bound_evicts_exited_first() -> None:
    t = table(max_entries=3)
    exec_(t, 1, 0, 1, "/init")
    exec_(t, 2, 1, 2, "/a")
    exec_(t, 3, 1, 3, "/b")
    t.on_exit(T, 2, 0, None, False)
    exec_(t, 4, 1, 4, "/c")
    assert len(t) == 3 and t.evictions == 1 and t.evicted_live == 0
    assert t.record(eid(2, 2)) is None
    assert {p for p, _ in t.live()} == {1, 3, 4}
    exec_(t, 5, 1, 5, "/d")  # nothing exited left: the oldest live entry goes, counted
    assert t.evicted_live == 1 and t.get(1) is None and len(t) == 3
    assert t.live_count == 3


def test_apply_records() -> None:
    t = table()
    assert t.apply([R.FORK, T, 1, 100, 500]) is None
    ev = t.apply([R.EXEC, T, 100, 1, 500, "/bin/sh", ["sh"], True, "/", 0, 0, 0, 100])
    assert isinstance(ev, ProcessExec) and ev.truncated and ev.exec_id == eid(100, 500)
    c = t.apply([R.CONNECT, T, 100, 100, 3, "inet6", "::1", 80])
    assert isinstance(c, NetConnect) and c.exec_id == ev.exec_id
    ex = t.apply([R.EXIT, T, 100, None, 9, True])
    assert isinstance(ex, ProcessExit) and ex.signal == 9 and ex.core_dumped
    with pytest.raises(RecordError):
        t.apply([R.EXEC, T, "100", 1, 500, "/bin/sh", ["sh"], False, "/", 0, 0, 0, 100])
    with pytest.raises(RecordError):
        t.apply([R.EXEC, T, 100, 1, 500, "/bin/sh", "sh", False, "/", 0, 0, 0, 100])
    with pytest.raises(RecordError):
        t.apply([R.FORK, T, True, 1, 2])
    with pytest.raises(RecordError):
        t.apply([R.CAPS, T, {}])
