"""Joining traced connects to flows when the records and the packets come by two channels:
a flow seen before the core's CONNECT record waits for it (wrapper mode), in order, and
only for a bounded time. Hand-built frames; no packet is sent (capture = procfs)."""

from __future__ import annotations

import time

from lw_embed.config import config_from_dict
from lw_embed.pipeline.enrich import ProcessTable
from lw_embed.records import R
from lw_embed.sources.base import SourceContext
from lw_embed.sources.packets import CONNECT_WAIT, NetworkSource
from tests.unit.test_packet_parse import A, B, ip4, tcp

S = 1_000_000_000


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def mono(self) -> float:
        return self.t


def source(mode: str = "wrapper") -> tuple[NetworkSource, Clock]:
    cfg = config_from_dict({"network": {"capture": "procfs", "dns": False}})
    clock = Clock()
    ctx = SourceContext(cfg, mode, "tree", ProcessTable("b", 1, 0, 8), "/proc", "/nonexistent",
                        1, time.time_ns, clock.mono)  # fmt: skip
    return NetworkSource(cfg.network, ctx), clock


def syn(src: NetworkSource, sport: int, ts: int) -> None:
    frame = ip4(6, tcp(sport, 80, 2), A, B)
    src.table.ingest_frame(frame, 0, len(frame), len(frame), ts)


def connect(pid: int, t: int) -> list[object]:
    return [R.CONNECT, t, pid, pid, 3, "inet", "10.0.0.2", 80]


def who(src: NetworkSource) -> dict[int, tuple[str, int | None]]:
    """source port -> (attribution, pid) of the flows attributed so far."""
    return {k[2]: (f[12][0], f[12][1]) for k, f in src.table.flows.items()
            if f[12] is not None}  # fmt: skip


def test_flows_seen_before_their_connect_records_wait_and_match_in_order() -> None:
    src, clock = source()
    t0 = 1_700_000_000 * S
    src.observe([R.EXIT, t0, 99, 0, 0, False, 0])  # the record stream is at t0
    syn(src, 40001, t0 + 10)
    src._attribute_new(clock.t)
    syn(src, 40002, t0 + 20)
    clock.t += 0.05
    src._attribute_new(clock.t)
    assert who(src) == {}, "both wait for records past their start"
    for rec in (connect(7, t0 + 5), connect(8, t0 + 15), [R.EXIT, t0 + 30, 99, 0, 0, False, 0]):
        src.observe(rec)
    syn(src, 40003, t0 + 25)  # a newer flow arrives in the same poll as the records
    src.observe(connect(9, t0 + 22))
    src.observe([R.EXIT, t0 + 40, 99, 0, 0, False, 0])
    clock.t += 0.01
    src._attribute_new(clock.t)
    assert who(src) == {40001: ("syscall", 7), 40002: ("syscall", 8), 40003: ("syscall", 9)}


def test_the_wait_is_bounded_then_the_flow_is_unknown_and_counted() -> None:
    src, clock = source()
    t0 = 1_700_000_000 * S
    src.observe([R.EXIT, t0, 99, 0, 0, False, 0])
    syn(src, 40001, t0 + 10)  # not from a traced process: no CONNECT ever comes
    src._attribute_new(clock.t)
    assert who(src) == {}
    list(src.poll(clock.t))
    due = src.next_due()
    clock.t += 0.03
    assert due is not None and src.next_due() == due <= clock.t  # comes due: a fixed time
    clock.t += CONNECT_WAIT
    src._attribute_new(clock.t)
    assert who(src)[40001][0] == "unknown"
    assert src.counts.get("network.connect_wait_expired") == 1


def test_without_the_tracer_nothing_waits() -> None:
    src, clock = source(mode="sidecar")
    t0 = 1_700_000_000 * S
    src.observe([R.EXIT, t0, 99, 0, 0, False, 0])
    syn(src, 40001, t0 + 10)
    src._attribute_new(clock.t)
    assert who(src)[40001][0] == "unknown"  # decided at once (the inode lookup found none)
