"""Package inventory and usage on this machine's real filesystem and kernel: dpkg agrees with
dpkg-query, Python distributions with importlib.metadata; a sleeping process's mapped C
extension, open file and executable make their packages active; the traced `env` of a
workload under `lw-embed run` is reported with evidence `exec`."""

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
from lw_embed.sources.packages.usage import Hit, ProcScanner, Tracker
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
    for name in ("lwprobe_open", "lwprobe_idle"):
        info = site / f"{name}-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        (site / f"{name}.dat").write_text("x")
        (info / "RECORD").write_text(f"{name}.dat,,\n")
    (site / "lwprobe_bare-1.0.egg-info").write_text("Name: lwprobe_bare\nVersion: 1.0\n")
    inv = build("/", {"python:x": run(python.scan("/", str(site)))})
    p = subprocess.Popen(["sleep", "60"], stdin=open(site / "lwprobe_open.dat"))  # noqa: SIM115
    child.append(p)
    got = _wait_hits(inv, p.pid, {("lwprobe_open", "open")})
    assert got == {("lwprobe_open", "open")}
    tr = Tracker()
    ps = ProcScanner("/proc", "/", exclude=(os.getpid(),))
    for h in ps.scan(inv, 1):
        tr.add(inv.packages[h.idx], h, 1)
    tr.observed_since = 1
    states = {p.name: tr.state(p) for p in inv.packages}
    assert states == {"lwprobe_open": "active", "lwprobe_idle": "dormant",
                      "lwprobe_bare": "unmeasurable"}  # fmt: skip
    assert Tracker().state(inv.packages[0]) == "unmeasurable"  # nothing measured yet


def test_usage_pass_cost_is_bounded(machine: Inventory) -> None:
    ps = ProcScanner("/proc", "/", exclude=(os.getpid(),))
    ps.scan(machine, 1)
    reads = ps.reads
    ps.scan(machine, 1)
    assert ps.reads <= reads + 5  # the second pass reads only processes started meanwhile
    hit = Hit(0, "exe", "/x", None, False)
    assert hit.kind == "exe"


def _owner_of_env() -> str | None:
    if not HAVE_DPKG:
        return None
    out = subprocess.run(["dpkg-query", "-S", "/usr/bin/env"], capture_output=True, text=True)
    return out.stdout.split(":")[0] if out.returncode == 0 else None


@pytest.mark.skipif(_owner_of_env() is None, reason="no dpkg owner for /usr/bin/env")
def test_traced_env_marks_its_package_active_with_exec(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "LW_EMBED_PACKAGES_SCAN_RATE": "10000000",
           "LW_EMBED_PACKAGES_SEARCH_DEPTH": "2"}  # fmt: skip
    # env lives about a millisecond; the workload waits so that the first snapshot is out
    proc = subprocess.run(
        [sys.executable, "-m", "lw_embed", "run", "--output", str(out), "--data-dir",
         str(tmp_path / "data"), "--", "sh", "-c", "/usr/bin/env true; sleep 4"],
        capture_output=True, timeout=120, env=env, cwd=ROOT_DIR,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    evs = events_of(batches(out))
    owner = _owner_of_env()
    active = [e for e in of_kind(evs, "package.active") if e["name"] == owner]
    assert any(e["evidence"] == "exec" and e["path"] == "/usr/bin/env" for e in active), active
    snap = of_kind(evs, "package.inventory")
    assert snap and len({e["snapshot_id"] for e in snap}) == 1
    assert sum(len(e["packages"]) for e in snap) == snap[0]["totals"]["packages"]
    rec = [p for e in snap for p in e["packages"] if p["name"] == owner]
    assert rec and rec[0]["state"] == "active" and "exec" in rec[0]["evidence"]


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
