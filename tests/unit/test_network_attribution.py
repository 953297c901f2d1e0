"""Joining traced connects to flows when the records and the packets come by two channels:
a flow attributed before the core's CONNECT record was read is claimed by it (wrapper
mode), oldest first, within a bounded window. Hand-built frames; no packet is sent
(capture = procfs)."""

from __future__ import annotations

import time

from lw_embed.config import config_from_dict
from lw_embed.pipeline.enrich import ProcessTable
from lw_embed.records import R
from lw_embed.sources.base import SourceContext
from lw_embed.sources.netjoin import CLAIM_WINDOW
from lw_embed.sources.packets import NetworkSource
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


def test_connect_records_read_after_their_flows_claim_them_in_order() -> None:
    src, clock = source()
    t0 = 1_700_000_000 * S
    syn(src, 40001, t0 + 10)
    syn(src, 40002, t0 + 20)
    src._attribute_new(clock.t)  # no record yet: unknown (the inode lookup found nothing)
    assert who(src) == {40001: ("unknown", None), 40002: ("unknown", None)}
    clock.t += 0.05
    src.observe(connect(7, t0 + 5))  # the records come later, by the other channel
    src.observe(connect(8, t0 + 15))
    assert who(src) == {40001: ("syscall", 7), 40002: ("syscall", 8)}
    assert src.counts.get("network.connect_late") == 2
    assert not src.connects.pending.get((B, 80)), "a record that claimed its flow is used up"
    syn(src, 40003, t0 + 40)  # the usual order still works: record first, then the flow
    src.observe(connect(9, t0 + 30))
    src._attribute_new(clock.t)
    assert who(src)[40003] == ("syscall", 9)


def test_a_record_past_the_claim_window_is_kept_for_a_later_flow() -> None:
    src, clock = source()
    t0 = 1_700_000_000 * S
    syn(src, 40001, t0 + 10)  # not from a traced process
    src._attribute_new(clock.t)
    clock.t += CLAIM_WINDOW + 0.1
    src.observe(connect(7, t0 + 5))  # would fit 40001's start, but comes too late
    assert who(src)[40001] == ("unknown", None) and src.connects.claimable == 0
    syn(src, 40002, t0 + 20)
    src._attribute_new(clock.t)
    assert who(src)[40002] == ("syscall", 7)


def test_without_the_tracer_no_flow_is_held() -> None:
    src, clock = source(mode="sidecar")
    t0 = 1_700_000_000 * S
    syn(src, 40001, t0 + 10)
    src._attribute_new(clock.t)
    assert who(src)[40001][0] == "unknown" and src.connects.claimable == 0
