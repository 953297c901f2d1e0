"""Ingest throughput (helper's independent version): N concurrent aiohttp clients POST
realistic 1,000-event brotli-q5 batches to a real ``lw-embed ingest`` on 127.0.0.1:0.

    /work/main/.venv/bin/python ingest_bench.py [--clients 4,16] [--seconds 10]
                                                [--max-batches 500]

Batches are built before the clock starts (so the clients spend no CPU on encoding):
events of the unique mix of pipeline_bench (go test binaries: exec, connect, exit, through
the ProcessTable and the 10-rule filter), CBOR-encoded as the spool stores them, spliced
with their process records by encode_batch_raw, brotli q5: what an agent sends. Each run
starts a fresh ingest (fresh database) and posts from a shared pool until --seconds pass
or the pool is used up (reported). Latency is per POST (request sent -> answer read).
Also: the server-side cost of one batch measured in-process (parse_batch: inflate +
strict decode + check; Store.store_batch: JSON + SQLite + fsync), and the ingest
process's CPU time per batch from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import brotli
import cbor2

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from pipeline_bench import (  # noqa: E402
    BOOT_ID,
    BOOT_NS,
    PIDNS,
    RESOURCE,
    Stream,
    bench_config,
    machine,
    records_for_events,
)  # fmt: skip

from lw_embed import records  # noqa: E402
from lw_embed.codec import AgentIdentity, encode_batch_raw  # noqa: E402
from lw_embed.pipeline.enrich import ProcessTable  # noqa: E402
from lw_embed.pipeline.filter import FilterProgram, process_context  # noqa: E402
from lw_embed.server.store import Store  # noqa: E402

LW_EMBED = str(Path(sys.executable).with_name("lw-embed"))
EVENTS = 1000
AGENTS = 16


BASE_BATCHES = 24  # distinct event contents; a batch reuses one of them with fresh seqs


def build_pool(n_batches: int) -> tuple[list[bytes], dict[str, float]]:
    """``n_batches`` bodies, round-robin over AGENTS agent instances, seqs increasing. The
    events of BASE_BATCHES x 1,000 distinct processes are reused with fresh seqs (the
    receiver stores by (instance_id, seq); within a batch every event is distinct)."""
    table = ProcessTable(BOOT_ID, PIDNS, BOOT_NS, 8)
    program = FilterProgram(bench_config().filter)
    stream = Stream(unique=True, seed=5)
    for p in stream.preamble():
        table.apply(records.decode_payload(p))
    events: list[dict[str, Any]] = []
    for chunk in stream.chunks(records_for_events(EVENTS * BASE_BATCHES) + 2 * EVENTS):
        for p in chunk:
            ev = table.apply(records.decode_payload(p))
            if ev is not None:
                w = ev.to_wire()
                k = program.apply(w, process_context(w, table))
                if k is not None:
                    events.append(k)
    bases = []
    for b in range(BASE_BATCHES):
        evs = events[b * EVENTS : (b + 1) * EVENTS]
        eids = list(dict.fromkeys(e["exec_id"] for e in evs if "exec_id" in e))
        bases.append((evs, [r for r in (table.record(x) for x in eids) if r is not None]))
    agents = [AgentIdentity(f"bench-agent-{i:02d}", "bench", "wrapper") for i in range(AGENTS)]
    next_seq = [1] * AGENTS
    bodies: list[bytes] = []
    raw_total = 0
    for n in range(n_batches):
        evs, procs = bases[n % BASE_BATCHES]
        a = n % AGENTS
        first = next_seq[a]
        next_seq[a] = first + EVENTS
        raw = [cbor2.dumps(dict(sorted({**e, "seq": first + i}.items())))
               for i, e in enumerate(evs)]  # fmt: skip
        batch = encode_batch_raw(agents[a], RESOURCE, first, first + EVENTS - 1, procs, raw, {})
        raw_total += len(batch)
        bodies.append(brotli.compress(batch, quality=5))
    return bodies, {"raw_kb": raw_total / len(bodies) / 1024,
                    "body_kb": sum(map(len, bodies)) / len(bodies) / 1024}  # fmt: skip


def server_side_cost(bodies: list[bytes], tmp: str) -> dict[str, float]:
    """What the ingest does per batch, step by step, in this process: parse_batch (inflate,
    strict CBOR decode, the schema walk, check_seqs) in its parse thread, then
    Store.store_batch (to_json_line per event, one SQLite transaction with fsync)."""
    from lw_embed.codec import _loads_strict, decode_batch
    from lw_embed.decode import to_json_line
    from lw_embed.server.parse import check_seqs, inflate

    store = Store(os.path.join(tmp, "cost.db"))
    pc = time.perf_counter
    t = dict.fromkeys(("inflate", "cbor_loads", "decode_batch", "check_seqs", "json", "store"),
                      0.0)  # fmt: skip
    sample = bodies[:20]
    for body in sample:
        t0 = pc()
        raw = inflate(body, "br", 4 << 20)
        t1 = pc()
        _loads_strict(raw)  # the decode alone, to split decode_batch
        t2 = pc()
        batch = decode_batch(raw)
        t3 = pc()
        check_seqs(batch)
        t4 = pc()
        [to_json_line(e) for e in batch["events"]]  # what store_batch does first
        t5 = pc()
        store.store_batch(batch)
        t6 = pc()
        for k, v in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5), strict=True):
            t[k] += v
    store.close()
    ms = {k: v / len(sample) * 1e3 for k, v in t.items()}
    ms["parse_ms"] = ms["inflate"] + ms["decode_batch"] + ms["check_seqs"]
    ms["store_ms"] = ms["store"]
    return ms


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _client(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                  pool: list[bytes], pos: list[int], end: float, lat: list[float],
                  codes: dict[int, int]) -> None:  # fmt: skip
    while time.monotonic() < end:
        i = pos[0]
        if i >= len(pool):
            return
        pos[0] = i + 1
        body = pool[i]
        h = {**headers, "Idempotency-Key": f"bench:{i}", "X-LW-Events": str(EVENTS)}
        t0 = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=h) as r:
                await r.read()
                status = r.status
                retry = r.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError):
            status, retry = -1, None
        lat.append(time.perf_counter() - t0)
        codes[status] = codes.get(status, 0) + 1
        if status == 503:  # as an agent would: wait, then carry on (with the next batch)
            await asyncio.sleep(min(1.0, float(retry or 1)))


async def _run(clients: int, seconds: float, pool: list[bytes], tmp: str) -> dict[str, Any]:
    d = tempfile.mkdtemp(dir=tmp)
    token = os.urandom(16).hex()
    tf = os.path.join(d, "token")
    with open(tf, "w") as f:
        f.write(token + "\n")
    errlog = open(os.path.join(d, "ingest.err"), "wb")  # noqa: SIM115
    proc = await asyncio.create_subprocess_exec(
        LW_EMBED, "ingest", "--listen", "127.0.0.1:0", "--db", os.path.join(d, "db"),
        "--token-file", tf, stdout=asyncio.subprocess.PIPE, stderr=errlog,
        stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        if "listening on" not in line:
            raise RuntimeError(f"ingest did not start: {line!r}")
        base = line.split("listening on", 1)[1].strip()
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/cbor",
                   "Content-Encoding": "br"}  # fmt: skip
        conn = aiohttp.TCPConnector(limit=clients)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
            # warm-up (not counted): one batch per client, fresh seqs from the pool's end
            async def post(body: bytes) -> None:
                async with s.post(base + "/v1/batches", data=body, headers=headers) as r:
                    await r.read()

            await asyncio.gather(*(post(pool.pop()) for _ in range(clients)))
            lat: list[float] = []
            codes: dict[int, int] = {}
            pos = [0]
            cpu0 = _cpu_s(proc.pid)
            t0 = time.monotonic()
            end = t0 + seconds
            await asyncio.gather(*(_client(s, base + "/v1/batches", headers, pool, pos, end,
                                           lat, codes) for _ in range(clients)))  # fmt: skip
            dt = time.monotonic() - t0
            cpu = _cpu_s(proc.pid) - cpu0
            async with s.get(base + "/v1/agents", headers=headers) as r:
                agents = await r.json()
        stored = sum(int(a.get("events_stored", 0)) for a in agents)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        errlog.close()
    ok = codes.get(200, 0)
    lat.sort()
    q = (lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3) if lat else (lambda p: 0.0)
    return {
        "clients": clients, "seconds": dt, "posted": len(lat), "ok": ok,
        "pool_exhausted": pos[0] >= len(pool), "batches_s": ok / dt,
        "events_s": ok * EVENTS / dt, "p50_ms": q(0.50), "p99_ms": q(0.99),
        "max_ms": lat[-1] * 1e3 if lat else 0.0, "status_503": codes.get(503, 0),
        "other": {k: v for k, v in codes.items() if k not in (200, 503)},
        "server_cpu_s": cpu, "server_cpu_ms_per_batch": cpu / ok * 1e3 if ok else 0.0,
        "stored_events": stored, "mean_ms": statistics.fmean(lat) * 1e3 if lat else 0.0,
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="4,16", help="comma-separated: one run per value")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-batches", type=int, default=500, help="pool size (bounds a run)")
    args = ap.parse_args()
    runs = [int(c) for c in args.clients.split(",")]
    m = machine()
    print(f"{m['date']}; kernel {m['kernel']}, nproc {m['nproc']}, {m['cpu']}, Python "
          f"{m['python']}, load average {m['loadavg']}")  # fmt: skip
    t0 = time.perf_counter()
    pool, sizes = build_pool(args.max_batches + max(runs))
    print(f"pool: {len(pool)} batches of {EVENTS} events, {sizes['raw_kb']:.0f} KiB CBOR -> "
          f"{sizes['body_kb']:.1f} KiB brotli q5 each, built in {time.perf_counter() - t0:.1f} s")
    with tempfile.TemporaryDirectory(prefix="lw-ingest-bench-") as tmp:
        cost = server_side_cost(pool, tmp)
        print(f"server-side cost per batch, in-process: parse_batch {cost['parse_ms']:.1f} ms "
              f"(inflate {cost['inflate']:.1f}, decode_batch {cost['decode_batch']:.1f} of "
              f"which the CBOR decode {cost['cbor_loads']:.1f} and the schema walk "
              f"{cost['decode_batch'] - cost['cbor_loads']:.1f}, check_seqs "
              f"{cost['check_seqs']:.1f}); Store.store_batch {cost['store_ms']:.1f} ms (of "
              f"which to_json_line {cost['json']:.1f}, SQLite + fsync "
              f"{cost['store_ms'] - cost['json']:.1f}) -> at most "
              f"{1e3 / (cost['parse_ms'] + cost['store_ms']):.0f} batches/s on one core "
              f"(the GIL serialises the parse and writer threads)")  # fmt: skip
        for clients in runs:
            r = asyncio.run(_run(clients, args.seconds, list(pool), tmp))
            print(f"{clients} clients, {r['seconds']:.1f} s: {r['batches_s']:.1f} batches/s = "
                  f"{r['events_s']:,.0f} events/s; latency p50 {r['p50_ms']:.0f} ms, p99 "
                  f"{r['p99_ms']:.0f} ms, max {r['max_ms']:.0f} ms; 503: {r['status_503']}; "
                  f"other: {r['other'] or 'none'}; ingest CPU {r['server_cpu_ms_per_batch']:.1f} "
                  f"ms/batch; stored {r['stored_events']:,} events"
                  f"{' (pool used up)' if r['pool_exhausted'] else ''}")  # fmt: skip
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
