"""The /proc source on fake proc trees: scope, the agent's own processes, grace, reuse."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from lw_embed.kernel.procfs import Stat
from lw_embed.pipeline.enrich import ProcessTable
from lw_embed.sources.procfs import ProcInfo, Reconciler

CORE, WORKER = 10, 11


def mkproc(
    root: Path,
    pid: int,
    ppid: int,
    ticks: int,
    *,
    comm: str = "sleep",
    state: str = "S",
    exe: str | None = "/bin/sleep",
    argv: Sequence[str] = ("sleep", "5"),
    cwd: str | None = "/srv",
    uid: int = 1000,
) -> Path:
    d = root / str(pid)
    d.mkdir(exist_ok=True)
    rest = [state, ppid, pid, pid, 0, -1, 4194560] + [0] * 8 + [20, 0, 1, 0, ticks, 1000, 100]
    (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(str(x) for x in rest) + "\n")
    (d / "status").write_text(
        f"Name:\t{comm}\nTgid:\t{pid}\nPPid:\t{ppid}\nUid:\t{uid}\t{uid + 1}\t{uid}\t{uid}\n"
        f"Gid:\t{uid + 2}\t{uid + 2}\t{uid + 2}\t{uid + 2}\n"
    )
    (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
    for name, target in (("exe", exe), ("cwd", cwd)):
        link = d / name
        if link.is_symlink():
            link.unlink()
        if target is not None:
            os.symlink(target, link)
    return d


def rmproc(root: Path, pid: int) -> None:
    d = root / str(pid)
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


class FakeTable:
    def __init__(self, live: dict[int, int] | None = None) -> None:
        self.known: dict[int, int] = dict(live or {})

    def live_start_ticks(self, pid: int) -> int | None:
        return self.known.get(pid)

    def live(self) -> Iterable[tuple[int, int]]:
        return list(self.known.items())


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    """A tree: init(1) -> core(10) -> {worker(11) -> 14, workload 12 -> 13}; 20 under init."""
    root = tmp_path / "proc"
    root.mkdir()
    (root / "self").mkdir()  # not a pid
    (root / "sys").mkdir()
    mkproc(root, 1, 0, 1, comm="init", exe="/sbin/init", argv=["/sbin/init"])
    mkproc(root, CORE, 1, 100, comm="lw-embed", exe="/usr/bin/python3")
    mkproc(root, WORKER, CORE, 110, comm="python3", exe="/usr/bin/python3")
    mkproc(root, 14, WORKER, 140, comm="helper")
    mkproc(root, 12, CORE, 120, comm="server", exe="/app/server", argv=["/app/server", "-v"])
    mkproc(root, 13, 12, 130, comm="sh", exe="/bin/sh", argv=["sh", "-c", "x y"])
    mkproc(root, 20, 1, 200, comm="other", exe="/bin/other")
    return root


def rec(root: Path, scope: str, table: FakeTable | None = None) -> Reconciler:
    return Reconciler(table or FakeTable(), scope, CORE, WORKER, proc=str(root))


def test_snapshot_tree_scope_excludes_the_agent(proc: Path) -> None:
    infos = rec(proc, "tree").snapshot()
    assert [i.pid for i in infos] == [12, 13]  # parents first
    assert infos[0] == ProcInfo(
        pid=12, ppid=CORE, start_ticks=120, exe="/app/server", argv=("/app/server", "-v"),
        truncated=False, cwd="/srv", uid=1000, gid=1002, euid=1001,
    )  # fmt: skip
    assert infos[1].argv == ("sh", "-c", "x y")


def test_snapshot_namespace_scope(proc: Path) -> None:
    mkproc(proc, 2, 0, 2, comm="kthreadd", exe=None, argv=())
    mkproc(proc, 3, 2, 3, comm="kworker/0:0", exe=None, argv=())
    pids = [i.pid for i in rec(proc, "namespace").snapshot()]
    assert pids == [1, 12, 13, 20]  # no core, worker, worker child, kernel threads


def test_scope_none_reads_nothing(tmp_path: Path) -> None:
    r = rec(tmp_path / "does-not-exist", "none", FakeTable({5: 50}))
    assert r.snapshot() == []
    for _ in range(3):
        out = r.reconcile(0.0)
        assert out.new == [] and out.gone == []
    assert r.scan_errors == 0


def test_bad_scope() -> None:
    with pytest.raises(ValueError):
        Reconciler(FakeTable(), "everything", 1, 2)


def test_processes_vanishing_mid_read_are_skipped(proc: Path) -> None:
    mkproc(proc, 30, 12, 300)
    (proc / "30" / "stat").unlink()  # gone before its stat was read
    mkproc(proc, 31, 12, 310)
    (proc / "31" / "stat").write_text("31 (trunc) S 12 31")  # truncated stat
    mkproc(proc, 32, 12, 320)
    (proc / "32" / "cmdline").unlink()  # gone between stat and cmdline
    mkproc(proc, 33, 12, 330)
    (proc / "33" / "status").write_text("Name:\tx\n")  # truncated status
    mkproc(proc, 34, 12, 340)
    (proc / "34" / "stat").write_text("")  # empty stat
    mkproc(proc, 35, 12, 350, exe=None, cwd=None)  # links unreadable: still reported
    (proc / "36").mkdir()  # an empty directory
    infos = rec(proc, "tree").snapshot()
    assert [i.pid for i in infos] == [12, 13, 35]
    assert (infos[2].exe, infos[2].cwd) == ("", "")


def test_zombies_are_not_new(proc: Path) -> None:
    mkproc(proc, 40, 12, 400, state="Z", exe=None, argv=())
    assert [i.pid for i in rec(proc, "tree").snapshot()] == [12, 13]


def test_identity_changed_during_read(proc: Path) -> None:
    r = rec(proc, "tree")
    stale = Stat(pid=12, comm="server", state="S", ppid=CORE, pgrp=12, start_ticks=119)
    assert r.read_info(stale) is None  # the pid now belongs to another process


def test_new_process_reported_after_grace(proc: Path) -> None:
    table = FakeTable({12: 120, 13: 130})
    r = rec(proc, "tree", table)
    assert r.reconcile(1.0).new == []
    mkproc(proc, 50, 12, 500, exe="/bin/late")
    mkproc(proc, 51, 12, 510, exe="/bin/traced")
    mkproc(proc, 52, 12, 520, exe="/bin/brief")
    first = r.reconcile(2.0)
    assert first.new == [] and first.gone == []  # records may be in flight
    table.known[51] = 510  # the tracer's records for 51 arrived meanwhile
    rmproc(proc, 52)  # 52 ended before the next pass
    second = r.reconcile(3.0)
    assert [i.pid for i in second.new] == [50]
    assert second.new[0].exe == "/bin/late"
    assert r.passes == 3 and r.last_pass == 3.0


def test_vanished_process_gone_after_one_more_interval(proc: Path) -> None:
    table = FakeTable({12: 120, 13: 130, 60: 600, 61: 610})
    r = rec(proc, "tree", table)
    first = r.reconcile(1.0)
    assert first.gone == []  # 60 and 61 are not in /proc: wait one more pass
    del table.known[61]  # its EXIT record came in
    second = r.reconcile(2.0)
    assert second.gone == [(60, 600)]
    assert second.new == []


def test_known_zombie_counts_as_vanished(proc: Path) -> None:
    table = FakeTable({12: 120, 13: 130})
    r = rec(proc, "tree", table)
    mkproc(proc, 13, 12, 130, state="Z", exe=None, argv=())
    assert r.reconcile(1.0).gone == []
    assert r.reconcile(2.0).gone == [(13, 130)]


def test_known_process_outside_scope_is_not_gone(proc: Path) -> None:
    table = FakeTable({12: 120, 13: 130, 20: 200})  # 20 is alive, just not in the tree
    r = rec(proc, "tree", table)
    for t in (1.0, 2.0, 3.0):
        assert r.reconcile(t).gone == []


def test_pid_reuse_is_a_new_process(proc: Path) -> None:
    table = FakeTable({12: 120, 13: 130})
    r = rec(proc, "tree", table)
    r.reconcile(1.0)
    mkproc(proc, 13, 12, 135, exe="/bin/reused")  # 13 exited and its pid was reused
    first = r.reconcile(2.0)
    assert first.new == [] and first.gone == []
    second = r.reconcile(3.0)
    assert second.gone == [(13, 130)]
    assert [(i.pid, i.start_ticks, i.exe) for i in second.new] == [(13, 135, "/bin/reused")]


def test_unlistable_proc_reports_nothing(tmp_path: Path) -> None:
    table = FakeTable({12: 120})
    r = rec(tmp_path / "missing", "namespace", table)
    assert r.snapshot() == []
    for t in (1.0, 2.0, 3.0):
        out = r.reconcile(t)
        assert out.gone == [] and out.new == []
    assert r.scan_errors == 4


def test_with_process_table(proc: Path) -> None:
    table = ProcessTable("boot", 1, 0, 8)
    r = Reconciler(table, "tree", CORE, WORKER, proc=str(proc))
    events = [table.observe_procfs(i, 1) for i in r.snapshot()]
    assert [e.pid for e in events if e] == [12, 13]
    child = events[1]
    parent = table.get(12)
    assert child is not None and parent is not None and child.parent_exec_id == parent.exec_id
    for t in (1.0, 2.0):
        out = r.reconcile(t)
        assert out.new == [] and out.gone == []
    rmproc(proc, 13)
    assert r.reconcile(3.0).gone == []
    (gone,) = r.reconcile(4.0).gone
    ex = table.procfs_exit(gone[0], 5, gone[1])
    assert ex is not None and ex.exec_id == child.exec_id and ex.exit_code is None
    assert r.reconcile(5.0).gone == []


def test_final_pass_has_no_grace(proc: Path) -> None:
    table = FakeTable({12: 120, 13: 130, 60: 600})
    r = rec(proc, "tree", table)
    mkproc(proc, 50, 12, 500, exe="/bin/late")
    out = r.reconcile(1.0, final=True)
    assert [i.pid for i in out.new] == [50]
    assert out.gone == [(60, 600)]
