"""FilterProgram: every condition, rule order and verdicts, alerts, the process context."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from lw_embed.config import FilterConfig, FilterRule, config_from_dict
from lw_embed.errors import ConfigError
from lw_embed.events import AgentStatus
from lw_embed.kernel.procfs import exec_id
from lw_embed.pipeline.enrich import ProcessTable
from lw_embed.pipeline.filter import MEMO_ENTRIES, FilterProgram, glob_regex, process_context

BOOT = "8d1f0c6e-0000-4000-8000-000000000001"
NS = 4026531836
BOOT_NS = 1_700_000_000_000_000_000
T = 1_700_000_100_000_000_000


def program(*rules: dict[str, Any], default: str = "include") -> FilterProgram:
    cfg = config_from_dict({"filter": {"default": default, "rules": list(rules)}})
    return FilterProgram(cfg.filter)


def rule(name: str = "r", action: str = "tag", **conditions: Any) -> dict[str, Any]:
    return {"name": name, "action": action, **conditions}


def exec_event(
    exe: str = "/usr/bin/curl",
    argv: tuple[str, ...] = ("curl", "-s", "http://localhost/healthz"),
    uid: int = 1000,
    ancestors: tuple[str, ...] = ("/bin/bash", "/usr/sbin/cron"),
    **extra: Any,
) -> dict[str, Any]:
    ev = {
        "ancestors": [
            {"exe": a, "exec_id": f"{i:016x}", "pid": 10 + i} for i, a in enumerate(ancestors)
        ],
        "argv": list(argv),
        "cwd": "/",
        "euid": uid,
        "exe": exe,
        "exec_id": "e" * 16,
        "gid": uid,
        "kind": "process.exec",
        "pid": 100,
        "ppid": 10,
        "source": "ptrace",
        "start_time": T - 5,
        "time": T,
        "truncated": False,
        "uid": uid,
        **extra,
    }
    return dict(sorted(ev.items()))


def connect_event(**extra: Any) -> dict[str, Any]:
    ev = {
        "address": "10.0.0.1", "exec_id": "e" * 16, "family": "inet", "fd": 3,
        "kind": "net.connect", "pid": 100, "port": 443, "tid": 100, "time": T, **extra,
    }  # fmt: skip
    return dict(sorted(ev.items()))


def run(prog: FilterProgram, ev: dict[str, Any]) -> dict[str, Any] | None:
    """Apply with the event as its own process context (as for process.exec)."""
    return prog.apply(ev, ev)


def matched(prog: FilterProgram, ev: dict[str, Any], proc: Any = "self") -> list[str]:
    out = prog.apply(ev, ev if proc == "self" else proc)
    assert out is not None
    names: list[str] = out.get("matched_rules", [])
    return names


# --- each condition matches and mismatches ---

CONDITIONS = [
    ({"exe": ["/usr/bin/*"]}, {}, {"exe": "/opt/curl"}),
    ({"exe": ["/opt/*", "/usr/bin/cu?l"]}, {}, {"exe": "/usr/bin/cat"}),
    ({"exe": ["/usr/bin/[abc]url"]}, {}, {"exe": "/usr/bin/durl"}),
    ({"process_name": ["curl"]}, {}, {"exe": "/usr/bin/wget"}),
    ({"process_name": ["wget*", "cur*"]}, {}, {"exe": "/usr/bin/xcurl"}),
    ({"process_name": ["curl"]}, {"exe": "curl"}, {"exe": "/usr/bin/curl2"}),  # no directory
    ({"ancestor_exe": ["*/cron"]}, {}, {"ancestors": ("/bin/bash", "/sbin/init")}),
    ({"ancestor_exe": ["/bin/bash"]}, {}, {"ancestors": ()}),
    ({"ancestor_name": ["cron"]}, {}, {"ancestors": ("/bin/bash", "/usr/sbin/crond")}),
    ({"ancestor_name": ["ba*"]}, {}, {"ancestors": ("/bin/dash",)}),
    ({"cmdline": "--health(check)?"}, {"argv": ("app", "--healthcheck")}, {}),
    ({"cmdline": "-s http://"}, {}, {"argv": ("curl", "-s", "https://x")}),
    ({"cmdline": "^curl -s"}, {}, {"argv": ("/usr/bin/curl", "-s")}),
    ({"user": ["1000"]}, {}, {"uid": 0}),
    ({"user": ["root"]}, {"uid": 0}, {"uid": 1000}),
    ({"user": ["nobody", "5"]}, {"uid": 65534}, {"uid": 0}),
    ({"container": ["abc123*"]}, {"container": "abc1234567"}, {"container": "def456"}),
    ({"container": ["abc123*"]}, {"container": "abc123"}, {}),  # no container: no match
    ({"kinds": ["process.exec"]}, {}, {"kind": "process.exit"}),
    ({"kinds": ["process.*"]}, {}, {"kind": "net.connect"}),
    ({"kinds": ["net.*", "process.exit"]}, {"kind": "net.connect"}, {"kind": "processXexec"}),
    ({"kinds": ["process.*"]}, {"kind": "process.exit"}, {"kind": "process"}),
]


def _variant(changes: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, Any] = {}
    for k, v in changes.items():
        if k in ("exe", "argv", "uid", "ancestors"):
            base[k] = v
    ev = exec_event(**base)
    for k, v in changes.items():
        if k not in base:
            ev[k] = v
    return dict(sorted(ev.items()))


@pytest.mark.parametrize(("condition", "hit", "miss"), CONDITIONS)
def test_each_condition_matches_and_mismatches(
    condition: dict[str, Any], hit: dict[str, Any], miss: dict[str, Any]
) -> None:
    prog = program(rule(**condition))
    assert matched(prog, _variant(hit)) == ["r"]
    assert matched(prog, _variant(miss)) == []
    assert prog.matched == {"r": 1}


def test_all_conditions_of_a_rule_must_match() -> None:
    prog = program(rule(exe=["/usr/bin/*"], user=["0"], cmdline="healthz"))
    assert matched(prog, exec_event(uid=0)) == ["r"]
    assert matched(prog, exec_event(uid=1000)) == []  # exe and cmdline match, user does not
    assert matched(prog, exec_event(uid=0, argv=("curl",))) == []


def test_globs_are_anchored_and_case_sensitive() -> None:
    prog = program(rule(exe=["/usr/bin/curl"]))
    assert matched(prog, exec_event(exe="/usr/bin/curl")) == ["r"]
    assert matched(prog, exec_event(exe="/usr/bin/curl-x")) == []
    assert matched(prog, exec_event(exe="/x/usr/bin/curl")) == []
    assert matched(prog, exec_event(exe="/USR/BIN/CURL")) == []
    assert glob_regex(["a*", "b?"]).match("bz")
    assert not glob_regex(["a*", "b?"]).match("bzz")


def test_process_conditions_do_not_match_without_a_process() -> None:
    prog = program(
        rule("exe", exe=["*"]), rule("name", process_name=["*"]),
        rule("anc", ancestor_exe=["*"]), rule("ancname", ancestor_name=["*"]),
        rule("cmd", cmdline="."), rule("user", user=["0", "1000"]),
        rule("net", kinds=["net.*"]),
    )  # fmt: skip
    assert matched(prog, connect_event(), proc=None) == ["net"]


def test_container_from_the_event_or_the_process() -> None:
    prog = program(rule(container=["abc*"]))
    assert matched(prog, connect_event(container="abc1"), proc=None) == ["r"]
    assert matched(prog, connect_event(), proc={"container": "abc2"}) == ["r"]
    assert matched(prog, connect_event(container="zzz"), proc={"container": "abc2"}) == []
    assert matched(prog, connect_event(), proc={"exe": "/x"}) == []


def test_conditions_use_the_process_context_for_other_kinds() -> None:
    prog = program(rule(kinds=["net.connect"], exe=["/opt/app"], ancestor_name=["sshd"]))
    proc = {"exe": "/opt/app", "argv": ("app",), "ancestors": [{"exe": "/usr/sbin/sshd"}]}
    assert matched(prog, connect_event(), proc=proc) == ["r"]
    assert matched(prog, connect_event(), proc={**proc, "exe": "/opt/other"}) == []


# --- rule order, verdicts, alerts ---


def test_matched_rules_lists_every_match_in_rule_order() -> None:
    prog = program(
        rule("a", exe=["/usr/bin/*"]),
        rule("b", "include", process_name=["wget"]),
        rule("c", process_name=["curl"]),
        rule("d", "include", cmdline="healthz"),
        rule("e", ancestor_name=["cron"]),
    )
    out = run(prog, exec_event())
    assert out is not None
    assert out["matched_rules"] == ["a", "c", "d", "e"]
    assert list(out) == sorted(out)
    assert "alert" not in out
    assert prog.matched == {"a": 1, "b": 0, "c": 1, "d": 1, "e": 1}


def test_the_first_include_or_exclude_decides() -> None:
    prog = program(
        rule("tag", exe=["*"]),
        rule("keep", "include", process_name=["curl"]),
        rule("drop", "exclude", cmdline="healthz"),
    )
    out = run(prog, exec_event())
    assert out is not None and out["matched_rules"] == ["tag", "keep", "drop"]
    prog = program(
        rule("drop", "exclude", cmdline="healthz"),
        rule("keep", "include", process_name=["curl"]),
    )
    assert run(prog, exec_event()) is None
    assert prog.excluded == 1
    assert prog.matched == {"drop": 1, "keep": 1}  # counted even when dropped


def test_default_include_and_exclude() -> None:
    ev = exec_event(exe="/bin/ls")
    inc = program(rule("drop", "exclude", exe=["/usr/*"]))
    assert run(inc, ev) is ev  # nothing matched: the event itself, not a copy
    exc = program(rule("keep", "include", exe=["/usr/*"]), default="exclude")
    assert run(exc, ev) is None
    kept = run(exc, exec_event())
    assert kept is not None and kept["matched_rules"] == ["keep"]
    # a tag rule does not decide: the default applies
    tagged = program(rule("t", exe=["/bin/*"]), default="exclude")
    assert run(tagged, ev) is None
    assert tagged.matched == {"t": 1} and tagged.excluded == 1
    # no rules at all
    assert FilterProgram(FilterConfig(default="exclude")).apply(ev, ev) is None
    assert FilterProgram(FilterConfig()).apply(ev, ev) is ev


def test_agent_events_are_never_excluded() -> None:
    status = AgentStatus(time=T, metrics={"rss": 1}).to_wire()
    prog = program(rule("drop", "exclude", kinds=["agent.*"]), default="exclude")
    out = prog.apply(status, None)
    assert out is not None and out["matched_rules"] == ["drop"]
    prog = program(rule("keep", "include", exe=["/nothing"]), default="exclude")
    assert prog.apply(status, None) is status
    assert prog.excluded == 0
    assert prog.apply(exec_event(), None) is None


def test_alert_flag() -> None:
    prog = program(rule("quiet", exe=["*"]), rule("loud", cmdline="healthz", alert=True))
    out = run(prog, exec_event())
    assert out is not None
    assert out["alert"] is True and out["matched_rules"] == ["quiet", "loud"]
    assert list(out) == sorted(out)
    out = run(prog, exec_event(argv=("curl",)))
    assert out is not None and "alert" not in out and out["matched_rules"] == ["quiet"]


def test_the_input_event_is_not_modified() -> None:
    ev = exec_event()
    before = dict(ev)
    out = run(program(rule(exe=["*"], alert=True)), ev)
    assert out is not ev and ev == before
    assert out == {**before, "alert": True, "matched_rules": ["r"]}


def test_odd_events_do_not_raise() -> None:
    prog = program(
        rule("a", exe=["*"]), rule("b", ancestor_exe=["*x"]), rule("c", cmdline="x"),
        rule("d", user=["0"]), rule("e", container=["*"]),
    )  # fmt: skip
    odd: list[tuple[dict[str, Any], Any]] = [
        ({}, None),
        ({"kind": 5}, {"exe": 3, "argv": [1, 2], "uid": True, "ancestors": [1, {"exe": 2}]}),
        ({"kind": "process.exec"}, {"ancestors": [{"exe": "/x"}, "junk"], "argv": "str"}),
        ({"kind": "x", "container": ["list"]}, {"ancestors": [{"exe": ["unhashable"]}]}),
    ]
    for ev, proc in odd:
        prog.apply(ev, proc)
    out = prog.apply({"kind": "k"}, {"ancestors": [{"exe": "/x"}, "junk"]})
    assert out is not None and out["matched_rules"] == ["b"]


def test_memos_stay_bounded_and_correct() -> None:
    prog = program(rule("r", cmdline="^go 7"))
    hits = 0
    for i in range(MEMO_ENTRIES * 2 + 10):
        out = run(prog, exec_event(argv=("go", str(i))))
        hits += out is not None and "matched_rules" in out
    assert hits == sum(1 for i in range(MEMO_ENTRIES * 2 + 10) if str(i).startswith("7"))
    for fact in (*(f for _, f in prog._proc_facts), prog._container):
        assert fact is None or len(fact.memo) <= MEMO_ENTRIES


# --- the process context, from a real ProcessTable ---


def _table() -> ProcessTable:
    t = ProcessTable(BOOT, NS, BOOT_NS, ancestors_max=8)
    t.on_exec(T, 1, 0, 100, "/sbin/init", ["/sbin/init"], False, "/", 0, 0, 0)
    t.on_fork(T + 1, 1, 50, 200)
    t.on_exec(T + 2, 50, 1, 200, "/usr/sbin/sshd", ["sshd", "-D"], False, "/", 0, 0, 0)
    t.on_fork(T + 3, 50, 60, 300)
    t.on_exec(T + 4, 60, 50, 300, "/usr/bin/curl", ["curl", "--health"], False, "/", 33, 33, 33)
    return t


def test_process_context_from_a_process_table() -> None:
    t = _table()
    conn = t.on_connect(T + 5, 60, 60, 3, "inet", "10.0.0.1", 443).to_wire()
    ctx = process_context(conn, t)
    assert ctx is not None
    assert ctx["exe"] == "/usr/bin/curl"
    assert tuple(ctx["argv"]) == ("curl", "--health")
    assert ctx["uid"] == 33
    assert ctx["exec_id"] == exec_id(BOOT, NS, 60, 300)
    assert [a["exe"] for a in ctx["ancestors"]] == ["/usr/sbin/sshd", "/sbin/init"]
    assert [a["pid"] for a in ctx["ancestors"]] == [50, 1]
    prog = program(
        rule("sshd-child", ancestor_name=["sshd"], alert=True),
        rule("www", user=["33"], kinds=["net.*"]),
        rule("health", cmdline="--health"),
    )
    out = prog.apply(conn, ctx)
    assert out is not None
    assert out["matched_rules"] == ["sshd-child", "www", "health"] and out["alert"] is True
    # an exit is attributed the same way (the entry is kept after the exit)
    ex = t.on_exit(T + 6, 60, 0, None, False)
    assert ex is not None
    ctx = process_context(ex.to_wire(), t)
    assert ctx is not None and ctx["exe"] == "/usr/bin/curl"


def test_process_context_of_an_exec_is_the_event_itself() -> None:
    t = _table()
    ev = t.on_exec(T + 9, 61, 50, 400, "/bin/sh", ["sh"], False, "/", 0, 0, 0).to_wire()
    assert process_context(ev, t) is ev
    assert [a["exe"] for a in ev["ancestors"]] == ["/usr/sbin/sshd", "/sbin/init"]


def test_process_context_unknown_process() -> None:
    t = _table()
    assert process_context(connect_event(), t) is None  # exec_id not in the table
    unattributed = t.on_connect(T, 999, 999, 3, "inet", "10.0.0.1", 80).to_wire()
    assert "exec_id" not in unattributed
    assert process_context(unattributed, t) is None


def test_process_context_respects_ancestors_max_and_unknown_uid() -> None:
    t = ProcessTable(BOOT, NS, BOOT_NS, ancestors_max=1)
    t.on_exec(T, 1, 0, 100, "/sbin/init", ["/sbin/init"], False, "/", 0, 0, 0)
    t.on_exec(T, 2, 1, 110, "/bin/sh", ["sh"], False, "/", 0, 0, 0)
    t.on_exec(T, 3, 2, 120, "/bin/app", ["app"], False, "/", 0, 0, 0)
    ctx = process_context({"kind": "net.connect", "exec_id": exec_id(BOOT, NS, 3, 120)}, t)
    assert ctx is not None and [a["exe"] for a in ctx["ancestors"]] == ["/bin/sh"]
    t.on_fork(T, 77, 78, 130)  # a parent the table does not know: uid unknown (-1)
    ctx = process_context({"kind": "net.connect", "exec_id": exec_id(BOOT, NS, 78, 130)}, t)
    assert ctx is not None and "uid" not in ctx and ctx["ancestors"] == []


# --- config errors name the rule's dotted key ---


@pytest.mark.parametrize(
    ("rules", "key", "message"),
    [
        ('[[filter.rules]]\nname = "a"\naction = "tag"\nexe = ["x"]\n'
         '[[filter.rules]]\nname = "b"\naction = "tag"\ncmdline = "(unclosed"\n',
         "filter.rules[1].cmdline", "invalid regular expression"),
        ('[[filter.rules]]\nname = "a"\naction = "tag"\nuser = ["no-such-user-xyz"]\n',
         "filter.rules[0].user", "unknown user 'no-such-user-xyz'"),
        ('[[filter.rules]]\nname = "a"\nacton = "tag"\nexe = ["x"]\n',
         "filter.rules[0].acton", "unknown key"),
        ('[[filter.rules]]\nname = "a"\naction = "tag"\nexe = ["x"]\n'
         '[[filter.rules]]\nname = "a"\naction = "exclude"\nexe = ["y"]\n',
         "filter.rules[1].name", "duplicate rule name 'a'"),
        ('[[filter.rules]]\nname = "a"\naction = "exclude"\nalert = true\n',
         "filter.rules[0]", "at least one condition"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(rules: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        FilterProgram(config_from_dict(tomllib.loads(rules)).filter)
    assert info.value.key == key
    assert message in info.value.message


def test_compiling_checks_rules_built_without_the_loader() -> None:
    bad_user = FilterConfig(rules=(FilterRule("a", "tag", user=("no-such-user-xyz",)),))
    with pytest.raises(ConfigError) as info:
        FilterProgram(bad_user)
    assert info.value.key == "filter.rules[0].user"
    bad_regex = FilterConfig(
        rules=(FilterRule("a", "tag", exe=("x",)), FilterRule("b", "tag", cmdline="[")),
    )
    with pytest.raises(ConfigError) as info:
        FilterProgram(bad_regex)
    assert info.value.key == "filter.rules[1].cmdline"
    with pytest.raises(ConfigError) as info:
        FilterProgram(FilterConfig(rules=(FilterRule("a", "drop", exe=("x",)),)))
    assert info.value.key == "filter.rules[0].action"
