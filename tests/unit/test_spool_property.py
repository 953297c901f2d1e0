"""Stateful property test of the spool: nothing is ever silently gone.

The model knows every appended seq and what the test did with it. After every step the
counters must satisfy accepted == delivered + pending + sum(dropped); ``check_drain``
leases everything and checks that each appended event is delivered (acked by the test),
dropped by the test, pending, or one of exactly as many records as the spool says it
dropped itself (evicted / corrupt / missing). A small max_bytes forces eviction; crashes
lose exactly what was not synced; damage is done to a synced spool while it is stopped.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import cbor2
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lw_embed.spool import CORRUPT, EVICTED, MISSING, Spool, SpoolItem, priority_of

KINDS = ["net.flow", "file.change", "process.exec", "process.exit", "agent.status"]
BIG = 1 << 30


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _records(path: Path) -> list[tuple[int, int]]:
    data = path.read_bytes()
    out, off = [], 0
    while off + 8 <= len(data):
        (length,) = struct.unpack_from("<I", data, off)
        if off + 8 + length > len(data):
            break
        out.append((off, off + 8 + length))
        off += 8 + length
    return out


class SpoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="spool-prop-"))
        self.clock = Clock()
        self.spool = self._open()
        self.n = 0
        self.max_seq = 0
        self.events: dict[int, dict[str, Any]] = {}
        self.alive: set[int] = set()  # pending as far as the test knows
        self.leased: set[int] = set()
        self.done_volatile: set[int] = set()  # acked/dropped by the test since the last sync
        self.done_durable: set[int] = set()
        self.lost: set[int] = set()  # found gone: must be counted by the spool

    def _open(self) -> Spool:
        s = Spool(
            str(self.dir), max_bytes=2500, segment_bytes=500, sync_interval=0.1, clock=self.clock
        )
        s.open()
        return s

    def teardown(self) -> None:
        self.spool.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _synced(self) -> None:
        self.done_durable |= self.done_volatile
        self.done_volatile.clear()

    # --- rules --------------------------------------------------------------------------

    @rule(
        burst=st.lists(
            st.tuples(st.sampled_from(KINDS), st.integers(0, 150), st.booleans()),
            min_size=1,
            max_size=12,
        )
    )
    def append(self, burst: list[tuple[str, int, bool]]) -> None:
        for kind, pad, alert in burst:
            self.n += 1
            event: dict[str, Any] = {"kind": kind, "n": self.n, "pad": "y" * pad}
            if alert:
                event["alert"] = True
            seq = self.spool.append(event)
            if seq is not None:
                assert seq > self.max_seq
                self.max_seq = seq
                self.events[seq] = event
                self.alive.add(seq)

    @rule(n=st.integers(1, 10), budget=st.integers(1, 1500))
    def lease(self, n: int, budget: int) -> None:
        items = self.spool.lease(n, budget)
        assert len(items) <= n
        if len(items) > 1:
            assert sum(len(it.data) for it in items) <= budget
        self._check_items(items)
        for it in items:
            if it.seq in self.lost:  # came back: its eviction was not synced before a crash
                self.lost.discard(it.seq)
            else:
                assert it.seq in self.alive
                self.alive.discard(it.seq)
            self.leased.add(it.seq)

    def _check_items(self, items: list[SpoolItem]) -> None:
        got = [it.seq for it in items]
        assert len(set(got)) == len(got)
        assert not set(got) & (self.leased | self.done_volatile | self.done_durable)
        keys = [(-it.priority, it.seq) for it in items]
        assert keys == sorted(keys)
        for it in items:
            event = self.events[it.seq]
            assert it.priority == priority_of(event)
            assert it.data == cbor2.dumps(dict(sorted({**event, "seq": it.seq}.items())))

    def _some_leased(self, data: st.DataObject) -> set[int]:
        return data.draw(st.sets(st.sampled_from(sorted(self.leased)), max_size=8))

    @precondition(lambda self: self.leased)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        chosen = self._some_leased(data)
        self.spool.ack(chosen)
        self.leased -= chosen
        self.done_volatile |= chosen

    @precondition(lambda self: self.leased)
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        chosen = self._some_leased(data)
        self.spool.drop(chosen, "http_400")
        self.leased -= chosen
        self.done_volatile |= chosen

    @precondition(lambda self: self.leased)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        chosen = self._some_leased(data)
        self.spool.release(chosen)
        self.leased -= chosen
        self.alive |= chosen

    @rule()
    def sync(self) -> None:
        self.spool.sync()
        self._synced()

    @rule()
    def tick(self) -> None:
        self.clock.t += 0.25  # exact in binary: no rounding below sync_interval
        self.spool.maybe_sync()
        self._synced()

    @rule()
    def crash_reopen(self) -> None:
        self.spool._simulate_crash()
        self.spool = self._open()
        # not synced: the acks and drops are forgotten, the items are pending again
        self.alive |= self.leased | self.done_volatile
        self.leased.clear()
        self.done_volatile.clear()
        assert self.spool.next_seq > self.max_seq

    @rule()
    def close_reopen(self) -> None:
        self.spool.close()
        self._synced()
        self.spool = self._open()
        self.alive |= self.leased
        self.leased.clear()
        assert self.spool.next_seq > self.max_seq

    @rule(data=st.data(), how=st.sampled_from(["truncate", "flip", "delete"]))
    def damage_while_stopped(self, data: st.DataObject, how: str) -> None:
        self.spool.sync()
        self._synced()
        self.spool._simulate_crash()
        self.alive |= self.leased
        self.leased.clear()
        files = sorted(self.dir.glob("p*-*.seg"))
        if files:
            path = data.draw(st.sampled_from(files))
            raw = bytearray(path.read_bytes())
            if how == "delete" or not raw:
                path.unlink()
            elif how == "truncate":
                path.write_bytes(bytes(raw[: data.draw(st.integers(0, len(raw) - 1))]))
            else:
                off, end = data.draw(st.sampled_from(_records(path)))
                at = data.draw(st.integers(off + 16, end - 1))  # inside the CBOR
                raw[at] ^= 1 << data.draw(st.integers(0, 7))
                path.write_bytes(bytes(raw))
        self.spool = self._open()

    @rule()
    def check_drain(self) -> None:
        items = self.spool.lease(BIG, BIG)
        self._check_items(items)
        found = {it.seq for it in items}
        stats = self.spool.stats()
        assert stats.pending == len(found) + len(self.leased)
        back = found & self.lost
        assert found <= self.alive | back
        self.lost -= back
        self.alive |= back
        gone = self.alive - found
        self.alive -= gone
        self.lost |= gone
        spool_lost = sum(stats.dropped.get(r, 0) for r in (EVICTED, CORRUPT, MISSING))
        for reason in sorted(stats.dropped):
            event(f"drain after {reason}")
        assert len(self.lost) == spool_lost, (sorted(self.lost), stats.dropped)
        self.spool.release(sorted(found))

    @invariant()
    def counters_balance(self) -> None:
        st_ = self.spool.stats()
        assert st_.accepted == st_.delivered + st_.pending + sum(st_.dropped.values())
        assert st_.pending >= len(self.leased)
        assert all(v > 0 for v in st_.dropped.values())


SpoolMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSpool = SpoolMachine.TestCase
