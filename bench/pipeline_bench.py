"""Pipeline benchmark (helper's independent version): the worker's stages per event, bytes
on the wire per exec, and RSS while a large spool backlog is replayed.

    /work/main/.venv/bin/python pipeline_bench.py [--quick] [--events N] [--backlog-mib MIB]
                                                  [--json FILE] [--only a,b,c]

(a) Events/s on one core. Core records (CBOR payloads) of a job runner are decoded and
    applied to a ProcessTable (``source``: not in the target, for context); each
    ``to_wire`` dict then runs process_context -> FilterProgram.apply (10 rules) ->
    Aggregator.add (default keys) -> Spool.append (sync_interval 0.1) -> maybe_sync (the
    worker's tick) -> lease(1000, 1 MiB) -> Shipper._build (the real one) -> brotli q5 ->
    ack, in one thread, timed per stage per chunk of 2,000 records. Batches are cut as the
    shipper cuts them (a full batch once 1,000 are pending, everything after max_age 1 s).
    Mixes: repetitive (a shell loop of 4 commands) and unique (go test binaries: fresh
    exe, argv and peer port per process; nothing folds).
(b) Bytes on the wire per exec: real ``lw-embed run --backend`` -> counting aiohttp proxy
    -> real ``lw-embed ingest`` on 127.0.0.1:0.
(c) RSS replaying a backlog: steady state (empty spool + trickle through the pipeline)
    then the backlog (lease, _build, brotli q5, ack) in the same fresh child process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import brotli
import cbor2

from lw_embed import records
from lw_embed.codec import AgentIdentity, decode_batch, encode_batch_raw
from lw_embed.config import Config, FilterConfig, FilterRule
from lw_embed.events import sorted_value
from lw_embed.pipeline.aggregate import Aggregator
from lw_embed.pipeline.enrich import ProcessTable
from lw_embed.pipeline.filter import FilterProgram, process_context
from lw_embed.records import R
from lw_embed.runtime.shipper import Shipper, ShipperLimits
from lw_embed.spool import Spool, SpoolItem
from lw_embed.spool._frames import frame_record

HERE = Path(__file__).resolve().parent
BENCH = HERE if (HERE / "spool_bench.py").exists() else Path("/work/main/bench")
sys.path.insert(0, str(BENCH))
from spool_bench import peak_rss_mib, rss_mib  # noqa: E402

LW_EMBED = str(Path(sys.executable).with_name("lw-embed"))
AGENT = AgentIdentity("bench0000000000a", "bench", "wrapper")
BOOT_ID = "3f9c2b1e-8d47-4a6b-9e0f-5c1d2a7b8e90"
PIDNS = 4026531836
BOOT_NS = 1_764_590_000_000_000_000
RESOURCE = {"boot_id": BOOT_ID, "pid_namespace": PIDNS}
STAGES = ("source", "context", "filter", "aggregate", "append", "tick", "lease", "build",
          "brotli", "ack")  # fmt: skip
TARGET_STAGES = STAGES[1:]
CHUNK = 2000

RULES = (
    FilterRule(name="reverse-shell", action="include", alert=True,
               cmdline=r"(/dev/tcp/|\bbash -i\b|\bnc\b.*\s-e\s|socket\.socket\()"),
    FilterRule(name="netcat", action="include", alert=True,
               process_name=("nc", "ncat", "netcat", "socat", "telnet")),
    FilterRule(name="miner", action="include", alert=True,
               process_name=("xmrig", "minerd", "cpuminer*")),
    FilterRule(name="pkg-manager", action="tag", kinds=("process.exec",),
               process_name=("apt", "apt-get", "dpkg", "rpm", "apk", "pip", "pip3", "npm")),
    FilterRule(name="exec-from-tmp", action="tag", kinds=("process.exec",),
               exe=("/tmp/*", "/var/tmp/*", "/dev/shm/*")),
    FilterRule(name="root-exec", action="tag", kinds=("process.exec",), user=("root",)),
    FilterRule(name="interactive", action="tag", ancestor_name=("sshd", "tmux*", "screen")),
    FilterRule(name="spawned-by-app", action="tag", kinds=("process.exec",),
               ancestor_exe=("/usr/bin/python3*", "/usr/local/bin/node")),
    FilterRule(name="dns-noise", action="exclude", kinds=("net.connect",),
               process_name=("nscd", "systemd-resolved", "dnsmasq")),
    FilterRule(name="nagios", action="exclude", exe=("/usr/lib/nagios/plugins/*",)),
)  # fmt: skip


def bench_config() -> Config:
    return Config(filter=FilterConfig(rules=RULES))


REPETITIVE_JOBS: tuple[tuple[str, tuple[str, ...], tuple[tuple[str, int], ...]], ...] = (
    ("/usr/bin/curl", ("curl", "-fsS", "-m", "2", "http://127.0.0.1:8080/healthz"),
     (("127.0.0.1", 8080),)),
    ("/usr/bin/pg_isready", ("pg_isready", "-h", "db.internal", "-p", "5432", "-q"),
     (("10.0.3.7", 5432),)),
    ("/usr/bin/date", ("date", "+%s"), ()),
    ("/usr/bin/python3.11", ("python3", "/app/manage.py", "send_queued_mail"),
     (("10.0.3.7", 5432), ("10.0.3.9", 587))),
)  # fmt: skip
GO_PKGS = ("api", "auth", "billing", "cache", "db", "events", "mail", "queue", "search", "web")


class Stream:
    """CBOR payloads of the core's records for one mix (FORK, EXEC, CONNECT, EXIT)."""

    def __init__(self, unique: bool, seed: int = 1) -> None:
        self.unique = unique
        self.rng = random.Random(seed)
        self.t = 1_764_600_000_000_000_000
        self.ticks = 4_000_000
        self.pid = 1000
        self.job = 0
        self.parent = 8 if not unique else 7

    def _tick(self, ns: int) -> int:
        self.t += ns
        return self.t

    def _exec(self, pid: int, ppid: int, ticks: int, exe: str, argv: list[str], cwd: str,
              uid: int = 1000) -> list[Any]:  # fmt: skip
        return [R.EXEC, self._tick(20_000), pid, ppid, ticks, exe, argv, False, cwd, uid, uid,
                uid, pid]  # fmt: skip

    def preamble(self) -> list[bytes]:
        t = self._tick
        if self.unique:
            recs = [self._exec(7, 1, 3_990_000, "/usr/local/go/bin/go",
                               ["go", "test", "-count=1", "./..."], "/src")]  # fmt: skip
        else:
            recs = [
                self._exec(7, 1, 3_990_000, "/usr/bin/python3.11",
                           ["/usr/bin/python3.11", "/app/.venv/bin/gunicorn", "app.wsgi:app",
                            "-w", "2", "-b", "0.0.0.0:8080"], "/app"),
                [R.FORK, t(1000), 7, 8, 3_990_100],
                self._exec(8, 7, 3_990_100, "/bin/sh", ["/bin/sh", "/app/bin/run-jobs.sh"],
                           "/app"),
            ]  # fmt: skip
        return [cbor2.dumps([int(r[0]), *r[1:]]) for r in recs]

    def job_records(self) -> list[list[Any]]:
        self.job += 1
        self.pid = self.pid + 1 if self.pid < 4_000_000 else 1000
        self.ticks += 1
        pid, ticks, j, t = self.pid, self.ticks, self.job, self._tick
        recs: list[list[Any]] = [[R.FORK, t(30_000), self.parent, pid, ticks]]
        if self.unique:
            pkg = GO_PKGS[j % len(GO_PKGS)]
            exe = f"/tmp/go-build{self.rng.randrange(10**9, 10**10)}/b{j % 1000:03d}/{pkg}.test"
            argv = [exe, "-test.paniconexit0", "-test.timeout=10m0s", "-test.count=1",
                    f"-test.run=^Test{pkg.title()}Case{j}$"]  # fmt: skip
            recs.append(self._exec(pid, self.parent, ticks, exe, argv, f"/src/{pkg}"))
            peers: tuple[tuple[str, int], ...] = (("127.0.0.1", 20_000 + j % 40_000),)
            code = 1 if j % 97 == 0 else 0
        else:
            exe, argv0, peers = REPETITIVE_JOBS[j % len(REPETITIVE_JOBS)]
            recs.append(self._exec(pid, self.parent, ticks, exe, list(argv0), "/app"))
            code = 0
        for fd, (addr, port) in enumerate(peers, 3):
            recs.append([R.CONNECT, t(400_000), pid, pid, fd, "inet", addr, port])
        recs.append([R.EXIT, t(2_000_000), pid, code, None, False])
        return recs

    def chunks(self, n_records: int, chunk: int = CHUNK) -> Iterator[list[bytes]]:
        left = n_records
        buf: list[bytes] = []
        while left > 0:
            for r in self.job_records():
                buf.append(cbor2.dumps([int(r[0]), *r[1:]]))
            if len(buf) >= min(chunk, left):
                left -= len(buf)
                yield buf
                buf = []


def records_for_events(events: int) -> int:
    # both mixes: fork + exec + exit + one connect on average (repetitive: 1, 1, 0, 2)
    return events * 4 // 3


class FsyncTimer:
    """Wall time in os.fdatasync/os.fsync (the spool's group syncs), by patching os."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._orig = (os.fdatasync, os.fsync)

    def __enter__(self) -> FsyncTimer:
        def timed(fn: Any) -> Any:
            def call(fd: int) -> None:
                t0 = time.perf_counter()
                try:
                    fn(fd)
                finally:
                    self.seconds += time.perf_counter() - t0
                    self.calls += 1

            return call

        os.fdatasync, os.fsync = timed(self._orig[0]), timed(self._orig[1])  # type: ignore
        return self

    def __exit__(self, *exc: object) -> None:
        os.fdatasync, os.fsync = self._orig  # type: ignore[assignment]


class Pipeline:
    def __init__(self, spool_dir: str, max_bytes: int | None = None, keep_samples: bool = True):
        cfg = bench_config()
        self.table = ProcessTable(BOOT_ID, PIDNS, BOOT_NS, cfg.processes.ancestors_max)
        self.program = FilterProgram(cfg.filter)
        a = cfg.aggregate
        self.aggregator = Aggregator(a.window, a.max_groups, a.keys, time.monotonic)
        sc = cfg.spool
        self.spool = Spool(spool_dir, max_bytes=max_bytes or sc.max_bytes,
                           segment_bytes=sc.segment_bytes,
                           sync_interval=sc.sync_interval)  # fmt: skip
        self.spool.open()
        o = cfg.output
        self.limits = ShipperLimits(o.batch_max_events, o.batch_max_bytes, o.batch_max_age)
        self.quality = cfg.backend.compression_quality
        self.shipper = Shipper(self.spool, None, AGENT, self.limits,  # type: ignore[arg-type]
                               resource=lambda: RESOURCE, processes=self._processes,
                               loss=dict)  # fmt: skip
        self.t = dict.fromkeys(STAGES, 0.0)
        self.n = dict.fromkeys(("records", "events", "kept", "appended", "batches", "shipped",
                                "raw_bytes", "wire_bytes"), 0)  # fmt: skip
        self.last_ship = time.monotonic()
        self.keep_samples = keep_samples
        self.sample_events: list[dict[str, Any]] = []
        self.sample_batches: list[list[SpoolItem]] = []

    def _processes(self, exec_ids: list[str]) -> list[dict[str, Any]]:
        out = []
        for eid in exec_ids:
            rec = self.table.record(eid)
            if rec is not None:
                out.append(rec)
        return out

    def feed(self, payloads: list[bytes]) -> None:
        pc, t, table = time.perf_counter, self.t, self.table
        decode, apply = records.decode_payload, table.apply
        t0 = pc()
        wires = []
        for p in payloads:
            ev = apply(decode(p))
            if ev is not None:
                wires.append(ev.to_wire())
        for ev in table.drain_missed():
            wires.append(ev.to_wire())
        t1 = pc()
        ctxs = [process_context(w, table) for w in wires]
        t2 = pc()
        kept = []
        papply = self.program.apply
        for w, c in zip(wires, ctxs, strict=True):
            k = papply(w, c)
            if k is not None:
                kept.append((k, c))
        t3 = pc()
        out: list[dict[str, Any]] = []
        add = self.aggregator.add
        for k, c in kept:
            out.extend(add(k, c))
        out.extend(self.aggregator.flush(time.monotonic()))
        t4 = pc()
        append = self.spool.append
        for e in out:
            append(e)
        t5 = pc()
        self.spool.maybe_sync()
        t6 = pc()
        t["source"] += t1 - t0
        t["context"] += t2 - t1
        t["filter"] += t3 - t2
        t["aggregate"] += t4 - t3
        t["append"] += t5 - t4
        t["tick"] += t6 - t5
        n = self.n
        n["records"] += len(payloads)
        n["events"] += len(wires)
        n["kept"] += len(kept)
        n["appended"] += len(out)
        if self.keep_samples and len(self.sample_events) < 5000:
            self.sample_events.extend(out[: 5000 - len(self.sample_events)])
        self._maybe_ship()

    def _maybe_ship(self) -> None:
        t0 = time.perf_counter()
        pending = self.spool.stats().pending
        self.t["tick"] += time.perf_counter() - t0
        if pending >= self.limits.max_events:
            self.ship(pending, full_only=True)
        elif time.monotonic() - self.last_ship >= self.limits.max_age:
            self.ship(pending, full_only=False)

    def ship(self, pending: int, full_only: bool) -> None:
        pc, t, lim = time.perf_counter, self.t, self.limits
        self.last_ship = time.monotonic()
        while pending > 0 and (not full_only or pending >= lim.max_events):
            t0 = pc()
            items = self.spool.lease(lim.max_events, lim.max_bytes)
            t1 = pc()
            if not items:
                break
            seqs = [i.seq for i in items]
            batch = self.shipper._build(items, min(seqs), max(seqs))
            t2 = pc()
            body = brotli.compress(batch, quality=self.quality)
            t3 = pc()
            self.spool.ack(seqs)
            t4 = pc()
            t["lease"] += t1 - t0
            t["build"] += t2 - t1
            t["brotli"] += t3 - t2
            t["ack"] += t4 - t3
            pending -= len(items)
            n = self.n
            n["batches"] += 1
            n["shipped"] += len(items)
            n["raw_bytes"] += len(batch)
            n["wire_bytes"] += len(body)
            if self.keep_samples and len(items) >= 100:  # the last 5 (their processes
                self.sample_batches = [*self.sample_batches[-4:], items]  # are still known)

    def finish(self) -> None:
        t0 = time.perf_counter()
        out = self.aggregator.flush(force=True)
        t1 = time.perf_counter()
        for e in out:
            self.spool.append(e)
        self.spool.maybe_sync()
        t2 = time.perf_counter()
        self.t["aggregate"] += t1 - t0
        self.t["append"] += t2 - t1
        self.n["appended"] += len(out)
        self.ship(self.spool.stats().pending, full_only=False)

    def close(self) -> None:
        self.spool.close()


def micro_costs(p: Pipeline) -> dict[str, float]:
    pc = time.perf_counter
    out: dict[str, float] = {}
    evs = p.sample_events
    if evs:
        reps = max(1, 20_000 // len(evs))
        t0 = pc()
        for _ in range(reps):
            for s, e in enumerate(evs, 1):
                dict(sorted({**e, "seq": s}.items()))
        t1 = pc()
        sorted_evs = [dict(sorted({**e, "seq": s}.items())) for s, e in enumerate(evs, 1)]
        t2 = pc()
        for _ in range(reps):
            for d in sorted_evs:
                cbor2.dumps(d)
        t3 = pc()
        blobs = [cbor2.dumps(d) for d in sorted_evs]
        t4 = pc()
        for _ in range(reps):
            for s, b in enumerate(blobs, 1):
                frame_record(s, b)
        t5 = pc()
        k = reps * len(evs)
        out["append_sort_us"] = (t1 - t0) / k * 1e6
        out["append_cbor_dumps_us"] = (t3 - t2) / k * 1e6
        out["append_frame_crc_us"] = (t5 - t4) / k * 1e6
        out["event_cbor_bytes"] = sum(map(len, blobs)) / len(blobs)
    batches = p.sample_batches
    if batches:
        k = sum(map(len, batches))
        dec = recs = enc = srt = 0.0
        for b in batches:
            t0 = pc()
            eids = []
            for it in b:
                eids.append(cbor2.loads(it.data).get("exec_id"))
            t1 = pc()
            procs = p._processes(list(dict.fromkeys(e for e in eids if isinstance(e, str))))
            t2 = pc()
            seqs = [i.seq for i in b]
            encode_batch_raw(AGENT, RESOURCE, min(seqs), max(seqs), procs, [i.data for i in b],
                             {})  # fmt: skip
            t3 = pc()
            [sorted_value(r) for r in procs]
            t4 = pc()
            dec, recs, enc, srt = dec + t1 - t0, recs + t2 - t1, enc + t3 - t2, srt + t4 - t3
            out["build_process_records_per_batch"] = len(procs)
        out["build_exec_id_decode_us"] = dec / k * 1e6
        out["build_process_records_us"] = recs / k * 1e6
        out["build_encode_batch_raw_us"] = enc / k * 1e6
        out["build_sorted_value_us"] = srt / k * 1e6
    return out


def run_mix(unique: bool, events: int, tmp: str) -> dict[str, Any]:
    d = os.path.join(tmp, f"spool-{'unique' if unique else 'repetitive'}")
    stream = Stream(unique)
    p = Pipeline(d, max_bytes=4 << 30)
    p.feed(stream.preamble())
    p.t = dict.fromkeys(STAGES, 0.0)
    p.n = dict.fromkeys(p.n, 0)
    with FsyncTimer() as fs:
        w0, c0 = time.perf_counter(), time.process_time()
        for chunk in stream.chunks(records_for_events(events)):
            p.feed(chunk)
        p.finish()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    micro = micro_costs(p)
    st = p.spool.stats()
    p.close()
    shutil.rmtree(d, ignore_errors=True)
    n = p.n
    ev = n["events"]
    target_s = sum(p.t[s] for s in TARGET_STAGES)
    return {
        "mix": "unique" if unique else "repetitive",
        "records": n["records"], "events": ev, "kept": n["kept"], "appended": n["appended"],
        "shipped": n["shipped"], "batches": n["batches"],
        "folded_pct": 100.0 * (1 - n["appended"] / ev) if ev else 0.0,
        "stage_s": dict(p.t),
        "stage_us_per_event": {s: v / ev * 1e6 for s, v in p.t.items()},
        "events_per_s": ev / target_s,
        "events_per_s_with_source": ev / sum(p.t.values()),
        "events_per_cpu_s_with_source": ev / cpu,
        "wall_s": wall, "cpu_s": cpu, "fsync_s": fs.seconds, "fsync_calls": fs.calls,
        "raw_bytes_per_event": n["raw_bytes"] / ev,
        "wire_bytes_per_event": n["wire_bytes"] / ev,
        "delivered": st.delivered, "micro_us": micro,
    }  # fmt: skip


def print_mix(r: dict[str, Any]) -> None:
    ev = r["events"]
    print(f"  {r['mix']}: {ev:,} events ({r['records']:,} records), {r['kept']:,} kept by the "
          f"filter, {r['appended']:,} spooled ({r['folded_pct']:.1f}% folded), "
          f"{r['batches']:,} batches")  # fmt: skip
    print(f"    {r['events_per_s']:,.0f} events/s filter..brotli (target >= 50,000); "
          f"{r['events_per_s_with_source']:,.0f}/s with the source stage; "
          f"{r['events_per_cpu_s_with_source']:,.0f}/CPU-s")  # fmt: skip
    print("    stage       µs/event  µs per item at the stage")
    per_item = {"append": r["appended"], "tick": None, "lease": r["shipped"],
                "build": r["shipped"], "brotli": r["shipped"], "ack": r["shipped"],
                "aggregate": r["kept"]}  # fmt: skip
    for s in STAGES:
        us = r["stage_us_per_event"][s]
        k = per_item.get(s, ev)
        at = f"{r['stage_s'][s] / k * 1e6:8.2f}" if k else "       -"
        mark = "  (not in the target)" if s == "source" else ""
        print(f"    {s:<10} {us:8.2f}  {at}{mark}")
    print(f"    fdatasync/fsync: {r['fsync_calls']} calls, {r['fsync_s'] * 1e3:.0f} ms wall in "
          f"all ({r['fsync_s'] / ev * 1e6:.2f} µs/event, inside append and tick)")  # fmt: skip
    m = r["micro_us"]
    if "append_sort_us" in m:
        print(f"    append detail (µs per spooled event, {m['event_cbor_bytes']:.0f} B of CBOR): "
              f"sort {m['append_sort_us']:.2f}, cbor2.dumps {m['append_cbor_dumps_us']:.2f}, "
              f"frame+crc {m['append_frame_crc_us']:.2f}")  # fmt: skip
    if "build_exec_id_decode_us" in m:
        print(f"    build detail (µs per shipped event): cbor2.loads for exec_id "
              f"{m['build_exec_id_decode_us']:.2f}, process records "
              f"{m['build_process_records_us']:.2f}, encode_batch_raw "
              f"{m['build_encode_batch_raw_us']:.2f} (of which sorted_value of the "
              f"{m['build_process_records_per_batch']} process records "
              f"{m['build_sorted_value_us']:.2f})")  # fmt: skip
    print(f"    in-process batches: {r['raw_bytes_per_event']:.1f} B raw CBOR, "
          f"{r['wire_bytes_per_event']:.2f} B brotli per event")  # fmt: skip


# -- (b) ---------------------------------------------------------------------------------------


async def _start_ingest(tmp: str, token: str) -> tuple[asyncio.subprocess.Process, str]:
    tf = os.path.join(tmp, "token")
    with open(tf, "w") as f:
        f.write(token + "\n")
    proc = await asyncio.create_subprocess_exec(
        LW_EMBED, "ingest", "--listen", "127.0.0.1:0", "--db", os.path.join(tmp, "ingest.db"),
        "--token-file", tf, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"lw-embed ingest did not start: {line!r}")
    return proc, line.split("listening on", 1)[1].strip()


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()


class CountingProxy:
    FORWARD = ("Content-Type", "Content-Encoding", "Authorization", "Idempotency-Key",
               "X-LW-Events", "User-Agent")  # fmt: skip

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.bodies: list[bytes] = []
        self.header_bytes = 0
        self.statuses: dict[int, int] = {}

    async def start(self) -> str:
        import aiohttp
        from aiohttp import web

        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, auto_decompress=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.read()
        if request.method == "POST":
            self.bodies.append(body)
            self.header_bytes += len(f"{request.method} {request.path_qs} HTTP/1.1\r\n") + sum(
                len(k) + len(v) + 4 for k, v in request.headers.items()
            ) + 2
        headers = {k: request.headers[k] for k in self.FORWARD if k in request.headers}
        async with self._session.request(request.method, self.upstream + request.path_qs,
                                         data=body, headers=headers) as r:  # fmt: skip
            payload = await r.read()
            self.statuses[r.status] = self.statuses.get(r.status, 0) + 1
            out = {k: r.headers[k] for k in ("Content-Type", "Retry-After", "WWW-Authenticate")
                   if k in r.headers}  # fmt: skip
            return web.Response(status=r.status, body=payload, headers=out)

    async def close(self) -> None:
        await self._runner.cleanup()
        await self._session.close()


async def _count_stored(base: str, token: str) -> int:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(
        f"{base}/v1/events", params={"limit": "100000"},
        headers={"Authorization": f"Bearer {token}"},
    ) as r:  # fmt: skip
        text = await r.text()
        if r.status != 200:
            raise RuntimeError(f"GET /v1/events: {r.status} {text[:200]}")
    return sum(1 for line in text.splitlines() if line.strip())


async def _wire_run(tmp: str, unique: bool, n: int) -> dict[str, Any]:
    d = os.path.join(tmp, f"wire-{'unique' if unique else 'repetitive'}")
    os.makedirs(d)
    token = os.urandom(16).hex()
    ingest, base = await _start_ingest(d, token)
    proxy = CountingProxy(base)
    true = '/bin/true "$i"' if unique else "/bin/true"
    try:
        url = await proxy.start()
        script = f'i=0; while [ "$i" -lt {n} ]; do {true}; i=$((i+1)); done'
        env = {**os.environ, "LW_EMBED_TOKEN": token}
        for k in ("LW_EMBED_CONFIG", "LW_EMBED_BACKEND", "LW_EMBED_DATA_DIR"):
            env.pop(k, None)
        t0 = time.perf_counter()
        run = await asyncio.create_subprocess_exec(
            LW_EMBED, "run", "--data-dir", os.path.join(d, "data"), "--backend", url, "--",
            "/bin/sh", "-c", script, env=env, stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            _, err = await asyncio.wait_for(run.communicate(), 180)
        except TimeoutError:
            run.kill()
            await run.wait()
            raise RuntimeError("lw-embed run did not finish within 180 s") from None
        took = time.perf_counter() - t0
        if run.returncode != 0:
            raise RuntimeError(f"lw-embed run exited {run.returncode}: {err.decode()[-500:]}")
        stored = await _count_stored(base, token)
    finally:
        await proxy.close()
        await _stop(ingest)
    kinds: dict[str, int] = {}
    recs: dict[str, int] = {}
    raw = 0
    for body in proxy.bodies:
        data = brotli.decompress(body)
        raw += len(data)
        for ev in decode_batch(data)["events"]:
            k = ev["kind"]
            kinds[k] = kinds.get(k, 0) + ev.get("count", 1)
            recs[k] = recs.get(k, 0) + 1
    wire = sum(map(len, proxy.bodies))
    shutil.rmtree(d, ignore_errors=True)
    return {
        "workload": f"{n:,} x {true}", "wall_s": took, "requests": len(proxy.bodies),
        "statuses": proxy.statuses, "body_bytes": wire, "raw_bytes": raw,
        "header_bytes": proxy.header_bytes, "bytes_per_exec": wire / n,
        "bytes_per_exec_with_headers": (wire + proxy.header_bytes) / n,
        "observed": kinds, "records_sent": recs, "stored_rows": stored,
        "stderr": err.decode().strip()[-300:],
    }  # fmt: skip


def print_wire(r: dict[str, Any]) -> None:
    obs = r["observed"]
    print(f"  {r['workload']}: {r['body_bytes']:,} body bytes (brotli) in {r['requests']} "
          f"POSTs -> {r['bytes_per_exec']:.2f} B per exec "
          f"({r['bytes_per_exec_with_headers']:.2f} B with the HTTP request headers); "
          f"{r['raw_bytes']:,} B before compression; run took {r['wall_s']:.2f} s")  # fmt: skip
    print(f"    observed (sum of count): process.exec {obs.get('process.exec', 0):,}, "
          f"process.exit {obs.get('process.exit', 0):,}; records sent "
          f"{sum(r['records_sent'].values())} {r['records_sent']}; answers {r['statuses']}; "
          f"rows stored by the ingest {r['stored_rows']}")  # fmt: skip
    if r["stderr"]:
        print(f"    wrapper stderr: {r['stderr']}")


# -- (c) ---------------------------------------------------------------------------------------


def fill_backlog(directory: str, mib: int) -> dict[str, Any]:
    pool: list[dict[str, Any]] = []
    table = ProcessTable(BOOT_ID, PIDNS, BOOT_NS, 8)
    program = FilterProgram(bench_config().filter)
    stream = Stream(unique=True, seed=2)
    for p in stream.preamble():
        table.apply(records.decode_payload(p))
    for chunk in stream.chunks(27_000):
        for p in chunk:
            ev = table.apply(records.decode_payload(p))
            if ev is not None:
                w = ev.to_wire()
                k = program.apply(w, process_context(w, table))
                if k is not None:
                    pool.append(k)
    spool = Spool(directory, max_bytes=(mib << 20) + (256 << 20), segment_bytes=4 << 20,
                  sync_interval=0.1)  # fmt: skip
    spool.open()
    target = mib << 20
    n = 0
    t0 = time.perf_counter()
    append = spool.append
    while spool.stats().bytes < target:
        for e in pool:
            append(e)
        n += len(pool)
    spool.close()
    took = time.perf_counter() - t0
    st_bytes = sum(f.stat().st_size for f in Path(directory).glob("*.seg"))
    return {"events": n, "bytes": st_bytes, "seconds": took}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def replay_child(backlog: str, scratch: str, backlog_mib: int) -> None:
    base_rss = rss_mib()
    p = Pipeline(scratch)
    stream = Stream(unique=True, seed=3)
    p.feed(stream.preamble())
    end = time.monotonic() + 3.0
    for chunk in stream.chunks(records_for_events(1500), chunk=40):
        p.feed(chunk)
        time.sleep(max(0.0, min(0.08, end - time.monotonic())))
    p.finish()
    steady = {"rss_mib": rss_mib(), "hwm_mib": peak_rss_mib(), "events": p.n["events"],
              "batches": p.n["batches"]}  # fmt: skip
    p.close()
    spool = Spool(backlog, max_bytes=(backlog_mib << 20) + (256 << 20), segment_bytes=4 << 20,
                  sync_interval=0.1)  # fmt: skip
    t0 = time.perf_counter()
    spool.open()
    open_s = time.perf_counter() - t0
    after_open = rss_mib()
    st = spool.stats()
    shipper = Shipper(spool, None, AGENT, p.limits, resource=lambda: RESOURCE,  # type: ignore
                      processes=p._processes, loss=dict)  # fmt: skip
    n = batches = raw = wire = 0
    max_rss_kb = 0
    t0 = time.perf_counter()
    while True:
        items = spool.lease(p.limits.max_events, p.limits.max_bytes)
        if not items:
            break
        seqs = [i.seq for i in items]
        batch = shipper._build(items, min(seqs), max(seqs))
        body = brotli.compress(batch, quality=p.quality)
        raw += len(batch)
        wire += len(body)
        del batch, body
        spool.ack(seqs)
        spool.maybe_sync()
        n += len(items)
        batches += 1
        max_rss_kb = max(max_rss_kb, _status_kb("VmRSS:"))
        del items
    drain_s = time.perf_counter() - t0
    spool.close()
    print(json.dumps({
        "base_rss_mib": base_rss, "steady": steady, "open_s": open_s,
        "rss_after_open_mib": after_open, "pending_at_open": st.pending,
        "spool_bytes": st.bytes, "events": n, "batches": batches, "drain_s": drain_s,
        "max_rss_mib": max_rss_kb / 1024, "hwm_mib": peak_rss_mib(),
        "raw_bytes": raw, "wire_bytes": wire,
    }))  # fmt: skip


def replay_rss(tmp: str, mib: int) -> dict[str, Any]:
    backlog = os.path.join(tmp, "backlog")
    fill = fill_backlog(backlog, mib)
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--replay-child", backlog, os.path.join(tmp, "trickle"),
             str(mib)],
            check=True, capture_output=True, text=True, timeout=900,
        ).stdout  # fmt: skip
    finally:
        shutil.rmtree(backlog, ignore_errors=True)
        shutil.rmtree(os.path.join(tmp, "trickle"), ignore_errors=True)
    r = json.loads(out.strip().splitlines()[-1])
    r["fill"] = fill
    r["backlog_mib"] = mib
    if r["events"] != r["pending_at_open"] or r["events"] != fill["events"]:
        raise RuntimeError(f"replay shipped {r['events']} of {fill['events']} events: {r}")
    return r


def print_replay(r: dict[str, Any]) -> None:
    f, s = r["fill"], r["steady"]
    print(f"  backlog: {f['events']:,} events, {f['bytes'] / 2**20:,.0f} MiB of segments, "
          f"written in {f['seconds']:.1f} s ({f['events'] / f['seconds']:,.0f} appends/s)")
    print(f"  steady state (empty spool + {s['events']:,} events over 3 s, {s['batches']} "
          f"batches): VmRSS {s['rss_mib']:.1f} MiB, VmHWM {s['hwm_mib']:.1f} MiB "
          f"(interpreter + imports before it: {r['base_rss_mib']:.1f} MiB)")  # fmt: skip
    mb = r["spool_bytes"] / 2**20
    print(f"  replay: open (recovery scan) {r['open_s']:.2f} s, VmRSS after open "
          f"{r['rss_after_open_mib']:.1f} MiB; {r['events']:,} events in {r['batches']:,} "
          f"batches in {r['drain_s']:.1f} s = {mb / r['drain_s']:.1f} MiB/s of spool, "
          f"{r['events'] / r['drain_s']:,.0f} events/s")  # fmt: skip
    delta = max(r["max_rss_mib"], r["hwm_mib"]) - s["hwm_mib"]
    print(f"  memory: max VmRSS while replaying {r['max_rss_mib']:.1f} MiB, VmHWM "
          f"{r['hwm_mib']:.1f} MiB -> +{delta:.1f} MiB over steady VmHWM (target <= +32 MiB)")
    print(f"  shipped batches: {r['raw_bytes'] / r['events']:.0f} B raw, "
          f"{r['wire_bytes'] / r['events']:.1f} B brotli per event")


def machine() -> dict[str, str]:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
        "kernel": platform.release(), "nproc": str(os.cpu_count()), "cpu": cpu,
        "python": platform.python_version(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--events", type=int, default=None)
    ap.add_argument("--execs", type=int, default=1000)
    ap.add_argument("--backlog-mib", type=int, default=None)
    ap.add_argument("--only", default="a,b,c")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", default=None, metavar="FILE")
    ap.add_argument("--replay-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.replay_child:
        replay_child(args.replay_child[0], args.replay_child[1], int(args.replay_child[2]))
        return 0
    events = args.events or (30_000 if args.quick else 300_000)
    mib = args.backlog_mib or (64 if args.quick else 1024)
    parts = set(args.only.split(","))
    m = machine()
    print(f"{m['date']}; kernel {m['kernel']}, nproc {m['nproc']}, {m['cpu']}, Python "
          f"{m['python']}, load average {m['loadavg']}")  # fmt: skip
    results: dict[str, Any] = {"machine": m}
    t_start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="lw-pipeline-bench-", dir=args.dir)
    status = 0
    try:
        if "a" in parts:
            print(f"(a) pipeline on one core, {events:,} events per mix")
            for unique in (False, True):
                r = run_mix(unique, events, tmp)
                results[f"pipeline_{r['mix']}"] = r
                print_mix(r)
        if "b" in parts:
            print(f"(b) bytes on the wire per exec: lw-embed run --backend (counting proxy) "
                  f"-> lw-embed ingest, {args.execs:,} execs")  # fmt: skip
            for unique in (False, True):
                r = asyncio.run(_wire_run(tmp, unique, args.execs))
                results[f"wire_{'unique' if unique else 'repetitive'}"] = r
                print_wire(r)
        if "c" in parts:
            print(f"(c) RSS replaying a {mib:,} MiB backlog")
            r = replay_rss(tmp, mib)
            results["replay"] = r
            print_replay(r)
    except Exception as exc:
        print(f"FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        status = 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["total_s"] = time.perf_counter() - t_start
    print(f"total {results['total_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
