"""Packet capture benchmark on loopback: our TPACKET_V3 capture + flow aggregation, side
by side with scapy's ``sniff`` and ``tcpdump -w /dev/null`` on the same traffic.

Traffic: ``bench/workloads/udp_flood.c`` (built with gcc into a temp dir) sends small UDP
datagrams to 127.0.0.1 (or to 127.1.0.0 + i for distinct flows) on a port it binds
itself; every run is bounded in count and time. Nothing leaves the machine.

Measures (printed as a table and, with ``--json``, as JSON):

- ``ring_walk``: packets/s that one core captures and aggregates, from a pre-filled
  64 MiB ring (the loop alone: no sender competing for the CPU), for one flow and for
  10,000 flows;
- ``live``: the same N-packet flood at full speed for each tool: packets seen, kernel
  drops, CPU seconds and packets per CPU second (ours, scapy, tcpdump);
- ``drops_50k``: the worker-style loop (default 8 MiB ring, ``blocks_per_poll``) at
  50,000 pkt/s: sent, seen, kernel drops;
- ``cpu``: the whole network source (capture, flows, attribution, sweeps) at 1,000 and
  10,000 pkt/s: CPU % of one core;
- ``flows_100k``: RSS of the source holding 100,000 live flows, and how long its
  ``close()`` (the final export at shutdown) takes.

Needs root (CAP_NET_RAW), gcc; scapy and tcpdump are optional (skipped, said so).
Usage: ``.venv/bin/python bench/capture_bench.py [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lw_embed.config import config_from_dict  # noqa: E402
from lw_embed.kernel import packet as pk  # noqa: E402
from lw_embed.pipeline.enrich import ProcessTable  # noqa: E402
from lw_embed.pipeline.flows import FlowTable  # noqa: E402
from lw_embed.sources.base import SourceContext  # noqa: E402
from lw_embed.sources.packets import NetworkSource  # noqa: E402


def build(tmp: Path) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit("capture_bench: no gcc/cc on PATH")
    exe = tmp / "udp_flood"
    subprocess.run([cc, "-O2", "-Wall", "-o", str(exe), str(HERE / "workloads/udp_flood.c")],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    return exe


def flood(exe: Path, count: int, rate: int = 0, size: int = 16,
          dests: int = 1) -> subprocess.Popen[str]:  # fmt: skip
    return subprocess.Popen([str(exe), str(count), str(rate), str(size), str(dests)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip


def sent_of(p: subprocess.Popen[str]) -> int:
    out, _ = p.communicate(timeout=150)
    return int(out.split()[0])


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def walk(cap: pk.Capture, table: FlowTable, mv: memoryview, budget: int) -> int:
    """The source's V3 walk (lw_embed.sources.packets.NetworkSource._capture): blocks."""
    return cap.walk_v3(mv, table.ingest_v3, budget)[0]


def flood_filter(snap: int = 128) -> list[pk.Insn]:
    """Inbound IPv4 UDP datagrams of IP total length 44 (the flood's 16-byte payload):
    every tool gets the same selection (tcpdump/scapy: ``inbound and udp and ip[2:2] = 44``)."""
    a = pk._Asm()
    a.op(pk.BPF_LD_W_ABS, pk.SKF_AD_OFF + pk.SKF_AD_PKTTYPE)
    a.op(pk.BPF_JEQ_K, pk.PACKET_OUTGOING, "drop", 0)
    a.op(pk.BPF_LD_W_ABS, pk.SKF_AD_OFF + pk.SKF_AD_PROTOCOL)
    a.op(pk.BPF_JEQ_K, 0x0800, 0, "drop")
    a.op(pk.BPF_LD_B_ABS, pk.SKF_NET_OFF + 9)
    a.op(pk.BPF_JEQ_K, 17, 0, "drop")
    a.op(pk.BPF_LD_H_ABS, pk.SKF_NET_OFF + 2)
    a.op(pk.BPF_JEQ_K, 44, "ok", "drop")
    a.label("ok")
    a.op(pk.BPF_RET_K, snap)
    a.label("drop")
    a.op(pk.BPF_RET_K, 0)
    return a.code()


PCAP_FILTER = "inbound and udp and ip[2:2] = 44"


# -- ours ---------------------------------------------------------------------------------
def ring_walk(exe: Path, n: int, dests: int = 1) -> dict[str, Any]:
    # blocks retire when full (1 s timeout): the ring holds ~450,000 small frames
    spec = pk.RingSpec(1 << 20, 64, 2048, 1000)
    cap, _ = pk.open_capture("lo", flood_filter(), spec, ("tpacket_v3",))
    assert cap.mm is not None
    mv = memoryview(cap.mm)
    try:
        sent = sent_of(flood(exe, n, 0, 16, dests))
        time.sleep(1.2)  # the last block's retire timeout
        table = FlowTable()
        c0, t0 = cpu_self(), time.perf_counter()
        while walk(cap, table, mv, cap.block_nr):
            pass
        cpu, wall = cpu_self() - c0, time.perf_counter() - t0
        _pk, drops, _fr = cap.read_stats()
        return {"sent": sent, "walked": table.packets, "kernel_drops": drops,
                "cpu_s": round(cpu, 3), "pkt_per_s": round(table.packets / max(wall, 1e-9)),
                "pkt_per_cpu_s": round(table.packets / max(cpu, 1e-9)),
                "flows": len(table)}  # fmt: skip
    finally:
        mv.release()
        cap.close()


def live_ours(exe: Path, n: int) -> dict[str, Any]:
    cap, _ = pk.open_capture("lo", flood_filter(), pk.RingSpec(1 << 20, 8, 2048, 10),
                             ("tpacket_v3",))  # fmt: skip
    assert cap.mm is not None
    mv = memoryview(cap.mm)
    table = FlowTable()
    try:
        c0 = cpu_self()
        p = flood(exe, n)
        while p.poll() is None:
            select.select([cap.sock], [], [], 0.05)
            walk(cap, table, mv, cap.block_nr)
        sent = sent_of(p)
        cap.settle(cap.cursor)
        walk(cap, table, mv, cap.block_nr)
        cpu = cpu_self() - c0
        _pk, drops, _fr = cap.read_stats()
        return {"sent": sent, "seen": table.packets, "kernel_drops": drops,
                "cpu_s": round(cpu, 3), "pkt_per_cpu_s": round(table.packets / max(cpu, 1e-9))}
    finally:
        mv.release()
        cap.close()


def drops_at(exe: Path, rate: int, seconds: float) -> dict[str, Any]:
    """The worker-style loop with the default ring and per-poll budget."""
    cfg = config_from_dict({}).network
    spec = pk.RingSpec(cfg.block_size, cfg.block_count, cfg.frame_size, cfg.retire_ms)
    cap, _ = pk.open_capture("lo", flood_filter(), spec, ("tpacket_v3",))
    assert cap.mm is not None
    mv = memoryview(cap.mm)
    table = FlowTable()
    try:
        c0, t0 = cpu_self(), time.perf_counter()
        p = flood(exe, int(rate * seconds), rate)
        while p.poll() is None:
            select.select([cap.sock], [], [], 0.05)
            walk(cap, table, mv, cfg.blocks_per_poll)
        sent = sent_of(p)
        cap.settle(cap.cursor)
        walk(cap, table, mv, cap.block_nr)
        cpu, wall = cpu_self() - c0, time.perf_counter() - t0
        _pk, drops, freezes = cap.read_stats()
        return {"rate": rate, "sent": sent, "seen": table.packets, "kernel_drops": drops,
                "ring_freezes": freezes, "cpu_pct": round(100 * cpu / wall, 1)}  # fmt: skip
    finally:
        mv.release()
        cap.close()


def _source(**cfg: Any) -> NetworkSource:
    config = config_from_dict({"network": {"interfaces": ["lo"], **cfg}})
    ctx = SourceContext(config, "sidecar", "namespace", ProcessTable("b", 1, 0, 4), "/proc",
                        "/tmp", 1, time.time_ns, time.monotonic)  # fmt: skip
    return NetworkSource(config.network, ctx)


def drive(src: NetworkSource, until: Any) -> int:
    """The worker's loop for one source: wait on its fd until next_due, then poll."""
    events = 0
    fd = src.fileno()
    while not until():
        now = time.monotonic()
        due = src.next_due()
        wait = 0.05 if due is None else min(0.05, max(0.0, due - now))
        if fd is not None:
            select.select([fd], [], [], wait)
        else:
            time.sleep(wait)
        events += len(list(src.poll(time.monotonic())))
    return events


def source_cpu(exe: Path, rate: int, seconds: float) -> dict[str, Any]:
    src = _source()
    try:
        c0, t0 = cpu_self(), time.perf_counter()
        p = flood(exe, int(rate * seconds), rate)
        drive(src, lambda: p.poll() is not None)
        cpu, wall = cpu_self() - c0, time.perf_counter() - t0
        sent = sent_of(p)
        m = src.metrics()
        return {"rate": rate, "sent": sent, "cpu_pct": round(100 * cpu / wall, 2),
                "packets": m["network.packets"], "kernel_drops": m["network.kernel_drops"]}
    finally:
        list(src.close())


def flows_100k(exe: Path, n: int = 100_000) -> dict[str, Any]:
    src = _source(max_flows=4 * n, max_events_queued=4 * n, udp_timeout=3600,
                  active_timeout=3600)  # fmt: skip
    try:
        base = rss()
        c0 = cpu_self()
        p = flood(exe, n, 0, 16, n)
        deadline = time.monotonic() + 120
        drive(src, lambda: (p.poll() is not None and src.table.packets >= n)
              or time.monotonic() > deadline)  # fmt: skip
        sent = sent_of(p)
        deadline = time.monotonic() + 30  # let attribution retries finish
        drive(src, lambda: not src._retry or time.monotonic() > deadline)
        cpu = cpu_self() - c0
        live, grown = len(src.table), rss() - base
        lookups = src.netproc.diag.lookups if src.netproc.diag else 0
        t0 = time.perf_counter()
        out = list(src.close())
        close_s = time.perf_counter() - t0
        attributed = sum(1 for e in out if getattr(e, "attribution", "") == "inode")
        return {"sent": sent, "live_flows": live, "rss_growth_mib": round(grown / 2**20, 1),
                "bytes_per_flow": round(grown / max(live, 1)), "ingest_cpu_s": round(cpu, 2),
                "close_s": round(close_s, 2), "final_events": len(out),
                "attributed_inode": attributed, "diag_lookups": lookups}  # fmt: skip
    finally:
        if src.cap is not None:
            list(src.close())


# -- the others ---------------------------------------------------------------------------
SCAPY = """
import json, resource, sys
from scapy.all import conf, sniff
n = 0
def cb(_p):
    global n
    n += 1
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
c0 = 0.0
def ready():
    global c0
    c0 = cpu()
    print("ready", flush=True)
sniff(iface="lo", filter=sys.argv[1], store=False, prn=cb, timeout=float(sys.argv[2]),
      started_callback=ready)
print(json.dumps({"seen": n, "cpu_s": cpu() - c0}), flush=True)
"""


def live_scapy(exe: Path, n: int, timeout: float) -> dict[str, Any]:
    try:
        import scapy  # noqa: F401
    except ImportError:
        return {"skipped": "scapy not installed"}
    p = subprocess.Popen([sys.executable, "-c", SCAPY, PCAP_FILTER, str(timeout)],
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line.startswith("ready"):
            return {"skipped": f"scapy did not start: {line!r}"}
        sent = sent_of(flood(exe, n))
        out, _ = p.communicate(timeout=timeout + 60)
        r = json.loads(out.strip().splitlines()[-1])
        return {"sent": sent, "seen": r["seen"], "kernel_drops": "n/a (sent - seen: "
                f"{sent - r['seen']})", "cpu_s": round(r["cpu_s"], 3),
                "pkt_per_cpu_s": round(r["seen"] / max(r["cpu_s"], 1e-9))}  # fmt: skip
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def live_tcpdump(exe: Path, n: int) -> dict[str, Any]:
    td = shutil.which("tcpdump")
    if td is None:
        return {"skipped": "tcpdump not installed (apt-get install -y tcpdump)"}
    p = subprocess.Popen([td, "-i", "lo", "-n", "-B", "8192", "-s", "128", "-w", "/dev/null",
                          PCAP_FILTER], stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert p.stderr is not None
        t_end = time.monotonic() + 10
        while time.monotonic() < t_end and "listening on" not in p.stderr.readline():
            pass
        sent = sent_of(flood(exe, n))
        time.sleep(1.5)  # its buffer timeout (1 s)
        c0 = children_cpu()  # the sender has been waited for: tcpdump is what follows
        p.send_signal(signal.SIGINT)
        _out, err = p.communicate(timeout=30)
        cpu = children_cpu() - c0
        stats = {}
        for line in err.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0].isdigit():
                stats[" ".join(parts[2:])] = int(parts[0])
        seen = stats.get("captured", 0)
        return {"sent": sent, "seen": seen, "kernel_drops": stats.get("dropped by kernel"),
                "cpu_s": round(cpu, 3), "pkt_per_cpu_s": round(seen / max(cpu, 1e-9))}
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("capture_bench: needs root (AF_PACKET)")
    q = args.quick
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lw-capbench-") as tmp:
        exe = build(Path(tmp))
        n_live = 100_000 if q else 1_000_000
        res["ring_walk"] = ring_walk(exe, 50_000 if q else 400_000)
        res["ring_walk_10k_flows"] = ring_walk(exe, 50_000 if q else 400_000, 10_000)
        res["live"] = {"ours": live_ours(exe, n_live), "tcpdump": live_tcpdump(exe, n_live),
                       "scapy": live_scapy(exe, n_live // 10, 30 if q else 60)}
        res["drops_50k"] = drops_at(exe, 50_000, 1 if q else 5)
        res["cpu"] = [source_cpu(exe, r, 1 if q else 5) for r in (1_000, 10_000)]
        res["flows_100k"] = flows_100k(exe, 10_000 if q else 100_000)
    ours = res["live"]["ours"]["pkt_per_cpu_s"]
    sc = res["live"]["scapy"].get("pkt_per_cpu_s")
    res["summary"] = {"ring_walk_pkt_per_s": res["ring_walk"]["pkt_per_s"],
                      "ours_vs_scapy": round(ours / sc, 1) if sc else None}  # fmt: skip
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k}: {json.dumps(v)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
