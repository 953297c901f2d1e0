"""Package inventory cost on this machine: cold scan of the full filesystem (dpkg + every
site-packages / node_modules found), incremental recheck (nothing changed, and one database
touched), and the usage join for N sleeping processes.

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
    res: dict[str, object] = {"runs": runs, "python": sys.version.split()[0],
                              "cpus": os.cpu_count(),
                              "bench_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                              / 1024,
                              "time": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
