"""The network source end to end: flows from a real workload, attributed and named.

Targets are loopback and a network namespace + veth pair each test creates (names from
the test's pid); every process a test starts is killed by pid; namespaces are deleted in
``finally``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lw_embed.config import config_from_dict
from lw_embed.decode import iter_events
from lw_embed.pipeline.enrich import ProcessTable
from lw_embed.sources.base import SourceContext
from lw_embed.sources.packets import NetworkSource

pytestmark = [
    pytest.mark.linux,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, AF_PACKET, ptrace)"),
]
PY = sys.executable


def run_agent(tmp: Path, cmd: list[str], net: str, launcher: list[str] | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:  # fmt: skip
    cfg = tmp / "lw.toml"
    cfg.write_text("[network]\n" + net + "\n[aggregate.keys]\n")
    args = [*(launcher or []), PY, "-m", "lw_embed", "run", "--output", str(tmp / "out"),
            "--data-dir", str(tmp / "data"), "--config", str(cfg), "--", *cmd]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def wait_capture(ifname: str) -> str:
    """Workload prologue: wait (at most 30 s) until a packet socket bound to ``ifname``
    exists (the agent's capture; /proc/net/packet's Iface column is the ifindex)."""
    idx = socket.if_nametoindex(ifname)
    return (
        "import time as _t\n"
        "_end = _t.monotonic() + 30\n"
        f"while _t.monotonic() < _end and not any(l.split()[4] == '{idx}'\n"
        "        for l in open('/proc/net/packet').readlines()[1:]):\n"
        "    _t.sleep(0.02)\n"
    )


def events(tmp: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in iter_events([str(tmp / "out")]) if e["kind"] == kind]


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture
def netns() -> Iterator[tuple[str, str, str, str]]:
    """(namespace, root-side veth, root address, namespace address)."""
    n = os.getpid() % 200 + 20
    ns, va, vb = f"lwt{os.getpid()}", f"lwa{os.getpid()}", f"lwb{os.getpid()}"
    a, b = f"10.211.{n}.1", f"10.211.{n}.2"
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
        sh("ip", "link", "set", vb, "netns", ns)
        sh("ip", "addr", "add", f"{a}/24", "dev", va)
        sh("ip", "link", "set", va, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{b}/24", "dev", vb)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", vb, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, va, a, b
    finally:
        subprocess.run(["ip", "link", "del", va], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_http_to_another_namespace_is_one_attributed_flow(tmp_path: Path,
                                                          netns: tuple[str, str, str, str],
                                                          ) -> None:  # fmt: skip
    ns, veth, _a, b = netns
    body = tmp_path / "www" / "f.bin"
    body.parent.mkdir()
    body.write_bytes(os.urandom(50000))
    srv = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-m", "http.server", "8080",
                            "--bind", b, "--directory", str(body.parent)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        code = (wait_capture(veth) + "import socket, sys, time\n"
                "for _ in range(200):\n"
                f"    try: socket.create_connection(('{b}', 8080), 1).close(); break\n"
                "    except OSError: time.sleep(0.05)\n"
                f"s = socket.create_connection(('{b}', 8080))\n"
                "req = b'GET /f.bin HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n'\n"
                "s.sendall(req)\n"
                "got = 0\n"
                "while (d := s.recv(65536)): got += len(d)\n"
                "s.close()\n"
                "print(s.getsockname() if False else '', len(req), got)\n")  # fmt: skip
        # the readiness probes are flows too: the one that sent the request is checked
        r = run_agent(tmp_path, [PY, "-c", code], f'interfaces = ["{veth}"]')
        assert r.returncode == 0, r.stderr
        sent, got = (int(x) for x in r.stdout.split())
        flows = [f for f in events(tmp_path, "net.flow")
                 if f["resp_addr"] == b and f["resp_port"] == 8080 and f["orig_bytes"]]
        assert len(flows) == 1, flows
        f = flows[0]
        assert f["proto"] == "tcp" and f["direction"] == "syn"
        assert abs(f["orig_bytes"] - sent) <= 0.05 * sent
        assert abs(f["resp_bytes"] - got) <= 0.05 * got
        assert f["conn_state"] == "SF"
        assert f["attribution"] == "syscall"
        execs = [e for e in events(tmp_path, "process.exec") if e["argv"][:2] == [PY, "-c"]]
        assert f["exec_id"] == execs[0]["exec_id"]
    finally:
        srv.kill()
        srv.wait(10)


CHILD = wait_capture("lo") + """
import os, socket, sys, time
port = int(sys.argv[1])
pid = os.fork()
if pid == 0:
    print(os.getpid(), flush=True)
    for _ in range(500):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"hi")
        s.close()
    os._exit(0)
os.waitpid(pid, 0)
"""


def serve(n: int) -> tuple[socket.socket, threading.Thread]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(128)
    ls.settimeout(60)

    def loop() -> None:
        for _ in range(n):
            try:
                c, _ = ls.accept()
            except OSError:
                return
            c.recv(16)
            c.close()

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    return ls, th


def test_500_short_connections_attributed_by_syscall(tmp_path: Path) -> None:
    ls, th = serve(500)
    port = ls.getsockname()[1]
    try:
        r = run_agent(tmp_path, [PY, "-c", CHILD, str(port)], 'interfaces = ["lo"]')
        assert r.returncode == 0, r.stderr
        child = int(r.stdout.split()[0])
        flows = [f for f in events(tmp_path, "net.flow") if f["resp_port"] == port]
        assert len(flows) >= 495
        ok = [f for f in flows if f.get("pid") == child and f["attribution"] == "syscall"
              and f.get("exe", "").startswith("/") and "python" in f["exe"]]
        assert len(ok) >= 0.95 * 500, (len(ok), flows[:3])
    finally:
        ls.close()
        th.join(5)


SERVER = wait_capture("lo") + """
import os, socket, sys
port, ready, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
pid = os.fork()
if pid == 0:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(128)
    ls.settimeout(60)
    open(ready, "w").write(str(os.getpid()))
    for _ in range(n):
        c, _ = ls.accept()
        c.recv(16)
        c.close()
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_inbound_short_connections_attributed_to_the_traced_listener(tmp_path: Path) -> None:
    """The workload is the server; the client (this test) is outside the traced tree, so
    no connect is traced and only the traced bind/listen can name the flow's owner."""
    n = 50
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    ready = tmp_path / "ready"
    cfg = tmp_path / "lw.toml"
    cfg.write_text('[network]\ninterfaces = ["lo"]\n[aggregate.keys]\n')
    agent = subprocess.Popen(
        [PY, "-m", "lw_embed", "run", "--output", str(tmp_path / "out"), "--data-dir",
         str(tmp_path / "data"), "--config", str(cfg), "--", PY, "-c", SERVER, str(port),
         str(ready), str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 60
        while not ready.exists() or not ready.read_text():
            assert time.monotonic() < end and agent.poll() is None, "server not ready"
            time.sleep(0.02)
        server = int(ready.read_text())
        for _ in range(n):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                c.sendall(b"hi")
                c.recv(16)  # until the server closes
        _out, err = agent.communicate(timeout=60)
        assert agent.returncode == 0, err
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
    flows = [f for f in events(tmp_path, "net.flow") if f["resp_port"] == port]
    assert len(flows) >= n
    ok = [f for f in flows if f.get("pid") == server and f["attribution"] == "syscall"
          and "python" in f.get("exe", "")]
    assert len(ok) >= 0.95 * n, (len(ok), flows[:3])
    listens = [e for e in events(tmp_path, "net.listen") if e["port"] == port]
    assert [e.get("pid") for e in listens] == [server], listens


def _source(cfg: dict[str, Any], mode: str = "sidecar") -> NetworkSource:
    config = config_from_dict({"network": cfg})
    ctx = SourceContext(config, mode, "namespace", ProcessTable("b", 1, 0, 4), "/proc",
                        "/tmp", 1, time.time_ns, time.monotonic)  # fmt: skip
    return NetworkSource(config.network, ctx)


@pytest.mark.parametrize(("capture", "want"), [("auto", "procfs"), ("tpacket_v3", "tpacket_v3")])
def test_in_app_mode_polls_unless_capture_is_asked_for(capture: str, want: str) -> None:
    """In-app, packets would be parsed under the host's GIL: the default there is /proc
    polling; naming a capture mode still gets it."""
    src = _source({"interfaces": ["lo"], "capture": capture}, mode="in-app")
    try:
        tech, reason = src.technique()
        assert tech == want, reason
        if want == "procfs":
            assert "in-app" in reason
    finally:
        list(src.close())


SHORT = """
import os, socket, sys, time, threading
port = int(sys.argv[1])
def one():
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"hi")
    time.sleep(0.08)
    s.close()
for _ in range(50):
    ts = [threading.Thread(target=one) for _ in range(10)]
    [t.start() for t in ts]
    [t.join() for t in ts]
"""


def test_500_short_connections_attributed_by_inode_sidecar_style() -> None:
    ls, th = serve(500)
    port = ls.getsockname()[1]
    src = _source({"interfaces": ["lo"]})  # the defaults: 20 ms retire, 0.2 s full scans
    assert src.technique()[0] == "tpacket_v3"
    child = subprocess.Popen([PY, "-c", SHORT, str(port)])
    out: list[Any] = []
    try:
        deadline = time.monotonic() + 60
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
            out += src.poll(time.monotonic())
        out += src.close()
    finally:
        child.kill()
        child.wait(10)
        ls.close()
        th.join(5)
    flows = [e for e in out if e.kind == "net.flow" and e.resp_port == port]
    assert len(flows) >= 495
    ok = [f for f in flows if f.pid == child.pid and f.attribution == "inode"
          and "python" in (f.exe or "")]  # fmt: skip
    assert len(ok) >= 0.95 * 500, (len(ok), src.netproc.full_scans)


def test_dns_answer_names_the_flow_then_expires(tmp_path: Path) -> None:
    from scapy.layers.dns import DNS, DNSQR, DNSRR

    dns_addr, peer = "127.0.0.77", "127.0.0.88"
    resp_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    resp_sock.bind((dns_addr, 53))
    ls = socket.socket()
    ls.bind((peer, 0))
    ls.listen(4)
    src = _source({"interfaces": ["lo"], "retire_ms": 5, "close_timeout": 0,
                   "sweep_interval": 0.05})  # fmt: skip
    out: list[Any] = []
    try:
        q = DNS(id=7, rd=1, qd=DNSQR(qname="svc.example.test", qtype="A"))
        cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        cli.sendto(bytes(q), (dns_addr, 53))
        _data, addr = resp_sock.recvfrom(512)
        ans = DNS(id=7, qr=1, aa=1, qd=DNSQR(qname="svc.example.test", qtype="A"),
                  an=DNSRR(rrname="svc.example.test", type="A", ttl=1, rdata=peer))
        resp_sock.sendto(bytes(ans), addr)
        cli.recv(512)
        c = socket.create_connection((peer, ls.getsockname()[1]))
        a, _ = ls.accept()
        key = 0x7F000058
        deadline = time.monotonic() + 10
        while not src.dns.lookup(key) and time.monotonic() < deadline:
            out += src.poll(time.monotonic())
            time.sleep(0.01)
        time.sleep(1.2)  # past the TTL, but the connection is open: pinned
        for _ in range(5):
            out += src.poll(time.monotonic())
            time.sleep(0.06)
        assert src.dns.lookup(key) == ("svc.example.test",)
        c.close()
        a.close()
        deadline = time.monotonic() + 10
        while src.dns.lookup(key) and time.monotonic() < deadline:
            out += src.poll(time.monotonic())
            time.sleep(0.05)
        assert src.dns.lookup(key) == ()
    finally:
        out += src.close()
        resp_sock.close()
        ls.close()
    dns = [e for e in out if e.kind == "net.dns"]
    assert dns and dns[0].query == "svc.example.test" and dns[0].answers[0][2] == peer
    flows = [e for e in out if e.kind == "net.flow" and e.resp_addr == peer]
    assert flows and flows[0].peer_names == ("svc.example.test",)


def test_without_cap_net_raw_flows_come_from_proc_net(tmp_path: Path) -> None:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4)
    port = ls.getsockname()[1]
    code = (f"import socket, time\ns = socket.create_connection(('127.0.0.1', {port}))\n"
            "time.sleep(3.0)\ns.close()\nprint('ran')\n")  # fmt: skip
    try:
        r = run_agent(tmp_path, [PY, "-c", code], "procfs_interval = 0.1",
                      launcher=["setpriv", "--bounding-set", "-net_raw", "--"])  # fmt: skip
        assert r.returncode == 0 and r.stdout == "ran\n", r.stderr
    finally:
        ls.close()
    caps = events(tmp_path, "agent.capabilities")[0]["report"]
    assert caps["techniques"]["network"] == "procfs"
    assert "not permitted" in caps["reasons"]["network"]
    flows = [f for f in events(tmp_path, "net.flow") if f["resp_port"] == port]
    assert len(flows) == 1 and flows[0]["source"] == "procfs"
    assert flows[0]["attribution"] == "inode" and "python" in flows[0]["exe"]
    # named when first seen: the owner has exited by the time the flow is exported
    execs = [e for e in events(tmp_path, "process.exec") if e["argv"][:2] == [PY, "-c"]]
    assert flows[0]["exec_id"] == execs[0]["exec_id"]


def test_close_exports_a_bounded_number_of_flows_and_counts_the_rest() -> None:
    """Shutdown stays quick with many live flows: at most SHUTDOWN_EXPORT_MAX records,
    the others counted as a loss (they are not silently dropped)."""
    from lw_embed.sources.packets import SHUTDOWN_EXPORT_MAX

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("0.0.0.0", 0))  # every 127.x address: no ICMP replies
    port = rx.getsockname()[1]
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    n = SHUTDOWN_EXPORT_MAX + 2000
    src = _source({"interfaces": ["lo"], "max_flows": 4 * n, "max_events_queued": 4 * n})
    out: list[Any] = []
    try:
        for i in range(n):  # one datagram to each of n loopback addresses: n flows
            tx.sendto(b"x", (f"127.2.{i >> 8}.{i & 255}", port))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(
                1 for k in src.table.flows if k[4] == port) < n:  # fmt: skip
            out += src.poll(time.monotonic())
            time.sleep(0.01)
        live = len(src.table)
        assert sum(1 for k in src.table.flows if k[4] == port) == n
        out += src.close()
    finally:
        rx.close()
        tx.close()
    final = [e for e in out if e.kind == "net.flow" and e.end_reason == "shutdown"]
    assert len(final) == SHUTDOWN_EXPORT_MAX
    assert src.losses()["network.flows_unexported"] == live - SHUTDOWN_EXPORT_MAX


def test_sock_diag_exact_lookups_and_dumps() -> None:
    """The attribution's socket lookup: the right inode for each end, nothing for a tuple
    that only a listener would match, unconnected UDP by its local end, IPv6 too."""
    from lw_embed.sources.netproc import TCP, UDP, SockDiag

    diag = SockDiag()
    assert diag.ok
    lo4, lo6 = 0x7F000001, bytes(15) + b"\x01"
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4)
    c = socket.create_connection(ls.getsockname())
    a, _ = ls.accept()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    ls6 = socket.socket(socket.AF_INET6)
    ls6.bind(("::1", 0))
    ls6.listen(4)
    c6 = socket.create_connection(ls6.getsockname()[:2])
    try:
        sp, cp, up = ls.getsockname()[1], c.getsockname()[1], u.getsockname()[1]
        assert diag.lookup(TCP, lo4, cp, lo4, sp) == os.fstat(c.fileno()).st_ino
        assert diag.lookup(TCP, lo4, sp, lo4, cp) == os.fstat(a.fileno()).st_ino
        assert diag.lookup(TCP, lo4, sp, lo4, 9) is None  # the kernel offers the listener
        assert diag.lookup(UDP, lo4, up, lo4, 5353) == os.fstat(u.fileno()).st_ino
        assert diag.lookup(TCP, lo6, c6.getsockname()[1], lo6,
                           ls6.getsockname()[1]) == os.fstat(c6.fileno()).st_ino  # fmt: skip
        listening = {(s.proto, s.lport) for s in diag.sockets(1 << 10 | 1 << 7)}
        assert {(TCP, sp), (UDP, up), (TCP, ls6.getsockname()[1])} <= listening
    finally:
        for s in (ls, c, a, u, ls6, c6):
            s.close()
        diag.close()


def test_inode_attribution_without_sock_diag_reads_proc_net() -> None:
    """gVisor-like: no sock_diag, so the /proc/net text serves the lookups."""
    ls, th = serve(20)
    port = ls.getsockname()[1]
    src = _source({"interfaces": ["lo"]})
    src.netproc.close()  # as if NETLINK_SOCK_DIAG were refused
    assert src.netproc.diag is None
    code = ("import socket, sys, time\n"
            "for _ in range(20):\n"
            f"    s = socket.create_connection(('127.0.0.1', {port}))\n"
            "    s.sendall(b'hi'); time.sleep(0.2); s.close()\n")  # fmt: skip
    child = subprocess.Popen([PY, "-c", code])
    out: list[Any] = []
    try:
        deadline = time.monotonic() + 60
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
            out += src.poll(time.monotonic())
        out += src.close()
    finally:
        child.kill()
        child.wait(10)
        ls.close()
        th.join(5)
    flows = [e for e in out if e.kind == "net.flow" and e.resp_port == port]
    ok = [f for f in flows if f.pid == child.pid and f.attribution == "inode"]
    assert len(flows) == 20 and len(ok) >= 19, [(f.attribution, f.pid) for f in flows]
    assert src.netproc.reads > 0


def test_default_config_captures_every_interface(tmp_path: Path) -> None:
    """No [network] interfaces (the default in a container): one capture on every
    interface, loopback included, so sidecars talking over localhost are seen."""
    code = (
        "import time as _t\n"
        "_end = _t.monotonic() + 30\n"  # until the agent's all-interfaces socket exists
        "while _t.monotonic() < _end and not any(l.split()[4] == '0'\n"
        "        for l in open('/proc/net/packet').readlines()[1:]):\n"
        "    _t.sleep(0.02)\n"
        # the socket is listed from its creation, before the ring and the real filter
        "_t.sleep(1.0)\n"
        "import socket, threading\n"
        "ls = socket.socket(); ls.bind(('127.0.0.1', 0)); ls.listen(1)\n"
        "def serve():\n"
        "    a, _ = ls.accept()\n"
        "    while a.recv(65536): pass\n"
        "    a.close()\n"
        "th = threading.Thread(target=serve); th.start()\n"
        "c = socket.create_connection(ls.getsockname()); c.sendall(b'q' * 3000); c.close()\n"
        "th.join(); print(ls.getsockname()[1])\n"
    )
    r = run_agent(tmp_path, [PY, "-c", code], "")
    assert r.returncode == 0, r.stderr
    port = int(r.stdout.split()[-1])
    caps = events(tmp_path, "agent.capabilities")[0]["report"]
    assert caps["techniques"]["network"] == "tpacket_v3", caps["reasons"]["network"]
    flows = [f for f in events(tmp_path, "net.flow") if f["resp_port"] == port]
    assert len(flows) == 1, flows
    assert flows[0]["orig_bytes"] == 3000 and flows[0]["attribution"] == "syscall"
