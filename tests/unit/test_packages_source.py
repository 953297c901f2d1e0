"""PackagesSource through the worker seam with a fake SourceContext: a Debian-like root
built in tmp and a fake /proc tree. Default config (only the root set): backlogged exec
evidence joined as soon as the OS index exists, the first snapshot after a usage pass
(nothing dormant after one instantaneous pass), runtime package.change at the
check_interval (not before), a periodic snapshot, scope tree vs namespace, unreadable
processes, sliced work, in-app import evidence, and close() within its budget."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from lw_embed.config import Config, load_config
from lw_embed.events import Event, PackageActive, PackageChange, PackageInventory
from lw_embed.pipeline.enrich import ProcessTable
from lw_embed.records import R
from lw_embed.sources.base import SourceContext
from lw_embed.sources.packages import PackagesSource, close_budget, python
from lw_embed.sources.packages.inventory import Inventory, Scanner
from lw_embed.sources.packages.model import Steps
from tests.unit.test_packages import FIX, _fake_proc

T0 = 1_700_000_000_000_000_000


class Clock:
    """A monotonic clock that moves only when told to, or by ``step`` at every read."""

    def __init__(self, step: float = 0.0) -> None:
        self.t = 1000.0
        self.step = step

    def mono(self) -> float:
        self.t += self.step
        return self.t

    def wall(self) -> int:
        return T0 + int(self.t * 1e9)


def root_with_idle(tmp: Path) -> Path:
    root = tmp / "root"
    shutil.copytree(FIX / "debian", root)
    with open(root / "var/lib/dpkg/status", "a") as f:
        f.write("\nPackage: idle\nStatus: install ok installed\nArchitecture: amd64\n"
                "Version: 1\n")  # fmt: skip
    (root / "var/lib/dpkg/info/idle.list").write_text("/usr/bin/idle\n")
    return root


Made = tuple[PackagesSource, Clock, ProcessTable]


def make_source(tmp: Path, root: Path, proc: Path, scope: str = "namespace",
                mode: str = "wrapper", clock: Clock | None = None,
                scanner: Scanner | None = None) -> Made:  # fmt: skip
    cfg: Config = load_config(None, {"LW_EMBED_PACKAGES_ROOT": str(root)})
    table = ProcessTable("boot", 1, 0, 8)
    clock = clock or Clock()
    ctx = SourceContext(cfg, mode, scope, table, str(proc), str(tmp / "data"), 1,
                        clock.wall, clock.mono)  # fmt: skip
    return PackagesSource(cfg.packages, ctx, scanner), clock, table


def drive(src: PackagesSource, clock: Clock, until: str, max_polls: int = 500) -> list[Event]:
    """Poll at each due time until an event of kind ``until`` came out (``""``: just poll
    ``max_polls`` times)."""
    out: list[Event] = []
    for _ in range(max_polls):
        due = src.next_due()
        assert due is not None
        clock.t = max(clock.t, due)
        evs = list(src.poll(clock.t))
        out += evs
        if any(e.kind == until for e in evs):
            return out
    if not until:
        return out
    raise AssertionError(f"no {until} after {max_polls} polls: {[e.kind for e in out]}")


def exec_rec(pid: int, exe: str, argv: list[str], cwd: str = "/") -> list[Any]:
    return [R.EXEC, T0, pid, 1, 4242, exe, argv, False, cwd, 0, 0, 0, pid]


def snapshot(evs: Iterable[Event]) -> dict[str, dict[str, Any]]:
    parts = [e for e in evs if isinstance(e, PackageInventory)]
    assert parts and len({e.snapshot_id for e in parts}) == 1
    return {str(p["name"]): dict(p) for e in parts for p in e.packages}


def test_backlog_first_snapshot_change_and_periodic_snapshot(tmp_path: Path) -> None:
    root = root_with_idle(tmp_path)
    (root / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (root / "usr/lib/x86_64-linux-gnu/libfoo.so.1").write_bytes(b"\x7fELF")
    maps = "7f00-7f10 r-xp 00000000 00:01 5 /usr/lib/x86_64-linux-gnu/libfoo.so.1\n"
    proc = _fake_proc(tmp_path, root, 77, "/bin/bash", maps, [])
    src, clock, _ = make_source(tmp_path, root, proc)
    # a short-lived md5only ran before any scan: kept, joined once the OS index exists
    assert list(src.observe(exec_rec(90, "/usr/bin/md5only", ["md5only"]))) == []
    evs = drive(src, clock, "package.inventory")
    kinds = [e.kind for e in evs]
    active = {e.name: e for e in evs if isinstance(e, PackageActive)}
    assert active["md5only"].evidence == "exec" and active["md5only"].arch == "all"
    assert active["md5only"].location == str(root / "var/lib/dpkg/status")
    assert kinds.index("package.active") < kinds.index("package.inventory")
    assert {active["bash"].evidence, active["libfoo1"].evidence} == {"exe", "mmap"}
    snap = snapshot(evs)
    assert snap["bash"]["state"] == "active" and snap["md5only"]["evidence"] == ["exec"]
    # one instantaneous pass: nothing is dormant yet
    assert snap["idle"]["state"] == "unmeasurable"
    assert "1 of 2 usage passes" in snap["idle"]["reason"]
    first = next(e for e in evs if isinstance(e, PackageInventory))
    assert first.totals["usage_passes"] == 1 and first.totals["observed_since"] > 0
    assert first.totals["complete"] == 1
    # a runtime upgrade: seen at the check, not before
    status = root / "var/lib/dpkg/status"
    status.write_text(status.read_text().replace("Version: 5.2.15-2+b8", "Version: 5.2.21-2"))
    os.utime(status, ns=(1, 10**18))
    check_at = src._check_at
    clock.t = check_at - 1
    assert not [e for e in src.poll(clock.t) if e.kind == "package.change"]
    evs = drive(src, clock, "package.change")
    ch = [e for e in evs if isinstance(e, PackageChange)]
    assert [(c.action, c.name, c.old_version, c.new_version, c.arch) for c in ch] == [
        ("upgraded", "bash", "5.2.15-2+b8", "5.2.21-2", "amd64")]
    assert ch[0].location == str(status)
    # the periodic snapshot: a new id, and now idle has been observed over passes
    drive(src, clock, "", max_polls=4)  # a second usage pass
    clock.t += 43200
    evs = drive(src, clock, "package.inventory")
    snap2 = snapshot(evs)
    assert snap2["idle"]["state"] == "dormant" and snap2["bash"]["version"] == "5.2.21-2"
    ids = {e.snapshot_id for e in evs if isinstance(e, PackageInventory)}
    assert first.snapshot_id not in ids
    assert src.metrics()["packages.snapshots"] == 2


def test_scope_tree_joins_only_known_processes(tmp_path: Path) -> None:
    root = root_with_idle(tmp_path)
    _fake_proc(tmp_path, root, 77, "/usr/bin/idle", "", [])
    proc = _fake_proc(tmp_path, root, 78, "/bin/bash", "", [])  # the harness: not ours
    src, clock, table = make_source(tmp_path, root, proc, scope="tree")
    table.on_exec(T0, 77, 1, 4242, "/usr/bin/idle", ["idle"], False, "/", 0, 0, 0)
    evs = drive(src, clock, "package.inventory")
    assert {e.name for e in evs if isinstance(e, PackageActive)} == {"idle"}
    src2, clock2, _ = make_source(tmp_path, root, proc, scope="namespace")
    evs = drive(src2, clock2, "package.inventory")
    assert {e.name for e in evs if isinstance(e, PackageActive)} == {"idle", "bash"}
    src3, clock3, _ = make_source(tmp_path, root, proc, scope="none")
    snap = snapshot(drive(src3, clock3, "package.inventory"))
    assert {p["state"] for p in snap.values()} == {"unmeasurable"}


def test_unreadable_process_makes_nothing_dormant(tmp_path: Path) -> None:
    root = root_with_idle(tmp_path)
    proc = _fake_proc(tmp_path, root, 77, "/bin/bash", "", [])
    bad = _fake_proc(tmp_path, root, 79, "/bin/bash", "", []) / "79"
    (bad / "maps").unlink()
    (bad / "maps").mkdir()  # opening it fails, and not as "gone"
    src, clock, _ = make_source(tmp_path, root, proc)
    drive(src, clock, "package.inventory")
    drive(src, clock, "", max_polls=4)
    clock.t += 43200
    snap = snapshot(drive(src, clock, "package.inventory"))
    assert snap["idle"]["state"] == "unmeasurable"
    assert "could not be read" in snap["idle"]["reason"]
    assert src.metrics()["packages.proc_unreadable"] >= 2


def test_work_is_sliced(tmp_path: Path) -> None:
    root = root_with_idle(tmp_path)
    proc = tmp_path / "proc"
    for pid in range(100, 140):
        _fake_proc(tmp_path, root, pid, "/bin/bash", "", [])
    clock = Clock(step=0.004)  # every clock read costs 4 ms: a slice ends after a few steps
    src, clock, _ = make_source(tmp_path, root, proc, clock=clock)
    partial = polls = 0
    for _ in range(1000):
        due = src.next_due()
        assert due is not None
        clock.t = max(clock.t, due)
        evs = list(src.poll(clock.t))
        polls += 1
        if src._pass is not None and 0 < src.procs.reads < 40:
            partial += 1  # a poll returned with the pass half done
        if any(e.kind == "package.inventory" for e in evs):
            break
    assert src.snapshots == 1 and partial >= 2 and polls > 5
    assert src.procs.reads == 40


class SiteScanner(Scanner):
    """Only one site directory, under the real root "/"."""

    def __init__(self, site: str) -> None:
        super().__init__("/")
        self.site = site

    def full(self) -> Steps[Inventory]:
        inv = Inventory("/")
        res = yield from python.scan("/", self.site)
        yield from inv.add(res)
        yield from inv.index()
        inv.complete = True
        self.interim = self.inventory = inv
        return inv

    def changed(self) -> list[str]:
        return []


def test_inapp_import_evidence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site-packages"
    for name in ("lwprobe_imp", "lwprobe_unused"):
        info = site / f"{name}-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Name: {name}\nVersion: 1.0\n")
        (info / "RECORD").write_text(f"{name}.py,,\n")
        (site / f"{name}.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(site))
    __import__("lwprobe_imp")
    try:
        src, clock, _ = make_source(tmp_path, Path("/"), Path("/proc"), scope="tree",
                                    mode="in-app", scanner=SiteScanner(str(site)))  # fmt: skip
        evs = drive(src, clock, "package.inventory")
        act = [e for e in evs if isinstance(e, PackageActive)]
        assert [(e.name, e.evidence, e.pid) for e in act] == [
            ("lwprobe_imp", "import", os.getpid())]
        drive(src, clock, "", max_polls=4)
        clock.t += 43200
        snap = snapshot(drive(src, clock, "package.inventory"))
        # in-app, pure Python is measured by imports: never imported is dormant
        assert snap["lwprobe_unused"]["state"] == "dormant"
        assert snap["lwprobe_imp"]["evidence"] == ["import"]
    finally:
        sys.modules.pop("lwprobe_imp", None)


def test_close_sends_what_it_has_within_budget(tmp_path: Path) -> None:
    root = root_with_idle(tmp_path)
    proc = _fake_proc(tmp_path, root, 77, "/bin/bash", "", [])
    # a slow root: every step costs 100 ms, the budget ends before the OS index exists
    src, clock, _ = make_source(tmp_path, root, proc, clock=Clock(step=0.1))
    src.observe(exec_rec(90, "/usr/bin/md5only", ["md5only"]))
    start = clock.t
    assert list(src.close()) == []
    assert clock.t - start <= close_budget(src.ctx.config.shutdown.flush) + 0.2
    # a fast one: the OS part is read, the backlog joined, a snapshot of what there is
    src, clock, _ = make_source(tmp_path, root, proc, clock=Clock(step=0.002))
    src.observe(exec_rec(90, "/usr/bin/md5only", ["md5only"]))
    start = clock.t
    evs = list(src.close())
    assert clock.t - start <= close_budget(src.ctx.config.shutdown.flush) + 0.2
    assert [e.name for e in evs if isinstance(e, PackageActive)] == ["md5only"]
    snap = snapshot(evs)
    assert snap["md5only"]["state"] == "active" and snap["idle"]["state"] == "unmeasurable"
