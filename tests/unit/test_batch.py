"""Batcher: sequence numbers, count/size/age bounds, process records once per batch."""

from __future__ import annotations

from typing import Any

import pytest

from lw_embed.codec import AgentIdentity, decode_batch, encode_batch
from lw_embed.pipeline.batch import BATCH_OVERHEAD, Batcher, encoded_size


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ev(i: int, exec_id: str | None = None) -> dict[str, Any]:
    e: dict[str, Any] = {"kind": "test.event", "n": i, "time": 1000 + i}
    if exec_id is not None:
        e["exec_id"] = exec_id
    return e


def proc(exec_id: str, exe: str = "/bin/sh") -> dict[str, Any]:
    return {"argv": [exe], "exe": exe, "exec_id": exec_id, "pid": 1, "ppid": 0, "start_time": 5}


def test_sequence_numbers_start_at_given_value_and_stay_monotonic() -> None:
    b = Batcher(10, 1 << 20, 1.0, seq_start=41, clock=Clock())
    assert b.take() is None
    assert [b.add(ev(i)) for i in range(3)] == [41, 42, 43]
    batch = b.take()
    assert batch is not None
    assert (batch.seq_first, batch.seq_last, len(batch)) == (41, 43, 3)
    assert b.take() is None and len(b) == 0
    assert b.add(ev(9)) == 44
    nxt = b.take()
    assert nxt is not None and (nxt.seq_first, nxt.seq_last) == (44, 44)
    assert b.next_seq == 45


def test_due_by_count() -> None:
    b = Batcher(3, 1 << 20, 60.0, clock=Clock())
    b.add(ev(0))
    b.add(ev(1))
    assert not b.full() and not b.due()
    b.add(ev(2))
    assert b.full() and b.due()


def test_due_by_size_estimate() -> None:
    b = Batcher(1000, 1024, 60.0, clock=Clock())
    big = {"kind": "test.big", "blob": "x" * 300, "time": 1}
    b.add(big)
    assert b.pending_bytes == BATCH_OVERHEAD + encoded_size(big)
    assert not b.due()
    b.add(big)
    b.add(big)
    assert b.due()
    # one event larger than the bound is a batch on its own
    b.take()
    b.add({"kind": "test.huge", "blob": "y" * 5000, "time": 2})
    assert b.full()


def test_due_by_age_with_injected_clock() -> None:
    clock = Clock()
    b = Batcher(1000, 1 << 20, 1.0, clock=clock)
    assert b.deadline() is None and not b.due()
    b.add(ev(0))
    assert b.deadline() == 101.0
    clock.now = 100.5
    b.add(ev(1))
    assert b.deadline() == 101.0  # the oldest event sets the deadline
    assert not b.due()
    clock.now = 101.0
    assert b.due()
    b.take()
    assert b.deadline() is None
    clock.now = 200.0
    b.add(ev(2))
    assert b.deadline() == 201.0


def test_processes_referenced_once_newest_record_kept() -> None:
    b = Batcher(100, 1 << 20, 1.0, clock=Clock())
    b.add(ev(0, "a"), proc("a", "/bin/sh"))
    b.add(ev(1, "b"), proc("b"))
    size = b.pending_bytes
    b.add(ev(2, "a"), proc("a", "/bin/ls"))  # re-exec: one record, the newest
    assert b.pending_bytes == size + encoded_size(ev(2, "a"))
    b.add(ev(3))  # no process
    b.add(ev(4, "c"), {"no": "exec_id"})  # not a process record: ignored
    batch = b.take()
    assert batch is not None
    assert [p["exec_id"] for p in batch.processes] == ["a", "b"]
    assert batch.processes[0]["exe"] == "/bin/ls"
    assert [e["n"] for e in batch.events] == [0, 1, 2, 3, 4]
    b.add(ev(5, "a"), proc("a"))
    nxt = b.take()
    assert nxt is not None and [p["exec_id"] for p in nxt.processes] == ["a"]


def test_batch_encodes_with_codec() -> None:
    b = Batcher(100, 1 << 20, 1.0, seq_start=7, clock=Clock())
    b.add(ev(0, "a"), proc("a"))
    b.add(ev(1))
    batch = b.take()
    assert batch is not None
    data = encode_batch(
        AgentIdentity("inst", "0.1.0", "wrapper"), {}, batch.seq_first, batch.seq_last,
        batch.processes, batch.events, {},
    )  # fmt: skip
    out = decode_batch(data)
    assert out["seq"] == [7, 8] and out["events"] == batch.events
    assert out["processes"] == batch.processes
    assert len(data) <= BATCH_OVERHEAD + sum(encoded_size(e) for e in batch.events) + sum(
        encoded_size(p) for p in batch.processes
    )


@pytest.mark.parametrize(
    "args", [(0, 10, 1.0, 0), (10, 0, 1.0, 0), (10, 10, 0.0, 0), (10, 10, 1.0, -1)]
)
def test_bad_bounds(args: tuple[int, int, float, int]) -> None:
    with pytest.raises(ValueError):
        Batcher(*args)
