"""``lw-embed sidecar`` against the real kernel, always inside a PID namespace the test made.

Each test builds what ``pidMode: task`` looks like from inside: ``unshare --pid --fork
--mount-proc`` runs a small reaping init as PID 1 (the task's "pause"), and the
workload and the sidecar enter that namespace with ``nsenter`` like two containers do
(their parent is outside, so they have ppid 0 in there). The sidecar is never pointed at
a process the test did not start; on the machine's own namespace it is only run where it
must refuse before attaching anything (and with ``tracer.mode = procfs`` besides).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lw_embed.decode import iter_events
from lw_embed.errors import RecordError
from lw_embed.runtime.sidecar import ScopeError, decide_scope, is_root_namespace
from lw_embed.runtime.worker import SpecError, parse_spec
from lw_embed.sources.procfs import in_scope, scan

pytestmark = pytest.mark.linux

PY = sys.executable
Popen = subprocess.Popen[bytes]
ROOT = Path(__file__).resolve().parents[2]

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

# a workload that runs one command per line written to its fifo, with a long-lived child
SHELL = 'sleep 1000 & exec 3<>"$1"; while read -r cmd <&3; do $cmd; done'

THREADS = """
import threading, time
for _ in range(3):
    threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()
time.sleep(1000)
"""


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LW_EMBED_", "_LW_EMBED_"))}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra or {})
    return env


def status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def tids(pid: int) -> list[int]:
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


def traced(pid: int) -> bool:
    """Every thread of ``pid`` has a tracer."""
    try:
        return all(status(t)["TracerPid"] != "0" for t in tids(pid))
    except OSError:
        return False


def clean(pid: int) -> bool:
    """Alive, and no thread traced or stopped."""
    for t in tids(pid):
        st = status(t)
        if st["TracerPid"] != "0" or st["State"][0] in "Tt" or st["State"][0] in "ZX":
            return False
    return True


def ns_pid(pid: int) -> int:
    return int(status(pid)["NSpid"].split()[-1])


def wait_for(pred: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


class Namespace:
    """A PID namespace with a reaping init, and processes entered into it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.out = tmp / "out"
        self.data = tmp / "data"
        self.popens: list[subprocess.Popen[bytes]] = []
        self.unshare = self._popen(["unshare", "--pid", "--fork", "--mount-proc",
                                    "--kill-child", PY, "-c", INIT])  # fmt: skip
        wait_for(lambda: children(self.unshare.pid), 10, "the namespace's init")
        self.init = children(self.unshare.pid)[0]

    def _popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.DEVNULL)
        p = subprocess.Popen(argv, env=_env(kw.pop("env", None)), cwd=str(self.tmp), **kw)
        self.popens.append(p)
        return p

    def enter(self, argv: list[str], **kw: Any) -> tuple[subprocess.Popen[bytes], int]:
        """Run ``argv`` in the namespace; (the nsenter process, the host pid of argv)."""
        p = self._popen(["nsenter", "-t", str(self.init), "-p", "-m", "--", *argv], **kw)
        wait_for(lambda: children(p.pid), 10, f"{argv[0]} in the namespace")
        return p, children(p.pid)[0]

    def shell(self) -> tuple[int, Path]:
        """The fifo-driven workload shell: (its host pid, its fifo)."""
        fifo = self.tmp / f"fifo-{len(self.popens)}"
        os.mkfifo(fifo)
        _, pid = self.enter(["sh", "-c", SHELL, "sh", str(fifo)])
        wait_for(lambda: children(pid), 10, "the workload's child")
        return pid, fifo

    def sidecar(self, *args: str, prefix: tuple[str, ...] = (),
                env: dict[str, str] | None = None) -> tuple[Popen, int, Path]:  # fmt: skip
        log = self.tmp / f"sidecar-{len(self.popens)}.stderr"
        with open(log, "wb") as err:
            p, pid = self.enter([*prefix, PY, "-P", "-m", "lw_embed", "sidecar", "--output",
                                 str(self.out), "--data-dir", str(self.data), *args],
                                stderr=err, env=env)  # fmt: skip
        return p, pid, log

    def events(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        with contextlib.suppress(RecordError, OSError):
            return list(iter_events([str(self.out)]))
        return []

    def batches(self) -> list[dict[str, Any]]:
        from lw_embed.decode import batch_files, read_batch

        return [read_batch(p) for p in batch_files([str(self.out)])] if self.out.exists() else []

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.init, signal.SIGKILL)  # PID 1 dies: the kernel kills the rest
        for p in self.popens:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)


@pytest.fixture
def ns(tmp_path: Path) -> Iterator[Namespace]:
    n = Namespace(tmp_path)
    try:
        yield n
    finally:
        n.close()


def execs(evs: list[dict[str, Any]], word: str) -> list[dict[str, Any]]:
    return [e for e in evs if e["kind"] == "process.exec" and word in " ".join(e["argv"])]


def caps(evs: list[dict[str, Any]]) -> dict[str, Any]:
    found: list[dict[str, Any]] = [e["report"] for e in evs if e["kind"] == "agent.capabilities"]
    assert found, "no agent.capabilities event"
    return found[0]


def test_sees_execs_in_the_tree_and_detaches_cleanly_on_sigterm(ns: Namespace) -> None:
    shell, fifo = ns.shell()
    sleeper = children(shell)[0]
    _, threaded = ns.enter([PY, "-c", THREADS])
    wait_for(lambda: len(tids(threaded)) == 4, 10, "the threads of the threaded workload")
    _, stopped = ns.enter(["sleep", "1000"])
    proc, side, log = ns.sidecar()
    for pid in (shell, sleeper, threaded, stopped):
        wait_for(lambda p=pid: traced(p), 30, f"pid {pid} (all threads) traced")
    assert status(ns.init)["TracerPid"] == "0", "PID 1 of the task must not be traced"
    marker = f"lw-marker-{uuid.uuid4().hex[:8]}"
    written = time.time_ns()
    fifo.write_text(f"/bin/true {marker}\n")
    wait_for(lambda: execs(ns.events(), marker), 30, "the exec of the marker")
    ev = execs(ns.events(), marker)[0]
    assert ev["source"] == "ptrace", ev  # seen by the tracer, not found later in /proc
    assert ev["ppid"] == ns_pid(shell)
    # the exec is recorded as it happens (the batch may come later): within 1 s
    assert ev["time"] - written < 1_000_000_000, (ev["time"] - written) / 1e9
    # the batch's resource is the sidecar's own container: marked as the observer's
    assert {b["resource"].get("observer") for b in ns.batches()} == {True}
    wait_for(lambda: execs(ns.events(), "sleep 1000"), 30, "the pre-existing sleep reported")
    evs = ns.events()
    pids = {e.get("pid") for e in evs if e["kind"] == "process.exec"}
    assert 1 not in pids, "PID 1 (the task's init) is not reported"
    assert ns_pid(side) not in pids, "the sidecar does not report itself"
    report = caps(evs)
    assert report["techniques"]["processes"] == "ptrace", report
    assert report["techniques"]["network.connect"] == "none"

    os.kill(stopped, signal.SIGSTOP)  # a job-control stop must survive the detach
    wait_for(lambda: status(stopped)["State"][0] in "Tt", 10, "the stopped sleep")
    # a tree busy forking while the sidecar lets go (bounded: 2000 execs)
    _, forker = ns.enter(["sh", "-c", 'i=0; while [ $i -lt 2000 ]; do /bin/true; '
                          'i=$((i+1)); done; touch "$1"', "sh", str(ns.tmp / "forker-done")])
    wait_for(lambda: traced(forker), 30, "the forking workload traced")
    os.kill(side, signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()
    for pid in (shell, sleeper, threaded):
        assert clean(pid), (pid, status(pid))
    with contextlib.suppress(FileNotFoundError):  # the forker may have finished by now
        assert clean(forker), status(forker)
    # let go by PTRACE_DETACH, not by the kernel at the sidecar's exit
    last = [e for e in ns.events() if e["kind"] == "agent.status"][-1]["metrics"]
    assert last.get("sidecar.detached", 0) >= 8, last  # sh, sleep, 4 threads, sleep, forker
    assert "sidecar.detach_timeouts" not in last, last
    st = status(stopped)
    assert st["TracerPid"] == "0" and st["State"][0] == "T", st  # still stopped, as untraced
    os.kill(stopped, signal.SIGCONT)
    wait_for(lambda: status(stopped)["State"][0] not in "Tt", 10, "the sleep continued")
    fifo.write_text(f"touch {ns.tmp / 'after'}\n")
    wait_for((ns.tmp / "after").exists, 10, "the workload still working after the detach")
    wait_for((ns.tmp / "forker-done").exists, 120, "the forking workload finishing")
    assert "Traceback" not in log.read_text()


def test_sigkilled_sidecar_leaves_the_workload_running(ns: Namespace) -> None:
    shell, fifo = ns.shell()
    sleeper = children(shell)[0]
    _, threaded = ns.enter([PY, "-c", THREADS])
    proc, side, _ = ns.sidecar()
    for pid in (shell, sleeper, threaded):
        wait_for(lambda p=pid: traced(p), 30, f"pid {pid} traced")
    os.kill(side, signal.SIGKILL)
    proc.wait(timeout=30)
    for pid in (shell, sleeper, threaded):
        wait_for(lambda p=pid: clean(p), 10, f"pid {pid} released by the kernel")
    fifo.write_text(f"touch {ns.tmp / 'after'}\n")
    wait_for((ns.tmp / "after").exists, 10, "the workload still working")


def test_pid_option_watches_only_those_trees(ns: Namespace) -> None:
    shell, fifo = ns.shell()
    sleeper = children(shell)[0]
    _, other = ns.enter(["sleep", "1000"])
    proc, side, log = ns.sidecar("--pid", str(ns_pid(shell)))
    wait_for(lambda: traced(shell) and traced(sleeper), 30, "the --pid tree traced")
    wait_for(lambda: execs(ns.events(), "sleep 1000"), 30, "the tree's child reported")
    marker = f"lw-marker-{uuid.uuid4().hex[:8]}"
    fifo.write_text(f"/bin/true {marker}\n")
    wait_for(lambda: execs(ns.events(), marker), 30, "the exec in the tree")
    # by now the sidecar has re-scanned and the worker reconciled more than once
    assert status(other)["TracerPid"] == "0", "a process outside the --pid tree was traced"
    pids = {e.get("pid") for e in ns.events() if e["kind"] == "process.exec"}
    assert ns_pid(other) not in pids and 1 not in pids
    os.kill(side, signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()
    assert clean(shell) and clean(sleeper)


def test_without_cap_sys_ptrace_falls_back_to_proc(ns: Namespace) -> None:
    shell, _ = ns.shell()
    prefix = ("setpriv", "--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace", "--")
    proc, side, log = ns.sidecar(prefix=prefix)
    wait_for(lambda: any(e["kind"] == "agent.capabilities" for e in ns.events()), 30,
             "the capability report")  # fmt: skip
    report = caps(ns.events())
    assert report["techniques"]["processes"] == "procfs", report
    assert "EPERM" in report["reasons"]["processes"]
    wait_for(lambda: execs(ns.events(), "sleep 1000"), 30, "the workload seen through /proc")
    ev = execs(ns.events(), "sleep 1000")[0]
    assert ev["source"] == "procfs"
    assert status(shell)["TracerPid"] == "0"
    os.kill(side, signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()


def test_nothing_in_scope_says_so_and_picks_up_a_later_workload(ns: Namespace) -> None:
    proc, side, log = ns.sidecar()
    wait_for(lambda: any(e["kind"] == "agent.capabilities" for e in ns.events()), 30,
             "the capability report")  # fmt: skip
    first = caps(ns.events())
    assert first["techniques"]["processes"] == "none", first
    assert "no process in scope" in first["reasons"]["processes"]
    wait_for(lambda: "no process in scope" in log.read_text(), 10, "the warning")
    shell, _ = ns.shell()  # the workload starts later
    wait_for(lambda: traced(shell), 30, "the late workload traced")
    wait_for(lambda: len([e for e in ns.events() if e["kind"] == "agent.capabilities"]) >= 2,
             30, "a second capability report")  # fmt: skip
    reports = [e["report"] for e in ns.events() if e["kind"] == "agent.capabilities"]
    assert reports[-1]["techniques"]["processes"] == "ptrace", reports[-1]
    os.kill(side, signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()
    assert clean(shell)


VFORK_LATE = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    /* the parent waits in vfork (it cannot stop) until the child execs, argv[1] s on */
    pid_t p = vfork();
    if (p == 0) {
        sleep(atoi(argv[1]));
        execl("/bin/sleep", "sleep", "1000", (char *)0);
        _exit(127);
    }
    close(open(argv[2], O_CREAT | O_WRONLY, 0644));
    for (;;) pause();
}
"""


def test_a_tracee_that_stops_only_after_the_detach_budget_is_not_left_stopped(
    ns: Namespace,
) -> None:
    src, exe = ns.tmp / "vfork_late.c", ns.tmp / "vfork_late"
    src.write_text(VFORK_LATE)
    subprocess.run(["cc", "-O1", "-o", str(exe), str(src)], check=True, timeout=60)
    marker = ns.tmp / "vfork-returned"
    _, late = ns.enter([str(exe), "9", str(marker)])
    dead = socket_port()  # the backend is down: the drain takes the whole grace
    proc, side, log = ns.sidecar("--backend", f"http://127.0.0.1:{dead}", "--token", "t",
                                 env={"LW_EMBED_SHUTDOWN_GRACE": "12"})  # fmt: skip
    wait_for(lambda: traced(late), 30, "the vfork parent traced")
    os.kill(side, signal.SIGTERM)
    # the detach budget (3 s) runs out while the parent waits in vfork; when the child
    # execs the parent stops, and must be detached then, while the sidecar still drains
    wait_for(marker.exists, 30, "the vfork parent running again")
    assert proc.poll() is None, "the sidecar exited first: the test proves nothing"
    wait_for(lambda: clean(late), 5, "the vfork parent detached")
    assert proc.wait(timeout=60) == 0, log.read_text()
    assert "not detached within the budget" in log.read_text()


def socket_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def _run_cli(args: list[str], tmp: Path,
             extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    # belt and braces: never ptrace here
    env = _env({"LW_EMBED_TRACER_MODE": "procfs", **(extra or {})})
    return subprocess.run([PY, "-P", "-m", "lw_embed", "sidecar", "--output", str(tmp / "out"),
                           "--data-dir", str(tmp / "data"), *args], env=env, cwd=str(tmp),
                          capture_output=True, text=True, timeout=60)  # fmt: skip


@pytest.mark.skipif(not is_root_namespace(), reason="needs the machine's root PID namespace")
def test_root_namespace_without_pid_attaches_nothing_and_exits_2(tmp_path: Path) -> None:
    r = _run_cli([], tmp_path)
    assert r.returncode == 2, r.stderr
    assert "root PID namespace" in r.stderr and "--pid" in r.stderr
    assert not (tmp_path / "data").exists(), "nothing may start before the scope is decided"


@pytest.mark.parametrize("arg", ["0", "-3", "4194305", "abc"])
def test_bad_pid_exits_2(tmp_path: Path, arg: str) -> None:
    r = _run_cli(["--pid", arg], tmp_path)
    assert r.returncode == 2, r.stderr
    assert "--pid" in r.stderr or "argument --pid" in r.stderr
    assert not (tmp_path / "data").exists()


def test_bad_config_value_exits_2_naming_the_key(tmp_path: Path) -> None:
    r = _run_cli(["--pid", "0"], tmp_path, {"LW_EMBED_SHUTDOWN_GRACE": "soon"})
    assert r.returncode == 2 and "LW_EMBED_SHUTDOWN_GRACE" in r.stderr, r.stderr
    assert not (tmp_path / "data").exists()


# -- scope decisions on fake /proc trees ---------------------------------------------------
def _fake_proc(root: Path, procs: dict[int, tuple[str, int]]) -> str:
    for pid, (comm, ppid) in procs.items():
        d = root / str(pid)
        d.mkdir(parents=True)
        rest = " ".join(["S", str(ppid), str(pid)] + ["0"] * 16 + [str(100 + pid)] + ["0"] * 5)
        (d / "stat").write_text(f"{pid} ({comm}) {rest}\n")
    return str(root)


def test_namespace_scope_leaves_out_init_ancestors_and_own(tmp_path: Path) -> None:
    # 1 pause; 7 the sidecar container's tini -> 8 the sidecar -> 9 its worker; 20 app -> 21
    proc = _fake_proc(tmp_path, {1: ("pause", 0), 7: ("tini", 0), 8: ("python", 7),
                                 9: ("python", 8), 20: ("app", 0), 21: ("sh", 20)})  # fmt: skip
    s = decide_scope((), False, 8, proc)
    assert s.kind == "namespace" and s.exclude == {1, 7}
    stats = scan(proc)
    assert stats is not None
    assert set(in_scope(stats, s.kind, 8, 8, s.roots, s.exclude)) == {20, 21}
    assert decide_scope((), True, 8, proc).exclude == {1, 7}, "a pause PID 1 stays out"


def test_include_init_and_pid_trees(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, {1: ("init", 0), 8: ("python", 0), 20: ("app", 1),
                                 21: ("sh", 20), 30: ("other", 1)})  # fmt: skip
    assert decide_scope((), False, 8, proc).exclude == {1}
    assert decide_scope((), True, 8, proc).exclude == set()
    s = decide_scope((20,), False, 8, proc)
    stats = scan(proc)
    assert stats is not None
    assert s.kind == "tree" and set(in_scope(stats, "tree", 8, 8, s.roots, s.exclude)) == {20, 21}
    with pytest.raises(ScopeError, match="no such process"):
        decide_scope((99,), False, 8, proc)
    with pytest.raises(ScopeError, match="sidecar itself"):
        decide_scope((8,), False, 8, proc)


def test_kthreadd_means_root_namespace(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, {1: ("systemd", 0), 2: ("kthreadd", 0), 8: ("python", 1)})
    assert is_root_namespace(proc)
    with pytest.raises(ScopeError, match="root PID namespace"):
        decide_scope((), False, 8, proc)


def test_worker_spec_roots_and_exclude_are_checked() -> None:
    from lw_embed.config import config_to_dict, load_config

    base = {"config": config_to_dict(load_config(None, {})), "config_path": None,
            "core_pid": 5, "instance_id": "", "mode": "sidecar", "scope": "tree",
            "version": "0"}  # fmt: skip
    spec = parse_spec(json.dumps({**base, "roots": [20, 30], "exclude": [1]}))
    assert spec.roots == (20, 30) and spec.exclude == (1,)
    assert parse_spec(json.dumps(base)).roots == ()
    for bad in ([0], ["1"], 5, [True]):
        with pytest.raises(SpecError, match="roots"):
            parse_spec(json.dumps({**base, "roots": bad}))


def _watching(ino: int) -> bool:
    """Some process's inotify fd has a watch on inode ``ino`` (its fdinfo says so)."""
    needle = f" ino:{ino:x} "
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    if needle in f.read():
                        return True
    return False


def test_watch_through_a_workload_root_reports_its_files_without_the_default_trees(
        ns: Namespace) -> None:  # fmt: skip
    shell, fifo = ns.shell()
    w = ns.tmp / "w"
    w.mkdir()
    root_path = f"/proc/{ns_pid(shell)}/root{w}"  # the workload's view, from the sidecar
    proc, side, log = ns.sidecar("--watch", root_path)
    wait_for(lambda: _watching(w.stat().st_ino), 30, "the sidecar watching w")
    fifo.write_text(f"touch {w}/planted\n")
    want = f"{root_path}/planted"
    try:
        wait_for(lambda: any(e["kind"] == "file.change" and e["path"] == want
                             for e in ns.events()), 30, "the change reported")  # fmt: skip
    except BaseException:
        print([(e["kind"], e.get("path")) for e in ns.events() if e["kind"] != "process.exec"])
        raise
    ev = next(e for e in ns.events() if e["kind"] == "file.change" and e["path"] == want)
    assert ev["action"] == "create" and ev["attribution"] in ("heuristic", "none"), ev
    rules = {e.get("rule") for e in ns.events() if e["kind"] == "file.change"}
    assert rules == {f"watch:{root_path}"}, rules  # no default tree of the sidecar's image
    os.kill(side, signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()
