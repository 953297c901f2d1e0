"""The flow table: packets -> bidirectional 5-tuple flows, Zeek conn.log style.

Interface: no kernel interface of its own. :meth:`FlowTable.ingest_v3` walks the frames
of one TPACKET_V3 block (``tpacket3_hdr`` layout, see :mod:`lw_embed.kernel.packet`),
:meth:`FlowTable.ingest_frame` takes one frame (TPACKET_V2 and ``recv_into`` modes, tests).
:meth:`FlowTable.expire` returns the flows whose idle or active timeout passed, as
:class:`FlowRecord` (the caller turns them into ``net.flow`` events).

A flow is keyed ``(proto, orig_addr, orig_port, resp_addr, resp_port)`` (IPv4 addresses
as ints, IPv6 as 16 bytes; ICMP ports are 0). The originator is the sender of a SYN
without ACK; a SYN-ACK seen first makes its receiver the originator; otherwise the sender
of the first packet, which :meth:`FlowTable.expire` may swap when the other end is a
known listening socket (``direction`` "listen"). Per direction: packets, payload bytes
(``bytes``: IP length minus IP and TCP/UDP headers, retransmissions included) and IP
bytes, and the OR of the TCP flags. ``conn_state`` is computed from those flags at export
(:func:`conn_state`).

Capability: none.

Cost: per packet one ``unpack_from`` per header layer, one or two dict lookups and a few
list-slot updates; no per-packet objects beyond the key tuple. A sweep every second walks
the table (about 10 ms per 100,000 flows).

Failure modes: truncated or garbage frames are counted (``malformed``) and skipped;
non-IP/unsupported protocols and later fragments are counted (``other``). IPv6 extension
headers (hop-by-hop, routing, fragment, destination options) are walked, at most 8. At
``max_flows`` the oldest tenth of the table is exported early with ``end_reason``
"evicted" and counted (``evicted``); at most ``max_flows / 10`` such records wait for the
next :meth:`FlowTable.expire`, further ones are only counted (``evicted_lost``), so a flood
of unique tuples cannot grow memory past about 1.1 x ``max_flows`` flows.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_H3 = struct.Struct("=IIIIIIHH")
_IP4 = struct.Struct("!BBHHHBBHII")
_IP6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBB")
_PORTS = struct.Struct("!HH")

TCP, UDP, ICMP, ICMP6 = 6, 17, 1, 58
PROTO_NAMES = {TCP: "tcp", UDP: "udp", ICMP: "icmp", ICMP6: "icmp6"}
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 1, 2, 4, 8, 16, 32, 64, 128
_FLAG_LETTERS = ((SYN, "S"), (ACK, "A"), (FIN, "F"), (RST, "R"), (PSH, "P"), (URG, "U"),
                 (ECE, "E"), (CWR, "C"))  # fmt: skip

# slots of a flow list (literals are used in the hot loops: keep in sync)
START, LAST, OPK, OBY, OIP, RPK, RBY, RIP, OFL, RFL, DIR, EXPORTED, ATTR, ACTIVE, SEQ = range(15)
DIR_FIRST, DIR_SYN, DIR_LISTEN = 0, 1, 2
DIRECTION_NAMES = ("first_packet", "syn", "listen")
#: IPv6 extension headers walked to find the transport: hop-by-hop, routing, fragment,
#: destination options
_EXT6 = frozenset((0, 43, 44, 60))
_EXT6_MAX = 8


def _skip_ext6(mv: memoryview, nh: int, pos: int, avail: int,
               plen: int) -> tuple[int, int, int, int, int]:  # fmt: skip
    """(next header, position, bytes left, payload length, later-fragment flag) after the
    extension headers; next header -1 when they are truncated or too many."""
    for _ in range(_EXT6_MAX):
        if nh not in _EXT6:
            return nh, pos, avail, plen, 0
        if avail < 8:
            return -1, pos, avail, plen, 0
        if nh == 44:
            size = 8
            if ((mv[pos + 2] << 8) | mv[pos + 3]) & 0xFFF8:  # fragment offset != 0
                return mv[pos], pos + size, avail - size, plen - size, 1
        else:
            size = (mv[pos + 1] + 1) << 3
            if size > avail:
                return -1, pos, avail, plen, 0
        nh = mv[pos]
        pos += size
        avail -= size
        plen -= size
    return (-1, pos, avail, plen, 0) if nh in _EXT6 else (nh, pos, avail, plen, 0)


def flags_text(flags: int) -> str:
    return "".join(ch for bit, ch in _FLAG_LETTERS if flags & bit)


def conn_state(proto: int, ofl: int, rfl: int, opk: int, rpk: int, syn_dir: bool) -> str:
    """Zeek's conn_state from per-direction flag unions (an approximation: Zeek keeps the
    order of events, we keep their union)."""
    if proto != TCP:
        return "SF" if opk and rpk else "S0"
    if not syn_dir or not ofl & SYN:
        return "OTH"
    if not rpk:
        if ofl & RST:
            return "RSTOS0"
        return "SH" if ofl & FIN else "S0"
    if not rfl & SYN:
        return "REJ" if rfl & RST else "OTH"
    if ofl & RST:
        return "RSTO"
    if rfl & RST:
        return "RSTR"
    if ofl & FIN and rfl & FIN:
        return "SF"
    if ofl & FIN:
        return "S2"
    if rfl & FIN:
        return "S3"
    return "S1"


ETH_IP4, ETH_IP6, ETH_VLAN, ETH_QINQ = 0x0800, 0x86DD, 0x8100, 0x88A8
#: link types (sockaddr_ll.sll_hatype) whose frames start with an Ethernet header
_ETHER_LINKS = frozenset((1, 772))  # ARPHRD_ETHER, ARPHRD_LOOPBACK


def link_offset(buf: bytes | bytearray | memoryview, n: int, hatype: int = 1) -> int:
    """Where the IP header of a frame of ``n`` bytes starts; -1 for a truncated link header,
    -2 for a frame that is not IPv4/IPv6 (at most two VLAN tags are skipped)."""
    if hatype not in _ETHER_LINKS:
        return (0 if buf[0] >> 4 in (4, 6) else -2) if n > 0 else -1
    pos = 12
    for _ in range(3):
        if n < pos + 2:
            return -1
        et = (buf[pos] << 8) | buf[pos + 1]
        if et in (ETH_IP4, ETH_IP6):
            return pos + 2
        if et not in (ETH_VLAN, ETH_QINQ):
            return -2
        pos += 4
    return -1


@dataclass(frozen=True, slots=True)
class FlowRecord:
    """One export of a flow: counters are deltas since its previous export."""

    key: tuple[int, int | bytes, int, int | bytes, int]
    start: int
    last: int
    orig_pkts: int
    orig_bytes: int
    orig_ip_bytes: int
    resp_pkts: int
    resp_bytes: int
    resp_ip_bytes: int
    orig_flags: int
    resp_flags: int
    conn_state: str
    direction: str
    final: bool
    end_reason: str | None
    seq: int
    attr: object  # what the attribution step stored (opaque here)


class FlowTable:
    """Flows by key; timeouts in ns; ``now`` comes from the caller (wall clock ns)."""

    def __init__(self, max_flows: int = 100000, tcp_timeout: float = 300.0,
                 udp_timeout: float = 60.0, active_timeout: float = 60.0,
                 close_timeout: float = 5.0, max_dns: int = 256) -> None:  # fmt: skip
        self.flows: dict[tuple[int, int | bytes, int, int | bytes, int], list[Any]] = {}
        self.max_flows = max_flows
        self.tcp_timeout = int(tcp_timeout * 1e9)
        self.udp_timeout = int(udp_timeout * 1e9)
        self.active_timeout = int(active_timeout * 1e9)
        self.close_timeout = int(close_timeout * 1e9)
        self.new: list[tuple[int, int | bytes, int, int | bytes, int]] = []
        #: (ts_ns, key-as-seen, udp payload) of port-53 datagrams, bounded by max_dns
        self.dns: list[tuple[int, tuple[int, int | bytes, int, int | bytes, int], bytes]] = []
        self.max_dns = max_dns
        self.packets = 0
        self.malformed = 0
        self.other = 0
        self.evicted = 0
        self.created = 0
        self.dns_dropped = 0
        self.evicted_out: list[FlowRecord] = []
        #: evicted flows kept for export until the next expire(); past that only counted
        self.max_evicted_out = max(100, max_flows // 10)
        self.evicted_lost = 0
        self.shutdown_lost = 0
        #: (proto, addr, port) -> True for local listening sockets (set by the source)
        self.is_listener: Callable[[int, int | bytes, int], bool] = lambda p, a, o: False

    def __len__(self) -> int:
        return len(self.flows)

    # -- the hot loops -------------------------------------------------------------------
    def ingest_v3(self, mv: memoryview, off: int, num: int) -> None:
        """Every frame of one V3 block: ``off`` is the first frame's offset in ``mv``."""
        flows = self.flows
        get = flows.get
        h3 = _H3.unpack_from
        ip4 = _IP4.unpack_from
        ip6 = _IP6.unpack_from
        tcp = _TCP.unpack_from
        ports = _PORTS.unpack_from
        new = self.new
        bad = other = 0
        for _ in range(num):
            nxt, sec, nsec, snap, _wl, _st, mac, net = h3(mv, off)
            p = off + net
            cap = snap - (net - mac)
            off += nxt
            if cap < 20:
                bad += 1
                continue
            v = mv[p] >> 4
            if v == 4:
                vihl, _t, tot, _i, frag, _l, proto, _c, src, dst = ip4(mv, p)
                hl = (vihl & 15) << 2
                if hl < 20 or tot < hl:
                    bad += 1
                    continue
                if frag & 0x1FFF:  # a later fragment: no ports to key it by
                    other += 1
                    continue
                l4 = p + hl
                avail = cap - hl
                plen = tot - hl
                iplen = tot
            elif v == 6:
                if cap < 40:
                    bad += 1
                    continue
                _v, plen, proto, _h, src, dst = ip6(mv, p)
                l4 = p + 40
                avail = cap - 40
                iplen = plen + 40
                if proto in _EXT6:
                    proto, l4, avail, plen, frag = _skip_ext6(mv, proto, l4, avail, plen)
                    if proto < 0:
                        bad += 1
                        continue
                    if frag:  # a later fragment
                        other += 1
                        continue
            else:
                bad += 1
                continue
            fl = 0
            if proto == 6:
                if avail < 14:
                    bad += 1
                    continue
                sport, dport, _s, _a, offb, fl = tcp(mv, l4)
                if offb < 0x50:  # data offset under 5 words
                    bad += 1
                    continue
                plen -= (offb >> 4) << 2
            elif proto == 17:
                if avail < 8:
                    bad += 1
                    continue
                sport, dport = ports(mv, l4)
                plen -= 8
                if (sport == 53 or dport == 53) and avail >= plen > 0:
                    ts = sec * 1000000000 + nsec
                    self._dns(ts, (17, src, sport, dst, dport), bytes(mv[l4 + 8 : l4 + 8 + plen]))
            elif proto == 1 or proto == 58:
                sport = dport = 0
                plen -= 8
            else:
                other += 1
                continue
            if plen < 0:
                plen = 0
            ts = sec * 1000000000 + nsec
            key = (proto, src, sport, dst, dport)
            f = get(key)
            if f is not None:
                f[1] = ts
                f[2] += 1
                f[3] += plen
                f[4] += iplen
                f[8] |= fl
                continue
            rkey = (proto, dst, dport, src, sport)
            f = get(rkey)
            if f is not None:
                f[1] = ts
                f[5] += 1
                f[6] += plen
                f[7] += iplen
                f[9] |= fl
                continue
            if fl & 18 == 18:  # SYN-ACK first: its receiver is the originator
                flows[rkey] = [ts, ts, 0, 0, 0, 1, plen, iplen, 0, fl, 1, None, None, ts, 0]
                new.append(rkey)
            else:
                flows[key] = [ts, ts, 1, plen, iplen, 0, 0, 0, fl, 0,
                              1 if fl & 18 == 2 else 0, None, None, ts, 0]  # fmt: skip
                new.append(key)
            if len(flows) >= self.max_flows:
                self._evict()
        self.packets += num
        self.malformed += bad
        self.other += other

    def ingest_frame(self, buf: bytes | bytearray | memoryview, net: int, caplen: int,
                     wirelen: int, ts: int) -> None:  # fmt: skip
        """One frame whose network header starts at ``net`` and which holds ``caplen``
        bytes in all; ``ts`` in ns. Bounds are checked against ``caplen`` and the buffer."""
        n = min(caplen, len(buf))
        if n - net < 20 or net < 0:
            self.packets += 1
            self.malformed += 1
            return
        # a V3-shaped header in front of the data lets one walker serve both paths
        hdr = _H3.pack(0, ts // 1000000000, ts % 1000000000, n - net, wirelen, 0, 48, 48)
        mv = memoryview(hdr + bytes(48 - len(hdr)) + bytes(buf[net:n]) + bytes(64))
        self.ingest_v3(mv, 0, 1)

    def ingest_link(self, buf: bytes | bytearray | memoryview, n: int, ts: int,
                    hatype: int = 1) -> None:  # fmt: skip
        """One frame as ``recv`` gives it: the link header (Ethernet with any VLAN tags,
        or none for ``ARPHRD_NONE``/raw IP links) is skipped first."""
        net = link_offset(buf, min(n, len(buf)), hatype)
        if net < 0:
            self.packets += 1
            if net == -2:
                self.other += 1
            else:
                self.malformed += 1
            return
        self.ingest_frame(buf, net, n, n, ts)

    def _dns(self, ts: int, key: tuple[int, int | bytes, int, int | bytes, int],
             payload: bytes) -> None:  # fmt: skip
        if len(self.dns) >= self.max_dns:
            self.dns_dropped += 1
            return
        self.dns.append((ts, key, payload))

    def take_new(self) -> list[tuple[int, int | bytes, int, int | bytes, int]]:
        """Keys of the flows created since the last call (still in the table or not)."""
        new, self.new = self.new, []
        self.created += len(new)
        return new

    def take_dns(self) -> list[tuple[int, tuple[int, int | bytes, int, int | bytes, int], bytes]]:
        dns, self.dns = self.dns, []
        return dns

    # -- export --------------------------------------------------------------------------
    def _evict(self) -> None:
        n = max(1, self.max_flows // 10)
        victims = []
        for k in self.flows:
            victims.append(k)
            if len(victims) >= n:
                break
        for k in victims:
            f = self.flows.pop(k)
            self.evicted += 1
            if len(self.evicted_out) < self.max_evicted_out:
                self.evicted_out.append(self._record(k, f, True, "evicted"))
            else:  # a flood between two sweeps: the record itself is lost, and counted
                self.evicted_lost += 1

    def _record(self, key: tuple[int, int | bytes, int, int | bytes, int], f: list[Any],
                final: bool, reason: str | None) -> FlowRecord:  # fmt: skip
        start, last, o1, o2, o3, r1, r2, r3, ofl, rfl, d, exp, attr, _act, seq = f
        f[EXPORTED] = (o1, o2, o3, r1, r2, r3)
        f[SEQ] = seq + 1
        if exp is None:
            opk, oby, oip, rpk, rby, rip = o1, o2, o3, r1, r2, r3
        else:
            p1, p2, p3, q1, q2, q3 = exp
            opk, oby, oip, rpk, rby, rip = o1 - p1, o2 - p2, o3 - p3, r1 - q1, r2 - q2, r3 - q3
        if d == DIR_FIRST and self.is_listener(key[0], key[1], key[2]) \
                and not self.is_listener(key[0], key[3], key[4]):  # fmt: skip
            # the first packet came from the server side: swap ends (for the output only)
            key = (key[0], key[3], key[4], key[1], key[2])
            opk, oby, oip, rpk, rby, rip = rpk, rby, rip, opk, oby, oip
            ofl, rfl = rfl, ofl
            d = DIR_LISTEN
        tot_o, tot_r = o1, r1
        if d == DIR_LISTEN:
            tot_o, tot_r = tot_r, tot_o
        state = conn_state(key[0], ofl, rfl, tot_o, tot_r, d == DIR_SYN)
        return FlowRecord(key, start, last, opk, oby, oip, rpk, rby, rip, ofl, rfl, state,
                          DIRECTION_NAMES[d], final, reason, seq, attr)  # fmt: skip

    def expire(self, now: int, force: bool = False, limit: int | None = None) -> list[FlowRecord]:
        """Flows past their idle timeout (final), long flows past the active timeout
        (interim), and with ``force`` every flow (final, "shutdown"): at most ``limit`` of
        them recorded, the others only counted (``shutdown_lost``)."""
        out = self.evicted_out
        self.evicted_out = []
        if force:
            room = len(self.flows) if limit is None else max(0, limit - len(out))
            for k, f in self.flows.items():
                if room > 0:
                    out.append(self._record(k, f, True, "shutdown"))
                    room -= 1
                else:
                    self.shutdown_lost += 1
            self.flows.clear()
            return out
        gone = []
        for k, f in self.flows.items():
            last = f[1]
            proto = k[0]
            fl = f[8] | f[9]
            if proto == TCP and fl & RST:
                reason, limit = "reset", self.close_timeout
            elif proto == TCP and f[8] & FIN and f[9] & FIN:
                reason, limit = "closed", self.close_timeout
            else:
                reason = "idle"
                limit = self.tcp_timeout if proto == TCP else self.udp_timeout
            if now - last >= limit:
                gone.append(k)
                out.append(self._record(k, f, True, reason))
            elif now - f[ACTIVE] >= self.active_timeout:
                f[ACTIVE] = now
                out.append(self._record(k, f, False, None))
        for k in gone:
            del self.flows[k]
        return out
