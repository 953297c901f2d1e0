"""The DNS response parser on hand-built and garbage messages, and the IP -> names cache
(bound, TTL expiry, pinning) with an injected clock."""

from __future__ import annotations

import random
import struct

import pytest

from lw_embed.pipeline.dns import DnsCache, DnsFormatError, Response, addr_key, parse_response

S = 1_000_000_000
T0 = 1_700_000_000 * S


def name(n: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in n.split(".")) + b"\0"


def rr(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def response(q: str = "www.example.test", answers: list[bytes] | None = None, qr: bool = True,
             rcode: int = 0, counts: tuple[int, int] | None = None) -> bytes:  # fmt: skip
    ans = answers if answers is not None else [
        rr(b"\xc0\x0c", 5, 300, name("edge.example.test")),  # CNAME, owner by pointer
        rr(name("edge.example.test"), 1, 30, bytes([192, 0, 2, 7])),
        rr(name("edge.example.test"), 28, 30, bytes(15) + b"\x09"),
    ]  # fmt: skip
    qd, an = counts or (1, len(ans))
    flags = (0x8180 if qr else 0x0100) | rcode
    return (struct.pack("!HHHHHH", 7, flags, qd, an, 0, 0) + name(q) + struct.pack("!HH", 1, 1)
            + b"".join(ans))  # fmt: skip


def test_a_good_response_with_compression_cname_a_and_aaaa() -> None:
    r = parse_response(response())
    assert r is not None and r.query == "www.example.test" and r.qtype == "A"
    assert r.rcode == "NOERROR" and r.id == 7
    assert r.answers == (
        ("www.example.test", "CNAME", "edge.example.test", 300),
        ("edge.example.test", "A", "192.0.2.7", 30),
        ("edge.example.test", "AAAA", "::9", 30),
    )
    assert parse_response(response(qr=False)) is None  # a query
    assert parse_response(response(answers=[], rcode=3)).rcode == "NXDOMAIN"  # type: ignore[union-attr]


@pytest.mark.parametrize("msg", [
    b"",  # no header
    b"\x00" * 11,  # short header
    struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + b"\xc0\x0c" + b"\0" * 4,  # loop to itself
    struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + b"\xc0\x0e\xc0\x0c" + b"\0" * 4,  # 2-loop
    struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + b"\xc3\xff" + b"\0" * 4,  # out of range
    struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + b"\xc0",  # truncated pointer
    struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + b"\x05ab",  # truncated label
    struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + b"\x41abc\0" + b"\0" * 4,  # label type
    struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + b"\x3f" + b"a" * 63 + b"\xc0\x0c",  # long
    response()[:-3],  # truncated rdata
    response()[:-20],  # truncated record header
    response(counts=(1, 65535)),  # huge answer count
    response(counts=(65535, 3)),  # huge question count
    response(answers=[rr(b"\xc0\x0c", 5, 1, b"\xc0\xff")]),  # CNAME data out of range
])  # fmt: skip
def test_garbage_raises_only_the_format_error(msg: bytes) -> None:
    with pytest.raises(DnsFormatError):
        parse_response(msg)


def test_mutated_responses_never_raise_anything_else() -> None:
    rng = random.Random(99)
    good = response()
    outcomes = {"ok": 0, "error": 0}
    for _ in range(5000):
        b = bytearray(good)
        for _ in range(rng.randrange(1, 8)):
            b[rng.randrange(len(b))] = rng.getrandbits(8)
        b = b[: rng.randrange(len(b) + 1)] if rng.random() < 0.3 else b
        try:
            r = parse_response(bytes(b))
            assert r is None or isinstance(r, Response)
            outcomes["ok"] += 1
        except DnsFormatError:
            outcomes["error"] += 1
    assert outcomes["ok"] and outcomes["error"]


def test_cache_names_every_address_with_the_cname_chain() -> None:
    c = DnsCache()
    r = parse_response(response())
    assert r is not None
    c.add(r, T0)
    names = ("edge.example.test", "www.example.test")
    assert c.lookup(addr_key("192.0.2.7")) == names
    assert c.lookup(addr_key("::9")) == names
    assert c.lookup(addr_key("192.0.2.8")) == ()


def _one(ip: str, ttl: int, q: str = "a.test") -> Response:
    return Response(1, q, "A", "NOERROR", ((q, "A", ip, ttl),))


def test_ttl_expiry_and_pinning_with_an_injected_clock() -> None:
    c = DnsCache()
    a, b = addr_key("192.0.2.1"), addr_key("192.0.2.2")
    c.add(_one("192.0.2.1", 10), T0)
    c.add(_one("192.0.2.2", 10, "b.test"), T0)
    c.pin(a)
    c.pin(a)  # two flows use it
    assert c.expire(T0 + 9 * S) == 0
    assert c.expire(T0 + 10 * S) == 1  # b's TTL passed; a is pinned
    assert c.lookup(b) == () and c.lookup(a) == ("a.test",)
    c.unpin(a)
    assert c.expire(T0 + 20 * S) == 0 and c.lookup(a)  # one flow still uses it
    c.unpin(a)
    assert c.expire(T0 + 20 * S) == 1 and c.lookup(a) == ()
    c.add(_one("192.0.2.1", 10), T0 + 30 * S)  # a fresh answer extends, never shortens
    c.add(_one("192.0.2.1", 1), T0 + 31 * S)
    assert c.expire(T0 + 35 * S) == 0 and c.lookup(a)


def test_the_bound_evicts_the_oldest_unpinned_and_counts() -> None:
    c = DnsCache(max_entries=3)
    keys = [addr_key(f"192.0.2.{i}") for i in range(1, 7)]
    c.add(_one("192.0.2.1", 60), T0)
    c.pin(keys[0])  # in use: survives
    for i in range(2, 7):
        c.add(_one(f"192.0.2.{i}", 60), T0 + i)
    assert len(c) == 3 and c.evicted == 3
    assert c.lookup(keys[0]) and c.lookup(keys[5]) and c.lookup(keys[4])
    assert not c.lookup(keys[1])
