"""The shipper against a real spool and a scripted sink: what leaves the spool, and how."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import cbor2
import pytest

from lw_embed.codec import AgentIdentity, decode_batch
from lw_embed.runtime.shipper import Shipper, ShipperLimits
from lw_embed.sinks.http import SendResult
from lw_embed.spool import Spool

Script = Callable[[dict[str, object]], SendResult]


class ScriptedSink:
    """Answers each batch with ``script(decoded batch)``; records what it got."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.batches: list[dict[str, object]] = []
        self.keys: list[str] = []

    async def deliver(self, batch: bytes, *, key: str, seq_first: int, events: int,
                      stop: asyncio.Event) -> SendResult:  # fmt: skip
        decoded = decode_batch(batch)
        self.batches.append(decoded)
        self.keys.append(key)
        return self.script(decoded)

    async def close(self) -> None:
        return None


def ok(_b: dict[str, object]) -> SendResult:
    return SendResult("delivered", 200, "http_200", 1, 0.0)


def spool_with(tmp: Path, n: int) -> Spool:
    sp = Spool(str(tmp / "spool"), max_bytes=1 << 24, segment_bytes=1 << 20, sync_interval=0.1)
    sp.open()
    for i in range(n):
        sp.append({"exec_id": f"{i:016x}", "kind": "process.exec", "time": i})
    return sp


def ship_all(sp: Spool, sink: ScriptedSink, tmp: Path, max_events: int = 100,
             until: Callable[[], bool] | None = None, drain: float = 5.0) -> Shipper:  # fmt: skip
    """Run a shipper; wait (bounded) for ``until`` in normal operation, then drain."""
    sh = Shipper(sp, sink, AgentIdentity("inst", "0", "wrapper"),
                 ShipperLimits(max_events, 1 << 20, 0.05),
                 resource=lambda: {"boot_id": "b"},
                 processes=lambda ids: [{"exec_id": e, "pid": 1} for e in ids[:1]],
                 loss=lambda: {"core.buffer_full": 2},
                 deadletter_dir=str(tmp / "deadletter"))  # fmt: skip
    sh.start()
    end = time.monotonic() + 10.0
    while until is not None and not until() and time.monotonic() < end:
        time.sleep(0.02)
    sh.drain(time.monotonic() + drain)
    return sh


def events(sink: ScriptedSink) -> list[int]:
    return sorted(e["seq"] for b in sink.batches for e in b["events"])  # type: ignore[attr-defined,index]


def test_delivered_batches_are_acked_with_a_well_formed_batch(tmp_path: Path) -> None:
    sp = spool_with(tmp_path, 250)
    sink = ScriptedSink(ok)
    ship_all(sp, sink, tmp_path)
    st = sp.stats()
    assert st.delivered == 250 and st.pending == 0
    assert [len(b["events"]) for b in sink.batches] == [100, 100, 50]  # type: ignore[arg-type]
    b = sink.batches[0]
    assert b["loss"] == {"core.buffer_full": 2} and b["resource"] == {"boot_id": "b"}
    assert b["processes"] == [{"exec_id": "0000000000000000", "pid": 1}]
    first, last = b["seq"]  # type: ignore[misc]
    assert sink.keys[0] == f"inst:{first}-{last}"


def test_413_splits_until_it_fits_and_a_lone_giant_is_dropped(tmp_path: Path) -> None:
    sp = spool_with(tmp_path, 8)
    giant = sp.append({"kind": "process.exec", "time": 99, "argv": ["x" * 1000]})

    def script(b: dict[str, object]) -> SendResult:
        evs = b["events"]
        assert isinstance(evs, list)
        if len(evs) > 2 or any(e.get("argv") for e in evs):
            return SendResult("too_large", 413, "http_413", 1, 0.0)
        return ok(b)

    sink = ScriptedSink(script)
    ship_all(sp, sink, tmp_path)
    st = sp.stats()
    assert st.pending == 0 and st.delivered == 8 and st.dropped == {"too_large": 1}
    delivered = [e["seq"] for b in sink.batches if len(b["events"]) <= 2  # type: ignore[arg-type]
                 for e in b["events"] if not e.get("argv")]  # type: ignore[attr-defined]
    assert giant not in delivered and len(set(delivered)) == 8


def test_rejected_batches_are_dead_lettered_with_their_reason(tmp_path: Path) -> None:
    sp = spool_with(tmp_path, 5)
    sink = ScriptedSink(lambda b: SendResult("rejected", 401, "http_401", 1, 0.0))
    ship_all(sp, sink, tmp_path)
    st = sp.stats()
    assert st.delivered == 0 and st.pending == 0 and st.dropped == {"http_401": 5}
    kept = os.listdir(tmp_path / "deadletter")
    assert len(kept) == 1
    data = (tmp_path / "deadletter" / kept[0]).read_bytes()
    assert len(decode_batch(data)["events"]) == 5


class Unreachable(ScriptedSink):
    """A backend that never answers: the send ends only when the shipper stops it."""

    async def deliver(self, batch: bytes, *, key: str, seq_first: int, events: int,
                      stop: asyncio.Event) -> SendResult:  # fmt: skip
        self.batches.append(decode_batch(batch))
        await stop.wait()
        return SendResult("stopped", None, "stopped", 1, 0.0)


def test_a_send_stopped_at_the_deadline_goes_back_to_the_spool(tmp_path: Path) -> None:
    sp = spool_with(tmp_path, 5)
    sink = Unreachable(ok)
    t = time.monotonic()
    ship_all(sp, sink, tmp_path, drain=0.5)
    assert time.monotonic() - t < 3.0  # the deadline holds even with a send in flight
    assert len(sink.batches) == 1
    st = sp.stats()
    assert st.delivered == 0 and st.pending == 5 and not st.dropped
    again = sp.lease(10, 1 << 20)
    assert len(again) == 5  # released, not stranded


def test_a_sink_that_raises_never_strands_a_lease(tmp_path: Path) -> None:
    sp = spool_with(tmp_path, 3)
    calls = []

    def boom(b: dict[str, object]) -> SendResult:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("sink bug")
        return ok(b)

    sink = ScriptedSink(boom)
    ship_all(sp, sink, tmp_path, until=lambda: sp.stats().delivered == 3)
    assert sp.stats().delivered == 3  # the second attempt shipped what the first leased
    assert len(calls) == 2


@pytest.mark.parametrize("n", [0, 1])
def test_drain_returns_promptly_when_there_is_little_to_ship(tmp_path: Path, n: int) -> None:
    sp = spool_with(tmp_path, n)
    t = time.monotonic()
    ship_all(sp, ScriptedSink(ok), tmp_path)
    assert time.monotonic() - t < 3.0
    assert sp.stats().pending == 0


def test_events_keep_their_exact_bytes(tmp_path: Path) -> None:
    sp = spool_with(tmp_path, 3)
    raw = [i.data for i in sp.lease(10, 1 << 20)]
    sp.release([cbor2.loads(r)["seq"] for r in raw])
    sink = ScriptedSink(ok)
    ship_all(sp, sink, tmp_path)
    assert [cbor2.dumps(e) for e in sink.batches[0]["events"]] == raw  # type: ignore[attr-defined]


def test_a_trickle_goes_out_as_one_partial_batch_per_max_age(tmp_path: Path) -> None:
    """Events appended one by one (as a steady workload makes them) are not shipped as a
    tail of tiny batches: at most one partial batch per max_age, a full one at once."""
    sp = spool_with(tmp_path, 0)
    sink = ScriptedSink(ok)
    sh = Shipper(sp, sink, AgentIdentity("inst", "0", "wrapper"),
                 ShipperLimits(1000, 1 << 20, 0.5),
                 resource=dict, processes=lambda ids: [], loss=dict)  # fmt: skip
    sh.start()
    t0 = time.monotonic()
    for i in range(60):  # about 1.2 s of one event every 20 ms
        sp.append({"kind": "process.exec", "time": i})
        sh.notify()  # the worker's wake-up after an append must not force a batch
        time.sleep(0.02)
    elapsed = time.monotonic() - t0
    sh.drain(time.monotonic() + 5)
    assert sp.stats().delivered == 60
    # one batch per 0.5 s of trickle (plus the first and the drain), never one per event
    assert len(sink.batches) <= elapsed / 0.5 + 2, [len(b["events"]) for b in sink.batches]  # type: ignore[arg-type]
