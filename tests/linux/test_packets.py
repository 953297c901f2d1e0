"""AF_PACKET capture on the real kernel: the filter leaks nothing, drops are counted
honestly, and loopback frames are counted once. Traffic goes to 127.0.0.1 only."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from lw_embed.kernel import packet as pk
from lw_embed.pipeline.flows import FlowTable

pytestmark = [
    pytest.mark.linux,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs CAP_NET_RAW"),
]

LO = socket.if_nametoindex("lo")


def drain_v3(cap: pk.Capture, table: FlowTable) -> None:
    assert cap.mm is not None
    mv = memoryview(cap.mm)
    try:
        for _ in range(cap.block_nr):
            base = cap.cursor * cap.block_size
            if not struct.unpack_from("=I", cap.mm, base + 8)[0] & 1:
                break
            num, first = struct.unpack_from("=II", cap.mm, base + 12)
            table.ingest_v3(mv, base + first, num)
            struct.pack_into("=I", cap.mm, base + 8, 0)
            cap.cursor = (cap.cursor + 1) % cap.block_nr
    finally:
        mv.release()


def udp_pair() -> tuple[socket.socket, socket.socket, int]:
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return srv, cli, srv.getsockname()[1]


@pytest.mark.parametrize("iface", ["lo", ""], ids=["lo", "all-interfaces"])
def test_loopback_udp_counted_once_with_payload_bytes(iface: str) -> None:
    """On lo alone, and on every interface (the default: lo is one of them)."""
    srv, cli, port = udp_pair()
    cap, _ = pk.open_capture(iface, pk.port_filter(port), pk.RingSpec(retire_ms=5))
    try:
        for _ in range(25):
            cli.sendto(b"x" * 100, ("127.0.0.1", port))
        t = FlowTable()
        deadline = time.monotonic() + 10
        while t.packets < 25 and time.monotonic() < deadline:
            time.sleep(0.02)
            drain_v3(cap, t)
        # port_filter keeps the outgoing copies on lo too: each datagram is seen twice
        assert t.packets == 50
        (key, f), = t.flows.items()
        assert key[2] == cli.getsockname()[1] and key[4] == port
        assert f[2] == 50 and f[3] == 5000
    finally:
        cap.close()
        srv.close()
        cli.close()


def test_flow_filter_drops_outgoing_loopback_copies() -> None:
    srv, cli, port = udp_pair()
    cap, _ = pk.open_capture("lo", pk.flow_filter(128, 4096, LO), pk.RingSpec(retire_ms=5))
    try:
        for _ in range(25):
            cli.sendto(b"y" * 10, ("127.0.0.1", port))
        t = FlowTable()
        deadline = time.monotonic() + 10
        key = (17, 0x7F000001, cli.getsockname()[1], 0x7F000001, port)
        while (key not in t.flows or t.flows[key][2] < 25) and time.monotonic() < deadline:
            time.sleep(0.02)
            drain_v3(cap, t)
        time.sleep(0.05)
        drain_v3(cap, t)
        assert t.flows[key][2] == 25 and t.flows[key][3] == 250
    finally:
        cap.close()
        srv.close()
        cli.close()


@pytest.mark.parametrize("iface", ["lo", ""], ids=["lo", "all-interfaces"])
def test_filter_opened_during_a_tcp_flood_delivers_nothing_it_rejects(iface: str) -> None:
    """A TCP flood on one port runs while captures filtered on another port open: no
    frame of the flood may show up (the reject-all, drain, real-filter order). On every
    interface ("") the socket has ETH_P_ALL from the start, which the drain must cover."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    flood_port = ls.getsockname()[1]
    srv, cli, udp_port = udp_pair()
    stop = threading.Event()

    def flood() -> None:
        c = socket.create_connection(("127.0.0.1", flood_port))
        a, _ = ls.accept()
        a.setblocking(False)
        end = time.monotonic() + 8
        while not stop.is_set() and time.monotonic() < end:
            c.send(b"z" * 512)
            try:
                while a.recv(65536):
                    pass
            except BlockingIOError:
                pass
        c.close()
        a.close()

    th = threading.Thread(target=flood)
    th.start()
    try:
        time.sleep(0.2)
        for mode in pk.MODES[:2]:
            for _ in range(5):
                cap, _ = pk.open_capture(iface, pk.port_filter(udp_port), pk.RingSpec(retire_ms=5),
                                         modes=[mode])  # fmt: skip
                try:
                    cli.sendto(b"u", ("127.0.0.1", udp_port))
                    time.sleep(0.05)
                    t = FlowTable()
                    if mode == "tpacket_v3":
                        drain_v3(cap, t)
                        keys = set(t.flows)
                    else:
                        keys = _v2_ports(cap)
                    ports = {k[2] for k in keys} | {k[4] for k in keys}
                    assert flood_port not in ports, mode
                    assert udp_port in ports, mode
                finally:
                    cap.close()
    finally:
        stop.set()
        th.join(15)
        ls.close()
        srv.close()
        cli.close()


def _v2_ports(cap: pk.Capture) -> set[tuple[int, int, int, int, int]]:
    assert cap.mm is not None
    t = FlowTable()
    for i in range(cap.frame_nr):
        base = i * cap.frame_size
        st, wlen, snap, mac, net, _s, _ns = pk.TPACKET2_HDR.unpack_from(cap.mm, base)
        if st & 1:
            t.ingest_frame(cap.mm[base + mac : base + mac + snap], net - mac, snap, wlen, 0)
    return set(t.flows)  # type: ignore[arg-type]


def test_throttled_consumer_reports_drops_equal_to_sent_minus_seen() -> None:
    srv, cli, port = udp_pair()
    spec = pk.RingSpec(block_size=4096, block_nr=2, frame_size=2048, retire_ms=1)
    cap, _ = pk.open_capture("lo", pk.port_filter(port, 64), spec)
    sent = 3000
    try:
        for _ in range(sent):  # nobody reads the ring meanwhile: it fills and drops
            cli.sendto(b"d" * 8, ("127.0.0.1", port))
        time.sleep(0.05)
        t = FlowTable()
        drain_v3(cap, t)
        time.sleep(0.05)
        drain_v3(cap, t)
        packets, drops, _freezes = cap.read_stats()
        frames = 2 * sent  # lo: outgoing and incoming copy of each datagram
        assert drops > 0
        assert t.packets + drops == frames
        assert packets == frames
        # stats reset on read in the kernel; the totals do not
        assert cap.read_stats()[1] == drops
    finally:
        cap.close()
        srv.close()
        cli.close()
