"""Tracer overhead benchmark: lw-embed's ptrace+seccomp tracer vs native, strace and a naive tracer.

Usage: ``.venv/bin/python bench/tracer_overhead.py [--quick] [--repeat N] [--json]``

Each workload is a small C program from ``bench/workloads/`` built with gcc into a temp
dir at run time, run with ``stdin`` on /dev/null and ``stdout``/``stderr`` captured (a
workload prints one line, its own start and end CLOCK_REALTIME stamps) in these variants:

* ``native``  -- the program itself;
* ``lw-embed`` -- ``lw-embed run --output T --data-dir T -- PROG`` (fresh temp dirs per run);
* ``strace``  -- ``strace -f --seccomp-bpf -e trace=execve,connect -o /dev/null PROG``
  (the column is dropped, with a note, when this strace has no ``--seccomp-bpf``);
* ``naive``   -- ``bench/naive_tracer.py PROG``: PTRACE_SYSCALL on every syscall.

Per repetition every workload runs once in every variant (variant order rotated each
repetition), so noise from a shared machine hits all variants alike; the figure is the
median of N wall times of the whole command (for lw-embed that includes its Python
start-up and shutdown, i.e. worker flush). The ``empty`` workload (``/bin/true``)
measures that fixed cost, and the "minus start-up" ratio is
``(T_variant - (E_variant - E_native)) / T_native``.

The naive tracer pays two Python round trips per syscall, so workload (a) is run under it
with 1/``NAIVE_A_DIVISOR`` of the count and its time scaled up (marked ``*``).

Also measured: the start-up latency added before the workload's first instruction
(launch -> CLOCK_REALTIME printed by ``main()``, median of 10, interleaved with native),
and the peak RSS (VmRSS samples and VmHWM from /proc/PID/status) of the core and of the
worker during workload (b) -- the target -- and every other workload, plus their CPU time,
in one extra lw-embed run per workload with a 5 ms sampler (not in the timed runs).

``--quick`` runs 1 repetition with 1/10 of the counts (a CI smoke test: it checks that
everything runs and the tracer saw what it should, its figures mean little).
Exit status: 0 when everything ran (targets missed or not), 1 when a run failed, 3 when
lw-embed's output does not show what the workloads did (execs, connects) or reports loss.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKLOADS_DIR = HERE / "workloads"
NAIVE = HERE / "naive_tracer.py"
LW_EMBED = Path(sys.executable).with_name("lw-embed")
STRACE_ARGS = ["-f", "--seccomp-bpf", "-e", "trace=execve,connect", "-o", "/dev/null"]
NAIVE_A_DIVISOR = 10
STARTUP_SAMPLES = 10
RUN_TIMEOUT = 300.0  # seconds; any single command taking longer is a failure
WORKER_MARK = b"lw_embed.runtime.worker"


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    source: str  # C file in bench/workloads/, "" for /bin/true
    count: int
    target: float | None  # max ratio to native, lw-embed
    on_tmpfs: bool = False  # (d) only: create the files on tmpfs instead of the temp dir


WORKLOADS = (
    Workload("empty", "empty (/bin/true)", "", 0, None),
    Workload("a", "(a) {n:,} getppid syscalls", "syscalls.c", 1_000_000, 1.05),
    Workload("b", "(b) {n:,} fork+exec /bin/true", "forkexec.c", 1_000, 1.5),
    Workload("c", "(c) {n:,} loopback TCP connect/accept", "connect.c", 5_000, 1.2),
    Workload("d", "(d) {n:,} file create+close+unlink", "files.c", 10_000, 1.1),
    # the same on tmpfs: no disk journal, so far less noise from other I/O on the machine
    Workload("d-tmpfs", "(d) the same on tmpfs", "files.c", 10_000, 1.1, on_tmpfs=True),
)
STARTUP_TARGET_MS = 150.0
CORE_RSS_TARGET_MB = 30.0


class BenchError(RuntimeError):
    pass


# -- building -----------------------------------------------------------------------------
def build(tmp: Path) -> dict[str, Path]:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise BenchError("no gcc/cc on PATH")
    out: dict[str, Path] = {}
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    for src in sorted({w.source for w in WORKLOADS if w.source} | {"startts.c"}):
        exe = bindir / Path(src).stem
        cmd = [cc, "-O2", "-Wall", "-o", str(exe), str(WORKLOADS_DIR / src)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise BenchError(f"building {src} failed:\n{r.stderr}")
        out[src] = exe
    return out


def strace_ok() -> tuple[bool, str]:
    exe = shutil.which("strace")
    if exe is None:
        return False, "strace not installed"
    try:
        r = subprocess.run(
            [exe, *STRACE_ARGS, "/bin/true"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"strace failed: {exc}"
    if r.returncode != 0:
        return False, f"strace lacks --seccomp-bpf or cannot trace here: {r.stderr.strip()}"
    ver = subprocess.run([exe, "-V"], capture_output=True, text=True, timeout=30).stdout
    return True, ver.splitlines()[0] if ver else "strace"


# -- running --------------------------------------------------------------------------------
@dataclass
class Ctx:
    tmp: Path
    exes: dict[str, Path]
    scale: int  # counts are divided by this (--quick: 10)
    variants: list[str]
    tmpfs: Path | None = None
    verify: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def workload_argv(ctx: Ctx, w: Workload, count_div: int = 1) -> list[str]:
    if not w.source:
        return ["/bin/true"]
    argv = [str(ctx.exes[w.source]), str(max(1, w.count // ctx.scale // count_div))]
    if w.source == "files.c":
        d = (ctx.tmpfs if w.on_tmpfs and ctx.tmpfs else ctx.tmp) / "files"
        d.mkdir(exist_ok=True)
        argv.append(str(d))
    return argv


def wrap(ctx: Ctx, variant: str, argv: list[str], run_dir: Path | None) -> list[str]:
    if variant == "native":
        return argv
    if variant == "lw-embed":
        assert run_dir is not None
        out, data = run_dir / "out", run_dir / "data"
        return [str(LW_EMBED), "run", "--output", str(out), "--data-dir", str(data), "--", *argv]
    if variant == "strace":
        return [shutil.which("strace") or "strace", *STRACE_ARGS, *argv]
    if variant == "naive":
        return [sys.executable, str(NAIVE), *argv]
    raise ValueError(variant)


def run_timed(cmd: list[str]) -> tuple[float, int, int, str, str]:
    """Run cmd; (wall seconds, launch ns, exit ns, stdout, stderr). Raises on failure."""
    t_launch = time.time_ns()
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=RUN_TIMEOUT)
    dt = time.perf_counter() - t0
    t_exit = time.time_ns()
    err = r.stderr.decode(errors="replace")
    if r.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {r.returncode}: {err.strip()[-2000:]}")
    return dt, t_launch, t_exit, r.stdout.decode(errors="replace"), err


def one_run(ctx: Ctx, w: Workload, variant: str, check: bool) -> dict[str, float]:
    """One timed run: wall s; and, from the workload's own stamps, start-up ms (launch to
    main()), work s (main() to its end) and shutdown ms (its end to the command's exit)."""
    div = NAIVE_A_DIVISOR if (variant == "naive" and w.key == "a") else 1
    argv = workload_argv(ctx, w, div)
    run_dir = (
        Path(tempfile.mkdtemp(prefix="lw-run-", dir=ctx.tmp)) if variant == "lw-embed" else None
    )
    try:
        wall, t_launch, t_exit, out, err = run_timed(wrap(ctx, variant, argv, run_dir))
        if variant == "lw-embed":
            if err.strip():
                ctx.warnings.append(f"lw-embed stderr on {w.key}: {err.strip()[:500]}")
            if check:
                assert run_dir is not None
                ctx.verify[w.key] = verify_output(ctx, w, run_dir / "out")
    finally:
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
    res = {"wall": wall}
    stamps = out.split()
    if w.source:
        if len(stamps) < 2:
            raise BenchError(f"{variant} {w.key}: the workload printed no time stamps")
        t0, t1 = int(stamps[-2]), int(stamps[-1])
        res.update(
            start=(t0 - t_launch) / 1e6, work=(t1 - t0) / 1e9 * div, stop=(t_exit - t1) / 1e6
        )
        if div != 1:  # extrapolate only the part that scales with the count
            res["wall"] = res["start"] / 1e3 + res["work"] + res["stop"] / 1e3
    return res


def verify_output(ctx: Ctx, w: Workload, out: Path) -> dict[str, Any]:
    """What lw-embed recorded for one run: did the tracer see what the workload did?"""
    try:
        from lw_embed.decode import iter_events
    except ImportError as exc:
        return {"error": f"cannot import lw_embed.decode: {exc}"}
    kinds: dict[str, int] = {}
    technique = loss = None
    execs: dict[Any, list[str]] = {}  # exec_id -> sources, to count each exec once
    try:
        for ev in iter_events([str(out)]):
            k = ev.get("kind", "?")
            kinds[k] = kinds.get(k, 0) + 1
            if k == "process.exec":
                execs.setdefault(ev.get("exec_id", id(ev)), []).append(str(ev.get("source")))
            if k == "agent.capabilities":
                technique = ev.get("report", {}).get("techniques", {})
            elif k == "agent.loss":
                loss = ev.get("totals")
    except Exception as exc:  # report, do not abort the benchmark
        return {"error": f"decoding {out}: {exc!r}", "kinds": kinds}
    n = max(1, w.count // ctx.scale) if w.source else 0
    expect = {"process.exec": 1 + (n if w.key == "b" else 0)}
    if w.key == "c":
        expect["net.connect"] = n
    got = {k: kinds.get(k, 0) for k in expect}
    got["process.exec"] = len(execs)  # distinct exec_ids
    dups = {str(x): src for x, src in execs.items() if len(src) > 1}
    res = {
        "kinds": kinds,
        "expected": expect,
        "distinct": got,
        "ok": got == expect,
        "techniques": technique,
        "loss": loss,
        "duplicate_execs": dups,
    }
    if dups:
        ctx.warnings.append(
            f"lw-embed on {w.key}: {len(dups)} exec(s) recorded twice under "
            f"one exec_id (sources {sorted(set(map(tuple, dups.values())))})"
        )
    if not res["ok"]:
        ctx.warnings.append(f"lw-embed on {w.key}: expected {expect}, recorded {got} (loss {loss})")
    if loss:
        ctx.warnings.append(f"lw-embed on {w.key}: loss totals {loss}")
    if not technique or technique.get("processes") != "ptrace+seccomp":
        ctx.warnings.append(f"lw-embed on {w.key}: not the seccomp-accelerated tracer: {technique}")
    return res


def timings(ctx: Ctx, repeat: int, progress: bool) -> dict[str, dict[str, list[dict[str, float]]]]:
    times: dict[str, dict[str, list[dict[str, float]]]] = {
        w.key: {v: [] for v in ctx.variants} for w in WORKLOADS
    }
    for rep in range(repeat):
        order = ctx.variants[rep % len(ctx.variants) :] + ctx.variants[: rep % len(ctx.variants)]
        for w in WORKLOADS:
            for v in order:
                times[w.key][v].append(one_run(ctx, w, v, check=(rep == 0)))
        if progress:
            print(f"  repetition {rep + 1}/{repeat} done", file=sys.stderr, flush=True)
    return times


def startup_latency(ctx: Ctx) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """ms from launching the command to the workload's main() (CLOCK_REALTIME both), and
    ms from that main() (the probe exits at once) to the command's exit."""
    prog = [str(ctx.exes["startts.c"])]
    lat: dict[str, list[float]] = {v: [] for v in ctx.variants}
    down: dict[str, list[float]] = {v: [] for v in ctx.variants}
    for i in range(STARTUP_SAMPLES):
        order = ctx.variants[i % len(ctx.variants) :] + ctx.variants[: i % len(ctx.variants)]
        for v in order:
            run_dir = (
                Path(tempfile.mkdtemp(prefix="lw-st-", dir=ctx.tmp)) if v == "lw-embed" else None
            )
            try:
                _, t_launch, t_exit, out, _ = run_timed(wrap(ctx, v, prog, run_dir))
            finally:
                if run_dir is not None:
                    shutil.rmtree(run_dir, ignore_errors=True)
            lines = out.split()
            if not lines:
                raise BenchError(f"{v}: start-up probe printed nothing")
            lat[v].append((int(lines[-1]) - t_launch) / 1e6)
            down[v].append((t_exit - int(lines[-1])) / 1e6)
    return lat, down


# -- RSS ------------------------------------------------------------------------------------
def _status_kb(pid: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read()
    except OSError:
        return None
    rss = hwm = 0
    for line in text.splitlines():
        if line.startswith(b"VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith(b"VmHWM:"):
            hwm = int(line.split()[1])
    return rss, hwm


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        pass
    out = []  # no CONFIG_PROC_CHILDREN: scan /proc
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    st = f.read()
                if int(st[st.rindex(b")") + 2 :].split()[1]) == pid:
                    out.append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return WORKER_MARK in f.read()
    except OSError:
        return False


def _cpu_s(pid: int) -> float | None:
    """utime + stime of pid itself in seconds (not its children's)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
        fields = st[st.rindex(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def sample_run(ctx: Ctx, w: Workload) -> dict[str, Any]:
    """Run lw-embed on w once, sampling memory (VmRSS, VmHWM) and CPU time of the core
    and of its worker child(ren) every 5 ms until it exits."""
    run_dir = Path(tempfile.mkdtemp(prefix="lw-rss-", dir=ctx.tmp))
    cmd = wrap(ctx, "lw-embed", workload_argv(ctx, w), run_dir)
    core: dict[str, Any] = {"rss_kb": 0, "hwm_kb": 0, "cpu_s": 0.0}
    worker: dict[str, Any] = {"rss_kb": 0, "hwm_kb": 0, "cpu_s": 0.0, "pids": []}
    wcpu: dict[int, float] = {}
    samples = 0
    try:
        t0 = time.perf_counter()
        p = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + RUN_TIMEOUT
        try:
            while p.poll() is None and time.monotonic() < deadline:
                samples += 1
                s = _status_kb(p.pid)
                c = _cpu_s(p.pid)
                if s:
                    core["rss_kb"] = max(core["rss_kb"], s[0])
                    core["hwm_kb"] = max(core["hwm_kb"], s[1])
                if c is not None:
                    core["cpu_s"] = max(core["cpu_s"], c)
                for ch in _children(p.pid):
                    if ch in wcpu or _is_worker(ch):
                        if ch not in wcpu:
                            worker["pids"].append(ch)
                            wcpu[ch] = 0.0
                        s = _status_kb(ch)
                        c = _cpu_s(ch)
                        if s:
                            worker["rss_kb"] = max(worker["rss_kb"], s[0])
                            worker["hwm_kb"] = max(worker["hwm_kb"], s[1])
                        if c is not None:
                            wcpu[ch] = max(wcpu[ch], c)
                time.sleep(0.005)
        finally:
            if p.poll() is None:
                p.kill()  # our own child, past the deadline
            rc = p.wait(timeout=30)
        wall = time.perf_counter() - t0
        if rc != 0:
            raise BenchError(f"lw-embed on ({w.key}) for sampling exited {rc}")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    worker["cpu_s"] = sum(wcpu.values())
    worker["restarts"] = max(0, len(worker["pids"]) - 1)
    return {"core": core, "worker": worker, "samples": samples, "wall_s": wall}


# -- reporting ------------------------------------------------------------------------------
def title(ctx: Ctx, w: Workload) -> str:
    return w.title.format(n=max(1, w.count // ctx.scale))


def _med(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def summarize(ctx: Ctx, times: dict[str, dict[str, list[dict[str, float]]]]) -> dict[str, Any]:
    empty = {v: _med(times["empty"][v], "wall") for v in ctx.variants}
    res: dict[str, Any] = {}
    for w in WORKLOADS:
        runs = times[w.key]
        row: dict[str, Any] = {
            "title": title(ctx, w),
            "runs": runs,
            "wall_s": {v: _med(runs[v], "wall") for v in ctx.variants},
        }
        if w.source:
            nat = row["wall_s"]["native"]
            row["ratio"] = {v: row["wall_s"][v] / nat for v in ctx.variants}
            row["fixed_s"] = {v: empty[v] - empty["native"] for v in ctx.variants}
            row["ratio_minus_startup"] = {
                v: (row["wall_s"][v] - (empty[v] - empty["native"])) / nat for v in ctx.variants
            }
            for k in ("start", "work", "stop"):
                row[f"{k}_med"] = {v: _med(runs[v], k) for v in ctx.variants}
            natw = row["work_med"]["native"]
            nw = [r["work"] for r in runs["native"]]
            row["native_work_spread"] = max(nw) / min(nw) if min(nw) > 0 else float("inf")
            row["ratio_in_workload"] = {v: row["work_med"][v] / natw for v in ctx.variants}
        res[w.key] = row
    return res


def _met(x: float, t: float) -> str:
    return "met" if x <= t else "NOT met"


def verdicts(ctx: Ctx, s: dict[str, Any], lat: dict[str, float], rss: dict[str, Any]) -> list[str]:
    out = []
    for w in WORKLOADS:
        if w.target is None:
            continue
        row, t = s[w.key], w.target
        r, rm, ri = (
            row[k]["lw-embed"] for k in ("ratio", "ratio_minus_startup", "ratio_in_workload")
        )
        fixed = row["fixed_s"]["lw-embed"]
        if fixed > row["wall_s"]["native"]:
            mtxt = (
                f"inconclusive: the fixed cost subtracted ({fixed * 1e3:.0f} ms) exceeds the "
                f"native run ({row['wall_s']['native'] * 1e3:.0f} ms)"
            )
        else:
            mtxt = _met(rm, t)
        txt = (
            f"{row['title']}: target <= {t:.2f}x -- whole command {r:.2f}x ({_met(r, t)}), "
            f"minus start-up {rm:.2f}x ({mtxt}), in-workload {ri:.2f}x ({_met(ri, t)})"
        )
        if w.key == "b":
            if "strace" in ctx.variants:
                rs, rsm, rsi = (
                    row[k]["strace"] for k in ("ratio", "ratio_minus_startup", "ratio_in_workload")
                )
                txt += (
                    f"; <= strace ({rs:.2f}x / {rsm:.2f}x / {rsi:.2f}x): "
                    f"{_met(r, rs)} whole, {_met(rm, rsm)} minus start-up, "
                    f"{_met(ri, rsi)} in-workload"
                )
            else:
                txt += "; <= strace not checked (no strace --seccomp-bpf)"
        out.append(txt)
    add = lat["lw-embed"] - lat["native"]
    out.append(
        f"start-up latency added: {add:.1f} ms, target <= {STARTUP_TARGET_MS:.0f} ms "
        f"({_met(add, STARTUP_TARGET_MS)})"
    )
    core_mb = max(rss["core"]["hwm_kb"], rss["core"]["rss_kb"]) / 1024
    out.append(
        f"core peak RSS during (b): {core_mb:.1f} MB, target <= "
        f"{CORE_RSS_TARGET_MB:.0f} MB ({_met(core_mb, CORE_RSS_TARGET_MB)})"
    )
    return out


def tables(ctx: Ctx, s: dict[str, Any], repeat: int) -> list[str]:
    """The results as Markdown tables (pasted as they are into bench/RESULTS.md)."""
    vs = ctx.variants
    star = (
        f" (\\* naive on (a): 1/{NAIVE_A_DIVISOR} of the count, scaled up)" if "naive" in vs else ""
    )
    L = [
        f"Whole command, median wall time of {repeat} -- ratio to native (ratio minus the "
        f"variant's extra start-up+shutdown on /bin/true){star}",
        "",
    ]
    L.append("| workload | target | " + " | ".join(vs) + " |")
    L.append("|---|---|" + "---|" * len(vs))
    for w in WORKLOADS:
        row = s[w.key]
        cells = []
        for v in vs:
            t = row["wall_s"][v]
            mark = "\\*" if v == "naive" and w.key == "a" else ""
            if not w.source or v == "native":
                cells.append(f"{t:.3f} s{mark}")
            else:
                cells.append(
                    f"{t:.3f} s{mark} -- {row['ratio'][v]:.2f}x "
                    f"({row['ratio_minus_startup'][v]:.2f}x)"
                )
        tgt = f"<= {w.target}x" if w.target else ""
        L.append(f"| {row['title']} | {tgt} | " + " | ".join(cells) + " |")
    L += [
        "",
        "In-workload time (the workload's own CLOCK_REALTIME stamps, main() to its end), "
        "median -- ratio to native; and start-up / shutdown around it, median ms",
        "",
    ]
    L.append(
        "| workload | " + " | ".join(vs) + " | native max/min | lw-embed start-up "
        "| lw-embed shutdown |"
    )
    L.append("|---|" + "---|" * (len(vs) + 3))
    for w in WORKLOADS:
        if not w.source:
            continue
        row = s[w.key]
        cells = [
            f"{row['work_med'][v]:.3f} s"
            + ("" if v == "native" else f" -- {row['ratio_in_workload'][v]:.2f}x")
            for v in vs
        ]
        cells += [
            f"{row['native_work_spread']:.2f}",
            f"{row['start_med']['lw-embed']:.0f} ms",
            f"{row['stop_med']['lw-embed']:.0f} ms",
        ]
        L.append(f"| {row['title']} | " + " | ".join(cells) + " |")
    return L


def _fstype(path: str) -> str:
    """Type of the filesystem holding path, from /proc/self/mounts (longest prefix)."""
    best, fs = "", "?"
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3 or len(parts[1]) < len(best):
                    continue
                if real == parts[1] or real.startswith(parts[1].rstrip("/") + "/"):
                    best, fs = parts[1], parts[2]
    except OSError:
        pass
    return fs


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
        "kernel": platform.release(),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition, 1/10 of the counts")
    ap.add_argument("--repeat", type=int, default=None, metavar="N", help="repetitions (default 5)")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead")
    args = ap.parse_args(argv)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 5)
    if not 1 <= repeat <= 100:
        ap.error("--repeat must be 1..100")
    if not LW_EMBED.exists():
        print(f"no {LW_EMBED}: run with the project's venv python", file=sys.stderr)
        return 1
    notes: list[str] = []
    variants = ["native", "lw-embed", "strace", "naive"]
    ok, strace_note = strace_ok()
    if not ok:
        variants.remove("strace")
        notes.append(f"strace column skipped: {strace_note}")
    else:
        notes.append(f"peer: {strace_note}, `strace {' '.join(STRACE_ARGS)}`")
    if not (ROOT / "lw_embed" / "runtime" / "worker.py").exists():
        notes.append("lw_embed/runtime/worker.py missing: the worker fails and is restarted")
    t_start = time.monotonic()
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with (
        tempfile.TemporaryDirectory(prefix="lw-bench-") as td,
        tempfile.TemporaryDirectory(prefix="lw-bench-", dir=shm) as tfs,
    ):
        ctx = Ctx(
            tmp=Path(td),
            exes=build(Path(td)),
            scale=10 if args.quick else 1,
            variants=variants,
            tmpfs=Path(tfs) if shm else None,
        )
        notes.append(
            f"(d) creates its files in {td} ({_fstype(td)}); the tmpfs row in "
            f"{tfs} ({_fstype(tfs)})"
        )
        progress = not args.json
        try:
            if progress:
                print(
                    f"running {repeat} repetition(s) x {len(WORKLOADS)} workloads x "
                    f"{len(variants)} variants ...",
                    file=sys.stderr,
                    flush=True,
                )
            times = timings(ctx, repeat, progress)
            lat_all, down_all = startup_latency(ctx)
            sampled = {w.key: sample_run(ctx, w) for w in WORKLOADS}
            rss = sampled["b"]
        except (BenchError, subprocess.TimeoutExpired) as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
    s = summarize(ctx, times)
    lat = {v: statistics.median(x) for v, x in lat_all.items()}
    down = {v: statistics.median(x) for v, x in down_all.items()}
    verd = verdicts(ctx, s, lat, rss)
    doc = {
        "machine": machine(),
        "repeat": repeat,
        "quick": args.quick,
        "variants": variants,
        "naive_a_divisor": NAIVE_A_DIVISOR,
        "tables_md": tables(ctx, s, repeat),
        "workloads": s,
        "startup_ms": {
            "median": lat,
            "all": lat_all,
            "added_lw_embed": lat["lw-embed"] - lat["native"],
            "shutdown_median": down,
            "shutdown_all": down_all,
        },
        "rss": rss,
        "sampled": sampled,
        "verify": ctx.verify,
        "verdicts": verd,
        "notes": notes,
        "warnings": ctx.warnings,
        "elapsed_s": time.monotonic() - t_start,
    }
    bad = any(not v.get("ok") or v.get("loss") for v in ctx.verify.values())
    rc = 3 if bad else 0
    if args.json:
        json.dump(doc, sys.stdout, indent=2, sort_keys=True)
        print()
        return rc
    m = doc["machine"]
    print(
        f"{m['date']} | kernel {m['kernel']} | {m['nproc']} CPUs | {m['cpu']} | "
        f"Python {m['python']}" + (" | QUICK (1/10 counts)" if args.quick else "")
    )
    print()
    print("\n".join(tables(ctx, s, repeat)))
    print()
    print(
        "start-up latency, launch -> workload main(), median of "
        f"{STARTUP_SAMPLES} (ms): " + ", ".join(f"{v} {x:.1f}" for v, x in lat.items())
    )
    print(
        "shutdown, probe's main() -> command exit, same runs, median (ms): "
        + ", ".join(f"{v} {x:.1f}" for v, x in down.items())
    )
    print()
    print(
        "one sampled lw-embed run per workload (every 5 ms): peak VmRSS / VmHWM and CPU time "
        "(utime+stime, last sample) of the core and the worker"
    )
    print()
    print(
        "| workload | wall | core RSS max | core VmHWM | core CPU | worker RSS max "
        "| worker VmHWM | worker CPU | worker pids |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for w in WORKLOADS:
        x = sampled[w.key]
        c, wk = x["core"], x["worker"]
        print(
            f"| {title(ctx, w)} | {x['wall_s']:.3f} s | {c['rss_kb'] / 1024:.1f} MB "
            f"| {c['hwm_kb'] / 1024:.1f} MB | {c['cpu_s']:.2f} s | {wk['rss_kb'] / 1024:.1f} MB "
            f"| {wk['hwm_kb'] / 1024:.1f} MB | {wk['cpu_s']:.2f} s | {len(wk['pids'])} |"
        )
    print()
    print("tracer check (first lw-embed run of each workload):")
    for k, v in ctx.verify.items():
        if "error" in v:
            print(f"  {k}: ERROR {v['error']}")
        else:
            print(
                f"  {k}: {'ok' if v['ok'] else 'MISMATCH'} expected {v['expected']}, "
                f"distinct {v['distinct']}, events {v['kinds']}; "
                f"duplicate execs {len(v['duplicate_execs'])}; loss {v['loss']}"
            )
    techs = {json.dumps(v.get("techniques"), sort_keys=True) for v in ctx.verify.values()}
    print(f"  techniques reported: {', '.join(sorted(techs))}")
    print()
    print("targets:")
    for line in verd:
        print(f"  {line}")
    for n in notes + ctx.warnings:
        print(f"note: {n}")
    print(f"elapsed {doc['elapsed_s']:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
