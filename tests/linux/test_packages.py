"""Package inventory and usage on this machine's real filesystem and kernel: dpkg agrees with
dpkg-query, Python distributions with importlib.metadata; a sleeping process's mapped C
extension, open file and executable make their packages active; the traced `env` of a
workload under `lw-embed run` is reported with evidence `exec`, and so is a script run by
its interpreter; as an unprivileged user nothing is called dormant; the real source's polls
stay short."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lw_embed.sources.packages import python
from lw_embed.sources.packages.inventory import Inventory, Scanner, build
from lw_embed.sources.packages.model import run
from lw_embed.sources.packages.usage import ProcScanner, Tracker
from tests.linux.test_worker import batches, events_of, of_kind

pytestmark = pytest.mark.linux
ROOT_DIR = Path(__file__).resolve().parents[2]
HAVE_DPKG = shutil.which("dpkg-query") is not None


@pytest.fixture(scope="module")
def machine() -> Inventory:
    return run(Scanner("/").full())


def _wait_hits(inv: Inventory, pid: int, want: set[tuple[str, str]],
               timeout: float = 30) -> set[tuple[str, str]]:  # fmt: skip
    """Poll /proc until the process ``pid`` shows every (package, evidence) of ``want``."""
    got: set[tuple[str, str]] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ps = ProcScanner("/proc", inv.root, exclude=(os.getpid(),))
        got = {(inv.packages[h.idx].name, h.kind) for h in ps.scan(inv, 1) if h.pid == pid}
        if want <= got:
            break
        time.sleep(0.1)
    return got


@pytest.fixture
def child() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait(10)


@pytest.mark.skipif(not HAVE_DPKG, reason="no dpkg on this machine")
def test_dpkg_matches_dpkg_query(machine: Inventory) -> None:
    fmt = "${Package}\t${Version}\t${db:Status-Status}\n"
    out = subprocess.run(["dpkg-query", "-W", "-f", fmt], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    on_disk = {"installed", "unpacked", "half-configured", "half-installed", "triggers-awaited",
               "triggers-pending"}  # fmt: skip
    want = {tuple(line.split("\t")[:2]) for line in out.splitlines()
            if line.split("\t")[2] in on_disk}  # fmt: skip
    got = {(p.name, p.version) for p in machine.packages if p.source == "dpkg"}
    assert got == want
    assert len([p for p in machine.packages if p.source == "dpkg"]) == len(want)


def test_psutil_version_matches_importlib(machine: Inventory) -> None:
    psutil_dir = os.path.dirname(os.path.dirname(importlib.import_module("psutil").__file__ or ""))
    found = [p for p in machine.packages if p.ecosystem == "pypi" and p.name == "psutil"
             and p.location == psutil_dir]  # fmt: skip
    assert [p.version for p in found] == [importlib.metadata.version("psutil")]


def test_mapped_extension_is_active_with_mmap(machine: Inventory,
                                              child: list[subprocess.Popen[bytes]]) -> None:
    code = "import psutil, sys, time; print('up', flush=True); time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    child.append(p)
    assert p.stdout is not None and p.stdout.readline() == b"up\n"
    got = _wait_hits(machine, p.pid, {("psutil", "mmap")})
    assert ("psutil", "mmap") in got


@pytest.mark.skipif(not HAVE_DPKG, reason="no dpkg on this machine")
def test_bash_is_active_while_a_bash_workload_runs(machine: Inventory,
                                                   child: list[subprocess.Popen[bytes]]) -> None:
    p = subprocess.Popen(["bash", "--norc", "-c", "sleep 60; exit 3"])
    child.append(p)
    got = _wait_hits(machine, p.pid, {("bash", "exe"), ("bash", "mmap")})
    assert {("bash", "exe"), ("bash", "mmap")} <= got
    assert "libc6" in {n for n, _ in got}


def test_open_dormant_and_unmeasurable(tmp_path: Path,
                                       child: list[subprocess.Popen[bytes]]) -> None:
    site = tmp_path / "site-packages"
    for name in ("lwprobe_open", "lwprobe_idle", "lwprobe_pure"):
        info = site / f"{name}-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        ext = "py" if name == "lwprobe_pure" else "so"
        (site / f"{name}.{ext}").write_text("x")
        (info / "RECORD").write_text(f"{name}.{ext},,\n")
    (site / "lwprobe_bare-1.0.egg-info").write_text("Name: lwprobe_bare\nVersion: 1.0\n")
    inv = run(build("/", {"python:x": run(python.scan("/", str(site)))}))
    p = subprocess.Popen(["sleep", "60"], stdin=open(site / "lwprobe_open.so"))  # noqa: SIM115
    child.append(p)
    got = _wait_hits(inv, p.pid, {("lwprobe_open", "open")})
    assert got == {("lwprobe_open", "open")}
    tr = Tracker()
    ps = ProcScanner("/proc", "/", select=lambda stats: [p.pid])  # the scope: that child
    for h in ps.scan(inv, 1):
        tr.add(inv.packages[h.idx], h, 1)
    tr.note_pass(1, ps.last, len(ps.never_read))
    states = {p.name: tr.state(p, inv.reasons[i])[0] for i, p in enumerate(inv.packages)}
    assert states == {"lwprobe_open": "active", "lwprobe_idle": "dormant",
                      "lwprobe_pure": "unmeasurable", "lwprobe_bare": "unmeasurable"}
    assert Tracker().state(inv.packages[0])[0] == "unmeasurable"  # nothing measured yet


def test_usage_pass_cost_is_bounded(machine: Inventory) -> None:
    ps = ProcScanner("/proc", "/", exclude=(os.getpid(),))
    ps.scan(machine, 1)
    reads = ps.reads
    ps.scan(machine, 1)
    assert ps.reads <= reads + 5  # the second pass reads only processes started meanwhile


def test_cli_as_nobody_calls_nothing_dormant(child: list[subprocess.Popen[bytes]]) -> None:
    """Another uid's maps cannot be read: unreadable processes, never dormant packages."""
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv")
    p = subprocess.Popen(["sleep", "60"])  # a root process the CLI cannot read
    child.append(p)
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
           "-m", "lw_embed", "inventory", "--json"]  # fmt: skip
    env = {**os.environ, "LW_EMBED_PACKAGES_SEARCH_DEPTH": "2"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT_DIR,
                         env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["observation"]["unreadable"] >= 1
    assert rep["totals"]["dormant"] == 0
    assert rep["totals"]["packages"] > 0
    assert "could not be read" in rep["observation"]["why_not_dormant"]
    if (os.stat("/root").st_mode & 0o005) == 0:  # a directory nobody may not list
        assert any(e.startswith("discover: /root:") for e in rep["errors"]), rep["errors"]


def test_source_polls_stay_short_on_this_machine() -> None:
    """The real root and /proc with the default config: the first scan, its usage pass and
    the snapshot are sliced over many polls; no poll is near a blocking one (bound: a few
    slices, generous for a loaded 2-core machine)."""
    from lw_embed.config import load_config
    from lw_embed.pipeline.enrich import ProcessTable
    from lw_embed.sources.base import SourceContext
    from lw_embed.sources.packages import SLICE, PackagesSource

    cfg = load_config(None, {})
    ctx = SourceContext(cfg, "wrapper", "namespace", ProcessTable("b", 1, 0, 8), "/proc",
                        "/tmp", 1, time.time_ns, time.monotonic)  # fmt: skip
    src = PackagesSource(cfg.packages, ctx)
    polls = 0
    deadline = time.monotonic() + 120
    while src.snapshots == 0 and time.monotonic() < deadline:
        due = src.next_due()
        assert due is not None
        time.sleep(max(0.0, due - time.monotonic()))
        list(src.poll(time.monotonic()))
        polls += 1
    assert src.snapshots == 1
    assert polls > 10  # sliced, not one blocking pass
    assert src.max_poll < 10 * SLICE, src.metrics()


def _owner_of_env() -> str | None:
    if not HAVE_DPKG:
        return None
    out = subprocess.run(["dpkg-query", "-S", "/usr/bin/env"], capture_output=True, text=True)
    return out.stdout.split(":")[0] if out.returncode == 0 else None


@pytest.mark.skipif(_owner_of_env() is None, reason="no dpkg owner for /usr/bin/env")
def test_short_workload_gets_exec_evidence_with_default_config(tmp_path: Path) -> None:
    """The reviewer's workload: a one-second run, default config. `env` lives about a
    millisecond; `adduser` is a perl script (the tracer sees /usr/bin/perl execute it)."""
    out = tmp_path / "out"
    script = "/usr/bin/env true; sleep 1"
    have_adduser = os.path.exists("/usr/sbin/adduser")
    if have_adduser:
        script = "/usr/bin/env true; /usr/sbin/adduser --version >/dev/null 2>&1; sleep 1"
    proc = subprocess.run(
        [sys.executable, "-m", "lw_embed", "run", "--output", str(out), "--data-dir",
         str(tmp_path / "data"), "--", "sh", "-c", script],
        capture_output=True, timeout=120, cwd=ROOT_DIR,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    evs = events_of(batches(out))
    owner = _owner_of_env()
    active = [e for e in of_kind(evs, "package.active") if e["name"] == owner]
    assert any(e["evidence"] == "exec" and e["path"] == "/usr/bin/env" for e in active), active
    assert all(e.get("arch") and e.get("location") for e in of_kind(evs, "package.active"))
    if have_adduser:
        script_owner = subprocess.run(["dpkg-query", "-S", "/usr/sbin/adduser"],
                                      capture_output=True, text=True).stdout.split(":")[0]
        assert any(e["name"] == script_owner and e["path"] == "/usr/sbin/adduser"
                   for e in of_kind(evs, "package.active"))  # fmt: skip
    snap = of_kind(evs, "package.inventory")
    assert snap and len({e["snapshot_id"] for e in snap}) == 1
    assert sum(len(e["packages"]) for e in snap) == snap[0]["totals"]["packages"]
    rec = [p for e in snap for p in e["packages"] if p["name"] == owner]
    assert rec and rec[0]["state"] == "active" and "exec" in rec[0]["evidence"]
    # a second or two of observation: nothing may be called dormant yet
    assert snap[0]["totals"]["dormant"] == 0


def test_cli_inventory_json_and_table(tmp_path: Path) -> None:
    fix = ROOT_DIR / "tests/fixtures/packages/debian"
    cmd = [sys.executable, "-m", "lw_embed", "inventory", "--root", str(fix)]
    rep: dict[str, Any] = json.loads(subprocess.run([*cmd, "--json"], capture_output=True,
                                                    text=True, check=True, cwd=ROOT_DIR).stdout)
    assert {p["name"] for p in rep["packages"]} == {"bash", "libfoo1", "python3-yaml", "nolist",
                                                    "md5only", "requests"}  # fmt: skip
    assert rep["totals"]["packages"] == 6
    table = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT_DIR).stdout
    assert table.splitlines()[0].split()[:3] == ["STATE", "ECOSYSTEM", "NAME"]
    assert "6 packages in" in table
    bad = subprocess.run([*cmd[:-1], str(tmp_path / "missing")], capture_output=True,
                         text=True, cwd=ROOT_DIR)  # fmt: skip
    assert bad.returncode == 2 and "not a directory" in bad.stderr
    cfg_err = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT_DIR,
                             env={**os.environ, "LW_EMBED_PACKAGES_NPM_DEPTH": "0"})  # fmt: skip
    assert cfg_err.returncode == 2 and "packages.npm_depth" in cfg_err.stderr
