"""Spool benchmark: appends/s, lease+ack/s, and memory while replaying a large backlog.

    .venv/bin/python bench/spool_bench.py [--appends N] [--backlog-mib MIB] [--dir DIR]

1. appends: N appends of ~150-byte events (as CBOR) with sync_interval 0.1 s, one
   thread; append() runs maybe_sync() itself, so the fdatasyncs are included.
2. lease+ack: drain what phase 1 wrote with lease(1000, 1 MiB) + ack, syncing as the
   sender would.
3. latency: per-append latency percentiles (p50, p99, p99.9, max).
4. replay: build a backlog of --backlog-mib MiB, close it, then in a fresh process open
   it (recovery scan) and drain it; report open time, drain rate and peak RSS against
   the process's RSS before open (the backlog itself must not be in memory).

Prints one line per figure; writes nothing else (the temporary spools are deleted).
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
from typing import Any

from lw_embed.spool import Spool

SEGMENT = 4 << 20
EVENTS = 1024


def make_events() -> list[dict[str, Any]]:
    """Distinct events of about 150 bytes of CBOR each (with the seq)."""
    out = []
    for i in range(EVENTS):
        out.append(
            {
                "argv": ["python3", "-m", "http.server", str(8000 + i % 100)],
                "exe": "/usr/bin/python3.11",
                "exec_id": f"{i * 2654435761 % (1 << 64):016x}",
                "kind": "process.exec",
                "pid": 1000 + i,
                "ppid": 1,
                "time": 1_712_345_678_901_234_567 + i,
                "uid": 1000,
            }
        )
    return out


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_mib() -> float:
    return _status_mib("VmRSS:")


def peak_rss_mib() -> float:
    # VmHWM, not ru_maxrss: the latter keeps the forked parent's peak across exec
    return _status_mib("VmHWM:")


def drain(spool: Spool) -> int:
    n = 0
    while True:
        items = spool.lease(1000, 1 << 20)
        if not items:
            return n
        spool.ack([it.seq for it in items])
        spool.maybe_sync()
        n += len(items)


def bench_appends(directory: str, n: int) -> None:
    events = make_events()
    spool = Spool(directory, max_bytes=1 << 40, segment_bytes=SEGMENT, sync_interval=0.1)
    spool.open()
    append = spool.append
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        append(events[i % EVENTS])
    spool.sync()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    st = spool.stats()
    print(f"appends:     {n / wall:10,.0f} /s wall, {n / cpu:10,.0f} /s per CPU-second")
    print(f"             {st.bytes / n:.0f} bytes per record on disk, {st.segments} segments")
    t0 = time.perf_counter()
    got = drain(spool)
    spool.sync()
    wall = time.perf_counter() - t0
    assert got == n, (got, n)
    print(f"lease+ack:   {n / wall:10,.0f} /s (lease(1000, 1 MiB) + ack + maybe_sync)")
    spool.close()


def bench_latency(directory: str, n: int) -> None:
    """Per-append latency: the calls that run the group fdatasync are the slow ones."""
    events = make_events()
    spool = Spool(directory, max_bytes=1 << 40, segment_bytes=SEGMENT, sync_interval=0.1)
    spool.open()
    append, clock = spool.append, time.perf_counter
    lat = []
    for i in range(n):
        t0 = clock()
        append(events[i % EVENTS])
        lat.append(clock() - t0)
    spool.close()
    lat.sort()
    us = [lat[int(q * (n - 1))] * 1e6 for q in (0.5, 0.99, 0.999)]
    print(
        f"latency:     append p50 {us[0]:.1f} us, p99 {us[1]:.1f} us, p99.9 {us[2]:.0f} us, "
        f"max {lat[-1] * 1e3:.1f} ms (the max is the call that ran the fdatasync)"
    )


def build_backlog(directory: str, mib: int) -> int:
    events = make_events()
    spool = Spool(directory, max_bytes=1 << 40, segment_bytes=SEGMENT, sync_interval=0.1)
    spool.open()
    target = mib << 20
    n = 0
    append = spool.append
    while spool.stats().bytes < target:
        for _ in range(10_000):
            append(events[n % EVENTS])
            n += 1
    spool.close()
    return n


def replay(directory: str) -> None:
    """Runs in a fresh process: open + drain, report as JSON."""
    base = rss_mib()
    spool = Spool(directory, max_bytes=1 << 40, segment_bytes=SEGMENT, sync_interval=0.1)
    t0 = time.perf_counter()
    spool.open()
    opened = time.perf_counter() - t0
    after_open = rss_mib()
    st = spool.stats()
    t0 = time.perf_counter()
    n = drain(spool)
    drained = time.perf_counter() - t0
    spool.close()
    print(
        json.dumps(
            {
                "records": n,
                "pending_at_open": st.pending,
                "bytes": st.bytes,
                "open_s": opened,
                "drain_per_s": n / drained,
                "rss_before_open_mib": base,
                "rss_after_open_mib": after_open,
                "peak_rss_mib": peak_rss_mib(),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--appends", type=int, default=500_000)
    ap.add_argument("--backlog-mib", type=int, default=256)
    ap.add_argument("--dir", default=None, help="parent directory of the temporary spools")
    ap.add_argument("--replay", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.replay:
        replay(args.replay)
        return
    root = tempfile.mkdtemp(prefix="spool-bench-", dir=args.dir)
    try:
        bench_appends(os.path.join(root, "a"), args.appends)
        bench_latency(os.path.join(root, "l"), min(args.appends, 200_000))
        backlog = os.path.join(root, "b")
        t0 = time.perf_counter()
        n = build_backlog(backlog, args.backlog_mib)
        took = time.perf_counter() - t0
        print(f"backlog:     {n:,} records, {args.backlog_mib} MiB written in {took:.1f} s")
        out = subprocess.run(
            [sys.executable, __file__, "--replay", backlog],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        assert r["records"] == n == r["pending_at_open"], r
        print(
            f"replay:      open (recovery scan) {r['open_s']:.2f} s, "
            f"drain {r['drain_per_s']:,.0f} /s"
        )
        print(
            f"memory:      RSS {r['rss_before_open_mib']:.1f} MiB before open, "
            f"{r['rss_after_open_mib']:.1f} MiB after open, peak {r['peak_rss_mib']:.1f} MiB "
            f"while replaying {r['bytes'] / (1 << 20):.0f} MiB"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
