"""Ingest throughput: N concurrent clients POST 1,000-event brotli batches to a real
`lw-embed ingest` on loopback for a bounded time.

    .venv/bin/python bench/ingest_bench.py [--clients 4] [--seconds 10]

Reports batches/s, events/s, p50/p99 latency and how many answers were 503.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import aiohttp
import brotli

from lw_embed.codec import AgentIdentity, encode_batch

EVENTS = 1000


def batch(instance: str, first: int) -> bytes:
    evs = [{"argv": ["/bin/true", str(i)], "exe": "/usr/bin/true", "exec_id": f"{i:016x}",
            "kind": "process.exec", "pid": 100 + i % 30000, "seq": first + i,
            "source": "ptrace", "time": 1_700_000_000_000_000_000 + i}
           for i in range(EVENTS)]  # fmt: skip
    raw = encode_batch(AgentIdentity(instance, "0", "wrapper"), {}, first,
                       first + EVENTS - 1, [], evs, {})  # fmt: skip
    return brotli.compress(raw, quality=5)


async def client(url: str, token: str, n: int, end: float, lat: list[float],
                 codes: dict[int, int]) -> None:  # fmt: skip
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/cbor",
               "Content-Encoding": "br"}  # fmt: skip
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        k = 0
        while time.monotonic() < end:
            body = batch(f"bench-{n}", k * EVENTS)
            t0 = time.perf_counter()
            async with s.post(url, data=body, headers=headers) as r:
                await r.read()
                codes[r.status] = codes.get(r.status, 0) + 1
            lat.append(time.perf_counter() - t0)
            k += 1


async def run(url: str, token: str, clients: int, seconds: float) -> dict[str, float]:
    lat: list[float] = []
    codes: dict[int, int] = {}
    end = time.monotonic() + seconds
    t0 = time.monotonic()
    await asyncio.gather(*(client(url, token, i, end, lat, codes) for i in range(clients)))
    dt = time.monotonic() - t0
    ok = codes.get(200, 0)
    lat.sort()
    return {"batches_s": ok / dt, "events_s": ok * EVENTS / dt,
            "p50_ms": statistics.median(lat) * 1e3,
            "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1e3 if lat else 0.0,
            "status_503": codes.get(503, 0), "other": sum(v for k, v in codes.items()
                                                           if k not in (200, 503))}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lw-ingest-bench-") as tmp:
        token = os.urandom(8).hex()
        tf = os.path.join(tmp, "token")
        with open(tf, "w") as f:
            f.write(token)
        srv = subprocess.Popen([sys.executable, "-m", "lw_embed", "ingest", "--listen",
                                "127.0.0.1:0", "--db", os.path.join(tmp, "db"),
                                "--token-file", tf], stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert srv.stdout is not None
            line = srv.stdout.readline()
            base = line.split("listening on", 1)[1].strip()
            res = asyncio.run(run(base + "/v1/batches", token, args.clients, args.seconds))
        finally:
            srv.send_signal(signal.SIGTERM)
            srv.wait(20)
    print(f"{args.clients} clients, {args.seconds:.0f} s: {res['batches_s']:.1f} batches/s, "
          f"{res['events_s']:,.0f} events/s, p50 {res['p50_ms']:.1f} ms, "
          f"p99 {res['p99_ms']:.1f} ms, 503: {res['status_503']}, other: {res['other']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
