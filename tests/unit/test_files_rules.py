"""[files] config, the compiled rules, the baseline comparison and the inotify parser."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from lw_embed.cli import main
from lw_embed.config import DEFAULT_FILE_RULES, FileRule, config_from_dict, load_config
from lw_embed.errors import ConfigError
from lw_embed.kernel import inotify
from lw_embed.pipeline.baseline import Baseline, Entry, compare
from lw_embed.pipeline.filerules import RuleSet


def test_files_section_parses_rules_and_defaults() -> None:
    cfg = config_from_dict({"files": {"enabled": True, "rules": [
        {"path": "/srv/app", "exclude": ["*.log"], "actions": ["create", "delete"],
         "max_depth": 3, "hash": False}]}})  # fmt: skip
    (rule,) = cfg.files.effective_rules()
    assert rule.path == "/srv/app" and rule.actions == ("create", "delete")
    assert rule.max_depth == 3 and rule.hash is False and rule.exclude == ("*.log",)
    assert config_from_dict({}).files.effective_rules() == DEFAULT_FILE_RULES
    assert config_from_dict({"files": {"default_rules": False}}).files.effective_rules() == ()


@pytest.mark.parametrize(("files", "key"), [
    ({"rules": [{"path": "relative"}]}, "files.rules[0].path"),
    ({"rules": [{"path": "/x", "actions": ["explode"]}]}, "files.rules[0].actions"),
    ({"rules": [{"path": "/x", "max_depth": 999}]}, "files.rules[0].max_depth"),
    ({"hash_algorithm": "crc32"}, "files.hash_algorithm"),
    ({"scan_files_per_s": 0}, "files.scan_files_per_s"),
])  # fmt: skip
def test_bad_files_values_name_the_key(files: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"files": files})
    assert key in str(exc.value)


def test_bad_file_rule_in_a_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[files]\nenabled = true\n[[files.rules]]\npath = "/x"\nactions = ["nope"]\n')
    assert main(["validate-config", str(f)]) == 2
    assert "files.rules[0].actions" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        load_config(str(f), {})


def test_env_override_of_files_scalars() -> None:
    env = {"LW_EMBED_FILES_ENABLED": "true", "LW_EMBED_FILES_COALESCE_QUIET": "2"}
    cfg = load_config(None, env)
    assert cfg.files.enabled and cfg.files.coalesce_quiet == 2.0


def test_rule_matching_depth_exclusions_and_longest_root(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "f").write_text("x")
    root = str(tmp_path.resolve())
    rs = RuleSet([
        FileRule(root, "top", max_depth=2, exclude=("cache", f"{root}/a/skip*")),
        FileRule(f"{root}/a/b", "deep"),
        FileRule(f"{root}/f", "single"),
    ], secret_paths=("*.key", "/etc/shadow"))  # fmt: skip
    assert rs.rule_of(f"{root}/x").name == "top"  # type: ignore[union-attr]
    assert rs.rule_of(f"{root}/a/b/c/d/e").name == "deep"  # type: ignore[union-attr]
    assert rs.rule_of(f"{root}/a/x/y") is None  # depth 3 > 2
    assert rs.rule_of(f"{root}/cache/x") is None and rs.rule_of(f"{root}/a/cache") is None
    assert rs.rule_of(f"{root}/a/skipme") is None and rs.rule_of(f"{root}/a/keep") is not None
    assert rs.rule_of(f"{root}/f").name == "single"  # type: ignore[union-attr]
    assert rs.watch_rule(f"{root}/a") is not None and rs.watch_rule(f"{root}/a/x") is None
    assert rs.watch_rule(f"{root}/cache") is None  # never watched
    assert rs.is_secret("/srv/tls.key") and rs.is_secret("/etc/shadow")
    assert not rs.is_secret("/etc/passwd")
    assert rs.under_any_root(f"{root}/cache/x") and not rs.under_any_root("/elsewhere")


def test_non_recursive_rule_reaches_depth_one(tmp_path: Path) -> None:
    rs = RuleSet([FileRule(str(tmp_path), recursive=False)])
    assert rs.rule_of(f"{tmp_path}/x") is not None
    assert rs.rule_of(f"{tmp_path}/d/x") is None
    assert rs.watch_rule(f"{tmp_path}/d") is None


def _e(**kw: object) -> Entry:
    base: dict[str, object] = dict(path="/p", inode=1, mode=0o100644, uid=0, gid=0, size=1,
                                   mtime=5, hash="aa")  # fmt: skip
    base.update(kw)
    return Entry(**base)  # type: ignore[arg-type]


def test_compare_tells_content_from_attributes() -> None:
    assert compare(None, _e()) == "create"
    assert compare(_e(), _e()) is None
    assert compare(_e(), _e(hash="bb", mtime=6)) == "modify"
    assert compare(_e(), _e(mode=0o100600)) == "attrib"
    assert compare(_e(), _e(uid=1000)) == "attrib"
    assert compare(_e(hash=None), _e(hash=None, size=2)) == "modify"
    assert compare(_e(), _e(mode=0o40755)) == "modify"  # a file replaced by a directory


def test_baseline_tree_operations(tmp_path: Path) -> None:
    b = Baseline(str(tmp_path / "b.sqlite"))
    for p in ("/r/a", "/r/a/x", "/r/a/y/z", "/r/ab", "/r/b"):
        b.put(_e(path=p))
    assert sorted(b.children("/r")) == ["/r/a", "/r/ab", "/r/b"]
    b.rename_tree("/r/a", "/r/c")
    assert sorted(b.all()) == ["/r/ab", "/r/b", "/r/c", "/r/c/x", "/r/c/y/z"]
    assert b.delete_tree("/r/c") == ["/r/c/y/z", "/r/c/x", "/r/c"]
    assert sorted(b.all()) == ["/r/ab", "/r/b"]
    b.commit()
    b.close()
    assert sorted(Baseline(str(tmp_path / "b.sqlite")).all()) == ["/r/ab", "/r/b"]


def test_a_baseline_without_the_ctime_column_is_upgraded_in_place(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE files (path TEXT PRIMARY KEY, parent TEXT NOT NULL, inode INTEGER, "
        "mode INTEGER, uid INTEGER, gid INTEGER, size INTEGER, mtime INTEGER, hash TEXT);"
        "INSERT INTO files VALUES ('/a/f', '/a', 5, 33188, 0, 0, 3, 7, 'h');")
    db.commit()
    db.close()
    b = Baseline(str(path))
    old = b.get("/a/f")
    assert old == Entry("/a/f", 5, 33188, 0, 0, 3, 7, "h", 0)  # kept; ctime unknown: 0
    b.put(Entry("/a/g", 6, 33188, 0, 0, 3, 7, "h", 99))
    b.rename_tree("/a/g", "/a/h")
    assert b.get("/a/h") == Entry("/a/h", 6, 33188, 0, 0, 3, 7, "h", 99)
    b.close()


def test_canonical_keeps_a_proc_root_prefix_and_rules_on_one_root_are_one(
        tmp_path: Path) -> None:  # fmt: skip
    from lw_embed.pipeline.filerules import canonical

    # realpath would read /proc/1/root as this process's own "/" (another mount namespace)
    assert canonical("/proc/1/root/app/../etc//x") == "/proc/1/root/etc/x"
    assert canonical("/proc/self/root/") == "/proc/self/root"
    assert canonical("/proc/12/rootfs/a") == os.path.realpath("/proc/12/rootfs/a")
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert canonical(str(tmp_path / "link")) == str(real.resolve())
    rs = RuleSet([FileRule(str(tmp_path / "link"), "first"), FileRule(str(real), "second")])
    assert [r.name for r in rs.rules] == ["first"]  # /bin and /usr/bin: scanned once


def test_excludes_written_against_a_symlinked_root_and_default_secrets(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "cache").mkdir(parents=True)
    (tmp_path / "app").symlink_to(real)
    rs = RuleSet([FileRule(str(tmp_path / "app"), exclude=(f"{tmp_path}/app/cache",))])
    root = str(real.resolve())
    assert rs.rule_of(f"{root}/cache") is None and rs.rule_of(f"{root}/x") is not None
    dflt = config_from_dict({}).files
    secrets = RuleSet((), dflt.secret_paths)
    for p in ("/etc/shadow", "/root/.ssh/id_ed25519", "/app/.env", "/app/.env.prod",
              "/etc/ssl/private/site.key", "/srv/tls.key"):  # fmt: skip
        assert secrets.is_secret(p), p
    for p in ("/etc/passwd", "/app/env.py", "/etc/ssl/certs/ca-certificates.crt",
              "/usr/local/share/ca-certificates/corp.pem"):  # fmt: skip
        assert not secrets.is_secret(p), p


def test_sidecar_watch_leaves_the_default_trees_out() -> None:
    from lw_embed.pipeline.filerules import with_watch

    cfg = with_watch(config_from_dict({}), ["/proc/1/root/app"], defaults=False)
    assert [r.path for r in cfg.files.effective_rules()] == ["/proc/1/root/app"]


def test_sidecar_secrets_below_a_proc_root_and_watch_replacing_a_default_rule() -> None:
    from lw_embed.pipeline.filerules import with_watch

    dflt = config_from_dict({}).files
    secrets = RuleSet((), dflt.secret_paths)
    for p in ("/proc/1/root/etc/shadow", "/proc/77/root/etc/ssh/ssh_host_rsa_key",
              "/proc/1/root/etc/ssl/private/k", "/proc/self/root/root/.ssh/id_rsa"):  # fmt: skip
        assert secrets.is_secret(p), p
    assert not secrets.is_secret("/proc/1/root/etc/passwd")
    cfg = with_watch(config_from_dict({}), ["/etc", "/app"])
    rules = {r.path: r for r in cfg.files.effective_rules()}
    assert rules["/etc"].name == "watch:/etc" and rules["/etc"].max_depth == 0
    assert rules["/app"].exclude == () and "usr-bin" in {r.name for r in rules.values()}
    assert len([r for r in cfg.files.effective_rules() if r.path == "/etc"]) == 1


def test_in_app_mode_has_no_file_source() -> None:
    from lw_embed.sources.files import IN_APP, probe

    assert probe(config_from_dict({}), "in-app") == ("none", IN_APP)


def test_trace_aliases_map_a_symlinked_root_to_its_target(tmp_path: Path) -> None:
    from lw_embed.sources.filetrace import _canon, trace_aliases, trace_roots

    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    cfg = config_from_dict({"files": {"rules": [{"path": str(tmp_path / "link")}]}})
    assert trace_roots(cfg) == (str(real.resolve()),)
    aliases = trace_aliases(cfg)
    assert aliases == ((str(tmp_path / "link"), str(real.resolve())),)
    assert _canon(f"{tmp_path}/link/x/y", aliases) == f"{real.resolve()}/x/y"
    assert _canon(f"{tmp_path}/linkage", aliases) == f"{tmp_path}/linkage"
    off = config_from_dict({"files": {"enabled": False}})
    assert trace_aliases(off) == ()


def test_corrupt_baseline_is_moved_aside(tmp_path: Path) -> None:
    p = tmp_path / "b.sqlite"
    p.write_bytes(b"this is not a database" * 100)
    b = Baseline(str(p))
    assert b.count() == 0 and os.path.exists(str(p) + ".corrupt")


def test_inotify_parse_handles_names_and_a_torn_tail() -> None:
    raw = struct.pack("iIII", 1, inotify.IN_CREATE, 0, 8) + b"abc\0\0\0\0\0"
    raw += struct.pack("iIII", 2, inotify.IN_Q_OVERFLOW, 0, 0)
    evs = inotify.parse(raw + b"\x01\x02")
    assert [(e.wd, e.mask, e.name) for e in evs] == [(1, inotify.IN_CREATE, "abc"),
                                                     (2, inotify.IN_Q_OVERFLOW, "")]


def test_watch_option_adds_a_rule_and_enables_monitoring(tmp_path: Path) -> None:
    from lw_embed.pipeline.filerules import with_watch

    base = config_from_dict({"files": {"rules": [{"path": "/etc", "name": "etc"}]}})
    cfg = with_watch(base, [str(tmp_path)])
    assert cfg.files.enabled
    assert [r.path for r in cfg.files.effective_rules()] == ["/etc", str(tmp_path)]
    assert set(cfg.files.rules[-1].actions) == {"create", "modify", "attrib", "delete", "rename"}
    # monitoring on by default: --watch adds to the default trees
    dflt = with_watch(config_from_dict({}), ["rel"])
    assert [r.path for r in dflt.files.effective_rules()] == [
        *(r.path for r in DEFAULT_FILE_RULES), os.path.abspath("rel")]
    # turned off in the config: --watch alone monitors just its paths, not the default set
    only = with_watch(config_from_dict({"files": {"enabled": False}}), ["rel"])
    assert only.files.enabled
    assert [r.path for r in only.files.effective_rules()] == [os.path.abspath("rel")]


def _run_bpf(prog: list[tuple[int, int, int, int]], nr: int, arch: int, args: list[int]) -> int:
    """A tiny classic-BPF interpreter for the instructions the filter uses."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *args)
    acc, pc = 0, 0
    for _ in range(10000):
        code, jt, jf, k = prog[pc]
        if code == 0x20:  # ld w abs
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code == 0x15:  # jeq k
            pc += 1 + (jt if acc == k else jf)
        elif code == 0x45:  # jset k
            pc += 1 + (jt if acc & k else jf)
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
    raise AssertionError("no return")


def test_filter_traces_write_opens_and_file_syscalls_only_when_monitoring() -> None:
    from lw_embed.kernel import seccomp as sc
    from lw_embed.sources import filetrace as ft
    from lw_embed.sources.tracer import TracerOptions, seccomp_rules

    off = seccomp_rules(TracerOptions(4096, 256, True))
    assert not any(ft.is_file_tag(r.data) for r in off)
    rules = seccomp_rules(TracerOptions(4096, 256, True, file_roots=("/app",)))
    prog = sc.build_trace_filter(rules, (sc.AUDIT_ARCH_X86_64, sc.AUDIT_ARCH_I386))
    x86, i386 = sc.AUDIT_ARCH_X86_64, sc.AUDIT_ARCH_I386
    openat = sc.syscall_numbers(x86, "openat")
    trace = sc.SECCOMP_RET_TRACE
    for nr in openat:  # x86-64 and x32
        assert _run_bpf(prog, nr, x86, [0, 0, os.O_RDONLY, 0, 0, 0]) == sc.SECCOMP_RET_ALLOW
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC | os.O_RDONLY):
            got = _run_bpf(prog, nr, x86, [0, 0, flags | os.O_CLOEXEC, 0, 0, 0])
            assert got & 0xFFFF0000 == trace and ft.is_file_tag(got & 0xFFFF)
    (i386_open,) = sc.syscall_numbers(i386, "open")
    assert _run_bpf(prog, i386_open, i386, [0, os.O_RDONLY, 0, 0, 0, 0]) == sc.SECCOMP_RET_ALLOW
    assert _run_bpf(prog, i386_open, i386, [0, os.O_WRONLY, 0, 0, 0, 0]) & 0xFFFF0000 == trace
    for name in ("unlinkat", "renameat2", "fchmodat", "mkdir", "utimensat", "fchown"):
        (nr, *_) = sc.syscall_numbers(x86, name)
        assert ft.is_file_tag(_run_bpf(prog, nr, x86, [0] * 6) & 0xFFFF), name
    (read_nr, *_) = sc.syscall_numbers(x86, "read")
    assert _run_bpf(prog, read_nr, x86, [0] * 6) == sc.SECCOMP_RET_ALLOW
    (connect, *_) = sc.syscall_numbers(x86, "connect")
    assert _run_bpf(prog, connect, x86, [0] * 6) == trace | 1  # TAG_CONNECT still there
    # openat2's flags are behind a pointer: every call stops (the tracer drops read-only
    # ones); fchmodat2 (Linux 6.6) is in the table, on i386 too
    for arch, name in ((x86, "openat2"), (x86, "fchmodat2"), (i386, "openat2"),
                       (i386, "fchmodat2")):  # fmt: skip
        for nr in sc.syscall_numbers(arch, name):
            assert ft.is_file_tag(_run_bpf(prog, nr, arch, [0] * 6) & 0xFFFF), (arch, name)


def test_aarch64_filter_traces_the_at_forms_with_the_same_flag_check() -> None:
    from lw_embed.kernel import seccomp as sc
    from lw_embed.sources import filetrace as ft
    from lw_embed.sources.tracer import TracerOptions, seccomp_rules

    arm = sc.AUDIT_ARCH_AARCH64
    rules = seccomp_rules(TracerOptions(4096, 256, True, file_roots=("/app",)))
    prog = sc.build_trace_filter(rules, (arm,))
    trace = sc.SECCOMP_RET_TRACE
    assert sc.syscall_numbers(arm, "openat") == [56]
    assert _run_bpf(prog, 56, arm, [0, 0, os.O_RDONLY, 0, 0, 0]) == sc.SECCOMP_RET_ALLOW
    got = _run_bpf(prog, 56, arm, [0, 0, os.O_WRONLY | os.O_CREAT, 0, 0, 0])
    assert got & 0xFFFF0000 == trace and ft._NAMES[(got & 0xFFFF) - ft.TAG_BASE] == "openat"
    for name, nr in (("unlinkat", 35), ("renameat2", 276), ("mkdirat", 34),
                     ("fchmodat", 53), ("fchownat", 54), ("utimensat", 88), ("linkat", 37),
                     ("symlinkat", 36), ("openat2", 437), ("fchmodat2", 452)):  # fmt: skip
        got = _run_bpf(prog, nr, arm, [0] * 6)
        assert ft._NAMES[(got & 0xFFFF) - ft.TAG_BASE] == name, name
    assert sc.syscall_numbers(arm, "unlink") == []  # no legacy path calls on arm64
    assert _run_bpf(prog, 63, arm, [0] * 6) == sc.SECCOMP_RET_ALLOW  # read
    assert _run_bpf(prog, 203, arm, [0] * 6) == trace | 1  # connect


def test_trace_roots_follow_the_config() -> None:
    from lw_embed.sources.filetrace import trace_roots

    dflt = {os.path.realpath(r.path) for r in DEFAULT_FILE_RULES}
    assert set(trace_roots(config_from_dict({}))) == dflt  # monitoring is on by default
    assert trace_roots(config_from_dict({"files": {"enabled": False}})) == ()
    on = config_from_dict({"files": {"enabled": True, "rules": [{"path": "/srv"}]}})
    assert trace_roots(on) == (os.path.realpath("/srv"),)
    off = config_from_dict({"files": {"enabled": True, "trace": False,
                                      "rules": [{"path": "/srv"}]}})  # fmt: skip
    assert trace_roots(off) == ()
