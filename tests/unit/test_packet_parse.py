"""The flow table's packet walker on hand-built frames: good ones parse, and truncated or
garbage ones at every layer (Ethernet, VLAN, IPv4, IPv6 extension headers, TCP, UDP,
ICMP) are counted, never raised."""

from __future__ import annotations

import random
import struct

import pytest

from lw_embed.pipeline.flows import FlowTable, link_offset

A, B = 0x0A000001, 0x0A000002  # 10.0.0.1, 10.0.0.2 (never sent anywhere: bytes only)
A6, B6 = bytes(15) + b"\x01", bytes(15) + b"\x02"
T0 = 1_700_000_000_000_000_000


def eth(payload: bytes, ethertype: int = 0x0800, vlans: tuple[int, ...] = ()) -> bytes:
    tags = b"".join(struct.pack("!HH", tpid, 7) for tpid in vlans)
    return b"\x02" * 6 + b"\x04" * 6 + tags + struct.pack("!H", ethertype) + payload


def ip4(proto: int, payload: bytes, src: int = A, dst: int = B, opts: bytes = b"",
        frag: int = 0, ihl: int | None = None, tot: int | None = None) -> bytes:  # fmt: skip
    hl = ihl if ihl is not None else 5 + len(opts) // 4
    total = tot if tot is not None else 20 + len(opts) + len(payload)
    return struct.pack("!BBHHHBBHII", 0x40 | hl, 0, total, 1, frag, 64, proto, 0, src,
                       dst) + opts + payload  # fmt: skip


def ip6(nh: int, payload: bytes, ext: bytes = b"") -> bytes:
    body = ext + payload
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), nh, 64, A6, B6) + body


def ext6(nh: int, size8: int = 0) -> bytes:
    """A hop-by-hop / destination-options style header of (size8 + 1) * 8 bytes."""
    return bytes([nh, size8]) + bytes(6 + 8 * size8)


def tcp(sport: int = 40000, dport: int = 80, flags: int = 2, payload: bytes = b"",
        off: int = 5) -> bytes:  # fmt: skip
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, off << 4, flags, 1024, 0, 0) + bytes(
        4 * max(off - 5, 0)) + payload  # fmt: skip


def udp(sport: int = 40000, dport: int = 9999, payload: bytes = b"x") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def icmp() -> bytes:
    return struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"ping"


def feed(frames: list[bytes]) -> FlowTable:
    t = FlowTable()
    for i, fr in enumerate(frames):
        t.ingest_link(fr, len(fr), T0 + i)
    return t


GOOD = {
    "tcp4": eth(ip4(6, tcp(payload=b"hello"))),
    "tcp4_options": eth(ip4(6, tcp(payload=b"hello"), opts=b"\x01\x01\x01\x00")),
    "tcp4_vlan": eth(ip4(6, tcp(payload=b"hello")), 0x0800, (0x8100,)),
    "tcp4_qinq": eth(ip4(6, tcp(payload=b"hello")), 0x0800, (0x88A8, 0x8100)),
    "udp4": eth(ip4(17, udp(payload=b"abc"))),
    "icmp4": eth(ip4(1, icmp())),
    "udp6": eth(ip6(17, udp(payload=b"abc")), 0x86DD),
    "udp6_ext": eth(ip6(0, udp(payload=b"abc"), ext6(60, 1) + ext6(17)), 0x86DD),
    "tcp6_ext": eth(ip6(60, tcp(payload=b"hello"), ext6(6)), 0x86DD),
    "icmp6": eth(ip6(58, icmp()), 0x86DD),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_frames_make_one_flow_with_payload_bytes(name: str) -> None:
    t = feed([GOOD[name]])
    assert (t.packets, t.malformed, t.other) == (1, 0, 0)
    assert len(t.flows) == 1
    (key, f), = t.flows.items()
    proto = key[0]
    if proto in (6, 17):
        assert key[2] == 40000 and key[4] in (80, 9999)
        assert f[3] == (5 if proto == 6 else 3)  # payload bytes of the originator
    else:
        assert key[2] == key[4] == 0


@pytest.mark.parametrize("name", sorted(GOOD))
def test_every_truncation_is_counted_and_never_raises(name: str) -> None:
    frame = GOOD[name]
    for cut in range(len(frame)):
        t = feed([frame[:cut]])
        assert t.packets == 1
        if t.flows:  # only once the ports and flags are in (ICMP: the IP header)
            # the transport header starts this far from the end: header + payload
            l4 = len(frame) - {"tcp": 20 + 5, "udp": 8 + 3, "icm": 8 + 4}[name[:3]]
            assert cut >= l4 + {"tcp": 14, "udp": 8, "icm": 0}[name[:3]], (name, cut)
        else:
            assert t.malformed == 1, (name, cut)


def test_link_layer_cases() -> None:
    assert link_offset(b"", 0) == -1
    assert link_offset(b"\x00" * 13, 13) == -1  # no ethertype
    assert link_offset(eth(b"", 0x0806), 14) == -2  # ARP: not IP
    assert link_offset(eth(b"", 0x0800, (0x8100, 0x8100, 0x8100)), 26) == -1  # 3 tags
    assert link_offset(GOOD["tcp4_qinq"], len(GOOD["tcp4_qinq"])) == 22
    assert link_offset(ip4(6, tcp()), 40, hatype=65534) == 0  # ARPHRD_NONE: raw IP
    assert link_offset(b"\x00" * 40, 40, hatype=65534) == -2
    t = feed([eth(b"\x00" * 40, 0x0806), eth(b"", 0x0800)[:12]])
    assert (t.packets, t.other, t.malformed, len(t.flows)) == (2, 1, 1, 0)


@pytest.mark.parametrize("frame", [
    eth(ip4(6, tcp(), ihl=4)),  # IHL under 5
    eth(ip4(6, tcp(), ihl=15)),  # options past the captured bytes
    eth(ip4(6, tcp(), tot=10)),  # total length under the header length
    eth(ip4(6, tcp(off=2))),  # TCP data offset under 5
    eth(ip4(17, b"\x00" * 5)),  # UDP shorter than its header
    eth(b"\x75" + bytes(30)),  # IP version 7
    eth(ip6(0, b"", bytes([17, 5]) + bytes(14)), 0x86DD),  # ext header past the data
    eth(ip6(0, udp(), b"".join(ext6(0) for _ in range(9)) + ext6(17)), 0x86DD),  # too many
    eth(ip6(6, b"")[:30], 0x86DD),  # IPv6 header cut
])  # fmt: skip
def test_bad_headers_are_malformed(frame: bytes) -> None:
    t = feed([frame])
    assert (t.packets, t.malformed, len(t.flows)) == (1, 1, 0)


def test_fragments_and_other_protocols_are_counted_as_other() -> None:
    later4 = eth(ip4(17, b"\x00" * 16, frag=0x2000 | 100))  # offset 100 * 8
    first4 = eth(ip4(17, udp(payload=b"q" * 16), frag=0x2000))  # MF, offset 0: has ports
    frag6 = struct.pack("!BBHI", 17, 0, 100 << 3, 1)
    later6 = eth(ip6(44, b"\x00" * 16, frag6), 0x86DD)
    gre = eth(ip4(47, b"\x00" * 8))
    t = feed([later4, first4, later6, gre])
    assert (t.packets, t.other, t.malformed) == (4, 3, 0)
    assert [k[2] for k in t.flows] == [40000]


def test_random_garbage_never_raises_and_every_frame_is_accounted() -> None:
    rng = random.Random(1234)
    base = list(GOOD.values())
    frames = []
    for i in range(3000):
        if i % 3 == 0:
            fr = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 120)))
        else:  # a good frame with a few bytes flipped, then maybe cut
            b = bytearray(rng.choice(base))
            for _ in range(rng.randrange(1, 6)):
                b[rng.randrange(len(b))] = rng.getrandbits(8)
            fr = bytes(b[: rng.randrange(len(b) + 1)])
        frames.append(fr)
    t = FlowTable(max_flows=100000)
    for i, fr in enumerate(frames):
        t.ingest_link(fr, len(fr), T0 + i, hatype=rng.choice((1, 772, 65534)))
        t.ingest_frame(fr, rng.randrange(0, 30), len(fr), len(fr), T0 + i)
    assert t.packets == 2 * len(frames)
    counted = sum(f[2] + f[5] for f in t.flows.values())
    assert counted + t.malformed + t.other == t.packets
    assert t.malformed > 1000  # the garbage was seen as such


def test_v3_block_of_several_frames() -> None:
    """ingest_v3 walks tp_next_offset from frame to frame."""
    frames = [ip4(17, udp(sport=40000 + i)) for i in range(5)]
    buf = bytearray()
    for i, fr in enumerate(frames):
        nxt = 0 if i == len(frames) - 1 else 48 + 64
        hdr = struct.pack("=IIIIIIHH", nxt, T0 // 10**9, i, len(fr), len(fr), 0, 48, 48)
        buf += hdr.ljust(48, b"\0") + fr.ljust(64, b"\0")
    t = FlowTable()
    t.ingest_v3(memoryview(bytes(buf) + bytes(64)), 0, len(frames))
    assert sorted(k[2] for k in t.flows) == [40000 + i for i in range(5)]
    assert t.malformed == 0
