"""The network source: packets -> flows -> ``net.flow``/``net.listen``/``net.dns`` events,
each flow attributed to the process that owns its socket.

Interface: :mod:`lw_embed.kernel.packet` (AF_PACKET TPACKET_V3 ring, then V2, then
``recv_into``), :mod:`lw_embed.pipeline.flows` (the table and its per-block walker),
:mod:`lw_embed.sources.netproc` (``/proc/net`` sockets, inode owners, and the polling
fallback when nothing can be captured) and :mod:`lw_embed.pipeline.dns`. Core records:
``R.CONNECT`` (pid, fd, peer) from the tracer, matched to the flow whose responder is that
peer and which started just after the call, in whichever order they arrive
(:mod:`lw_embed.sources.netjoin`; ``attribution: syscall``); otherwise the
flow's socket inode (an exact ``NETLINK_SOCK_DIAG`` lookup in the poll that first sees the
flow, else one read of ``/proc/net``) joined to ``/proc/*/fd`` (``inode``).

Capability: ``CAP_NET_RAW`` for capture (else the /proc/net fallback, flagged
``source: procfs``); ``CAP_SYS_PTRACE`` or the same uid to read other processes' fds.

Cost: see the modules above; per poll at most ``blocks_per_poll`` blocks are walked
(about 1 M packets per CPU second), then at most ``LOOKUPS_PER_POLL`` new flows are looked
up (~20 us each; an fd scan on a miss, rate limited), so heavy traffic cannot starve the
worker's other duties. ``close()`` is bounded too (see there).

Failure modes: no capture -> the fallback, said in ``agent.capabilities``; kernel drops
and ring freezes (``PACKET_STATISTICS``, kept as running totals), a full event queue,
DNS payloads over the per-poll bound, malformed DNS, evicted flows not exported and flows
left at shutdown are all counted in ``losses()`` and ``metrics()``. The workload is never
touched.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lw_embed.config import NetworkConfig
from lw_embed.events import Event, NetDns, NetFlow, NetListen
from lw_embed.kernel import packet as pk
from lw_embed.pipeline import dns as dnsmod
from lw_embed.pipeline.flows import PROTO_NAMES, FlowRecord, FlowTable, flags_text
from lw_embed.records import R
from lw_embed.sources.base import SourceContext, seccomp_traced
from lw_embed.sources.netjoin import ConnectJoin
from lw_embed.sources.netproc import (
    BoundSockets,
    NetProc,
    ProcNetFlows,
    Tracked,
    listener_check,
    listeners,
)

log = logging.getLogger("lw_embed.sources.packets")
Addr = int | bytes
_U32 = struct.Struct("=I")
_H2 = pk.TPACKET2_HDR
#: a connect's flow starts within this long after the call (ns)
#: sock_diag lookups per poll (each ~20 us); the rest wait for the next poll
LOOKUPS_PER_POLL = 256
#: flows waiting for another attribution try, and the tries (backoff 40 ms .. 1.3 s)
RETRY_MAX = 10000
ATTR_TRIES = 6
#: flows exported by close(): what the worker can write within its shutdown budget
SHUTDOWN_EXPORT_MAX = 10000
Key = tuple[int, Addr, int, Addr, int]


def addr_text(a: Addr) -> str:
    if isinstance(a, int):
        return socket.inet_ntoa(a.to_bytes(4, "big"))
    return str(ipaddress.IPv6Address(a))


def _addr_of(family: str, text: str) -> Addr | None:
    try:
        return dnsmod.addr_key(text)
    except ValueError:
        return None


class NetworkSource:
    name = "network"

    def __init__(self, cfg: NetworkConfig, ctx: SourceContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.table = FlowTable(cfg.max_flows, cfg.tcp_timeout, cfg.udp_timeout,
                               cfg.active_timeout, cfg.close_timeout)  # fmt: skip
        self.netproc = NetProc(ctx.proc, cfg.fd_scan_interval, (os.getpid(), ctx.core_pid))
        self.dns = dnsmod.DnsCache(cfg.dns_max_entries)
        self.cap: pk.Capture | None = None
        self.fallback: ProcNetFlows | None = None
        self.mv: memoryview | None = None
        self._out: list[Event] = []
        self._listen_seen: set[tuple[int, Addr, int]] = set()
        self._listeners: set[tuple[int, Addr, int]] = set()
        self.table.is_listener = listener_check(self._listeners)
        self.bound = BoundSockets()  # traced bind/listen (R.BIND, R.LISTEN)
        self.counts: dict[str, int] = {}
        self.flows_out = self.unknown_out = 0
        self._next_sweep = ctx.mono() + cfg.sweep_interval
        self._next_procfs = ctx.mono()
        self._more = False
        self._retry: list[tuple[Key, int, int, float]] = []
        self.connects = ConnectJoin(self._count, claims=ctx.config.tracer.trace_connect
                                    and seccomp_traced(ctx.config, ctx.mode))  # fmt: skip
        self._technique = ("none", "")
        self._kstats = (0, 0, 0)  # the capture's last PACKET_STATISTICS totals
        self._open()
        self.ring_bytes = self.cap.ring_bytes if self.cap is not None else 0

    # -- setup ---------------------------------------------------------------------------
    def _open(self) -> None:
        cfg = self.cfg
        modes = list(pk.MODES) if cfg.capture == "auto" else (
            [] if cfg.capture == "procfs" else [cfg.capture])  # fmt: skip
        why: list[str] = []
        if cfg.capture == "auto" and self.ctx.mode == "in-app":
            # in-app, every packet would be parsed under the host's GIL: poll instead
            # (capture = "tpacket_v3" asks for packets anyway)
            modes = []
            why.append("in-app mode polls /proc/net unless [network] capture names a mode")
        if modes:
            try:
                ifx = [socket.if_nametoindex(n) for n in cfg.interfaces]
                try:
                    lo: int | None = socket.if_nametoindex("lo")
                except OSError:
                    lo = None
                prog = pk.flow_filter(cfg.snap_length, 4096 if cfg.dns else cfg.snap_length,
                                      lo, ifx if len(ifx) > 1 else ())  # fmt: skip
                spec = pk.RingSpec(cfg.block_size, cfg.block_count, cfg.frame_size, cfg.retire_ms)
                iface = cfg.interfaces[0] if len(cfg.interfaces) == 1 else ""
                self.cap, why = pk.open_capture(iface, prog, spec, modes)
            except (pk.CaptureError, OSError) as exc:
                why.append(str(exc))
        if self.cap is not None:
            if self.cap.mm is not None:
                self.mv = memoryview(self.cap.mm)
            where = ",".join(cfg.interfaces) or "all interfaces"
            size = f", {self.cap.ring_bytes >> 10} KiB ring" if self.cap.ring_bytes else ""
            note = f" (not {'; '.join(why)})" if why else ""
            self._technique = (self.cap.mode, f"AF_PACKET on {where}{size}{note}")
        else:
            self.fallback = ProcNetFlows(self.netproc)
            self._technique = ("procfs", "no packet capture ("
                               + ("; ".join(why) or "capture = procfs")
                               + "): flows from /proc/net polling, no byte counts")

    # -- the seam ------------------------------------------------------------------------
    def fileno(self) -> int | None:
        return self.cap.fileno() if self.cap is not None else None

    def next_due(self) -> float | None:
        if self._more:
            return self.ctx.mono()
        due = self._next_sweep
        if self.fallback is not None:
            due = min(due, self._next_procfs)
        return due

    def technique(self) -> tuple[str, str]:
        return self._technique

    def poll(self, now: float) -> Iterable[Event]:
        if self.cap is not None:
            self._capture()
            if self.cfg.dns:
                self._dns()  # first: a flow that follows its lookup gets the names
            self._attribute_new(now)
        elif self.fallback is not None and now >= self._next_procfs:
            self._next_procfs = now + self.cfg.procfs_interval
            self._procfs_poll(now)
        if now >= self._next_sweep:
            self._next_sweep = now + self.cfg.sweep_interval
            self._sweep(now)
        out, self._out = self._out, []
        return out

    def observe(self, rec: Sequence[Any]) -> Iterable[Event]:
        if rec[0] == R.CONNECT:
            _r, t, pid, _tid, _fd, family, address, port = rec
            key = _addr_of(family, address) if family in ("inet", "inet6") else None
            if key is not None and isinstance(port, int):
                p = self.ctx.table.get(pid)
                who = (pid, p.exec_id if p else None, p.exe if p else None)
                self.connects.record((key, port), t, who, self.table.flows, self.ctx.mono())
        elif rec[0] in (R.BIND, R.LISTEN, R.EXIT):
            self._observe_bind(rec)
        return ()

    def _observe_bind(self, rec: Sequence[Any]) -> None:
        if rec[0] == R.EXIT:
            self.bound.exited(rec[2], rec[1])
        elif rec[0] == R.BIND:
            _r, t, pid, _tid, fd, family, address, port = rec
            key = _addr_of(family, address) if family in ("inet", "inet6") else None
            if key is not None and isinstance(port, int):
                p = self.ctx.table.get(pid)
                self.bound.bind(pid, fd, key, port,
                                (pid, p.exec_id if p else None, p.exe if p else None), t)
        else:
            got = self.bound.listen(rec[2], rec[4], rec[1])
            if got is None:
                self._count("network.listen_unbound")
            elif (6, got[0], got[1]) not in self._listen_seen:
                self._listen_seen.add((6, got[0], got[1]))
                self._queue(NetListen(self.ctx.wall(), "tcp", addr_text(got[0]), got[1],
                                      got[2][1], got[2][0], got[2][2], "syscall", "syscall"))

    def metrics(self) -> Mapping[str, int | float]:
        t = self.table
        m: dict[str, int | float] = {
            "network.packets": t.packets, "network.flows_live": len(t),
            "network.flows_created": t.created, "network.flows_exported": self.flows_out,
            "network.flows_evicted": t.evicted, "network.malformed": t.malformed,
            "network.other_proto": t.other, "network.dns_cache": len(self.dns),
            "network.dns_evicted": self.dns.evicted, "network.fd_scans": self.netproc.full_scans,
            "network.unattributed_ratio": (self.unknown_out / self.flows_out
                                           if self.flows_out else 0.0),
        }  # fmt: skip
        if self.cap is not None or self._kstats[0]:
            if self.cap is not None:
                self._kstats = self.cap.read_stats()
            pkts, drops, freezes = self._kstats
            m.update({"network.kernel_packets": pkts, "network.kernel_drops": drops,
                      "network.ring_freezes": freezes,
                      "network.ring_bytes": self.ring_bytes})  # fmt: skip
        for k, v in self.counts.items():
            m[k] = v
        return m

    def losses(self) -> Mapping[str, int]:
        out = {k: v for k, v in self.counts.items()
               if k in ("network.queue_full", "network.dns_malformed")}  # fmt: skip
        if self.cap is not None:
            self._kstats = self.cap.read_stats()
        out["network.kernel_drops"] = self._kstats[1]
        if self.table.shutdown_lost:
            out["network.flows_unexported"] = self.table.shutdown_lost
        if self.table.dns_dropped:
            out["network.dns_dropped"] = self.table.dns_dropped
        if self.table.evicted_lost:
            out["network.evicted_unexported"] = self.table.evicted_lost
        return {k: v for k, v in out.items() if v}

    def close(self) -> Iterable[Event]:
        """Bounded: at most two retire timeouts (<= 0.25 s) for the open block, one walk
        of the ring, one attribution pass, then at most ``SHUTDOWN_EXPORT_MAX`` flows
        exported (about 10 us each; the rest counted as ``network.flows_unexported``), so
        the worker can still write them within its shutdown budget."""
        if self.cap is not None:
            self._capture(limit=self.cap.block_nr)
            self.cap.settle(self.cap.cursor)
            self._capture(limit=self.cap.block_nr)
            if self.cfg.dns:
                self._dns()
            self._attribute_new(self.ctx.mono())
        elif self.fallback is not None:
            self._procfs_poll(self.ctx.mono())
            for t in list(self.fallback.live.values()):
                self._emit_tracked(t, final=True)
            self.fallback.live.clear()
        room = min(SHUTDOWN_EXPORT_MAX, self.cfg.max_events_queued - len(self._out))
        for r in self.table.expire(self.ctx.wall(), force=True, limit=max(0, room)):
            self._emit_flow(r)
        if self.mv is not None:
            self.mv.release()
            self.mv = None
        if self.cap is not None:
            self._kstats = self.cap.read_stats()
            self.cap.close()
            self.cap = None
        self.netproc.close()
        out, self._out = self._out, []
        return out

    # -- capture -------------------------------------------------------------------------
    def _capture(self, limit: int | None = None) -> None:
        cap = self.cap
        assert cap is not None
        budget = limit or self.cfg.blocks_per_poll
        self._more = False
        if cap.mode == "tpacket_v3":
            assert self.mv is not None
            _, self._more = cap.walk_v3(self.mv, self.table.ingest_v3, budget)
            if self._more:
                self._count("network.poll_budget_hit")
        elif cap.mode == "tpacket_v2":
            self._capture_v2(budget * 256)
        else:
            self._capture_recv(budget * 256)

    def _capture_v2(self, frames: int) -> None:
        cap = self.cap
        assert cap is not None and cap.mm is not None and self.mv is not None
        mm, mv, fs, n = cap.mm, self.mv, cap.frame_size, cap.frame_nr
        i = cap.cursor
        for _ in range(frames):
            base = i * fs
            st, wlen, snap, mac, net, sec, nsec = _H2.unpack_from(mm, base)
            if not st & 1:
                break
            self.table.ingest_frame(mv[base + mac : base + mac + snap], net - mac, snap,
                                    wlen, sec * 1_000_000_000 + nsec)  # fmt: skip
            _U32.pack_into(mm, base, 0)
            i = (i + 1) % n
        else:
            self._more = True
        cap.cursor = i

    def _capture_recv(self, frames: int) -> None:
        cap = self.cap
        assert cap is not None
        buf = bytearray(max(self.cfg.snap_length, 4096))
        for _ in range(frames):
            try:
                nbytes, addr = cap.sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            self.table.ingest_link(buf, nbytes, time.time_ns(), addr[3] if len(addr) > 3 else 1)
        self._more = True

    # -- attribution ---------------------------------------------------------------------
    def _attribute_new(self, mono: float) -> None:
        """Attribute the flows created since the last call: a traced connect first, else
        the flow's socket inode (an exact sock_diag lookup, at once: a short connection's
        socket still exists) joined to its owner's fds; misses are retried a few times
        with backoff (a connection not accepted yet has no owner)."""
        flows = self.table.flows
        items = [(k, 0, 0) for k in self.table.take_new() if k in flows]
        retry, self._retry = self._retry, []
        for k, ino, tries, due in retry:
            if k in flows:
                if due <= mono:
                    items.append((k, ino, tries))
                else:
                    self._retry.append((k, ino, tries, due))
        if not items:
            return
        need: list[tuple[Key, int, int]] = []
        for item in items:
            k = item[0]
            f = flows[k]
            if f[12] is None:
                names = self._names(k)
                if names:
                    self.dns.pin(k[3])
                attr = self._by_connect(k, f[0]) or self._by_bind(k, f[0])
                if attr is not None:
                    f[12] = [*attr, names]
                    continue
                self.connects.hold(k, (k[3], k[4]), f[0], mono)
                f[12] = ["unknown", None, None, None, names]
            need.append(item)
        for k, ino, tries in need[LOOKUPS_PER_POLL:]:  # a flood: the rest a little later
            self._retry_at(k, ino, tries, mono)
        if need:
            self._by_inode(need[:LOOKUPS_PER_POLL], mono)

    def _names(self, k: Key) -> tuple[str, ...]:
        return self.dns.lookup(k[3]) if self.cfg.dns else ()

    def _by_connect(self, k: Key, start: int) -> tuple[str, int, str | None, str | None] | None:
        who = self.connects.match((k[3], k[4]), start)
        return ("syscall", *who) if who is not None else None

    def _by_bind(self, k: Key, start: int) -> tuple[str, int, str | None, str | None] | None:
        """A flow to a local port that a traced process bound and listens on."""
        who = self.bound.owner(k[0], k[3], k[4], start)
        return ("syscall", *who) if who is not None else None

    def _inode_of(self, k: Key, by_tuple: dict[Key, int] | None) -> int | None:
        """The inode of the flow's local socket (the originator's end first): 0 when the
        socket exists but has no owner yet (a connection not yet accepted), None when
        there is no such socket any more."""
        p, a, ap, b, bp = k
        diag = self.netproc.diag
        if by_tuple is None and diag is not None:
            first = diag.lookup(p, a, ap, b, bp)
            if first:
                return first
            second = diag.lookup(p, b, bp, a, ap)
            return second if second is not None else first
        tab = by_tuple or {}
        for t in ((p, a, ap, b, bp), (p, b, bp, a, ap)) + (
                ((p, a, ap, 0, 0), (p, b, bp, 0, 0)) if p == 17 else ()):  # fmt: skip
            ino = tab.get(t)
            if ino is not None:
                return ino
        return None

    def _by_inode(self, items: list[tuple[Key, int, int]], mono: float) -> None:
        by_tuple: dict[Key, int] | None = None
        if self.netproc.diag is None:  # one read of the /proc/net text for all of them
            by_tuple = {(s.proto, s.laddr, s.lport, s.raddr, s.rport): s.inode
                        for s in self.netproc.sockets()}  # fmt: skip
        found: dict[Key, int] = {}
        for k, ino, tries in items:
            got = ino or self._inode_of(k, by_tuple)
            if got:
                found[k] = got
            elif got == 0 and tries < ATTR_TRIES:  # exists, no owner yet: look again soon
                self._retry_at(k, 0, tries + 1, mono)
        owners = self.netproc.owner_of(found.values(), mono) if found else {}
        for k, _ino, tries in items:
            f = self.table.flows.get(k)
            if f is None or k not in found:
                continue
            pid = owners.get(found[k])
            if pid is None:
                if tries < ATTR_TRIES:  # the fd scan was rate limited: later
                    self._retry_at(k, found[k], tries + 1, mono)
                continue
            if f[12] is not None and f[12][0] == "syscall":
                continue  # claimed by a late CONNECT meanwhile
            pr = self.ctx.table.get(pid)
            f[12] = ["inode", pid, pr.exec_id if pr else None, pr.exe if pr else _exe(pid),
                     f[12][4] if isinstance(f[12], list) else ()]  # fmt: skip

    def _retry_at(self, k: Key, ino: int, tries: int, mono: float) -> None:
        if len(self._retry) < RETRY_MAX:
            self._retry.append((k, ino, tries, mono + 0.02 * (1 << tries)))
        else:
            self._count("network.attribution_skipped")

    def _note_listeners(self, socks: Iterable[Any], mono: float) -> None:
        socks = list(socks)
        lst = listeners(socks)
        self._listeners.clear()
        self._listeners.update(lst)
        new = [s for s in socks if (s.proto, s.laddr, s.lport) in lst - self._listen_seen
               and (s.proto == 17 or s.state == 0x0A)]  # fmt: skip
        if not new:
            return
        self._listen_seen |= {(s.proto, s.laddr, s.lport) for s in new}
        owners = self.netproc.owner_of([s.inode for s in new], mono)
        for s in new:
            self._emit_listen(s.proto, s.laddr, s.lport, owners.get(s.inode))

    def _emit_listen(self, proto: int, addr: Addr, port: int, pid: int | None) -> None:
        p = self.ctx.table.get(pid) if pid is not None else None
        self._queue(NetListen(self.ctx.wall(), PROTO_NAMES.get(proto, str(proto)),
                              addr_text(addr), port, p.exec_id if p else None, pid,
                              p.exe if p else (_exe(pid) if pid else None),
                              "inode" if pid else "unknown", "procfs"))  # fmt: skip

    # -- DNS -----------------------------------------------------------------------------
    def _dns(self) -> None:
        for ts, key, payload in self.table.take_dns():
            try:
                resp = dnsmod.parse_response(payload)
            except dnsmod.DnsFormatError:
                self._count("network.dns_malformed")
                continue
            if resp is None:
                continue
            self.dns.add(resp, ts)
            _p, src, sport, dst, dport = key
            client, cport, server, sport_ = (dst, dport, src, sport) if sport == 53 else (
                src, sport, dst, dport)  # fmt: skip
            f = self.table.flows.get((17, client, cport, server, sport_))
            f = f or self.table.flows.get((17, server, sport_, client, cport))
            attr = f[12] if f is not None and isinstance(f[12], list) else None
            self._queue(NetDns(ts, resp.query, resp.qtype, resp.rcode, resp.answers,
                               addr_text(client), cport, addr_text(server), sport_,
                               attr[2] if attr else None, attr[1] if attr else None,
                               attr[0] if attr else "unknown"))  # fmt: skip

    # -- export --------------------------------------------------------------------------
    def _sweep(self, mono: float) -> None:
        if self.cap is not None:
            self._capture()
            self._attribute_new(mono)
            self.cap.read_stats()
            self._note_listeners(self.netproc.listening(), mono)
        for r in self.table.expire(self.ctx.wall()):
            self._emit_flow(r)
        self.dns.expire(self.ctx.wall())
        now = self.ctx.wall()
        self.connects.sweep(mono, now)
        self.bound.expire(now)

    def _queue(self, ev: Event) -> None:
        if len(self._out) >= self.cfg.max_events_queued:
            self._count("network.queue_full")
            return
        self._out.append(ev)

    def _count(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n

    def _emit_flow(self, r: FlowRecord) -> None:
        attr = r.attr if isinstance(r.attr, list) else None
        if attr is None or attr[0] == "unknown":
            again = self._by_connect(r.key, r.start) or self._by_bind(r.key, r.start)
            if again is not None:
                attr = [*again, attr[4] if attr else ()]
        method, pid, eid, exe, names = attr or ("unknown", None, None, None, ())
        if r.final and names:
            self.dns.unpin(r.key[3])
        self.flows_out += 1
        if method == "unknown":
            self.unknown_out += 1
        proto = r.key[0]
        flow_id = hashlib.blake2b(repr((r.key, r.start)).encode(), digest_size=8).hexdigest()
        self._queue(NetFlow(
            self.ctx.wall(), flow_id, r.seq, r.final, PROTO_NAMES.get(proto, str(proto)),
            addr_text(r.key[1]), r.key[2], addr_text(r.key[3]), r.key[4], r.start, r.last,
            r.orig_pkts, r.orig_bytes, r.orig_ip_bytes, r.resp_pkts, r.resp_bytes,
            r.resp_ip_bytes, flags_text(r.orig_flags) if proto == 6 else None,
            flags_text(r.resp_flags) if proto == 6 else None, r.conn_state, r.direction,
            r.end_reason, eid, pid, exe, method, tuple(names) or None, "packets"))  # fmt: skip

    # -- the /proc/net fallback ----------------------------------------------------------
    def _procfs_poll(self, mono: float) -> None:
        fb = self.fallback
        assert fb is not None
        new, ended = fb.poll(self.ctx.wall(), mono)
        for s, pid in fb.listen_new:
            key = (s.proto, s.laddr, s.lport)
            if key not in self._listen_seen:
                self._listen_seen.add(key)
                self._emit_listen(s.proto, s.laddr, s.lport, pid)
        self._listeners.clear()
        self._listeners.update(fb.listening)
        for t in new:  # the owner is named now: it may be gone when the flow ends
            if t.pid is not None:
                p = self.ctx.table.get(t.pid)
                t.who = (p.exec_id, p.exe) if p else (None, _exe(t.pid))
        for t in ended:
            self._emit_tracked(t, final=True)

    def _emit_tracked(self, t: Tracked, final: bool) -> None:
        s = t.sock
        inbound = self.table.is_listener(s.proto, s.laddr, s.lport)
        o, op, r, rp = (s.raddr, s.rport, s.laddr, s.lport) if inbound else (
            s.laddr, s.lport, s.raddr, s.rport)  # fmt: skip
        state = ("SF" if t.established else "S0") if s.proto == 6 else "SF"
        flow_id = hashlib.blake2b(repr((s, t.first)).encode(), digest_size=8).hexdigest()
        self.flows_out += 1
        if t.pid is None:
            self.unknown_out += 1
        self._queue(NetFlow(
            self.ctx.wall(), flow_id, 0, final, PROTO_NAMES.get(s.proto, str(s.proto)),
            addr_text(o), op, addr_text(r), rp, t.first, t.last, None, None, None, None,
            None, None, None, None, state, "procfs", "closed" if final else None,
            t.who[0], t.pid, t.who[1],
            "inode" if t.pid is not None else "unknown", self.dns.lookup(r) or None,
            "procfs"))  # fmt: skip


def _exe(pid: int | None) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def probe(cfg: Any, mode: str) -> tuple[str, str]:
    """(technique, reason) for ``lw-embed env --mode``: opens (and closes) a capture with
    a reject-all filter and a tiny ring, the way the source would choose its mode."""
    net = getattr(cfg, "network", None)
    if not isinstance(net, NetworkConfig) or not net.enabled:
        return "none", "[network] enabled = false"
    if net.capture == "procfs" or (net.capture == "auto" and mode == "in-app"):
        return "procfs", "flows from /proc/net polling (no packet capture in this mode/config)"
    modes = list(pk.MODES) if net.capture == "auto" else [net.capture]
    iface = net.interfaces[0] if len(net.interfaces) == 1 else ""
    try:
        cap, why = pk.open_capture(iface, pk.reject_all(), pk.RingSpec(4096, 2, 2048, 20), modes)
    except pk.CaptureError as exc:
        return "procfs", f"no packet capture ({exc}): flows from /proc/net polling"
    cap.close()
    note = f" (not {'; '.join(why)})" if why else ""
    return cap.mode, f"AF_PACKET on {','.join(net.interfaces) or 'all interfaces'}{note}"


def make(ctx: SourceContext) -> NetworkSource | None:
    """The FACTORIES entry: None when ``[network] enabled = false`` (or the config has no
    network section)."""
    cfg = getattr(ctx.config, "network", None)
    if not isinstance(cfg, NetworkConfig) or not cfg.enabled:
        return None
    return NetworkSource(cfg, ctx)
