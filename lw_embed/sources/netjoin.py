"""Joining the tracer's ``connect`` records to flows (wrapper mode).

Interface: ``R.CONNECT`` records (pid, fd, peer address, at syscall entry) handed in by
:class:`lw_embed.sources.packets.NetworkSource` from the worker's record stream, and the
flows of its :class:`~lw_embed.pipeline.flows.FlowTable` (their attribution slot, ``f[12]``).
Records and packets reach the worker by two channels, so either may come first:

- the record first (the usual case): it waits, per peer, for the flow that starts just
  after it (:meth:`ConnectJoin.match`, oldest record first);
- the flow first: the flow is attributed otherwise (its socket inode, else ``unknown``) at
  once, and kept claimable for :data:`CLAIM_WINDOW` s (:meth:`ConnectJoin.hold`); a
  record read meanwhile makes it ``syscall`` (:meth:`ConnectJoin.record`), oldest flow
  first.

Capability: none (what the tracer sent). Cost: a dict lookup and a short deque walk per
record and per new flow. Failure modes: bounded: at most :data:`CONNECT_PENDING_MAX`
peers with waiting records (oldest peer dropped), 4096 records per peer and
:data:`CLAIMS_MAX` claimable flows; records dropped unmatched are counted
(``network.connect_unmatched``), claims skipped too (``network.claims_skipped``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

#: how long before a flow's start its connect may have been called
CONNECT_WINDOW = 5_000_000_000
#: a record this much later than a flow's start is a later call's
LATER = 50_000_000
CONNECT_PENDING_MAX = 4096
PER_PEER_MAX = 4096
#: how long (monotonic s) a flow no record explained yet may still be claimed by one
CLAIM_WINDOW = 1.0
CLAIMS_MAX = 10000

Who = tuple[int, str | None, str | None]  # pid, exec_id, exe
Peer = tuple[Any, int]  # the flow table's address form, port


class ConnectJoin:
    __slots__ = ("_n", "_unclaimed", "claims", "count", "pending")

    def __init__(self, count: Callable[[str], None], claims: bool) -> None:
        self.count = count
        self.claims = claims  # wrapper mode with connect tracing: flows may be claimed
        self.pending: dict[Peer, deque[tuple[int, Who]]] = {}
        self._unclaimed: dict[Peer, deque[tuple[int, Any, float]]] = {}  # (start, key, until)
        self._n = 0

    @property
    def claimable(self) -> int:
        return self._n

    def record(self, peer: Peer, t: int, who: Who, flows: dict[Any, list[Any]],
               mono: float) -> None:  # fmt: skip
        """One CONNECT record (wall time ``t``): it claims a flow already seen, else it
        waits for its flow."""
        if self._unclaimed and self._claim(peer, t, who, flows, mono):
            return
        q = self.pending.setdefault(peer, deque())
        q.append((t, who))
        while len(q) > PER_PEER_MAX:
            q.popleft()
            self.count("network.connect_unmatched")
        if len(self.pending) > CONNECT_PENDING_MAX:
            self.pending.pop(next(iter(self.pending)))

    def match(self, peer: Peer, start: int) -> Who | None:
        """The traced caller of the flow to ``peer`` that started at ``start``: the oldest
        waiting record from just before it (records older than the window are dropped)."""
        q = self.pending.get(peer)
        while q:
            t, who = q[0]
            if t > start + LATER:  # a later call: not this flow's
                return None
            q.popleft()
            if start - t <= CONNECT_WINDOW:
                return who
            self.count("network.connect_unmatched")
        return None

    def hold(self, key: Any, peer: Peer, start: int, mono: float) -> None:
        """Keep a flow that no record explained claimable (its other lookups go on)."""
        if not self.claims:
            return
        if self._n >= CLAIMS_MAX:
            self.count("network.claims_skipped")
            return
        self._unclaimed.setdefault(peer, deque()).append((start, key, mono + CLAIM_WINDOW))
        self._n += 1

    def _claim(self, peer: Peer, t: int, who: Who, flows: dict[Any, list[Any]],
               mono: float) -> bool:  # fmt: skip
        q = self._unclaimed.get(peer)
        if not q:
            return False
        self._expire(q, mono)
        found = False
        while not found:
            idx = next((i for i, (start, _k, _u) in enumerate(q)
                        if t <= start + LATER and start - t <= CONNECT_WINDOW), None)
            if idx is None:
                break
            _start, key, _until = q[idx]
            del q[idx]
            self._n -= 1
            f = flows.get(key)
            if f is not None and f[12] is not None and f[12][0] != "syscall":
                f[12] = ["syscall", *who, f[12][4]]
                self.count("network.connect_late")
                found = True
        if not q:
            del self._unclaimed[peer]
        return found

    def _expire(self, q: deque[tuple[int, Any, float]], mono: float) -> None:
        while q and q[0][2] < mono:
            q.popleft()
            self._n -= 1

    def sweep(self, mono: float, wall: int) -> None:
        """Forget claims past their window and peers whose last record is a minute old."""
        for peer in list(self._unclaimed):
            q = self._unclaimed[peer]
            self._expire(q, mono)
            if not q:
                del self._unclaimed[peer]
        for peer in [p for p, q in self.pending.items() if q and wall - q[-1][0] > 60e9]:
            del self.pending[peer]
