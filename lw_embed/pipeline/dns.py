"""DNS responses -> (question, answers), and a bounded IP -> names cache with TTLs.

Interface: none of the kernel's: the payloads are UDP datagrams to or from port 53 that
the capture filter kept whole. Parsing is a small bounds-checked RFC 1035 reader (header,
questions, answer records with name compression) for A, AAAA and CNAME; scapy is not
needed on this path (its DNS layer alone costs about 44 MB of RSS to import).

Capability: none.

Cost: a few microseconds per response; DNS packets are few. The cache holds at most
``max_entries`` addresses; each name carries its expiry (TTL from the answer).

Failure modes: a truncated, looping or otherwise malformed message returns None and is
counted by the caller; compression pointers are followed at most 32 times. A full cache
evicts its least recently answered unpinned address (``evicted``). A name stays while a
live flow uses its address (pinned), and expires after its TTL once none does.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

_HDR = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
TYPES = {1: "A", 28: "AAAA", 5: "CNAME", 2: "NS", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT",
         33: "SRV", 65: "HTTPS"}  # fmt: skip
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
Addr = int | bytes


class DnsFormatError(ValueError):
    pass


def _name(buf: bytes, pos: int) -> tuple[str, int]:
    """The name at ``pos`` and the position after it (not after a pointer's target)."""
    labels: list[str] = []
    end = -1
    jumps = 0
    total = 0
    while True:
        if pos >= len(buf):
            raise DnsFormatError("name runs past the end")
        n = buf[pos]
        if n == 0:
            pos += 1
            break
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(buf):
                raise DnsFormatError("truncated pointer")
            if end < 0:
                end = pos + 2
            jumps += 1
            if jumps > 32:
                raise DnsFormatError("pointer loop")
            pos = ((n & 0x3F) << 8) | buf[pos + 1]
            continue
        if n & 0xC0:
            raise DnsFormatError("bad label type")
        label = buf[pos + 1 : pos + 1 + n]
        if len(label) != n:
            raise DnsFormatError("truncated label")
        total += n + 1
        if total > 255:
            raise DnsFormatError("name too long")
        labels.append(label.decode("ascii", "backslashreplace").lower())
        pos += 1 + n
    return ".".join(labels), (end if end >= 0 else pos)


@dataclass(frozen=True, slots=True)
class Response:
    id: int
    query: str
    qtype: str
    rcode: str
    answers: tuple[tuple[str, str, str, int], ...]  # (name, type, data, ttl)


def parse_response(buf: bytes) -> Response | None:
    """A DNS response (QR set); None for a query. Raises DnsFormatError on garbage."""
    if len(buf) < 12:
        raise DnsFormatError("short header")
    qid, flags, qd, an, _ns, _ar = _HDR.unpack_from(buf)
    if not flags & 0x8000:
        return None
    pos = 12
    query, qtype = "", ""
    for i in range(qd):
        name, pos = _name(buf, pos)
        if pos + 4 > len(buf):
            raise DnsFormatError("truncated question")
        t = struct.unpack_from("!H", buf, pos)[0]
        pos += 4
        if i == 0:
            query, qtype = name, TYPES.get(t, str(t))
    answers = []
    for _ in range(min(an, 256)):
        name, pos = _name(buf, pos)
        if pos + 10 > len(buf):
            raise DnsFormatError("truncated record")
        t, _cls, ttl, rdlen = _RR.unpack_from(buf, pos)
        pos += 10
        rdata = buf[pos : pos + rdlen]
        if len(rdata) != rdlen:
            raise DnsFormatError("truncated rdata")
        if t == 1 and rdlen == 4:
            answers.append((name, "A", str(ipaddress.IPv4Address(rdata)), ttl))
        elif t == 28 and rdlen == 16:
            answers.append((name, "AAAA", str(ipaddress.IPv6Address(rdata)), ttl))
        elif t == 5:
            answers.append((name, "CNAME", _name(buf, pos)[0], ttl))
        pos += rdlen
    return Response(qid, query, qtype, RCODES.get(flags & 15, str(flags & 15)), tuple(answers))


def addr_key(text: str) -> Addr:
    """The flow table's form of an address: int for IPv4, 16 bytes for IPv6."""
    ip = ipaddress.ip_address(text)
    return int(ip) if ip.version == 4 else ip.packed


class DnsCache:
    """address -> {name: expiry_ns}; pinned addresses keep their names past the TTL."""

    def __init__(self, max_entries: int = 10000) -> None:
        self.max_entries = max_entries
        self.names: dict[Addr, dict[str, int]] = {}
        self.pins: dict[Addr, int] = {}
        self.evicted = 0
        self.answers = 0

    def __len__(self) -> int:
        return len(self.names)

    def add(self, resp: Response, now: int) -> None:
        """Every A/AAAA answer names its address with the query and the CNAME chain."""
        chain = {resp.query} | {n for n, t, _d, _ttl in resp.answers}
        chain |= {d for _n, t, d, _ttl in resp.answers if t == "CNAME"}
        chain.discard("")
        for _n, t, data, ttl in resp.answers:
            if t not in ("A", "AAAA"):
                continue
            key = addr_key(data)
            entry = self.names.pop(key, None) or {}
            exp = now + max(ttl, 0) * 1_000_000_000
            for name in chain:
                entry[name] = max(entry.get(name, 0), exp)
            self.names[key] = entry  # most recently answered last
            self.answers += 1
        while len(self.names) > self.max_entries:
            victim = next((k for k in self.names if not self.pins.get(k)), None)
            if victim is None:
                break
            del self.names[victim]
            self.evicted += 1

    def lookup(self, addr: Addr) -> tuple[str, ...]:
        entry = self.names.get(addr)
        return tuple(sorted(entry)) if entry else ()

    def pin(self, addr: Addr) -> None:
        self.pins[addr] = self.pins.get(addr, 0) + 1

    def unpin(self, addr: Addr) -> None:
        n = self.pins.get(addr, 0) - 1
        if n > 0:
            self.pins[addr] = n
        else:
            self.pins.pop(addr, None)

    def expire(self, now: int) -> int:
        """Drop expired names of unpinned addresses; return how many names went."""
        gone = 0
        for key in [k for k in self.names if not self.pins.get(k)]:
            entry = self.names[key]
            for name in [n for n, exp in entry.items() if exp <= now]:
                del entry[name]
                gone += 1
            if not entry:
                del self.names[key]
        return gone
