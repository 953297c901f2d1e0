"""Cost of the in-app agent's audit hook, with and without the agent, side by side.

Usage: ``.venv/bin/python bench/audit_hook.py [--rounds 9] [--n 200000] [--requests 2000]``

Each measurement runs in a fresh interpreter (a hook cannot be removed), rounds
alternating between the modes of :data:`MODES` (the agents write batch files to a temp
dir). What is measured is the CPU time of the whole process (``time.process_time``: the
host's threads and the agent's), from the first call to the agent having spooled the last
event (``lw_embed.flush``), so the agent thread's parsing, filtering and spooling is
counted: wall time on a shared 2-core machine is too noisy to resolve a few percent. The
median and the spread (interquartile range) over the rounds are printed:

- ``unwatched``: ``sys.audit("bench.other")`` - what every audit event of the host pays;
- ``watched (queued)``: ``sys.audit("os.remove", path, -1)`` - the hook's full path (thread
  check, clock, deque append), the agent thread turning it into an event meanwhile;
- ``open(/dev/null, "w")``: a real audited call producing a ``file.write`` event;
- ``http``: a loop of requests to an ``http.server`` on 127.0.0.1 whose handler opens a
  log file for appending, reads a file and answers (the host's requests/s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import http.client, http.server, json, os, sys, tempfile, threading, time
mode, what, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tmp = tempfile.mkdtemp(prefix="lw-bench-")
if mode == "hook":  # the hook queueing, no agent thread draining it
    from lw_embed.sources import audit
    audit.install(); audit.activate(10**9)
elif mode in ("audit", "full"):
    import lw_embed
    if mode == "audit":
        from lw_embed.sources import base
        for k in [k for k in base.FACTORIES if k != "audit"]: del base.FACTORIES[k]
    lw_embed.start(output=os.path.join(tmp, "out"), data_dir=os.path.join(tmp, "data"),
                   inapp_queue_max=1000000)
    time.sleep(0.5)  # let start-up work (snapshot, inventory) settle
def timed(fn):
    t0 = time.process_time(); fn()
    if mode in ("audit", "full"): lw_embed.flush(60)  # the agent's share of the work
    return time.process_time() - t0
if what == "unwatched":
    def run():
        a = sys.audit
        for _ in range(n): a("bench.other", 1)
    secs = timed(run)
elif what == "watched":
    def run():
        a = sys.audit
        for i in range(n): a("os.remove", "/nonexistent/x", -1)
    secs = timed(run)
elif what == "open":
    def run():
        for _ in range(n):
            with open("/dev/null", "w"): pass
    secs = timed(run)
else:
    page = os.path.join(tmp, "page.html"); open(page, "w").write("x" * 2048)
    logf = os.path.join(tmp, "access.log")
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True
        def do_GET(self):
            with open(logf, "a") as f: f.write(self.path + "\n")
            with open(page, "rb") as f: body = f.read()
            self.send_response(200); self.send_header("Content-Length", str(len(body)))
            self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    def run():
        c = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=10)
        for i in range(n):
            c.request("GET", f"/r{i % 50}"); c.getresponse().read()
        c.close()
    secs = timed(run)
    srv.shutdown()
extra = {}
if mode in ("audit", "full"):
    from lw_embed.sources import audit
    extra = {"dropped": audit._count(audit.STATE.drops)}
    lw_embed.stop(5)
print(json.dumps({"secs": secs, **extra}))
"""


#: off: no agent; hook: the hook installed and queueing, no agent thread; audit: the agent
#: with the audit source only; full: the agent with every source of its FACTORIES
MODES = ("off", "hook", "audit", "full")


def one(mode: str, what: str, n: int) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LW_EMBED_")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root
    out = subprocess.run([sys.executable, "-c", CHILD, mode, what, str(n)], env=env,
                         capture_output=True, text=True, timeout=600, check=True)  # fmt: skip
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res.get("dropped"):
        print(f"  note: {what} dropped {res['dropped']} events (queue full)", file=sys.stderr)
    return float(res["secs"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--n", type=int, default=200000)
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()
    cases = [("unwatched", args.n), ("watched", args.n // 4), ("open", args.n // 10),
             ("http", args.requests)]  # fmt: skip
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, {args.rounds} rounds, "
          f"process CPU time, median [IQR]; temp dir {tempfile.gettempdir()}")  # fmt: skip
    for what, n in cases:
        modes = MODES if what != "http" else tuple(m for m in MODES if m != "hook")
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.rounds):
            for mode in modes:
                times[mode].append(one(mode, what, n))
        off = statistics.median(times["off"])
        for mode in modes:
            t = statistics.median(times[mode])
            q = statistics.quantiles(times[mode], n=4) if len(times[mode]) > 1 else [t, t, t]
            spread = f"[{1e6 * q[0] / n:.2f}-{1e6 * q[2] / n:.2f}]"
            if what == "http":
                print(f"{what:<9} n={n:<6} {mode:<5} {1e6 * t / n:8.1f} us CPU/req {spread:<17}"
                      f" overhead {100 * (t - off) / off:+6.1f} %")  # fmt: skip
            else:
                print(f"{what:<9} n={n:<6} {mode:<5} {1e9 * t / n:7.0f} ns CPU/call "
                      f"{spread} us   added {1e9 * (t - off) / n:7.0f} ns/call")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
