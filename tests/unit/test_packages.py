"""Package inventory on fixture roots (Debian-like, distroless, Alpine, a Python venv with
node_modules): exact package lists and versions, owner index, OS-owned language packages
not repeated, incremental rechecks, change diffs; the usage join on a fake /proc tree."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from lw_embed.config import PackagesConfig, load_config
from lw_embed.errors import ConfigError
from lw_embed.events import PackageActive, PackageChange, PackageInventory
from lw_embed.sources.packages import manager_of, snapshot_events
from lw_embed.sources.packages.inventory import NOT_RUN, Scanner, diff
from lw_embed.sources.packages.model import run
from lw_embed.sources.packages.usage import PassStats, ProcScanner, Tracker, parse_maps

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "packages"


def observed(passes: int = 1, measured: int = 1, unreadable: int = 0) -> Tracker:
    """A tracker that completed ``passes`` usage passes."""
    tr = Tracker()
    for i in range(passes):
        tr.note_pass(i + 1, PassStats(measured, measured, 0), unreadable)
    return tr


def state_of(tr: Tracker, inv: Any, name: str) -> str:
    i = next(i for i, p in enumerate(inv.packages) if p.name == name)
    return tr.state(inv.packages[i], inv.reasons[i])[0]


def inventory(root: Path | str) -> Any:
    return run(Scanner(str(root)).full())


def listing(inv: Any) -> set[tuple[str, str, str, str, str]]:
    return {(p.ecosystem, p.name, p.version, p.arch, p.source) for p in inv.packages}


def test_debian_root() -> None:
    inv = inventory(FIX / "debian")
    assert listing(inv) == {
        ("deb", "bash", "5.2.15-2+b8", "amd64", "dpkg"),
        ("deb", "libfoo1", "1:1.2-3", "amd64", "dpkg"),
        ("deb", "python3-yaml", "6.0-3+b2", "amd64", "dpkg"),
        ("deb", "nolist", "2.0", "all", "dpkg"),
        ("deb", "md5only", "0.9~rc1", "all", "dpkg"),
        ("pypi", "requests", "2.31.0", "", "python-dist-info"),
    }  # "gone" is config-files only; PyYAML belongs to python3-yaml
    assert inv.os_owned == 1
    by = {p.name: p for p in inv.packages}
    assert by["nolist"].files is None
    assert by["md5only"].files == ("/usr/bin/md5only",)
    assert inv.packages[inv.owner["/usr/lib/x86_64-linux-gnu/libfoo.so.1"]].name == "libfoo1"
    assert inv.packages[inv.owner["/bin/bash"]].name == "bash"
    assert "/bin" not in inv.owner and "/usr" not in inv.owner  # directories: no evidence
    assert "/" not in inv.owner and "/." not in inv.owner
    site = "/usr/local/lib/python3.11/dist-packages"
    assert by["requests"].files == (f"{site}/requests/__init__.py", f"{site}/requests/api.py",
                                    "/usr/local/bin/requests-cli",
                                    f"{site}/requests-2.31.0.dist-info/RECORD")  # fmt: skip
    assert inv.packages[inv.owner["/usr/lib/python3/dist-packages/yaml/__init__.py"]].name == (
        "python3-yaml")


def test_distroless_root() -> None:
    inv = inventory(FIX / "distroless")
    assert listing(inv) == {
        ("deb", "base-files", "12.4+deb12u5", "amd64", "dpkg-status.d"),
        ("deb", "libssl3", "3.0.11-1~deb12u2", "amd64", "dpkg-status.d"),
        ("deb", "tzdata", "2024a-0+deb12u1", "all", "dpkg-status.d"),
    }
    by = {p.name: p for p in inv.packages}
    assert by["libssl3"].files == ("/usr/lib/x86_64-linux-gnu/libssl.so.3",)
    assert by["tzdata"].files is None
    assert state_of(observed(), inv, "tzdata") == "unmeasurable"
    assert state_of(observed(), inv, "libssl3") == "dormant"
    assert state_of(Tracker(), inv, "libssl3") == "unmeasurable"  # nothing observed yet


def test_alpine_root() -> None:
    inv = inventory(FIX / "alpine")
    assert listing(inv) == {("apk", "musl", "1.2.4-r2", "x86_64", "apk"),
                            ("apk", "busybox", "1.36.1-r15", "x86_64", "apk")}  # fmt: skip
    by = {p.name: p for p in inv.packages}
    assert set(by["musl"].files or ()) == {"/lib", "/lib/ld-musl-x86_64.so.1",
                                           "/lib/libc.musl-x86_64.so.1"}  # fmt: skip
    assert set(by["busybox"].files or ()) == {"/bin", "/bin/busybox", "/etc", "/etc/securetty",
                                              "/", "/.profile"}  # fmt: skip
    assert inv.packages[inv.owner["/bin/busybox"]].name == "busybox"


def test_python_venv_and_node_modules() -> None:
    inv = inventory(FIX / "venv")
    assert listing(inv) == {
        ("pypi", "six", "1.16.0", "", "python-dist-info"),
        ("pypi", "native-ext", "0.3", "", "python-dist-info"),
        ("pypi", "legacy", "2.0", "", "python-egg-info"),
        ("pypi", "bare", "1.0", "", "python-egg-info"),
        ("npm", "left-pad", "1.3.0", "", "npm"),
        ("npm", "tiny", "0.0.1", "", "npm"),
        ("npm", "@scope/pkg", "2.0.0", "", "npm"),
    }
    site = "/opt/venv/lib/python3.11/site-packages"
    by = {p.name: p for p in inv.packages}
    assert by["native-ext"].files == (f"{site}/native_ext/_core.cpython-311-x86_64-linux-gnu.so",
                                      f"{site}/native_ext/we,ird.py")  # fmt: skip
    assert by["legacy"].files == (f"{site}/legacy/__init__.py",
                                  f"{site}/legacy-2.0-py3.11.egg-info/PKG-INFO")  # fmt: skip
    assert by["bare"].files is None
    assert any("broken-0.dist-info" in e and "no Name" in e for e in inv.errors)
    assert any("bad/package.json" in e for e in inv.errors)
    # npm: a file inside a package directory belongs to it, nested packages to themselves
    tiny = inv.owner_of("/app/node_modules/left-pad/node_modules/tiny/build/x.node")
    assert tiny is not None and inv.packages[tiny].name == "tiny"
    assert state_of(observed(), inv, "left-pad") == "unmeasurable"


def test_npm_depth_is_bounded() -> None:
    inv = run(Scanner(str(FIX / "venv"), npm_depth=1).full())
    assert "tiny" not in {p.name for p in inv.packages}


def test_incremental_recheck_and_changes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(FIX / "debian", root)
    sc = Scanner(str(root))
    first = run(sc.full())
    assert sc.changed() == []
    status = root / "var/lib/dpkg/status"
    text = status.read_text().replace("Version: 5.2.15-2+b8", "Version: 5.2.21-2")
    text = text.replace("Package: nolist\n", "Package: newpkg\n")
    status.write_text(text)
    site = root / "usr/local/lib/python3.11/dist-packages"
    shutil.rmtree(site / "requests-2.31.0.dist-info")
    os.utime(status, ns=(1, 10**18))
    os.utime(site, ns=(1, 10**18))
    keys = sc.changed()
    assert keys == ["dpkg", f"python:{site}"]
    second = run(sc.recheck(keys))
    assert second is not None and sc.changed() == []
    got = {(c.action, c.name, c.old_version, c.new_version) for c in diff(first.packages,
                                                                        second.packages)}
    assert got == {("upgraded", "bash", "5.2.15-2+b8", "5.2.21-2"),
                   ("installed", "newpkg", None, "2.0"), ("removed", "nolist", "2.0", None),
                   ("removed", "requests", "2.31.0", None)}  # fmt: skip


def test_rediscovery_and_nested_node_modules(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(FIX / "venv", root)
    sc = Scanner(str(root))
    first = run(sc.full())
    assert run(sc.recheck([], rediscover=False)) is None  # nothing to do
    # a nested install changes only a nested node_modules directory's mtime
    nested = root / "app/node_modules/left-pad/node_modules"
    (nested / "late").mkdir()
    (nested / "late/package.json").write_text('{"name": "late", "version": "1.0.0"}')
    os.utime(nested, ns=(1, 10**18))
    keys = sc.changed()
    assert keys == [f"npm:{root}/app/node_modules"]
    # a runtime install in a directory that did not exist at the scan: found by rediscovery
    new_nm = root / "srv/other/node_modules/fresh"
    new_nm.mkdir(parents=True)
    (new_nm / "package.json").write_text('{"name": "fresh", "version": "0.1.0"}')
    second = run(sc.recheck(keys, rediscover=True))
    assert second is not None and sc.discoveries == 2
    got = {(c.action, c.name) for c in diff(first.packages, second.packages)}
    assert got == {("installed", "late"), ("installed", "fresh")}


def test_garbage_databases_do_not_raise(tmp_path: Path) -> None:
    (tmp_path / "var/lib/dpkg").mkdir(parents=True)
    (tmp_path / "var/lib/dpkg/status").write_bytes(b"\xff\xfe no colon\n\n:\n\nPackage:\n")
    (tmp_path / "lib/apk/db").mkdir(parents=True)
    (tmp_path / "lib/apk/db/installed").write_bytes(b"\x00\x01\nP\nV:1\n\n")
    inv = inventory(tmp_path)
    assert [(p.name, p.version) for p in inv.packages] == [("", "")]  # Package: with no name
    assert inv.errors == []


def test_apk_v3_is_reported_unsupported(tmp_path: Path) -> None:
    (tmp_path / "lib/apk/db").mkdir(parents=True)
    (tmp_path / "lib/apk/db/installed.adb").write_bytes(b"ADB.....")
    assert [u["source"] for u in inventory(tmp_path).unsupported] == ["apk-adb"]


def _fake_proc(tmp: Path, root: Path, pid: int, exe: str, maps: str, fds: list[str],
               euid: int = 0) -> Path:  # fmt: skip
    proc = tmp / "proc"
    d = proc / str(pid)
    (d / "fd").mkdir(parents=True)
    stat = f"{pid} (x) S 1 " + " ".join(["0"] * 17) + " 4242 0 0"
    (d / "stat").write_text(stat)
    (d / "status").write_text(f"Name:\tx\nUid:\t{euid}\t{euid}\t{euid}\t{euid}\n")
    (d / "maps").write_text(maps)
    os.symlink(exe, d / "exe")
    os.symlink(str(root), d / "root")
    for i, target in enumerate(fds):
        os.symlink(target, d / "fd" / str(i))
    return proc


def test_usage_join_on_fake_proc(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(FIX / "debian", root)
    lib = root / "usr/lib/x86_64-linux-gnu/libfoo.so.1"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"\x7fELF")
    # usr-merge: the process sees /usr/bin/bash, dpkg lists /bin/bash
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/bash").write_bytes(b"#!")
    os.symlink("usr/bin", root / "bin")
    st = lib.stat()
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    # mapped under a name no package lists (a hard link): found by (dev, inode)
    os.link(lib, lib.with_name("libfoo.so.1.old"))
    maps = (f"7f00-7f10 r-xp 00000000 {dev} {st.st_ino} /usr/lib/x86_64-linux-gnu/libfoo.so.1.old\n"
            "7f10-7f20 rw-p 00000000 00:00 0 [heap]\n"
            "7f20-7f30 r--p 00000000 fd:00 99 /usr/share/doc/bash/README (deleted)\n")  # fmt: skip
    proc = _fake_proc(tmp_path, root, 77, "/usr/bin/bash", maps,
                      ["/usr/local/lib/python3.11/dist-packages/requests/api.py", "pipe:[5]"],
                      euid=1000)  # fmt: skip
    inv = inventory(root)
    ps = ProcScanner(str(proc), str(root))
    hits = ps.scan(inv, 1)
    got = {(inv.packages[h.idx].name, h.kind, h.deleted, h.root) for h in hits}
    assert got == {("bash", "exe", False, False), ("bash", "mmap", True, False),
                   ("libfoo1", "mmap", False, False), ("requests", "open", False, False)}
    reads = ps.reads
    ps.scan(inv, 1)
    assert ps.reads == reads  # cached per (pid, start time)
    ps.stale.add(77)
    ps.scan(inv, 1)
    assert ps.reads == reads + 1  # an exec invalidates it
    assert ps.last.measured == 1 and ps.last.unreadable == 0
    tr = Tracker()
    for h in hits:
        tr.add(inv.packages[h.idx], h, 5)
    tr.note_pass(5, ps.last, len(ps.never_read))
    states = {p.name: tr.state(p, inv.reasons[i]) for i, p in enumerate(inv.packages)}
    assert states == {"bash": ("active", ""), "libfoo1": ("active", ""),
                      "requests": ("active", ""), "python3-yaml": ("unmeasurable", NOT_RUN),
                      "md5only": ("dormant", ""),
                      "nolist": ("unmeasurable", "no file list to join on")}  # fmt: skip
    rec = tr.record(next(p for p in inv.packages if p.name == "bash"))
    assert rec["evidence"] == ["exe", "mmap"] and rec["root"] is False


def test_renamed_executable_is_joined_by_identity(tmp_path: Path) -> None:
    """The process runs a file no package lists (renamed or hard-linked after the scan):
    the (dev, inode) of /proc/<pid>/exe finds the owned executable."""
    root = tmp_path / "root"
    shutil.copytree(FIX / "debian", root)
    exe = root / "usr/bin/md5only"
    exe.parent.mkdir(parents=True)
    exe.write_bytes(b"\x7fELF")
    inv = inventory(root)
    renamed = root / "usr/bin/.md5only-renamed"
    os.link(exe, renamed)
    proc = _fake_proc(tmp_path, root, 80, str(renamed), "", [])
    hits = ProcScanner(str(proc), str(root)).scan(inv, 1)
    assert [(inv.packages[h.idx].name, h.kind) for h in hits] == [("md5only", "exe")]


def test_process_of_another_root_is_not_joined(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(FIX / "debian", root)
    proc = _fake_proc(tmp_path, tmp_path, 78, "/bin/bash", "", [])  # its root: elsewhere
    inv = inventory(root)
    ps = ProcScanner(str(proc), str(root))
    assert ps.scan(inv, 1) == []
    assert ps.last.measured == 0
    tr = Tracker()
    tr.note_pass(1, ps.last, 0)
    # nothing in scope was read: nothing is dormant
    assert state_of(tr, inv, "md5only") == "unmeasurable"


def test_parse_maps_bad_lines() -> None:
    text = ("garbage\n7f-8f r-xp 0 zz:01 12 /lib/a.so\n7f-8f r-xp 0 08:01 12 /lib/b.so\n"
            "7f-8f r-xp 0 08:01 0 /lib/c\n7f-8f r-xp 0 08:01 13 [vdso]\n")  # fmt: skip
    assert parse_maps(text) == [("/lib/b.so", (os.makedev(8, 1), 12))]


def test_snapshot_parts_and_wire() -> None:
    inv = inventory(FIX / "venv")
    tr = observed()
    evs = snapshot_events(inv, tr, 9, "abc", part_size=3)
    assert [e.part for e in evs] == [0, 1, 2] and {e.parts for e in evs} == {3}
    assert sum(len(e.packages) for e in evs) == len(inv.packages) == 7
    wire = evs[0].to_wire()
    assert list(wire) == sorted(wire) and wire["kind"] == "package.inventory"
    assert wire["totals"]["packages"] == 7 and wire["totals"]["ecosystem.npm"] == 3
    assert wire["totals"]["dormant"] == 1  # native-ext: the only one with a .so
    assert wire["totals"]["usage_passes"] == 1 and wire["totals"]["observed_since"] == 1
    rec = {p["name"]: p for e in evs for p in e.packages}
    assert rec["six"]["state"] == "unmeasurable" and rec["six"]["reason"] == NOT_RUN
    assert wire["errors"] and "errors" not in evs[1].to_wire()  # part 0 only
    assert isinstance(evs[0], PackageInventory)


def test_active_and_change_wire() -> None:
    a = PackageActive(time=1, ecosystem="deb", name="bash", version="5", evidence="exec",
                      path="/usr/bin/bash", pid=None, exec_id=None, root=True).to_wire()
    assert list(a) == sorted(a) and "pid" not in a and a["deleted"] is False
    assert "arch" not in a
    a = PackageActive(time=1, ecosystem="deb", name="bash", version="5", evidence="exec",
                      path="/usr/bin/bash", pid=None, exec_id=None, root=True, arch="amd64",
                      location="/var/lib/dpkg/status").to_wire()  # fmt: skip
    assert list(a) == sorted(a) and a["arch"] == "amd64"
    c = PackageChange(time=1, action="installed", ecosystem="deb", name="x", source="dpkg",
                      old_version=None, new_version="1",
                      managers=({"manager": "apt-get", "pid": 3},)).to_wire()
    assert list(c) == sorted(c) and "old_version" not in c


def test_manager_of() -> None:
    assert manager_of("/usr/bin/apt-get", ["apt-get", "install"]) == "apt-get"
    assert manager_of("/usr/bin/python3.11", ["python3", "-m", "pip", "install"]) == "pip"
    assert manager_of("/usr/bin/ls", ["ls"]) is None


def test_config_section() -> None:
    cfg = load_config(None, {"LW_EMBED_PACKAGES_ROOT": "/proc/7/root",
                             "LW_EMBED_PACKAGES_USAGE_INTERVAL": "2"})  # fmt: skip
    assert cfg.packages.root == "/proc/7/root" and cfg.packages.usage_interval == 2.0
    assert PackagesConfig().snapshot_interval == 43200.0
    with pytest.raises(ConfigError, match=r"packages\.scan_rate"):
        load_config(None, {"LW_EMBED_PACKAGES_SCAN_RATE": "1"})
    with pytest.raises(ConfigError, match=r"packages\.rediscover_every"):
        load_config(None, {"LW_EMBED_PACKAGES_REDISCOVER_EVERY": "0"})
