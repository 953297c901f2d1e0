"""AF_PACKET capture: a TPACKET_V3 (or V2) mmap ring, or plain ``recv_into``, behind a
classic-BPF filter assembled here.

Interface: ``socket(AF_PACKET, SOCK_RAW, 0)`` (protocol 0: the socket receives nothing
until it is bound), ``SO_ATTACH_FILTER`` with a ``struct sock_fprog`` packed by hand (the
pointer is the address of a ctypes buffer), ``PACKET_VERSION``, ``PACKET_RX_RING`` with a
``tpacket_req3``/``tpacket_req``, ``mmap`` of the ring, ``bind((ifname | "", ETH_P_ALL))``
and ``PACKET_STATISTICS`` (which resets on read: :class:`Capture` keeps running totals).
The ring layouts (``tpacket_block_desc``, ``tpacket3_hdr``, ``tpacket2_hdr`` and the
``sockaddr_ll`` after them) are those of Documentation/networking/packet_mmap.rst.

Filter attach order (libpcap's trick, pcap-linux.c): the socket is created with protocol 0
and a reject-all filter is attached before it is bound; after the bind whatever reached the
ring or the receive queue is drained, then the real filter replaces the reject-all one. No
frame the real filter rejects is ever seen.

The filter (:func:`flow_filter`) keeps IPv4/IPv6 TCP, UDP and ICMP, drops the outgoing copy
of every frame on loopback (``lo`` shows each packet twice), optionally keeps only some
interfaces, and returns the snap length: headers only (``snap``), the whole datagram for
UDP port 53 (``dns_snap``). It addresses the network header with ``SKF_NET_OFF``, so one
program serves every link type.

Capability: ``CAP_NET_RAW`` in the network namespace. gVisor has no ``SO_ATTACH_FILTER``
nor ``PACKET_STATISTICS``: :func:`open_capture` raises and the caller falls back.

Cost: the ring is ``block_size * block_nr`` bytes of locked kernel memory (8 MiB by
default); no syscall per packet in the ring modes (a block is handed back by writing its
status word); one ``recv_into`` per packet in the fallback mode.

Failure modes: every setup error raises :class:`CaptureError` naming the step; the caller
tries the next mode (V3 -> V2 -> recv -> none).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lw_embed.errors import LwEmbedError

SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
TPACKET_V2 = 1
TPACKET_V3 = 2
ETH_P_ALL = 0x0003
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
PACKET_OUTGOING = 4

# classic BPF
BPF_LD_W_ABS = 0x20
BPF_LD_H_ABS = 0x28
BPF_LD_B_ABS = 0x30
BPF_LD_H_IND = 0x48
BPF_LDX_B_MSH = 0xB1
BPF_JEQ_K = 0x15
BPF_JSET_K = 0x45
BPF_RET_K = 0x06
SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL = 0
SKF_AD_PKTTYPE = 4
SKF_AD_IFINDEX = 8
SKF_NET_OFF = -0x100000

#: offsets in a V3 block: tpacket_block_desc.hdr.bh1
BLOCK_STATUS = 8
BLOCK_NUM_PKTS = 12
BLOCK_FIRST = 16
#: "IIIIIIHH": tp_next_offset, tp_sec, tp_nsec, tp_snaplen, tp_len, tp_status, tp_mac, tp_net
TPACKET3_HDR = struct.Struct("=IIIIIIHH")
#: "IIIHHII": tp_status, tp_len, tp_snaplen, tp_mac, tp_net, tp_sec, tp_nsec
TPACKET2_HDR = struct.Struct("=IIIHHII")
_REQ3 = struct.Struct("=7I")
_REQ = struct.Struct("=4I")
_U32 = struct.Struct("=I")
_U32X2 = struct.Struct("=II")  # block header: num_pkts, offset_to_first_pkt

Insn = tuple[int, int, int, int]


class CaptureError(LwEmbedError):
    """A capture mode could not be set up (``step`` says where)."""

    def __init__(self, step: str, exc: BaseException | str) -> None:
        self.step = step
        self.errno = getattr(exc, "errno", None)
        super().__init__(f"{step}: {exc}")


# -- classic BPF programs ----------------------------------------------------------------


def _u32(k: int) -> int:
    return k & 0xFFFFFFFF


def reject_all() -> list[Insn]:
    return [(BPF_RET_K, 0, 0, 0)]


class _Asm:
    """A tiny assembler with forward labels (jumps are resolved in :meth:`code`)."""

    def __init__(self) -> None:
        self.insns: list[tuple[int, str | int, str | int, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.insns)

    def op(self, code: int, k: int = 0, jt: str | int = 0, jf: str | int = 0) -> None:
        self.insns.append((code, jt, jf, _u32(k)))

    def code(self) -> list[Insn]:
        out: list[Insn] = []
        for i, (code, jt, jf, k) in enumerate(self.insns):
            def rel(j: str | int, i: int = i) -> int:
                if isinstance(j, int):
                    return j
                d = self.labels[j] - i - 1
                if not 0 <= d <= 255:
                    raise ValueError(f"BPF jump to {j} out of range")
                return d
            out.append((code, rel(jt), rel(jf), k))
        return out


def flow_filter(snap: int, dns_snap: int, lo_ifindex: int | None,
                ifindexes: Sequence[int] = ()) -> list[Insn]:  # fmt: skip
    """IPv4/IPv6 TCP/UDP/ICMP, outgoing loopback copies dropped, ``ifindexes`` only (all
    when empty); returns ``dns_snap`` for UDP port 53 and ``snap`` otherwise."""
    a = _Asm()
    if ifindexes:
        a.op(BPF_LD_W_ABS, SKF_AD_OFF + SKF_AD_IFINDEX)
        for idx in ifindexes:
            a.op(BPF_JEQ_K, idx, "if_ok", 0)
        a.op(BPF_RET_K, 0)
        a.label("if_ok")
    if lo_ifindex is not None:
        a.op(BPF_LD_W_ABS, SKF_AD_OFF + SKF_AD_PKTTYPE)
        a.op(BPF_JEQ_K, PACKET_OUTGOING, 0, "proto")
        a.op(BPF_LD_W_ABS, SKF_AD_OFF + SKF_AD_IFINDEX)
        a.op(BPF_JEQ_K, lo_ifindex, "drop", "proto")
    a.label("proto")
    a.op(BPF_LD_W_ABS, SKF_AD_OFF + SKF_AD_PROTOCOL)
    a.op(BPF_JEQ_K, 0x0800, "v4", 0)
    a.op(BPF_JEQ_K, 0x86DD, "v6", "drop")
    a.label("v4")
    a.op(BPF_LD_B_ABS, SKF_NET_OFF + 9)
    a.op(BPF_JEQ_K, 17, "v4udp", 0)
    a.op(BPF_JEQ_K, 6, "snap", 0)
    a.op(BPF_JEQ_K, 1, "snap", "drop")
    a.label("v4udp")
    a.op(BPF_LD_H_ABS, SKF_NET_OFF + 6)
    a.op(BPF_JSET_K, 0x1FFF, "snap", 0)  # a non-first fragment has no ports
    a.op(BPF_LDX_B_MSH, SKF_NET_OFF)
    a.op(BPF_LD_H_IND, SKF_NET_OFF)
    a.op(BPF_JEQ_K, 53, "dns", 0)
    a.op(BPF_LD_H_IND, SKF_NET_OFF + 2)
    a.op(BPF_JEQ_K, 53, "dns", "snap")
    a.label("v6")
    a.op(BPF_LD_B_ABS, SKF_NET_OFF + 6)
    a.op(BPF_JEQ_K, 17, "v6udp", 0)
    a.op(BPF_JEQ_K, 6, "snap", 0)
    a.op(BPF_JEQ_K, 58, "snap", "drop")
    a.label("v6udp")
    a.op(BPF_LD_H_ABS, SKF_NET_OFF + 40)
    a.op(BPF_JEQ_K, 53, "dns", 0)
    a.op(BPF_LD_H_ABS, SKF_NET_OFF + 42)
    a.op(BPF_JEQ_K, 53, "dns", "snap")
    a.label("dns")
    a.op(BPF_RET_K, dns_snap)
    a.label("snap")
    a.op(BPF_RET_K, snap)
    a.label("drop")
    a.op(BPF_RET_K, 0)
    return a.code()


def port_filter(port: int, snap: int = 0xFFFF, inbound_only: bool = False) -> list[Insn]:
    """IPv4 UDP or TCP with source or destination ``port`` (tests and the benchmark);
    ``inbound_only`` drops outgoing frames (on ``lo``: each packet is then seen once)."""
    a = _Asm()
    if inbound_only:
        a.op(BPF_LD_W_ABS, SKF_AD_OFF + SKF_AD_PKTTYPE)
        a.op(BPF_JEQ_K, PACKET_OUTGOING, "drop", 0)
    a.op(BPF_LD_W_ABS, SKF_AD_OFF + SKF_AD_PROTOCOL)
    a.op(BPF_JEQ_K, 0x0800, 0, "drop")
    a.op(BPF_LD_B_ABS, SKF_NET_OFF + 9)
    a.op(BPF_JEQ_K, 17, "ports", 0)
    a.op(BPF_JEQ_K, 6, "ports", "drop")
    a.label("ports")
    a.op(BPF_LDX_B_MSH, SKF_NET_OFF)
    a.op(BPF_LD_H_IND, SKF_NET_OFF)
    a.op(BPF_JEQ_K, port, "ok", 0)
    a.op(BPF_LD_H_IND, SKF_NET_OFF + 2)
    a.op(BPF_JEQ_K, port, "ok", "drop")
    a.label("ok")
    a.op(BPF_RET_K, snap)
    a.label("drop")
    a.op(BPF_RET_K, 0)
    return a.code()


def attach_filter(sock: socket.socket, prog: Sequence[Insn]) -> None:
    """``SO_ATTACH_FILTER``: the kernel copies the program during the call."""
    raw = b"".join(struct.pack("=HBBI", *insn) for insn in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("@HP", len(prog), ctypes.addressof(buf))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError as exc:
        raise CaptureError("SO_ATTACH_FILTER", exc) from exc


# -- the capture socket ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RingSpec:
    block_size: int = 1 << 20
    block_nr: int = 8
    frame_size: int = 2048
    retire_ms: int = 50


class Capture:
    """An open capture: ``mode`` is ``tpacket_v3``, ``tpacket_v2`` or ``recv``.

    Ring modes expose ``mm`` (the mmap), ``block_size``/``block_nr`` (V3) or
    ``frame_size``/``frame_nr`` (V2). :meth:`walk_v3` hands each ready V3 block to the
    flow table's per-block parser (:mod:`lw_embed.pipeline.flows`), so the per-packet
    loop has no extra call.
    """

    def __init__(self, sock: socket.socket, mode: str, spec: RingSpec,
                 mm: mmap.mmap | None) -> None:  # fmt: skip
        self.sock = sock
        self.mode = mode
        self.spec = spec
        self.mm = mm
        self.block_size = spec.block_size
        self.block_nr = spec.block_nr
        self.frame_size = spec.frame_size
        self.frame_nr = spec.block_size * spec.block_nr // spec.frame_size
        self.cursor = 0  # next block (V3) or frame (V2) to look at
        self.packets = 0  # cumulative PACKET_STATISTICS
        self.drops = 0
        self.freezes = 0
        self.stats_ok = True

    @property
    def ring_bytes(self) -> int:
        return self.block_size * self.block_nr if self.mm is not None else 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_stats(self) -> tuple[int, int, int]:
        """Add the kernel's counters since the last read to the totals; return the totals
        (packets, drops, freezes)."""
        if not self.stats_ok:
            return self.packets, self.drops, self.freezes
        size = 12 if self.mode == "tpacket_v3" else 8
        try:
            raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, size)
        except OSError:
            self.stats_ok = False
            return self.packets, self.drops, self.freezes
        vals = struct.unpack_from("=3I" if size == 12 else "=2I", raw.ljust(size, b"\0"))
        self.packets += vals[0]
        self.drops += vals[1]
        if size == 12:
            self.freezes += vals[2]
        return self.packets, self.drops, self.freezes

    def walk_v3(self, mv: memoryview, ingest: Callable[[memoryview, int, int], object],
                budget: int) -> tuple[int, bool]:
        """Hand at most ``budget`` ready blocks, from the cursor on, to ``ingest(mv, offset
        of the first packet, packet count)`` and give each back to the kernel; return
        (blocks walked, whether the next block is ready too)."""
        mm, bs, n = self.mm, self.block_size, self.block_nr
        assert mm is not None
        i, done = self.cursor, 0
        while done < budget:
            base = i * bs
            if not _U32.unpack_from(mm, base + BLOCK_STATUS)[0] & TP_STATUS_USER:
                self.cursor = i
                return done, False
            num, first = _U32X2.unpack_from(mm, base + BLOCK_NUM_PKTS)
            ingest(mv, base + first, num)
            _U32.pack_into(mm, base + BLOCK_STATUS, TP_STATUS_KERNEL)
            i = (i + 1) % n
            done += 1
        self.cursor = i
        return done, bool(_U32.unpack_from(mm, i * bs + BLOCK_STATUS)[0] & TP_STATUS_USER)

    def drain(self) -> int:
        """Hand back (or read and discard) everything queued; return the frames dropped."""
        n = 0
        mm = self.mm
        if mm is None:
            buf = bytearray(64)
            while True:
                try:
                    self.sock.recv_into(buf, 64, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                n += 1
            return n
        if self.mode == "tpacket_v3":
            for i in range(self.block_nr):
                base = i * self.block_size
                if _U32.unpack_from(mm, base + BLOCK_STATUS)[0] & TP_STATUS_USER:
                    n += _U32.unpack_from(mm, base + BLOCK_NUM_PKTS)[0]
                    _U32.pack_into(mm, base + BLOCK_STATUS, TP_STATUS_KERNEL)
        else:
            for i in range(self.frame_nr):
                base = i * self.frame_size
                if _U32.unpack_from(mm, base)[0] & TP_STATUS_USER:
                    n += 1
                    _U32.pack_into(mm, base, TP_STATUS_KERNEL)
        self.cursor = 0
        return n

    def settle(self, cursor: int, limit: float = 0.25) -> None:
        """Wait (at most ``limit`` s, and at most two retire timeouts) until the block at
        ``cursor`` that holds packets is handed to user space (V3 only; at shutdown, so
        that the last packets are not lost)."""
        mm = self.mm
        if mm is None or self.mode != "tpacket_v3":
            return
        base = cursor * self.block_size
        end = time.monotonic() + min(limit, 2 * self.spec.retire_ms / 1000 + 0.01)
        while (not _U32.unpack_from(mm, base + BLOCK_STATUS)[0] & TP_STATUS_USER
               and _U32.unpack_from(mm, base + BLOCK_NUM_PKTS)[0]):  # fmt: skip
            left = end - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(OSError, ValueError):
                select.select([self.sock], [], [], min(left, 0.01))

    def close(self) -> None:
        if self.mm is not None:
            with contextlib.suppress(BufferError, ValueError):
                self.mm.close()
            self.mm = None
        self.sock.close()


MODES = ("tpacket_v3", "tpacket_v2", "recv")


def _open(mode: str, interface: str, prog: Sequence[Insn], spec: RingSpec,
          rcvbuf: int) -> Capture:  # fmt: skip
    # Named interface: protocol 0 receives nothing until bind() names the interface and
    # ETH_P_ALL, after the reject-all filter is on. Every interface: Python cannot bind to
    # ifindex 0, so the socket gets ETH_P_ALL at once and the reject-all filter right
    # after; what slipped in between is purged by the ring setup or drained below.
    proto = 0 if interface else socket.htons(ETH_P_ALL)
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, proto)
    except OSError as exc:
        raise CaptureError("socket(AF_PACKET)", exc) from exc
    mm: mmap.mmap | None = None
    try:
        attach_filter(sock, reject_all())
        size = spec.block_size * spec.block_nr
        if mode == "tpacket_v3":
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            req = _REQ3.pack(spec.block_size, spec.block_nr, spec.frame_size,
                             size // spec.frame_size, spec.retire_ms, 0, 0)  # fmt: skip
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        elif mode == "tpacket_v2":
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
            req = _REQ.pack(spec.block_size, spec.block_nr, spec.frame_size,
                            size // spec.frame_size)  # fmt: skip
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        else:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if mode != "recv":
            mm = mmap.mmap(sock.fileno(), size, mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
        if interface:
            sock.bind((interface, ETH_P_ALL))
        cap = Capture(sock, mode, spec, mm)
        cap.drain()  # whatever came in before the real filter (nothing: reject-all)
        attach_filter(sock, prog)
        cap.read_stats()
        cap.packets = cap.drops = cap.freezes = 0  # counted before the real filter
        sock.setblocking(False)
        return cap
    except CaptureError:
        if mm is not None:
            mm.close()
        sock.close()
        raise
    except OSError as exc:
        if mm is not None:
            mm.close()
        sock.close()
        raise CaptureError(f"{mode} setup", exc) from exc


def open_capture(interface: str, prog: Sequence[Insn], spec: RingSpec,
                 modes: Sequence[str] = MODES, rcvbuf: int = 4 << 20,
                 ) -> tuple[Capture, list[str]]:  # fmt: skip
    """The first of ``modes`` that works on ``interface`` ("" = all), and why the ones
    before it did not. Raises CaptureError (the last mode's) when none works."""
    why: list[str] = []
    last: CaptureError | None = None
    for mode in modes:
        try:
            return _open(mode, interface, prog, spec, rcvbuf), why
        except CaptureError as exc:
            why.append(f"{mode}: {exc}")
            last = exc
            if exc.step == "socket(AF_PACKET)" or exc.step == "SO_ATTACH_FILTER":
                break  # no capability, or no filters (gVisor): no mode will work
    assert last is not None
    raise last
