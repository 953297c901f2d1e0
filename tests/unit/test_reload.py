"""RulesWatcher: change detection by stat (rate-limited), SIGHUP flag, reload aside."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from lw_embed.config import Config, load_config, with_overrides
from lw_embed.pipeline.filter import FilterProgram
from lw_embed.pipeline.reload import POLL_INTERVAL, ReloadResult, RulesWatcher

RULES_A = """\
[tracer]
mode = "auto"

[[filter.rules]]
name = "a"
action = "exclude"
exe = ["/usr/bin/*"]
"""

RULES_B = """\
[tracer]
mode = "procfs"

[filter]
default = "exclude"

[[filter.rules]]
name = "b"
action = "include"
process_name = ["sshd"]

[aggregate]
window = 3
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, text: str, mtime_ns: int) -> None:
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(mtime_ns, mtime_ns))  # deterministic, whatever the fs granularity


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Clock, RulesWatcher, Config]:
    path = tmp_path / "lw-embed.toml"
    write(path, RULES_A, 1_000_000_000)
    clock = Clock()
    current = load_config(str(path), {})
    return path, clock, RulesWatcher(str(path), clock, env={}), current


def test_unchanged_file_is_not_a_change(setup: Any) -> None:
    _, clock, w, _ = setup
    for _ in range(3):
        clock.now += POLL_INTERVAL
        assert w.changed() is False


def test_a_changed_file_is_detected_once(setup: Any) -> None:
    path, clock, w, _ = setup
    write(path, RULES_B, 2_000_000_000)
    assert w.changed() is False  # less than POLL_INTERVAL since the watcher started
    clock.now += POLL_INTERVAL
    assert w.changed() is True
    assert w.changed() is False
    clock.now += POLL_INTERVAL
    assert w.changed() is False  # reported once


@pytest.mark.parametrize("what", ["mtime", "size", "inode"])
def test_each_part_of_the_signature_counts(setup: Any, what: str) -> None:
    path, clock, w, _ = setup
    if what == "mtime":
        write(path, RULES_A, 5_000_000_000)
    elif what == "size":
        write(path, RULES_A + "\n", 1_000_000_000)
    else:  # an editor's rename over the file: same size and mtime, new inode
        new = path.with_name("new.toml")
        write(new, RULES_A, 1_000_000_000)
        os.replace(new, path)
    clock.now += POLL_INTERVAL
    assert w.changed() is True


def test_stat_is_rate_limited(setup: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _, clock, w, _ = setup
    calls = []
    real = os.stat

    def counting(p: Any, *a: Any, **k: Any) -> os.stat_result:
        calls.append(p)
        return real(p, *a, **k)

    monkeypatch.setattr(os, "stat", counting)
    for _ in range(40):
        clock.now += POLL_INTERVAL / 4
        w.changed()
    assert len(calls) == 10


def test_a_deleted_file_is_a_change_and_fails_to_reload(setup: Any) -> None:
    path, clock, w, current = setup
    path.unlink()
    clock.now += POLL_INTERVAL
    assert w.changed() is True
    res = w.try_reload(current)
    assert res.config is None and res.program is None and not res.ok
    assert res.error is not None and "cannot read config file" in res.error


def test_request_flag(setup: Any) -> None:
    path, clock, w, _ = setup
    assert w.requested is False
    w.request()
    assert w.requested is True
    assert w.changed() is True  # at once, whatever the poll interval
    assert w.requested is False
    assert w.changed() is False
    # a request also takes in a pending file change: one reload, not two
    write(path, RULES_B, 3_000_000_000)
    w.request()
    assert w.changed() is True
    clock.now += POLL_INTERVAL
    assert w.changed() is False


def test_request_without_a_file() -> None:
    clock = Clock()
    w = RulesWatcher(None, clock, env={})
    clock.now += 10
    assert w.changed() is False
    w.request()
    assert w.changed() is True
    res = w.try_reload(Config())
    assert res.config == Config() and res.error is None


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[[filter.rules]\n", ""),  # not TOML
        ('[[filter.rules]]\nname = "a"\naction = "tag"\ncmdline = "("\n',
         "filter.rules[0].cmdline"),
        ('[[filter.rules]]\nname = "a"\naction = "tag"\nuser = ["no-such-user-xyz"]\n',
         "filter.rules[0].user"),
        ('[[filter.rules]]\nname = "a"\nacton = "tag"\n', "filter.rules[0].acton"),
        ("[tracer]\nmode = 3\n", "tracer.mode"),  # any bad key rejects the whole file
    ],
)  # fmt: skip
def test_a_broken_file_gives_an_error_and_no_config(setup: Any, text: str, key: str) -> None:
    path, clock, w, current = setup
    write(path, text, 4_000_000_000)
    clock.now += POLL_INTERVAL
    assert w.changed() is True
    res = w.try_reload(current)
    assert res == ReloadResult(None, res.error)
    assert res.error is not None and res.error.startswith(key)
    assert w.rejected == 1 and w.reloads == 0


def test_a_valid_file_applies_filter_and_aggregate_only(setup: Any) -> None:
    path, clock, w, current = setup
    current = with_overrides(current, {"output.dir": "/from/the/cli"})
    write(path, RULES_B, 2_000_000_000)
    clock.now += POLL_INTERVAL
    assert w.changed() is True
    res = w.try_reload(current)
    assert res.ok and res.error is None and res.config is not None
    assert [r.name for r in res.config.filter.rules] == ["b"]
    assert res.config.filter.default == "exclude"
    assert res.config.aggregate.window == 3.0
    assert res.config.tracer == current.tracer  # not applied live...
    assert res.restart_needed == ("tracer.mode",)  # ...but named
    assert res.config.output.dir == "/from/the/cli"  # the caller's settings are kept
    assert res.changed == ("filter", "aggregate")
    assert isinstance(res.program, FilterProgram) and res.program.rule_names == ("b",)
    assert w.reloads == 1
    # reloading the same file again: nothing new to restart for, nothing live changed
    w.request()
    assert w.changed()
    again = w.try_reload(res.config)
    assert again.ok and again.restart_needed == () and again.changed == ()


def test_a_failed_reload_then_a_good_one(setup: Any) -> None:
    path, clock, w, current = setup
    write(path, '[filter]\ndefault = "maybe"\n', 2_000_000_000)
    clock.now += POLL_INTERVAL
    assert w.changed() and not w.try_reload(current).ok
    write(path, RULES_B, 3_000_000_000)
    clock.now += POLL_INTERVAL
    assert w.changed()
    res = w.try_reload(current)
    assert res.ok and res.restart_needed == ("tracer.mode",)


def test_environment_overrides_apply_on_reload(setup: Any) -> None:
    path, clock, _, current = setup
    w = RulesWatcher(str(path), clock, env={"LW_EMBED_AGGREGATE_MAX_GROUPS": "7"})
    w.request()
    assert w.changed()
    res = w.try_reload(current)
    assert res.config is not None and res.config.aggregate.max_groups == 7
    assert res.changed == ("aggregate",)
