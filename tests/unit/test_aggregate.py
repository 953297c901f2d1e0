"""Aggregator: first occurrence at once, repeats folded with their count, bounded groups."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lw_embed.config import DEFAULT_AGGREGATE_KEYS
from lw_embed.pipeline.aggregate import Aggregator

T = 1_700_000_100_000_000_000
KEYS = {
    "process.exec": ["exe", "argv", "parent_exe"],
    "process.exit": ["exe", "exit_code", "signal"],
    "net.connect": ["exe", "family", "address", "port"],
}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def agg(window: float = 10.0, max_groups: int = 100, keys: Any = None) -> tuple[Aggregator, Clock]:
    clock = Clock()
    return Aggregator(window, max_groups, KEYS if keys is None else keys, clock), clock


def conn(address: str = "10.0.0.1", port: int = 443, time: int = T, **extra: Any) -> dict[str, Any]:
    ev = {
        "address": address, "exec_id": "e" * 16, "family": "inet", "fd": 3,
        "kind": "net.connect", "pid": 100, "port": port, "tid": 100, "time": time, **extra,
    }  # fmt: skip
    return dict(sorted(ev.items()))


def exe_ctx(exe: str = "/usr/bin/curl", parent: str = "/bin/sh") -> dict[str, Any]:
    return {"exe": exe, "argv": ("x",), "ancestors": [{"exe": parent, "exec_id": "p", "pid": 1}]}


def exit_(code: int = 0, time: int = T) -> dict[str, Any]:
    return {"exec_id": "e" * 16, "exit_code": code, "kind": "process.exit", "pid": 1,
            "time": time}  # fmt: skip


def total(records: list[dict[str, Any]]) -> int:
    return sum(r.get("count", 1) for r in records)


def test_first_occurrence_goes_out_at_once_unchanged() -> None:
    a, _ = agg()
    ev = conn()
    before = dict(ev)
    (out,) = a.add(ev, exe_ctx())
    assert out is ev and ev == before and "count" not in out
    assert a.add(conn(time=T + 1), exe_ctx()) == []
    assert len(a) == 1


def test_repeats_are_folded_into_one_summary_at_window_end() -> None:
    a, clock = agg(window=10.0)
    first = conn(time=T)
    assert a.add(first, exe_ctx()) == [first]
    for i in range(1, 5):
        clock.now += 1
        assert a.add(conn(time=T + i, fd=3 + i), exe_ctx()) == []
    assert a.pending == 4 and a.folded == 4
    assert a.flush() == []  # 4 s into a 10 s window
    assert a.next_deadline() == 110.0
    clock.now = 110.0
    (summary,) = a.flush()
    assert summary == {
        **conn(time=T + 4, fd=7), "aggregated": True, "count": 4,
        "first_seen": T + 1, "last_seen": T + 4,
    }  # fmt: skip
    assert list(summary) == sorted(summary)
    assert len(a) == 0 and a.pending == 0 and a.summaries == 1
    # the group is forgotten: the next occurrence is a new first
    again = conn(time=T + 100)
    assert a.add(again, exe_ctx()) == [again]


def test_a_group_without_repeats_ends_silently() -> None:
    a, clock = agg(window=1.0)
    a.add(conn(), exe_ctx())
    clock.now += 5
    assert a.flush() == []
    assert len(a) == 0


def test_flush_with_an_explicit_now() -> None:
    a, _ = agg(window=10.0)
    a.add(conn(), exe_ctx())
    a.add(conn(time=T + 1), exe_ctx())
    assert a.flush(now=109.9) == []
    assert [r["count"] for r in a.flush(now=110.0)] == [1]


def test_add_after_the_window_flushes_the_old_group_first() -> None:
    a, clock = agg(window=10.0)
    a.add(conn(time=T), exe_ctx())
    a.add(conn(time=T + 1), exe_ctx())
    clock.now += 10
    new_first = conn(time=T + 2)
    out = a.add(new_first, exe_ctx())
    assert [r.get("count") for r in out] == [1, None]
    assert out[0]["last_seen"] == T + 1 and out[1] is new_first


def test_windows_are_per_group_from_their_first_occurrence() -> None:
    a, clock = agg(window=10.0)
    a.add(conn("10.0.0.1"), exe_ctx())
    clock.now = 105.0
    a.add(conn("10.0.0.2"), exe_ctx())
    a.add(conn("10.0.0.1", time=T + 1), exe_ctx())
    a.add(conn("10.0.0.2", time=T + 2), exe_ctx())
    clock.now = 110.0
    assert [r["address"] for r in a.flush()] == ["10.0.0.1"]
    clock.now = 115.0
    assert [r["address"] for r in a.flush()] == ["10.0.0.2"]


def test_force_flush_emits_every_open_summary() -> None:
    a, _ = agg()
    for addr in ("a", "b", "c"):
        a.add(conn(addr), exe_ctx())
    a.add(conn("a", time=T + 1), exe_ctx())
    a.add(conn("c", time=T + 2), exe_ctx())
    a.add(conn("c", time=T + 3), exe_ctx())
    out = a.flush(force=True)
    assert [(r["address"], r["count"]) for r in out] == [("a", 1), ("c", 2)]
    assert len(a) == 0
    assert a.flush(force=True) == []


def test_key_fields_separate_groups_and_others_do_not() -> None:
    a, _ = agg()
    assert len(a.add(conn(port=443), exe_ctx())) == 1
    assert len(a.add(conn(port=80), exe_ctx())) == 1  # another group
    assert a.add(conn(port=443, fd=9, tid=7), exe_ctx()) == []  # fd, tid are not key fields
    assert len(a.add(conn(port=443), exe_ctx("/usr/bin/wget"))) == 1  # derived exe differs
    assert len(a) == 3


def test_derived_fields_from_the_event_or_the_process() -> None:
    a, _ = agg(keys={"process.exec": ["exe", "parent_exe", "name"], "process.exit": ["name"]})
    ex = {"kind": "process.exec", "exe": "/bin/ls", "ancestors": [{"exe": "/bin/sh"}], "time": T}
    assert len(a.add(ex, ex)) == 1
    assert a.add({**ex, "time": T + 1}, ex) == []
    other_parent = {**ex, "ancestors": [{"exe": "/bin/bash"}]}
    assert len(a.add(other_parent, other_parent)) == 1
    # process.exit has no exe: the name comes from the process context
    assert len(a.add(exit_(), exe_ctx("/usr/bin/ls"))) == 1
    assert a.add(exit_(time=T + 1), exe_ctx("/bin/ls")) == []  # same basename "ls"
    assert len(a.add(exit_(time=T + 2), None)) == 1  # unknown process: a group of its own


def test_filter_outcome_is_part_of_the_group() -> None:
    a, _ = agg()
    a.add(conn(), exe_ctx())
    alert = conn(alert=True, matched_rules=["x"])
    assert a.add(alert, exe_ctx()) == [alert]
    tagged = conn(matched_rules=["y"])
    assert a.add(tagged, exe_ctx()) == [tagged]
    assert a.add(conn(alert=True, matched_rules=["x"], time=T + 1), exe_ctx()) == []
    (summary,) = a.flush(force=True)
    assert summary["alert"] is True and summary["count"] == 1


def test_kinds_not_in_keys_pass_untouched() -> None:
    a, _ = agg(keys={"net.connect": ["address"]})
    ev = {"kind": "agent.status", "metrics": {}, "time": T}
    for _ in range(3):
        out = a.add(ev, None)
        assert out == [ev] and out[0] is ev
    ex = exit_()
    assert a.add(ex, None)[0] is ex and a.add(ex, None)[0] is ex
    assert len(a) == 0
    assert a.add({"no": "kind"}, None) == [{"no": "kind"}]


def test_empty_keys_disable_aggregation() -> None:
    a, _ = agg(keys={})
    ev = conn()
    assert [a.add(ev, None) for _ in range(3)] == [[ev]] * 3


def test_a_kind_with_no_key_fields_is_one_group() -> None:
    a, _ = agg(keys={"process.exit": []})
    a.add(exit_(0), None)
    a.add(exit_(1, T + 1), None)
    a.add(exit_(2, T + 2), None)
    (summary,) = a.flush(force=True)
    assert summary["count"] == 2 and summary["exit_code"] == 2


def test_max_groups_evicts_the_oldest_group_with_its_summary() -> None:
    a, clock = agg(max_groups=2)
    a.add(conn("a"), exe_ctx())
    a.add(conn("a", time=T + 1), exe_ctx())
    clock.now += 1
    a.add(conn("b"), exe_ctx())
    c = conn("c")
    out = a.add(c, exe_ctx())
    assert out[0]["address"] == "a" and out[0]["count"] == 1 and out[0]["aggregated"] is True
    assert out[1] is c
    assert a.evicted_groups == 1 and len(a) == 2
    out = a.add(conn("d"), exe_ctx())  # evicts "b", which had no repeats: nothing to say
    assert [r["address"] for r in out] == ["d"]
    assert a.evicted_groups == 2


def test_reconfigure_flushes_only_groups_whose_keys_changed() -> None:
    a, clock = agg(window=10.0)
    a.add(conn(), exe_ctx())
    a.add(conn(time=T + 1), exe_ctx())
    a.add(exit_(), exe_ctx())
    a.add(exit_(time=T + 1), exe_ctx())
    keys = {**KEYS, "process.exit": ["exit_code"]}
    out = a.reconfigure(20.0, 100, keys)
    assert [(r["kind"], r["count"]) for r in out] == [("process.exit", 1)]
    assert len(a) == 1
    clock.now = 110.0  # the old window would end here; the new one is 20 s
    assert a.flush() == []
    clock.now = 120.0
    assert [r["kind"] for r in a.flush()] == ["net.connect"]


def test_reconfigure_removing_a_kind_and_lowering_max_groups() -> None:
    a, _ = agg()
    for addr in "abc":
        a.add(conn(addr), exe_ctx())
        a.add(conn(addr, time=T + 1), exe_ctx())
    a.add(exit_(), None)
    a.add(exit_(time=T + 1), None)
    out = a.reconfigure(10.0, 2, {"net.connect": KEYS["net.connect"]})
    assert [(r["kind"], r.get("address")) for r in out] == [
        ("process.exit", None), ("net.connect", "a"),
    ]  # fmt: skip
    assert len(a) == 2 and a.evicted_groups == 1
    ex = exit_(time=T + 5)
    assert a.add(ex, None) == [ex]  # no longer aggregated
    assert a.reconfigure(10.0, 2, {"net.connect": KEYS["net.connect"]}) == []


def test_default_config_keys_work_as_given() -> None:
    a = Aggregator(10.0, 10, DEFAULT_AGGREGATE_KEYS, Clock())
    ev = {"kind": "process.exec", "exe": "/bin/true", "argv": ["true"], "ancestors": [],
          "time": T}  # fmt: skip
    assert a.add(ev, ev) == [ev]
    assert a.add({**ev, "time": T + 1}, ev) == []
    assert a.add({**ev, "argv": ["true", "x"]}, ev) != []


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError):
        Aggregator(0, 10, KEYS, Clock())
    with pytest.raises(ValueError):
        Aggregator(1.0, 0, KEYS, Clock())


def test_odd_values_are_grouped_without_raising() -> None:
    a, _ = agg(keys={"x": ["v"]})
    values: list[Any] = [
        [1, [2]],
        {"a": [1]},
        [["a", [1]]],
        {1, 2},
        True,
        1,
        None,
        1.5,
        b"x",
    ]
    firsts = [a.add({"kind": "x", "v": v, "time": T}, None) for v in values]
    assert all(len(f) == 1 for f in firsts)  # all distinct groups (True is not 1)
    assert a.add({"kind": "x", "v": [1, [2]], "time": T + 1}, None) == []
    assert a.add({"kind": "x", "time": T + 2}, None) != []  # absent is a value of its own
    assert a.add({"kind": "x", "time": T + 3}, None) == []


# --- weighted events: a source's own summary counts as its count ---


def weighed(n: int, first: int, last: int, **extra: Any) -> dict[str, Any]:
    ev = conn(time=last, **extra)
    ev.update(aggregated=True, count=n, first_seen=first, last_seen=last)
    return dict(sorted(ev.items()))


def test_a_weighted_event_starting_a_group_goes_out_as_is() -> None:
    a, _ = agg()
    ev = weighed(5, T, T + 9)
    before = dict(ev)
    (out,) = a.add(ev, exe_ctx())
    assert out is ev and ev == before
    assert a.pending == 0 and a.folded == 0
    assert a.flush(force=True) == []  # no repeats after it: nothing more to say
    assert total([out]) == 5


def test_a_weighted_event_folds_with_its_weight_and_widens_the_times() -> None:
    a, clock = agg(window=10.0)
    assert len(a.add(conn(time=T + 50), exe_ctx())) == 1  # the first occurrence, weight 1
    clock.now += 1
    assert a.add(conn(time=T + 60, fd=9), exe_ctx()) == []  # a plain repeat
    assert a.add(weighed(4, T + 20, T + 70), exe_ctx()) == []  # earlier first, later last
    assert a.add(weighed(3, T + 30, T + 40, fd=11), exe_ctx()) == []  # inside: no change
    assert a.pending == 1 + 4 + 3 and a.folded == 8
    (summary,) = a.flush(force=True)
    assert summary["count"] == 8 and summary["aggregated"] is True
    assert (summary["first_seen"], summary["last_seen"]) == (T + 20, T + 70)
    assert summary["fd"] == 11  # the last repeat's fields
    assert list(summary) == sorted(summary)


def test_a_weighted_event_of_a_kind_not_aggregated_passes_untouched() -> None:
    a, _ = agg()
    ev = {"aggregated": True, "count": 7, "kind": "agent.status", "time": T}
    assert a.add(ev, None) == [ev]


@pytest.mark.parametrize("bad", [0, -3, "5", 2.0, True, None])
def test_a_bad_weight_counts_as_one_and_is_stripped(bad: Any) -> None:
    a, _ = agg()
    ev = weighed(2, T, T + 1)
    ev["count"] = bad
    (out,) = a.add(ev, exe_ctx())
    assert not {"aggregated", "count", "first_seen", "last_seen"} & out.keys()
    assert out == conn(time=T + 1)
    assert a.add(dict(ev), exe_ctx()) == []  # folds as 1
    (summary,) = a.flush(force=True)
    assert summary["count"] == 1 and total([out, summary]) == 2


def test_next_deadline_follows_the_oldest_group() -> None:
    a, clock = agg(window=10.0, max_groups=2)
    assert a.next_deadline() is None
    a.add(conn("a"), exe_ctx())
    clock.now += 3
    a.add(conn("b"), exe_ctx())
    assert a.next_deadline() == 110.0
    clock.now += 1
    a.add(conn("c"), exe_ctx())  # evicts "a"
    assert a.next_deadline() == 113.0
    clock.now = 113.0
    a.flush()
    assert a.next_deadline() == 114.0
    a.reconfigure(20.0, 2, KEYS)  # a longer window moves it
    assert a.next_deadline() == 124.0
    a.flush(force=True)
    assert a.next_deadline() is None and len(a) == 0


# --- the invariant: nothing is summarised away without its count ---


def _weigh(ev: dict[str, Any], weight: int, span: int) -> dict[str, Any]:
    """``ev`` as a source's summary of ``weight`` events (weight 1: as is)."""
    if weight > 1:
        ev = {**ev, "aggregated": True, "count": weight, "first_seen": ev["time"] - span,
              "last_seen": ev["time"]}  # fmt: skip
    return ev


_event = st.builds(
    lambda kind, addr, code, t, weight, span: _weigh(
        conn(addr, time=t) if kind == "net.connect"
        else exit_(code, t) if kind == "process.exit"
        else {"kind": kind, "time": t}, weight, span
    ),
    st.sampled_from(["net.connect", "process.exit", "agent.status"]),
    st.sampled_from(["a", "b", "c", "d"]),
    st.integers(0, 3),
    st.integers(2**32, 2**63),
    st.sampled_from([1, 1, 1, 2, 7]),
    st.integers(0, 2**31),
)  # fmt: skip
_step = st.tuples(_event, st.floats(0, 5), st.sampled_from(["add", "add", "add", "flush"]))


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(_step, max_size=120),
    window=st.floats(0.1, 10),
    max_groups=st.integers(1, 6),
    reconf=st.booleans(),
)
def test_sum_of_counts_equals_events_added(
    steps: list[tuple[dict[str, Any], float, str]], window: float, max_groups: int, reconf: bool
) -> None:
    a, clock = agg(window=window, max_groups=max_groups)
    out: list[dict[str, Any]] = []
    added = 0
    for i, (ev, dt, op) in enumerate(steps):
        clock.now += dt
        if op == "flush":
            out += a.flush()
        else:
            out += a.add(ev, exe_ctx())
            added += ev.get("count", 1)  # the event's weight
        assert len(a) <= max_groups
        assert total(out) + a.pending == added
        if reconf and i == len(steps) // 2:
            out += a.reconfigure(window * 2, max(1, max_groups - 1), {"net.connect": ["address"]})
    out += a.flush(force=True)
    assert total(out) == added
    assert all(r.get("aggregated") is True for r in out if "count" in r)
    for r in out:  # a summary's times span its events
        if "first_seen" in r:
            assert r["first_seen"] <= r["last_seen"]
