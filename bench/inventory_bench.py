"""Package inventory cost on this machine: cold scan of the full filesystem (dpkg + every
site-packages / node_modules found), incremental recheck (nothing changed, and one database
touched), the usage join for N sleeping processes, the worker source's worst poll (the
real source driven with the default config and a real clock, while the N processes
sleep), and hostile inputs (a 48 MB dpkg file list, a node_modules symlink loop, an rpm
header of 128k files).

    .venv/bin/python bench/inventory_bench.py [--procs 200] [--root /]

Each measurement runs in a fresh child process so that RSS is the scan's own (max RSS of
the child, minus the interpreter's baseline measured the same way). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CHILD = r"""
import json, os, resource, sys, time
root, mode, nprocs = sys.argv[1], sys.argv[2], int(sys.argv[3])
from lw_embed.sources.packages.inventory import Scanner
from lw_embed.sources.packages.model import run
from lw_embed.sources.packages.usage import ProcScanner
out = {}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter(); c = time.process_time()
sc = Scanner(root)
inv = run(sc.full())
out["cold_s"] = time.perf_counter() - t
out["cold_cpu_s"] = time.process_time() - c
out["packages"] = len(inv.packages)
out["paths"] = inv.paths
out["databases"] = len(sc.results)
out["rss_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
t = time.perf_counter()
for _ in range(100):
    keys = sc.changed()
out["recheck_unchanged_ms"] = (time.perf_counter() - t) * 10
if "dpkg" in sc.results:
    sc.mtimes["dpkg"] = (0, 0)  # as if dpkg's status had changed
    t = time.perf_counter()
    run(sc.recheck(sc.changed()))
    out["recheck_dpkg_changed_s"] = time.perf_counter() - t
if nprocs:
    import subprocess
    kids = [subprocess.Popen(["sleep", "120"]) for _ in range(nprocs)]
    try:
        ps = ProcScanner("/proc", root, exclude=(os.getpid(),))
        t = time.perf_counter()
        hits = ps.scan(inv, 1)
        out["usage_cold_s"] = time.perf_counter() - t
        out["usage_procs"] = len(ps.cache)
        t = time.perf_counter()
        ps.scan(inv, 1)
        out["usage_warm_s"] = time.perf_counter() - t
        t = time.perf_counter()
        ps.scan(inv, 1, full=True)
        out["usage_full_refresh_s"] = time.perf_counter() - t
        out["usage_hits"] = len(hits)
    finally:
        for k in kids:
            k.kill(); k.wait()
if nprocs:
    from lw_embed.config import load_config
    from lw_embed.pipeline.enrich import ProcessTable
    from lw_embed.sources.base import SourceContext
    from lw_embed.sources.packages import PackagesSource
    kids = [subprocess.Popen(["sleep", "120"]) for _ in range(nprocs)]
    try:
        cfg = load_config(None, {"LW_EMBED_PACKAGES_ROOT": root})
        table = ProcessTable("b", 1, 0, 8)
        for k in kids:  # scope "tree": the workload is what the table knows
            with open(f"/proc/{k.pid}/stat", "rb") as f:
                ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
            table.on_exec(0, k.pid, os.getpid(), ticks, "/usr/bin/sleep", ["sleep"], False,
                          "/", 0, 0, 0)
        ctx = SourceContext(cfg, "wrapper", "tree", table, "/proc", "/tmp", 1, time.time_ns,
                            time.monotonic)
        t = time.monotonic()
        src = PackagesSource(cfg.packages, ctx)
        polls = 0
        polls_ms = []
        interim = None
        while src.snapshots == 0:
            time.sleep(max(0.0, src.next_due() - time.monotonic()))
            p0 = time.perf_counter()
            list(src.poll(time.monotonic()))
            polls_ms.append((time.perf_counter() - p0) * 1000)
            if interim is None and src.inv is not None:
                interim = time.monotonic() - t
        polls_ms.sort()
        out["source_first_snapshot_s"] = time.monotonic() - t
        out["source_os_index_s"] = interim
        out["source_polls"] = len(polls_ms)
        out["source_worst_poll_ms"] = polls_ms[-1]
        out["source_p99_poll_ms"] = polls_ms[int(len(polls_ms) * 0.99)]
        out["source_procs_read"] = src.procs.reads
        out["source_max_poll_ms"] = src.max_poll * 1000
        # close() in the middle of a first scan (a workload that lived 0.2 s)
        src = PackagesSource(cfg.packages, ctx)
        t = time.monotonic()
        while time.monotonic() - t < 0.2:
            time.sleep(max(0.0, src.next_due() - time.monotonic()))
            list(src.poll(time.monotonic()))
        t = time.perf_counter()
        evs = list(src.close())
        out["source_close_mid_scan_s"] = time.perf_counter() - t
        out["source_close_events"] = sorted({e.kind for e in evs})
    finally:
        for k in kids:
            k.kill(); k.wait()
print(json.dumps(out))
"""

HOSTILE = r"""
import json, os, resource, sys, tempfile, time
sys.path.insert(0, os.getcwd())
from lw_embed.sources.packages.inventory import Scanner
from lw_embed.sources.packages.model import run
from lw_embed.sources.packages import rpm
case = sys.argv[1]
out = {}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with tempfile.TemporaryDirectory() as d:
    if case == "huge_list":
        info = os.path.join(d, "var/lib/dpkg/info")
        os.makedirs(info)
        with open(os.path.join(d, "var/lib/dpkg/status"), "w") as f:
            f.write("Package: evil\nStatus: install ok installed\nVersion: 1\n\n")
        with open(os.path.join(info, "evil.list"), "w") as f:
            line = "/usr/share/evil/" + "x" * 40 + "/%d\n"
            n = 0
            while f.tell() < 48 << 20:
                f.write(line % n); n += 1
    elif case == "npm_loop":
        for i in range(8):
            p = os.path.join(d, "node_modules", f"p{i}")
            os.makedirs(p)
            with open(os.path.join(p, "package.json"), "w") as f:
                f.write('{"name": "p%d"}' % i)
            os.symlink("..", os.path.join(p, "node_modules"))
    t = time.perf_counter()
    if case == "rpm_header":
        from tests.unit.test_packages_rpm import pkg_header
        blob = pkg_header("big", "1", "1", "x", [f"/d{i % 300}/f{i}" for i in range(128000)])
        t = time.perf_counter()
        tags = rpm.parse_header(blob)
        out["files"] = len(tags[rpm.BASENAMES])
    else:
        inv = run(Scanner(d).full())
        out["packages"] = len(inv.packages)
        out["paths"] = inv.paths
        out["errors"] = inv.errors[:2]
    out["s"] = time.perf_counter() - t
out["rss_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps(out))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/")
    ap.add_argument("--procs", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = []
    for i in range(args.runs):
        r = subprocess.run([sys.executable, "-c", CHILD, args.root, "cold",
                            str(args.procs if i == 0 else 0)],
                           capture_output=True, text=True, check=True, cwd=here)  # fmt: skip
        runs.append(json.loads(r.stdout))
    hostile = {}
    for case in ("huge_list", "npm_loop", "rpm_header"):
        r = subprocess.run([sys.executable, "-c", HOSTILE, case], capture_output=True, text=True,
                           check=True, cwd=here)  # fmt: skip
        hostile[case] = json.loads(r.stdout)
    res: dict[str, object] = {"runs": runs, "hostile": hostile, "python": sys.version.split()[0],
                              "cpus": os.cpu_count(),
                              "bench_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                              / 1024,
                              "time": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
