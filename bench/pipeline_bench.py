"""Pipeline benchmark: events/s through the worker's stages, bytes on the wire per exec
event, and RSS while replaying a spool backlog.

    .venv/bin/python bench/pipeline_bench.py [--quick] [--backlog-mib N]

(a) one core: filter (10 rules) -> aggregate (default keys) -> spool.append (CBOR, group
    fdatasync) -> lease -> encode_batch_raw -> brotli q5 -> ack, for a repetitive and a
    unique stream of process.exec / process.exit / net.connect events. Target >= 50,000/s.
(b) the real wrapper runs 1,000 `/bin/true` with batch files as output; each batch is the
    exact CBOR the shipper would POST, so brotli q5 of each is the body on the wire.
    Target <= 15 bytes per exec event (repetitive workload).
(c) a child fills a spool with a backlog, another child opens it and ships it all the
    way the shipper does (lease, encode, compress, ack); its peak RSS (VmHWM) against the
    same child after an empty spool and a trickle. Target <= steady + 32 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import brotli

from lw_embed.codec import AgentIdentity, encode_batch_raw
from lw_embed.config import AggregateConfig, FilterConfig, FilterRule
from lw_embed.pipeline.aggregate import Aggregator
from lw_embed.pipeline.filter import FilterProgram
from lw_embed.spool import Spool

AGENT = AgentIdentity("bench", "0", "wrapper")
RULES = tuple(
    FilterRule(name=f"r{i}", action=a, **cond)  # type: ignore[arg-type]
    for i, (a, cond) in enumerate([
        ("exclude", {"exe": ("/usr/bin/curl",), "cmdline": "healthz"}),
        ("tag", {"process_name": ("sh", "bash", "dash")}),
        ("tag", {"ancestor_exe": ("/app/*",)}),
        ("tag", {"kinds": ("net.*",)}),
        ("exclude", {"exe": ("/usr/lib/nagios/*",)}),
        ("tag", {"cmdline": "--password"}),
        ("tag", {"user": ("0",), "process_name": ("nc", "ncat")}),
        ("tag", {"ancestor_name": ("sshd",)}),
        ("tag", {"exe": ("/tmp/*", "/dev/shm/*")}),
        ("include", {"kinds": ("process.*",)}),
    ])
)  # fmt: skip


def make_events(n: int, unique: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    parent = {"exe": "/app/server", "exec_id": "00000000000000aa", "pid": 7}
    for i in range(n):
        k = i % 3
        eid = f"{i:016x}"
        argv = ["/usr/bin/python3", "-c", f"job {i if unique else i % 5}"]
        if k == 0:
            ev: dict[str, Any] = {
                "ancestors": [parent], "argv": argv, "cwd": "/app", "euid": 1000,
                "exe": "/usr/bin/python3.11", "exec_id": eid, "gid": 1000,
                "kind": "process.exec", "parent_exec_id": parent["exec_id"], "pid": 100 + i,
                "ppid": 7, "source": "ptrace", "start_time": 1_700_000_000_000_000_000 + i,
                "time": 1_700_000_000_000_000_000 + i, "truncated": False, "uid": 1000,
            }  # fmt: skip
        elif k == 1:
            ev = {"core_dumped": False, "duration_ns": 1_000_000, "exec_id": eid,
                  "exit_code": 0, "kind": "process.exit", "pid": 100 + i, "source": "ptrace",
                  "time": 1_700_000_000_000_000_000 + i}  # fmt: skip
        else:
            ev = {"address": "10.0.0.5", "exec_id": eid, "family": "inet", "fd": 5,
                  "kind": "net.connect", "pid": 100 + i,
                  "port": 5432 if not unique else 1024 + i % 60000, "tid": 100 + i,
                  "time": 1_700_000_000_000_000_000 + i}  # fmt: skip
        out.append(ev)
    return out


def pipeline(n: int, unique: bool, tmp: str) -> dict[str, float]:
    events = make_events(n, unique)
    prog = FilterProgram(FilterConfig(rules=RULES))
    agg_cfg = AggregateConfig()
    agg = Aggregator(agg_cfg.window, agg_cfg.max_groups, agg_cfg.keys, time.monotonic)
    spool = Spool(os.path.join(tmp, f"spool-{unique}"), max_bytes=1 << 30,
                  segment_bytes=4 << 20, sync_interval=0.1)  # fmt: skip
    spool.open()
    t: dict[str, float] = {"filter": 0.0, "aggregate": 0.0, "spool": 0.0, "ship": 0.0}
    wire_bytes = 0
    pc = time.perf_counter
    start = pc()
    kept: list[dict[str, Any]] = []
    t0 = pc()
    for ev in events:
        e = prog.apply(ev, ev if ev["kind"] == "process.exec" else None)
        if e is not None:
            kept.append(e)
    t["filter"] = pc() - t0
    t0 = pc()
    out: list[dict[str, Any]] = []
    for e in kept:
        out.extend(agg.add(e, None))
    out.extend(agg.flush(force=True))
    t["aggregate"] = pc() - t0
    t0 = pc()
    for e in out:
        spool.append(e)
    spool.sync()
    t["spool"] = pc() - t0
    t0 = pc()
    while items := spool.lease(1000, 1 << 20):
        seqs = [i.seq for i in items]
        body = encode_batch_raw(AGENT, {}, min(seqs), max(seqs), [],
                                [i.data for i in items], {})  # fmt: skip
        wire_bytes += len(brotli.compress(body, quality=5))
        spool.ack(seqs)
    spool.sync()
    t["ship"] = pc() - t0
    total = pc() - start
    spool.close()
    res = {f"{k}_us_per_event": v / n * 1e6 for k, v in t.items()}
    res.update(events_per_s=n / total, accepted=len(out), wire_bytes_per_event=wire_bytes / n)
    return res


def wire_bytes_per_exec(unique: bool, tmp: str) -> dict[str, float]:
    out = Path(tmp) / f"out-{unique}"
    cmd = "/bin/true $i" if unique else "/bin/true"
    script = f"i=0; while [ $i -lt 1000 ]; do {cmd}; i=$((i+1)); done"
    subprocess.run([sys.executable, "-m", "lw_embed", "run", "--output", str(out),
                    "--data-dir", str(Path(tmp) / f"data-{unique}"), "--", "/bin/sh", "-c",
                    script], check=True, timeout=300)  # fmt: skip
    raw = comp = 0
    for f in sorted(out.glob("*.cbor")):
        data = f.read_bytes()
        raw += len(data)
        comp += len(brotli.compress(data, quality=5))
    return {"raw_bytes_per_exec": raw / 1000, "wire_bytes_per_exec": comp / 1000}


def _hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _replay_child(spool_dir: str) -> None:
    sp = Spool(spool_dir, max_bytes=1 << 36, segment_bytes=4 << 20, sync_interval=0.1)
    sp.open()
    t0 = time.perf_counter()
    n = size = 0
    while items := sp.lease(1000, 1 << 20):
        seqs = [i.seq for i in items]
        size += sum(len(i.data) for i in items)
        body = encode_batch_raw(AGENT, {}, min(seqs), max(seqs), [],
                                [i.data for i in items], {})  # fmt: skip
        brotli.compress(body, quality=5)
        sp.ack(seqs)
        sp.maybe_sync()
        n += len(items)
    sp.close()
    dt = time.perf_counter() - t0
    print(json.dumps({"events": n, "mb_s": size / dt / 1e6, "events_s": n / dt,
                      "hwm_kb": _hwm_kb()}))  # fmt: skip


def replay_rss(backlog_mib: int, tmp: str) -> dict[str, float]:
    full, empty = os.path.join(tmp, "backlog"), os.path.join(tmp, "empty")
    sp = Spool(full, max_bytes=1 << 36, segment_bytes=4 << 20, sync_interval=0.1)
    sp.open()
    ev = make_events(3, True)[0]
    target = backlog_mib << 20
    while sp.stats().bytes < target:
        for _ in range(10000):
            sp.append(ev)
    sp.close()
    sp = Spool(empty, max_bytes=1 << 30, segment_bytes=4 << 20, sync_interval=0.1)
    sp.open()
    for _ in range(2000):
        sp.append(ev)
    sp.close()

    def child(d: str) -> dict[str, Any]:
        r = subprocess.run([sys.executable, __file__, "--replay-child", d],
                           capture_output=True, text=True, check=True, timeout=1800)  # fmt: skip
        return dict(json.loads(r.stdout))

    steady, big = child(empty), child(full)
    shutil.rmtree(full, ignore_errors=True)
    return {"backlog_mib": backlog_mib, "steady_hwm_mb": steady["hwm_kb"] / 1024,
            "replay_hwm_mb": big["hwm_kb"] / 1024, "replay_mb_s": big["mb_s"],
            "replay_events_s": big["events_s"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backlog-mib", type=int, default=1024)
    ap.add_argument("--replay-child")
    args = ap.parse_args()
    if args.replay_child:
        _replay_child(args.replay_child)
        return 0
    n = 30_000 if args.quick else 300_000
    backlog = 64 if args.quick else args.backlog_mib
    with tempfile.TemporaryDirectory(prefix="lw-pipe-") as tmp:
        results = {
            "pipeline_repetitive": pipeline(n, False, tmp),
            "pipeline_unique": pipeline(n, True, tmp),
            "wire_repetitive": wire_bytes_per_exec(False, tmp),
            "wire_unique": wire_bytes_per_exec(True, tmp),
            "replay": replay_rss(backlog, tmp),
        }
    print(json.dumps(results, indent=2))
    r = results
    print(f"\n(a) {r['pipeline_repetitive']['events_per_s']:,.0f} ev/s repetitive, "
          f"{r['pipeline_unique']['events_per_s']:,.0f} ev/s unique (target >= 50,000)")
    print(f"(b) {r['wire_repetitive']['wire_bytes_per_exec']:.1f} B/exec repetitive "
          f"(target <= 15), {r['wire_unique']['wire_bytes_per_exec']:.1f} B/exec unique")
    rp = r["replay"]
    print(f"(c) replay of {rp['backlog_mib']} MiB: peak {rp['replay_hwm_mb']:.1f} MB vs "
          f"steady {rp['steady_hwm_mb']:.1f} MB (target <= +32 MB), "
          f"{rp['replay_events_s']:,.0f} ev/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
