"""The flow table with hand-built frames and an injected clock: direction, conn_state,
timeouts, interim deltas, the max_flows bound and its memory."""

from __future__ import annotations

import resource
import struct

from lw_embed.pipeline.flows import FlowRecord, FlowTable
from tests.unit.test_packet_parse import A, B, ip4, tcp, udp

S = 1_000_000_000
T0 = 1_700_000_000 * S
SYN, ACK, FIN, RST, PSH = 2, 16, 1, 4, 8


def pkt(t: FlowTable, frame: bytes, ts: int) -> None:
    t.ingest_frame(frame, 0, len(frame), len(frame), ts)


def c2s(flags: int, payload: bytes = b"") -> bytes:  # client A:40000 -> server B:80
    return ip4(6, tcp(40000, 80, flags, payload), A, B)


def s2c(flags: int, payload: bytes = b"") -> bytes:
    return ip4(6, tcp(80, 40000, flags, payload), B, A)


def final(t: FlowTable, now: int) -> FlowRecord:
    (r,) = t.expire(now, force=True)
    return r


def test_direction_from_syn_and_a_completed_connection_is_sf() -> None:
    t = FlowTable()
    for i, fr in enumerate([c2s(SYN), s2c(SYN | ACK), c2s(ACK), c2s(PSH | ACK, b"GET /"),
                            s2c(PSH | ACK, b"200 OK here"), c2s(FIN | ACK), s2c(FIN | ACK),
                            c2s(ACK)]):  # fmt: skip
        pkt(t, fr, T0 + i)
    r = final(t, T0 + 10)
    assert r.key == (6, A, 40000, B, 80) and r.direction == "syn"
    assert (r.orig_pkts, r.orig_bytes, r.resp_pkts, r.resp_bytes) == (5, 5, 3, 11)
    assert r.orig_ip_bytes == 5 * 40 + 5 and r.resp_ip_bytes == 3 * 40 + 11
    assert r.conn_state == "SF" and r.start == T0 and r.last == T0 + 7


def test_syn_ack_seen_first_makes_its_receiver_the_originator() -> None:
    t = FlowTable()
    pkt(t, s2c(SYN | ACK), T0)
    pkt(t, c2s(ACK), T0 + 1)
    r = final(t, T0 + 2)
    assert r.key[1:3] == (A, 40000) and r.direction == "syn"


def test_direction_from_a_listening_socket_when_no_syn_was_seen() -> None:
    t = FlowTable()
    t.is_listener = lambda proto, addr, port: (proto, addr, port) == (6, B, 80)
    pkt(t, s2c(PSH | ACK, b"mid-stream reply"), T0)  # the server's packet comes first
    pkt(t, c2s(ACK), T0 + 1)
    r = final(t, T0 + 2)
    assert r.key == (6, A, 40000, B, 80) and r.direction == "listen"
    assert (r.orig_pkts, r.resp_pkts, r.resp_bytes) == (1, 1, 16)
    t2 = FlowTable()  # no listener known: the first sender stays the originator
    pkt(t2, s2c(PSH | ACK, b"x"), T0)
    assert final(t2, T0 + 1).direction == "first_packet"


def test_rejected_half_open_and_reset_states() -> None:
    def state(frames: list[bytes]) -> str:
        t = FlowTable()
        for i, fr in enumerate(frames):
            pkt(t, fr, T0 + i)
        return final(t, T0 + 10).conn_state

    assert state([c2s(SYN), s2c(RST | ACK)]) == "REJ"
    assert state([c2s(SYN)]) == "S0"
    assert state([c2s(SYN), c2s(SYN)]) == "S0"
    assert state([c2s(SYN), s2c(SYN | ACK), c2s(ACK)]) == "S1"
    assert state([c2s(SYN), s2c(SYN | ACK), c2s(RST)]) == "RSTO"
    assert state([c2s(SYN), s2c(SYN | ACK), s2c(RST)]) == "RSTR"
    assert state([c2s(SYN), s2c(SYN | ACK), c2s(FIN | ACK)]) == "S2"
    assert state([c2s(ACK, b"no syn seen")]) == "OTH"


def test_udp_state_and_idle_timeouts_with_an_injected_clock() -> None:
    t = FlowTable(tcp_timeout=300, udp_timeout=60, close_timeout=5)
    pkt(t, ip4(17, udp(5000, 53), A, B), T0)
    pkt(t, ip4(17, udp(53, 5000), B, A), T0 + S)
    pkt(t, ip4(17, udp(5001, 9999), A, B), T0)
    pkt(t, c2s(SYN), T0)
    assert t.expire(T0 + 59 * S) == []
    # UDP idle 60 s, counted from the last packet (TCP: an interim record, not final)
    gone = {r.key[2]: r for r in t.expire(T0 + 60 * S + S // 2) if r.final}
    assert set(gone) == {5001}
    assert gone[5001].conn_state == "S0" and gone[5001].end_reason == "idle"
    gone = {r.key[2]: r for r in t.expire(T0 + 61 * S + S // 2)}
    assert set(gone) == {5000} and gone[5000].conn_state == "SF"
    assert all(not r.final for r in t.expire(T0 + 299 * S))
    (r,) = t.expire(T0 + 300 * S)  # TCP idle 300 s
    assert r.key[2] == 40000 and r.end_reason == "idle" and r.final and len(t) == 0


def test_closed_and_reset_flows_go_after_the_close_timeout() -> None:
    t = FlowTable(close_timeout=5)
    for i, fr in enumerate([c2s(SYN), s2c(SYN | ACK), c2s(FIN | ACK), s2c(FIN | ACK)]):
        pkt(t, fr, T0 + i)
    pkt(t, ip4(6, tcp(40001, 80, SYN), A, B), T0)
    pkt(t, ip4(6, tcp(80, 40001, RST | ACK), B, A), T0 + 1)
    assert t.expire(T0 + 4 * S) == []
    got = {r.key[2]: r.end_reason for r in t.expire(T0 + 6 * S)}
    assert got == {40000: "closed", 40001: "reset"}


def test_interim_records_are_deltas_that_sum_to_the_totals() -> None:
    t = FlowTable(active_timeout=60, tcp_timeout=300)
    pkt(t, c2s(SYN), T0)
    pkt(t, s2c(SYN | ACK), T0 + 1)
    recs: list[FlowRecord] = []
    sent = got = 0
    for minute in range(1, 4):
        for j in range(minute * 3):
            now = T0 + (minute - 1) * 60 * S + (j + 1) * S
            pkt(t, c2s(PSH | ACK, b"a" * (10 + j)), now)
            pkt(t, s2c(PSH | ACK, b"b" * 100), now)
            sent += 10 + j
            got += 100
        recs += t.expire(T0 + minute * 60 * S)
    assert [r.final for r in recs] == [False, False, False]
    pkt(t, c2s(FIN | ACK), T0 + 200 * S)
    recs += t.expire(T0 + 300 * S, force=True)
    assert [r.seq for r in recs] == [0, 1, 2, 3] and recs[-1].final
    assert sum(r.orig_bytes for r in recs) == sent
    assert sum(r.resp_bytes for r in recs) == got
    assert sum(r.orig_pkts for r in recs) == 1 + 18 + 1
    assert sum(r.resp_pkts for r in recs) == 1 + 18
    assert all(r.orig_bytes > 0 for r in recs[:3])  # each minute's own traffic


def test_max_flows_evicts_and_counts() -> None:
    t = FlowTable(max_flows=100)
    for i in range(1000):
        pkt(t, ip4(17, udp(1024 + i, 9999), A, B), T0 + i)
    assert len(t) < 100
    out = t.expire(T0 + 1000)
    assert t.evicted >= 900 and t.evicted == len(out) + t.evicted_lost
    assert {r.end_reason for r in out} == {"evicted"} and all(r.final for r in out)
    assert t.created == 0 and len(t.take_new()) == 1000  # created is counted on take


def _udp_block(n: int, first: int) -> bytes:
    """A V3-shaped run of ``n`` UDP frames, each from its own source address and port."""
    frame = ip4(17, udp(0, 9999), 0, B)
    step = 48 + 32
    buf = bytearray(step * n + 64)
    hdr = struct.Struct("=IIIIIIHH")
    for i in range(n):
        off = i * step
        hdr.pack_into(buf, off, step, T0 // S, i, len(frame), len(frame), 0, 48, 48)
        buf[off + 48 : off + 48 + len(frame)] = frame
        u = first + i
        struct.pack_into("!I", buf, off + 48 + 12, 0x0B000000 | (u >> 16))  # source addr
        struct.pack_into("!H", buf, off + 48 + 20, u & 0xFFFF)  # source port
    return bytes(buf)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_a_million_unique_tuples_stay_under_the_cap() -> None:
    max_flows = 20000
    t = FlowTable(max_flows=max_flows)
    per_block = 10000
    base = peak = _rss()
    for b in range(100):  # 1,000,000 unique tuples
        t.ingest_v3(memoryview(_udp_block(per_block, b * per_block)), 0, per_block)
        t.take_new()
        if b % 10 == 9:  # the source's sweep
            t.expire(T0)
        peak = max(peak, _rss())
    assert t.packets == 1_000_000 and t.malformed == 0
    assert len(t) < max_flows and t.evicted >= 1_000_000 - max_flows
    assert t.evicted_lost > 0  # a flood between two sweeps: counted, not kept
    # a flow is a 15-slot list + a 5-tuple key + a dict slot (< 0.75 KiB with its ints):
    # the table plus the evicted records awaiting export, plus allocator slack (without
    # the cap a million flows take ~440 MiB, without the bound on evicted records ~45)
    bound = (max_flows + t.max_evicted_out) * 768 + (16 << 20)
    assert peak - base < bound, (peak - base, bound)


def test_shutdown_export_is_bounded_and_the_rest_counted() -> None:
    t = FlowTable()
    for i in range(100):
        pkt(t, ip4(17, udp(1024 + i, 9999), A, B), T0 + i)
    out = t.expire(T0 + 100, force=True, limit=10)
    assert len(out) == 10 and {r.end_reason for r in out} == {"shutdown"}
    assert t.shutdown_lost == 90 and len(t) == 0
