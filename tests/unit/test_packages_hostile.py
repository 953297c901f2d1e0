"""Hostile and odd inputs to the package readers, built here in tmp: NUL bytes in file
lists (never an exception, never a dead source), symlink loops in node_modules and in the
discovery walk, huge file lists and databases (capped and reported), rpm headers of many
files (linear parse, capped strings), a two-arch Multi-Arch dpkg database, discovery of
site directories by content and of deep venvs; owner_of fuzzed."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

from lw_embed.sources.packages import exec_paths, manager_of, model, npm, rpm
from lw_embed.sources.packages.inventory import Inventory, Scanner, diff, discover
from lw_embed.sources.packages.model import DbResult, Package, clean_path, run
from tests.unit.test_packages_rpm import make_rpmdb, pkg_header


def scan(root: Path, **kw: int) -> Inventory:
    return run(Scanner(str(root), **kw).full())


def dist(site: Path, name: str, record: bytes, version: str = "1") -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Name: {name}\nVersion: {version}\n")
    (info / "RECORD").write_bytes(record)


def dpkg_root(root: Path, stanzas: list[tuple[str, str, str]], lists: dict[str, bytes]) -> None:
    d = root / "var/lib/dpkg"
    (d / "info").mkdir(parents=True)
    (d / "status").write_text("".join(
        f"Package: {n}\nStatus: install ok installed\nArchitecture: {a}\nVersion: {v}\n\n"
        for n, a, v in stanzas))  # fmt: skip
    for name, data in lists.items():
        (d / "info" / name).write_bytes(data)


def test_clean_path() -> None:
    assert clean_path("/usr/./bin//x") == "/usr/bin/x"
    assert clean_path("//usr/bin") == "/usr/bin"
    assert clean_path("/.") == "/"
    assert clean_path("ev\0il") is None and clean_path("/ev\0il") is None
    assert clean_path("relative/x") is None


def test_nul_byte_in_file_lists_is_dropped_and_counted(tmp_path: Path) -> None:
    # the reviewer's reproduction: a RECORD line with a NUL byte, in a world-writable dir
    dist(tmp_path / "x/site-packages", "evil", b"ev\0il/a.py,,\ngood.py,,\n")
    dpkg_root(tmp_path, [("pkg", "amd64", "1")], {"pkg.list": b"/usr/bin/p\0q\n/usr/bin/ok\n"})
    (tmp_path / "lib/apk/db").mkdir(parents=True)
    (tmp_path / "lib/apk/db/installed").write_bytes(b"P:a\nV:1\nF:usr/bin\nR:x\0y\nR:z\n\n")
    inv = scan(tmp_path)
    assert inv.dropped == 3
    by = {p.name: p for p in inv.packages}
    assert by["evil"].files == ("/x/site-packages/good.py",)
    assert by["pkg"].files == ("/usr/bin/ok",)
    assert by["a"].files == ("/usr/bin", "/usr/bin/z")
    # the slow path survives hostile queries and keeps answering afterwards
    for q in ("/x/site-packages/ev\0il/a.py", "/usr/bin/\0", "rel/x", "", "/"):
        assert inv.owner_of(q) is None
        assert inv.owner_of(q, (1, 2)) is None
    idx = inv.owner_of("/x/site-packages/good.py")
    assert idx is not None and inv.packages[idx].name == "evil"


def test_owner_of_fuzzed(tmp_path: Path) -> None:
    """Random inventories (raw paths, as a reader bug would leave them) and random queries:
    owner_of never raises, and an indexed path always finds its package."""
    rnd = random.Random(1234)
    alphabet = ["/", "a", "b", ".", "..", "\0", "é", " ", "bin", "lib", "x.so", "\n", "//"]
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/x.so").write_bytes(b"")
    for _ in range(60):
        pkgs = []
        for i in range(rnd.randint(0, 6)):
            files = tuple("/" + "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 8)))
                          for _ in range(rnd.randint(0, 8)))  # fmt: skip
            pkgs.append(Package("deb", f"p{i}", "1", "", "dpkg", "x",
                                files if rnd.random() < 0.9 else None,
                                prefix=rnd.choice(["", "/a", "/\0"])))  # fmt: skip
        inv = Inventory(str(tmp_path))
        run(inv.add(DbResult(packages=pkgs)))
        run(inv.index())
        for _ in range(40):
            q = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 10)))
            ident = rnd.choice([None, (1, 2), (os.stat(tmp_path).st_dev, 0)])
            got = inv.owner_of(q, ident)
            assert got is None or 0 <= got < len(inv.packages)
        for path, idx in inv.owner.items():
            assert inv.owner_of(path) == idx


def test_npm_symlink_loop_is_read_once(tmp_path: Path) -> None:
    nm = tmp_path / "app/node_modules"
    for i in range(8):
        d = nm / f"p{i}"
        d.mkdir(parents=True)
        (d / "package.json").write_text(f'{{"name": "p{i}", "version": "1.0.{i}"}}')
        os.symlink("..", d / "node_modules")
    inv = scan(tmp_path)
    assert sorted(p.name for p in inv.packages) == [f"p{i}" for i in range(8)]
    assert inv.errors == []


def test_npm_caps_are_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(npm, "MAX_PACKAGES", 3)
    nm = tmp_path / "node_modules"
    for i in range(6):
        (nm / f"p{i}").mkdir(parents=True)
        (nm / f"p{i}/package.json").write_text(f'{{"name": "p{i}"}}')
    res = run(npm.scan(str(tmp_path), str(nm), 6))
    assert len(res.packages) == 3
    assert any("more than 3 packages" in e for e in res.errors)


def test_discovery_loops_content_sites_and_deep_venvs(tmp_path: Path) -> None:
    # a symlink loop and a bind-like loop (a symlink is never followed)
    (tmp_path / "a/b").mkdir(parents=True)
    os.symlink(str(tmp_path / "a"), tmp_path / "a/b/loop")
    # a site directory that is not called site-packages (found by its *.dist-info)
    dist(tmp_path / "a/mylibs", "odd", b"odd.py,,\n")
    # a poetry venv deeper than search_depth
    venv = tmp_path / "root/.cache/pypoetry/virtualenvs/app-py3.11"
    site = venv / "lib/python3.11/site-packages"
    dist(site, "deep", b"deep.py,,\n")
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    found = run(discover(str(tmp_path), 5))  # virtualenvs at level 4
    assert str(tmp_path / "a/mylibs") in found.sites
    assert str(site) in found.sites
    inv = scan(tmp_path, search_depth=5)
    assert {"odd", "deep"} <= {p.name for p in inv.packages}


def test_huge_file_list_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model, "MAX_FILES", 1000)
    lines = b"".join(b"/usr/share/evil/%d\n" % i for i in range(5000))
    dpkg_root(tmp_path, [("evil", "all", "1"), ("fine", "all", "1")],
              {"evil.list": lines, "fine.list": b"/usr/bin/fine\n"})  # fmt: skip
    inv = scan(tmp_path)
    by = {p.name: (i, p) for i, p in enumerate(inv.packages)}
    i, evil = by["evil"]
    assert evil.files is None and "over 1000" in inv.reasons[i]
    assert any("evil.list" in e and "more than 1000 files" in e for e in inv.errors)
    assert by["fine"][1].files == ("/usr/bin/fine",)
    assert inv.paths == 1


def test_truncated_status_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lw_embed.sources.packages import dpkg

    dpkg_root(tmp_path, [(f"p{i}", "all", "1") for i in range(100)], {})
    monkeypatch.setattr(dpkg, "MAX_DB_BYTES", 2000)
    inv = scan(tmp_path)
    assert 0 < len(inv.packages) < 100
    assert any("read truncated" in e for e in inv.errors)


def test_rpm_many_files_parse_and_caps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [f"/usr/share/big/d{i % 300}/f{i}" for i in range(128_000)]
    blob = pkg_header("big", "1", "1", "x86_64", files)
    tags = rpm.parse_header(blob)
    assert len(tags[rpm.BASENAMES]) == 128_000
    make_rpmdb(tmp_path, [blob, pkg_header("small", "1", "1", "noarch", ["/usr/bin/s"])])
    inv = scan(tmp_path)
    by = {p.name: p for p in inv.packages}
    assert by["big"].files is not None and len(by["big"].files) == 128_000
    monkeypatch.setattr(model, "MAX_FILES", 1000)
    by = {p.name: p for p in scan(tmp_path).packages}
    assert by["big"].files is None and by["small"].files == ("/usr/bin/s",)
    monkeypatch.setattr(rpm, "MAX_STRINGS", 1000)
    with pytest.raises(rpm.HeaderError, match="strings"):
        rpm.parse_header(blob)
    # a count far beyond the data is rejected before any work
    bad = bytearray(blob)
    struct.pack_into(">i", bad, 8 + 12, 1 << 30)
    with pytest.raises(rpm.HeaderError):
        rpm.parse_header(bytes(bad))


def test_multiarch_same_two_arches(tmp_path: Path) -> None:
    dpkg_root(tmp_path, [("libz1", "amd64", "1.2"), ("libz1", "i386", "1.2")],
              {"libz1:amd64.list": b"/usr/lib/x86_64-linux-gnu/libz.so.1\n",
               "libz1:i386.list": b"/usr/lib/i386-linux-gnu/libz.so.1\n"})  # fmt: skip
    first = scan(tmp_path)
    got = {(p.name, p.arch, p.files) for p in first.packages}
    assert got == {("libz1", "amd64", ("/usr/lib/x86_64-linux-gnu/libz.so.1",)),
                   ("libz1", "i386", ("/usr/lib/i386-linux-gnu/libz.so.1",))}  # fmt: skip
    i386 = first.owner["/usr/lib/i386-linux-gnu/libz.so.1"]
    assert first.packages[i386].arch == "i386"
    # upgrading one arch is one change, with its arch
    status = tmp_path / "var/lib/dpkg/status"
    text = status.read_text()
    status.write_text(text.replace("Architecture: i386\nVersion: 1.2", "Architecture: i386\n"
                                   "Version: 1.3"))  # fmt: skip
    changes = diff(first.packages, scan(tmp_path).packages)
    assert [(c.action, c.name, c.arch, c.new_version) for c in changes] == [
        ("upgraded", "libz1", "i386", "1.3")]
    assert changes[0].location.endswith("var/lib/dpkg/status")


def test_exec_paths_of_scripts_and_links() -> None:
    # a #! script: the kernel runs "interpreter [option] script args"
    assert exec_paths("/usr/bin/perl", ["/usr/bin/perl", "/usr/sbin/adduser", "--version"],
                      "/") == ["/usr/bin/perl", "/usr/sbin/adduser"]  # fmt: skip
    assert exec_paths("/usr/bin/perl", ["/usr/bin/perl", "-w", "./x.pl"], "/srv") == [
        "/usr/bin/perl", "/srv/x.pl"]
    # busybox applets: argv[0] is the link
    assert exec_paths("/bin/busybox", ["/bin/ls", "-l"], "/") == ["/bin/busybox", "/bin/ls"]
    # not an interpreter: arguments are data, never evidence
    assert exec_paths("/usr/bin/cat", ["cat", "/usr/bin/perl"], "/") == ["/usr/bin/cat"]
    assert exec_paths("/bin/sh (deleted)", ["sh", "-c", "x"], "") == ["/bin/sh"]
    assert manager_of("/usr/bin/python3.11", ["/usr/bin/python3", "/usr/bin/pip", "list"]) == (
        "pip")
