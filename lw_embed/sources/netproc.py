"""``/proc/net/{tcp,tcp6,udp,udp6}`` parsing, socket-inode -> process attribution, and
the polling fallback that reconstructs flows when no packet can be captured.

Interface: ``NETLINK_SOCK_DIAG`` (``SOCK_DIAG_BY_FAMILY``: one exact lookup per flow
tuple, ``inet_diag_req_v2`` without ``NLM_F_DUMP``; dumps filtered by state for the
listening sockets and the fallback) when the kernel offers it, else
``<proc>/net/{tcp,tcp6,udp,udp6}`` (the reader's network namespace); and
``readlink(<proc>/<pid>/fd/*)`` (``socket:[INODE]``).

Capability: reading another user's ``/proc/<pid>/fd`` needs ``CAP_SYS_PTRACE`` (or the
same uid); ``/proc/net`` needs nothing (it works in gVisor too).

Cost: an exact sock_diag lookup is one ``send`` + ``recv`` (about 20 us) whatever the
number of sockets; a dump skips TIME_WAIT in the kernel. The /proc/net text is read
whole (TIME_WAIT lines included: milliseconds per thousand sockets). A full fd scan is
one ``listdir`` + one ``readlink`` per fd of every process,
so it is rate limited (``fd_scan_interval``); a miss first rescans the pids that owned a
socket recently, then the processes not seen before (a new process is the likely owner of
a new socket), and only then, rate limited, every process.

Failure modes: unreadable files and vanished processes are skipped; malformed lines are
counted (``bad_lines``) and skipped. A socket that opened and closed between two polls is
never seen by the fallback: its flows are missed, which is why the packet path is
preferred.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

Addr = int | bytes
TCP, UDP = 6, 17
TCP_LISTEN = 0x0A
TCP_ESTABLISHED = 0x01
TCP_SYN_SENT = 0x02
_V4MAPPED = b"\0" * 10 + b"\xff\xff"
FILES = (("tcp", TCP, False), ("tcp6", TCP, True), ("udp", UDP, False), ("udp6", UDP, True))
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
_NLH = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBBI")  # inet_diag_req_v2 head; then inet_diag_sockid
_SOCKID = struct.Struct("!HH16s16s")
_TAIL = struct.Struct("=III")  # idiag_if, idiag_cookie[2]
_MSG_INODE = struct.Struct("=I")  # inet_diag_msg.idiag_inode at offset 68
ALL_BUT_TIME_WAIT = 0xFFFFFFFF & ~(1 << 6)
TCP_CLOSE = 7


@dataclass(frozen=True, slots=True)
class Sock:
    proto: int
    laddr: Addr
    lport: int
    raddr: Addr
    rport: int
    state: int
    inode: int


def _addr(hexaddr: str) -> Addr:
    raw = bytes.fromhex(hexaddr)
    if len(raw) == 4:
        return int.from_bytes(raw, "little")
    if len(raw) != 16:
        raise ValueError(hexaddr)
    b = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    if b.startswith(_V4MAPPED):
        return int.from_bytes(b[12:], "big")
    return b


def parse(text: str, proto: int) -> tuple[list[Sock], int]:
    """The sockets of one /proc/net file, and the number of lines that did not parse."""
    out: list[Sock] = []
    bad = 0
    for line in text.splitlines()[1:]:
        f = line.split()
        try:
            la, lp = f[1].split(":")
            ra, rp = f[2].split(":")
            out.append(Sock(proto, _addr(la), int(lp, 16), _addr(ra), int(rp, 16),
                            int(f[3], 16), int(f[9])))  # fmt: skip
        except (IndexError, ValueError):
            bad += 1
    return out, bad


def _raw(a: Addr) -> tuple[int, bytes]:
    if isinstance(a, int):
        return socket.AF_INET, a.to_bytes(4, "big") + bytes(12)
    return socket.AF_INET6, a


def _from_raw(family: int, raw: bytes) -> Addr:
    if family == socket.AF_INET:
        return int.from_bytes(raw[:4], "big")
    if raw.startswith(_V4MAPPED):
        return int.from_bytes(raw[12:16], "big")
    return bytes(raw[:16])


class SockDiag:
    """``NETLINK_SOCK_DIAG`` queries of the agent's network namespace (``ok`` is False
    when the kernel refuses them, e.g. gVisor or no inet_diag: use /proc/net)."""

    def __init__(self) -> None:
        self.seq = 0
        self.lookups = 0
        try:
            self.sock: socket.socket | None = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
            self.sock.bind((0, 0))
            self.sock.settimeout(0.5)
            self.ok = True
            self.dump(TCP, socket.AF_INET, 1 << TCP_LISTEN)  # probe: raises if refused
        except OSError:
            self.close()

    def close(self) -> None:
        if getattr(self, "sock", None) is not None:
            assert self.sock is not None
            self.sock.close()
        self.sock = None
        self.ok = False

    def _send(self, proto: int, family: int, states: int, flags: int,
              sid: bytes = bytes(_SOCKID.size)) -> int:  # fmt: skip
        assert self.sock is not None
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        body = _REQ.pack(family, proto, 0, 0, states) + sid + _TAIL.pack(0, 0xFFFFFFFF,
                                                                          0xFFFFFFFF)
        self.sock.send(_NLH.pack(_NLH.size + len(body), SOCK_DIAG_BY_FAMILY,
                                 NLM_F_REQUEST | flags, self.seq, 0) + body)  # fmt: skip
        return self.seq

    def lookup(self, proto: int, laddr: Addr, lport: int, raddr: Addr,
               rport: int) -> int | None:  # fmt: skip
        """The inode of the socket whose local end is (laddr, lport) and whose peer is
        (raddr, rport) (an unconnected UDP socket matches any peer); 0 for a socket that
        has no owner (TIME_WAIT, not yet accepted); None when there is none."""
        if self.sock is None or isinstance(laddr, int) != isinstance(raddr, int):
            return None
        family, la = _raw(laddr)
        _f, ra = _raw(raddr)
        # udp_dump_one looks the pair up as an incoming datagram: peer first
        sid = (_SOCKID.pack(rport, lport, ra, la) if proto == UDP
               else _SOCKID.pack(lport, rport, la, ra))  # fmt: skip
        self.lookups += 1
        try:
            seq = self._send(proto, family, 0xFFFFFFFF, 0, sid)
            for _ in range(8):
                data = self.sock.recv(8192) if self.sock is not None else b""
                if len(data) < _NLH.size:
                    return None
                _ln, typ, _fl, rseq, _pid = _NLH.unpack_from(data)
                if rseq != seq:
                    continue  # a stale reply
                if typ != SOCK_DIAG_BY_FAMILY or len(data) < 88:
                    return None
                sp, dp = struct.unpack_from("!HH", data, 20)
                # the kernel falls back to a listener: not the socket asked for
                if sp != lport or (dp != rport and not (proto == UDP and dp == 0)):
                    return None
                return int(_MSG_INODE.unpack_from(data, 84)[0])
        except OSError:
            return None
        return None

    def dump(self, proto: int, family: int, states: int) -> list[Sock]:
        """Every socket of ``proto``/``family`` whose state bit is in ``states``."""
        out: list[Sock] = []
        seq = self._send(proto, family, states, NLM_F_DUMP)
        assert self.sock is not None
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + _NLH.size <= len(data):
                ln, typ, _fl, rseq, _pid = _NLH.unpack_from(data, off)
                if ln < _NLH.size:
                    return out
                if rseq == seq:
                    if typ == NLMSG_DONE:
                        return out
                    if typ == NLMSG_ERROR:
                        err = struct.unpack_from("=i", data, off + 16)[0]
                        raise OSError(-err, os.strerror(-err))
                    if typ == SOCK_DIAG_BY_FAMILY and ln >= 88:
                        fam, st = data[off + 16], data[off + 17]
                        sp, dp, src, dst = _SOCKID.unpack_from(data, off + 20)
                        ino = _MSG_INODE.unpack_from(data, off + 84)[0]
                        out.append(Sock(proto, _from_raw(fam, src), sp, _from_raw(fam, dst),
                                        dp, st, ino))  # fmt: skip
                off += (ln + 3) & ~3

    def sockets(self, states: int = ALL_BUT_TIME_WAIT) -> list[Sock]:
        out: list[Sock] = []
        for proto in (TCP, UDP):
            for family in (socket.AF_INET, socket.AF_INET6):
                out += self.dump(proto, family, states)
        return out


class NetProc:
    """Sockets of the namespace and who owns them."""

    def __init__(self, proc: str = "/proc", fd_scan_interval: float = 0.2,
                 skip_pids: Iterable[int] = (), diag: bool = True) -> None:  # fmt: skip
        self.proc = proc
        self.fd_scan_interval = fd_scan_interval
        self.skip = set(skip_pids)
        self.owner: dict[int, int] = {}  # inode -> pid
        self.hot: dict[int, None] = {}  # pids that owned a socket recently (ordered)
        self.known: set[int] = set()  # pids seen by the last listing of <proc>
        self._last_full = -1e9
        self.bad_lines = 0
        self.full_scans = 0
        self.pid_scans = 0
        self.reads = 0
        # a fake proc tree (tests) has its own net/ files: only the real one has sock_diag
        self.diag: SockDiag | None = SockDiag() if diag and proc == "/proc" else None
        if self.diag is not None and not self.diag.ok:
            self.diag = None

    def close(self) -> None:
        if self.diag is not None:
            self.diag.close()
            self.diag = None

    def sockets(self) -> list[Sock]:
        """Every socket but TIME_WAIT ones (which have no owner)."""
        self.reads += 1
        if self.diag is not None:
            try:
                return self.diag.sockets()
            except OSError:
                self.close()
        out: list[Sock] = []
        for name, proto, _v6 in FILES:
            try:
                with open(f"{self.proc}/net/{name}", encoding="ascii", errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            socks, bad = parse(text, proto)
            self.bad_lines += bad
            out += [s for s in socks if s.proto != TCP or s.state != 6]
        return out

    def listening(self) -> list[Sock]:
        """Listening TCP and unconnected UDP sockets (a dump filtered in the kernel)."""
        if self.diag is not None:
            try:
                return [s for s in (self.diag.sockets(1 << TCP_LISTEN | 1 << TCP_CLOSE))
                        if s.proto == UDP or s.state == TCP_LISTEN]  # fmt: skip
            except OSError:
                self.close()
        return [s for s in self.sockets() if s.state == TCP_LISTEN
                or (s.proto == UDP and s.rport == 0)]  # fmt: skip

    def _scan_pid(self, pid: int) -> int:
        found = 0
        base = f"{self.proc}/{pid}/fd"
        self.pid_scans += 1
        try:
            names = os.listdir(base)
        except OSError:
            self.hot.pop(pid, None)
            return 0
        owner = self.owner
        for n in names:
            try:
                link = os.readlink(f"{base}/{n}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owner[int(link[8:-1])] = pid
                found += 1
        if found:
            self.hot.pop(pid, None)
            self.hot[pid] = None  # most recent last
            while len(self.hot) > 64:
                del self.hot[next(iter(self.hot))]
        return found

    def _pids(self) -> list[int]:
        try:
            names = os.listdir(self.proc)
        except OSError:
            return []
        return [int(n) for n in names if n.isdigit() and int(n) not in self.skip]

    def owner_of(self, inodes: Iterable[int], now: float) -> dict[int, int]:
        """inode -> pid for the inodes it can find: the cache, then the hot pids, then the
        processes not seen before, then (at most once per ``fd_scan_interval``) every
        process; each step only while some inode is still missing."""
        want = {i for i in inodes if i}
        owner = self.owner
        missing = {i for i in want if i not in owner}
        if missing:
            for pid in list(self.hot)[::-1]:
                if self._scan_pid(pid):
                    missing = {i for i in missing if i not in owner}
                    if not missing:
                        break
        if missing:
            pids = self._pids()
            fresh = [p for p in pids if p not in self.known]
            self.known = set(pids)
            for pid in sorted(fresh, reverse=True):
                if self._scan_pid(pid):
                    missing = {i for i in missing if i not in owner}
                    if not missing:
                        break
            if missing and now - self._last_full >= self.fd_scan_interval:
                self._last_full = now
                self.full_scans += 1
                for pid in pids:
                    if pid not in self.hot:
                        self._scan_pid(pid)
        res = {i: owner[i] for i in want if i in owner}
        if len(owner) > 65536:
            owner.clear()
        return res


def listeners(socks: Iterable[Sock]) -> set[tuple[int, Addr, int]]:
    """(proto, addr, port) of listening TCP sockets and unconnected bound UDP ones."""
    out: set[tuple[int, Addr, int]] = set()
    for s in socks:
        if (s.proto == TCP and s.state == TCP_LISTEN) or (s.proto == UDP and s.rport == 0):
            out.add((s.proto, s.laddr, s.lport))
    return out


def listener_check(table: set[tuple[int, Addr, int]]) -> Callable[[int, Addr, int], bool]:
    def check(proto: int, addr: Addr, port: int) -> bool:
        if (proto, addr, port) in table:
            return True
        return (proto, 0, port) in table or (proto, b"\0" * 16, port) in table
    return check


@dataclass(slots=True)
class Tracked:
    """A socket the fallback follows between polls."""

    sock: Sock
    first: int
    last: int
    established: bool
    pid: int | None
    #: (exec_id, exe) of the owner, fixed when first seen (it may be gone at the end)
    who: tuple[str | None, str | None] = (None, None)


class ProcNetFlows:
    """The fallback: flows as sockets that appear and vanish between two polls."""

    def __init__(self, netproc: NetProc) -> None:
        self.netproc = netproc
        self.live: dict[tuple[int, Addr, int, Addr, int], Tracked] = {}
        self.listening: set[tuple[int, Addr, int]] = set()
        self.listen_new: list[tuple[Sock, int | None]] = []

    def poll(self, now_ns: int, mono: float) -> tuple[list[Tracked], list[Tracked]]:
        """(new sockets, ended sockets) since the last poll; listening sockets seen for
        the first time go to ``listen_new``."""
        socks = self.netproc.sockets()
        lst = listeners(socks)
        fresh_l = [s for s in socks if (s.proto, s.laddr, s.lport) in lst - self.listening
                   and (s.proto == UDP or s.state == TCP_LISTEN)]  # fmt: skip
        self.listening = lst
        seen: dict[tuple[int, Addr, int, Addr, int], Sock] = {}
        for s in socks:
            if s.rport == 0 or s.state == TCP_LISTEN or not s.inode:
                continue  # inode 0: TIME_WAIT, or not yet accepted (no owner)
            seen[(s.proto, s.laddr, s.lport, s.raddr, s.rport)] = s
        new_keys = [k for k in seen if k not in self.live]
        owners = self.netproc.owner_of(
            [seen[k].inode for k in new_keys] + [s.inode for s in fresh_l], mono)
        self.listen_new = [(s, owners.get(s.inode)) for s in fresh_l]
        new = []
        for k in new_keys:
            s = seen[k]
            t = Tracked(s, now_ns, now_ns, s.state == TCP_ESTABLISHED or s.proto == UDP,
                        owners.get(s.inode))  # fmt: skip
            self.live[k] = t
            new.append(t)
        for k, s in seen.items():
            t = self.live[k]
            t.last = now_ns
            if s.state == TCP_ESTABLISHED:
                t.established = True
        ended = [self.live.pop(k) for k in [k for k in self.live if k not in seen]]
        return new, ended


Who = tuple[int, str | None, str | None]  # pid, exec_id, exe


class BoundSockets:
    """Local (proto, address, port) -> the traced process that bound it, from the tracer's
    ``R.BIND``/``R.LISTEN`` records (wrapper mode): a TCP listener is known at ``listen``
    (joined to the ``bind`` of the same (pid, fd)), a bound socket never listened on is
    taken for UDP (the records do not carry the socket type). Bounded (``max_entries``,
    oldest dropped first); an entry whose owner exited still names flows that started
    before the exit."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._bound: dict[tuple[int, int], tuple[Addr, int, Who, int]] = {}  # (pid, fd)
        # key -> (who, since ns, exited ns | None)
        self.owners: dict[tuple[int, Addr, int], tuple[Who, int, int | None]] = {}
        self._by_pid: dict[int, list[tuple[int, Addr, int]]] = {}
        self.evicted = 0

    def _put(self, key: tuple[int, Addr, int], who: Who, t: int) -> None:
        self.owners.pop(key, None)
        self.owners[key] = (who, t, None)
        self._by_pid.setdefault(who[0], []).append(key)
        while len(self.owners) > self.max_entries:
            self.owners.pop(next(iter(self.owners)))
            self.evicted += 1

    def bind(self, pid: int, fd: int, addr: Addr, port: int, who: Who, t: int) -> None:
        self._bound.pop((pid, fd), None)
        self._bound[(pid, fd)] = (addr, port, who, t)
        while len(self._bound) > self.max_entries:
            self._bound.pop(next(iter(self._bound)))
        if port:
            self._put((UDP, addr, port), who, t)

    def listen(self, pid: int, fd: int, t: int) -> tuple[Addr, int, Who] | None:
        """The bound address of a listening socket, None if its bind was not seen (an
        implicit bind, or a port 0 bind whose port only the kernel knows)."""
        b = self._bound.get((pid, fd))
        if b is None or not b[1]:
            return None
        addr, port, who, _t = b
        if self.owners.get((UDP, addr, port), (None,))[0] == who:
            self.owners.pop((UDP, addr, port))  # it is TCP after all
        self._put((TCP, addr, port), who, t)
        return addr, port, who

    def exited(self, pid: int, t: int) -> None:
        for key in self._by_pid.pop(pid, []):
            v = self.owners.get(key)
            if v is not None and v[0][0] == pid and v[2] is None:
                self.owners[key] = (v[0], v[1], t)
        for k in [k for k in self._bound if k[0] == pid] if self._bound else []:
            del self._bound[k]

    def expire(self, now: int, after: int = 60_000_000_000) -> None:
        for key in [k for k, v in self.owners.items() if v[2] is not None and now - v[2] > after]:
            del self.owners[key]

    def owner(self, proto: int, addr: Addr, port: int, start: int) -> Who | None:
        """The traced process listening on (proto, addr, port) when a flow started then
        (a wildcard bind matches any address; ``::`` also IPv4, as on a dual-stack
        socket)."""
        for key in ((proto, addr, port), (proto, 0, port), (proto, b"\0" * 16, port)):
            v = self.owners.get(key)
            if v is not None and start >= v[1] - 50_000_000 and (v[2] is None or start <= v[2]):
                return v[0]
        return None
