"""Sidecar CPU at rest: what ``lw-embed sidecar`` costs while the workload does nothing.

Usage: ``.venv/bin/python bench/sidecar_idle.py [--processes 10,100] [--seconds 20]
[--warmup 5] [--json] [--quick]`` (root: it makes PID namespaces).

For each process count N and each variant, a fresh PID namespace is made the way the
sidecar tests do (``unshare --pid --fork --mount-proc`` with a reaping init as PID 1, the
workload and the sidecar entered with ``nsenter``, as two containers of a
``pidMode: task`` task): the workload is one shell with N ``sleep`` children, all idle.
The sidecar starts, every workload process is waited for until it is traced (variant
``ptrace``; ``procfs`` runs with ``LW_EMBED_TRACER_MODE=procfs``: no tracer, /proc only),
then after ``--warmup`` seconds (the worker's first /proc and package passes) the CPU
time (utime+stime of every thread, from ``/proc/<pid>/stat``) and the voluntary context
switches (wake-ups) of the sidecar process and of its worker are read over
``--seconds``. Figures are % of one core and wake-ups per second. Then (variant
``ptrace``) ``LATENCY_SAMPLES`` commands are fed to the workload shell through a fifo,
one every 0.1 s: the exec latency is the time of the ``process.exec`` record (taken by
the tracer at the exec stop) minus the time the command was written (so it includes
the shell's read and fork), median and max.

Nothing outside the namespaces it made is touched; every process it starts is killed at
the end (PID 1 of each namespace, which takes the rest with it). ``--quick``: N = 10, 3 s
(a smoke test). Exit status 0, or 1 when a run failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lw_embed.decode import iter_events  # noqa: E402

LATENCY_SAMPLES = 20
PY = sys.executable
TICKS = os.sysconf("SC_CLK_TCK")
INIT = """
import os, signal, sys
signal.signal(signal.SIGCHLD, lambda *a: None)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        signal.pause()
    except InterruptedError:
        pass
"""


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def wait_for(pred: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def worker_of(sidecar: int) -> int:
    """The sidecar's worker (not a short-lived probe child)."""
    for c in children(sidecar):
        try:
            with open(f"/proc/{c}/cmdline", "rb") as f:
                if b"lw_embed.runtime.worker" in f.read():
                    return c
        except OSError:
            continue
    return 0


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])  # utime + stime (all threads)


def wakeups(pid: int) -> int:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def tracer_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


def run_one(n: int, variant: str, seconds: float, warmup: float, tmp: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LW_EMBED_", "_LW_EMBED_"))}
    env["PYTHONPATH"] = str(ROOT)
    if variant == "procfs":
        env["LW_EMBED_TRACER_MODE"] = "procfs"
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, env=env, cwd=str(tmp), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        procs.append(p)
        return p

    ns = start(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", PY, "-c", INIT])
    init = 0
    try:
        wait_for(lambda: children(ns.pid), 10, "the namespace")
        init = children(ns.pid)[0]
        enter = ["nsenter", "-t", str(init), "-p", "-m", "--"]
        fifo = tmp / f"fifo-{variant}-{n}"
        os.mkfifo(fifo)
        wl = start([*enter, "sh", "-c", f"for i in $(seq {n}); do sleep 100000 & done; "
                    f'exec 3<>"{fifo}"; while read -r cmd <&3; do $cmd; done'])  # fmt: skip
        wait_for(lambda: children(wl.pid) and len(children(children(wl.pid)[0])) == n, 30,
                 "the workload")  # fmt: skip
        shell = children(wl.pid)[0]
        workload = [shell, *children(shell)]
        out = tmp / f"out-{variant}-{n}"
        side = start([*enter, PY, "-P", "-m", "lw_embed", "sidecar", "--output", str(out),
                      "--data-dir", str(tmp / f"data-{variant}-{n}")])  # fmt: skip
        wait_for(lambda: children(side.pid), 10, "the sidecar")
        sidecar = children(side.pid)[0]
        wait_for(lambda: worker_of(sidecar), 30, "the worker")
        worker = worker_of(sidecar)
        if variant == "ptrace":
            wait_for(lambda: all(tracer_of(p) for p in workload), 60, "every process traced")
        time.sleep(warmup)
        c0, w0 = cpu_ticks(sidecar), cpu_ticks(worker)
        s0, v0 = wakeups(sidecar), wakeups(worker)
        t0 = time.monotonic()
        time.sleep(seconds)
        dt = time.monotonic() - t0
        c1, w1 = cpu_ticks(sidecar), cpu_ticks(worker)
        s1, v1 = wakeups(sidecar), wakeups(worker)
        written: dict[str, int] = {}
        if variant == "ptrace":
            with open(fifo, "w") as f:
                for i in range(LATENCY_SAMPLES):
                    marker = f"lw-lat-{i}"
                    written[marker] = time.time_ns()
                    f.write(f"/bin/true {marker}\n")
                    f.flush()
                    time.sleep(0.1)
        os.kill(sidecar, signal.SIGTERM)
        code = side.wait(timeout=60)
        untraced = all(tracer_of(p) == 0 for p in workload)
        lat: list[float] = []
        for e in iter_events([str(out)]):
            if e["kind"] == "process.exec" and len(e["argv"]) == 2 and e["argv"][1] in written:
                lat.append((e["time"] - written[e["argv"][1]]) / 1e6)
        lat.sort()
        return {
            "exec_latency_ms_median": round(lat[len(lat) // 2], 2) if lat else None,
            "exec_latency_ms_max": round(lat[-1], 2) if lat else None,
            "exec_latency_samples": f"{len(lat)}/{len(written)}",
            "processes": n + 1,
            "variant": variant,
            "seconds": round(dt, 2),
            "sidecar_cpu_pct": round(100 * (c1 - c0) / TICKS / dt, 3),
            "worker_cpu_pct": round(100 * (w1 - w0) / TICKS / dt, 3),
            "sidecar_wakeups_per_s": round((s1 - s0) / dt, 2),
            "worker_wakeups_per_s": round((v1 - v0) / dt, 2),
            "exit_status": code,
            "workload_untraced_after": untraced,
        }
    finally:
        if init:
            with contextlib.suppress(ProcessLookupError):
                os.kill(init, signal.SIGKILL)
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", default="10,100", help="idle workload sizes (comma list)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    sizes = [10] if a.quick else [int(x) for x in a.processes.split(",") if x]
    seconds, warmup = (3.0, 2.0) if a.quick else (a.seconds, a.warmup)
    rows: list[dict[str, Any]] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="lw-sidecar-idle-") as d:
        for n in sizes:
            for variant in ("ptrace", "procfs"):
                try:
                    rows.append(run_one(n, variant, seconds, warmup, Path(d)))
                except Exception as exc:  # report and go on with the next
                    print(f"{variant} N={n}: failed: {exc}", file=sys.stderr)
                    failed = True
    if a.json:
        print(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                          "rows": rows}, indent=2))  # fmt: skip
    else:
        print(f"sidecar at rest on {platform.platform()} ({os.cpu_count()} cpus), "
              f"{seconds:.0f}s after {warmup:.0f}s warm-up\n")  # fmt: skip
        print(f"{'procs':>5} {'variant':<7} {'sidecar %cpu':>12} {'worker %cpu':>11} "
              f"{'sidecar wk/s':>12} {'worker wk/s':>11}  exec latency ms (med/max, n)"
              "  detached")  # fmt: skip
        for r in rows:
            print(f"{r['processes']:>5} {r['variant']:<7} {r['sidecar_cpu_pct']:>12.3f} "
                  f"{r['worker_cpu_pct']:>11.3f} {r['sidecar_wakeups_per_s']:>12.2f} "
                  f"{r['worker_wakeups_per_s']:>11.2f}  "
                  f"{r['exec_latency_ms_median']}/{r['exec_latency_ms_max']} "
                  f"({r['exec_latency_samples']})  "
                  f"{'yes' if r['workload_untraced_after'] else 'NO'} (exit {r['exit_status']})")
    return 1 if failed or any(r["exit_status"] != 0 for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
