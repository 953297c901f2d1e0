"""The aggregate stage: the first occurrence goes out at once, repeats become one summary.

Interface: none (pure Python, no I/O, no threads). :class:`Aggregator` takes the events
the filter kept (wire dicts) with their process context (see
:func:`lw_embed.pipeline.filter.process_context`) and returns the records to send. Time
comes from the injected ``clock`` (seconds, monotonic); :meth:`Aggregator.flush` is called
by the worker when :meth:`Aggregator.next_deadline` passes, and with ``force=True`` at
shutdown.

Semantics: ``aggregate.keys`` names, per kind, the fields whose values make a group (a kind
not listed passes untouched). A field is a top-level event field, or one of the derived
``exe``, ``parent_exe`` (``ancestors[0].exe``) and ``name`` (basename of ``exe``), taken
from the event or else its process context. The filter's outcome (``matched_rules``,
``alert``) is always part of the group, so an alert is never folded into a non-alert
group. The first event of a group is returned at once, unchanged. Each repeat within the
group's window (``aggregate.window`` seconds from the first) is folded; when the window
ends (or on a forced flush) the group is forgotten and, if there were repeats, one summary
goes out: the last repeat's event plus ``count`` (repeats folded), ``first_seen``/
``last_seen`` (the ``time`` of the first and last repeat, ns) and ``aggregated: true``.

Weights: an event may arrive already summarised by its source (``aggregated: true`` and an
int ``count`` >= 1, e.g. the in-app audit source folding identical calls of one drain,
with ``first_seen``/``last_seen``): it stands for ``count`` events. Starting a group it is
returned as is (it already is a summary); folded into a group it adds ``count`` to the
group's count, and its ``first_seen``/``last_seen`` (else its ``time``) widen the group's.
An event with ``aggregated: true`` but no valid ``count`` counts as 1 and is stripped of
``aggregated``/``count``/``first_seen``/``last_seen`` (bad input never inflates counts).
So the sum of ``count or 1`` over the records returned equals the sum of the weights of
the events added (1 for a plain event), once everything is flushed: nothing is summarised
away without its count.

Capability: none.

Cost: per event one clock read, one float compare against the cached deadline of the
oldest group (no group is looked at unless one can expire) and one dict lookup on a tuple
of the group's values (lists are frozen to tuples; plain fields are read without a call);
about 0.65 us for a repeat on the 2-core test box (1.0 us before the deadline cache and
the inlined field reads). A summary costs one copy of the last event. Memory is bounded
by ``aggregate.max_groups`` groups, each holding at most one event.

Failure modes: nothing raises on odd events (unhashable values are frozen; a missing field
is a value of its own). When a new group would exceed ``max_groups`` the oldest group is
flushed early (its summary is emitted, counter ``evicted_groups``), so the bound costs
compression, never counts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from math import inf
from typing import Any

__all__ = ["DERIVED_FIELDS", "Aggregator"]

_ABSENT = object()  # the value of a field an event does not have
_MAP = object()  # marks a frozen mapping (so {"a": 1} and [["a", 1]] differ)
_BOOL = object()  # marks a bool (so True and 1 differ)

_Getter = Callable[[Mapping[str, Any], Mapping[str, Any] | None], Any]
#: what a source-made summary carries besides its event's fields
_SUMMARY_FIELDS = frozenset({"aggregated", "count", "first_seen", "last_seen"})


def _freeze(value: Any) -> Any:
    """A hashable stand-in for ``value`` (equal values give equal stand-ins)."""
    t = type(value)
    if t is str or t is int or value is None:
        return value
    if t is bool:
        return (_BOOL, value)
    if t is float or t is bytes:
        return value
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return (_MAP, *sorted(((str(k), _freeze(v)) for k, v in value.items()), key=_first))
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def _first(item: tuple[str, Any]) -> str:
    return item[0]


def _exe(event: Mapping[str, Any], proc: Mapping[str, Any] | None) -> Any:
    exe = event.get("exe", _ABSENT)
    if exe is _ABSENT and proc is not None:
        exe = proc.get("exe", _ABSENT)
    return exe


def _parent_exe(event: Mapping[str, Any], proc: Mapping[str, Any] | None) -> Any:
    for source in (event, proc):
        if source is None:
            continue
        ancestors = source.get("ancestors")
        if isinstance(ancestors, list | tuple) and ancestors:
            first = ancestors[0]
            return first.get("exe", _ABSENT) if isinstance(first, Mapping) else _ABSENT
    return _ABSENT


def _name(event: Mapping[str, Any], proc: Mapping[str, Any] | None) -> Any:
    name = event.get("name", _ABSENT)
    if name is _ABSENT:
        exe = _exe(event, proc)
        name = exe.rpartition("/")[2] if isinstance(exe, str) else _ABSENT
    return name


#: key fields computed from the event or its process context rather than read as is
DERIVED_FIELDS: Mapping[str, _Getter] = {"exe": _exe, "parent_exe": _parent_exe, "name": _name}


def _plan(fields: Sequence[str]) -> tuple[tuple[str, _Getter | None], ...]:
    """Per key field: its name and its getter (None: read the event's field as is)."""
    return tuple((f, DERIVED_FIELDS.get(f)) for f in fields)


def _weighed(event: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(event, weight) of an event marked ``aggregated``: its ``count``, or 1 and a copy
    without the summary fields when the count is not an int >= 1."""
    c = event.get("count")
    if type(c) is int and c >= 1:
        return event, c
    return {k: v for k, v in event.items() if k not in _SUMMARY_FIELDS}, 1


def _is_int(v: Any) -> bool:
    return type(v) is int


class _Group:
    __slots__ = ("count", "first_seen", "kind", "last", "last_seen", "start")

    def __init__(self, kind: str, start: float) -> None:
        self.kind = kind
        self.start = start  # clock time of the first occurrence
        self.count = 0  # repeats folded (the sum of their weights)
        self.first_seen: Any = None
        self.last_seen: Any = None
        self.last: dict[str, Any] | None = None  # the last repeat


def _summary(g: _Group) -> dict[str, Any] | None:
    if g.last is None:
        return None
    rec = dict(g.last)
    rec["aggregated"] = True
    rec["count"] = g.count
    for key, value in (("first_seen", g.first_seen), ("last_seen", g.last_seen)):
        if isinstance(value, int) and not isinstance(value, bool):  # else absent, not null
            rec[key] = value
    return dict(sorted(rec.items()))


class Aggregator:
    """Groups of repeated events, each folded for ``window`` seconds of ``clock``."""

    __slots__ = (
        "_clock", "_deadline", "_groups", "_keys", "_max_groups", "_plans", "_window",
        "evicted_groups", "folded", "summaries",
    )  # fmt: skip

    def __init__(
        self,
        window: float,
        max_groups: int,
        keys: Mapping[str, Sequence[str]],
        clock: Callable[[], float],
    ) -> None:
        self._clock = clock
        self._groups: OrderedDict[tuple[Any, ...], _Group] = OrderedDict()  # by first seen
        self._window = 0.0
        self._max_groups = 1
        self._keys: dict[str, tuple[str, ...]] = {}
        self._plans: dict[str, tuple[tuple[str, _Getter | None], ...]] = {}
        self._deadline = inf  # the oldest group's window end (inf: no group)
        self._configure(window, max_groups, keys)
        self.evicted_groups = 0  # groups flushed early to stay within max_groups
        self.folded = 0  # events folded into a group (by weight; not returned at once)
        self.summaries = 0  # summary records returned

    def _configure(self, window: float, max_groups: int, keys: Mapping[str, Sequence[str]]) -> None:
        if not window > 0:
            raise ValueError(f"window must be > 0, got {window!r}")
        if max_groups < 1:
            raise ValueError(f"max_groups must be >= 1, got {max_groups!r}")
        self._window = float(window)
        self._max_groups = max_groups
        self._keys = {kind: tuple(fields) for kind, fields in keys.items()}
        self._plans = {kind: _plan(f) for kind, f in self._keys.items()}
        self._reset_deadline()

    # -- state ----------------------------------------------------------------------------
    def __len__(self) -> int:
        """Groups currently open."""
        return len(self._groups)

    @property
    def pending(self) -> int:
        """Events folded into open groups, not yet returned in a summary."""
        return sum(g.count for g in self._groups.values())

    def next_deadline(self) -> float | None:
        """Clock time at which the oldest open group's window ends (None: no group)."""
        return None if self._deadline == inf else self._deadline

    # -- events ---------------------------------------------------------------------------
    def add(self, event: dict[str, Any], proc: Mapping[str, Any] | None) -> list[dict[str, Any]]:
        """Take one event; return the records to send now (maybe none, maybe several).

        Groups whose window has ended are flushed first, so their summaries come before
        this event's first occurrence when it starts a new group.
        """
        kind = event.get("kind")
        plan = self._plans.get(kind) if isinstance(kind, str) else None
        if plan is None or not isinstance(kind, str):
            return [event]
        weight = 1
        if event.get("aggregated") is True:
            event, weight = _weighed(event)
        now = self._clock()
        out = self._expire(now) if now >= self._deadline else []
        rules = event.get("matched_rules")
        key: list[Any] = [kind, rules if rules is None else _freeze(rules),
                          event.get("alert") is True]  # fmt: skip
        for field, get in plan:
            v = event.get(field, _ABSENT) if get is None else get(event, proc)
            key.append(v if type(v) is str else _freeze(v))
        groups = self._groups
        g = groups.get(tuple(key))
        if g is not None:
            t = event.get("time")
            first = last = t
            if weight != 1 or "first_seen" in event:
                first, last = event.get("first_seen", t), event.get("last_seen", t)
            if g.count == 0:
                g.first_seen, g.last_seen = first, last
            else:  # min and max (values that are not ints: the first and the last)
                if _is_int(first) and _is_int(g.first_seen) and first < g.first_seen:
                    g.first_seen = first
                if not (_is_int(last) and _is_int(g.last_seen) and last < g.last_seen):
                    g.last_seen = last
            g.count += weight
            g.last = event
            self.folded += weight
            return out
        if len(groups) >= self._max_groups:
            out.extend(self._evict(len(groups) - self._max_groups + 1))
        if not groups:
            self._deadline = now + self._window
        groups[tuple(key)] = _Group(kind, now)
        out.append(event)
        return out

    def flush(self, now: float | None = None, force: bool = False) -> list[dict[str, Any]]:
        """Summaries of the groups whose window has ended at ``now`` (default: the clock),
        or of every group with ``force``; those groups are forgotten."""
        if force:
            out = []
            for g in self._groups.values():
                rec = _summary(g)
                if rec is not None:
                    out.append(rec)
            self._groups.clear()
            self._deadline = inf
            self.summaries += len(out)
            return out
        return self._expire(self._clock() if now is None else now)

    def reconfigure(
        self, window: float, max_groups: int, keys: Mapping[str, Sequence[str]]
    ) -> list[dict[str, Any]]:
        """Apply new settings; return the summaries of the groups this ends.

        Groups of a kind whose key fields changed (or that is no longer aggregated) are
        flushed now; the others are kept, their windows now ``window`` long from their
        first occurrence. A lower ``max_groups`` evicts the oldest groups down to it.
        """
        old = self._keys
        self._configure(window, max_groups, keys)
        changed = {k for k in old.keys() | self._keys.keys() if old.get(k) != self._keys.get(k)}
        out: list[dict[str, Any]] = []
        if changed:
            for key in [k for k, g in self._groups.items() if g.kind in changed]:
                rec = _summary(self._groups.pop(key))
                if rec is not None:
                    out.append(rec)
            self.summaries += len(out)
            self._reset_deadline()
        if len(self._groups) > self._max_groups:
            out.extend(self._evict(len(self._groups) - self._max_groups))
        return out

    # -- internals ------------------------------------------------------------------------
    def _reset_deadline(self) -> None:
        for g in self._groups.values():
            self._deadline = g.start + self._window
            return
        self._deadline = inf

    def _expire(self, now: float) -> list[dict[str, Any]]:
        out = []
        groups, window = self._groups, self._window
        while groups:
            g = next(iter(groups.values()))
            if g.start + window > now:
                break
            groups.popitem(last=False)
            rec = _summary(g)
            if rec is not None:
                out.append(rec)
        self.summaries += len(out)
        self._reset_deadline()
        return out

    def _evict(self, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            _, g = self._groups.popitem(last=False)
            self.evicted_groups += 1
            rec = _summary(g)
            if rec is not None:
                out.append(rec)
        self.summaries += len(out)
        self._reset_deadline()
        return out
