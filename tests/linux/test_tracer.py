"""The tracer against the real kernel: what it sees, and that it never breaks the workload."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lw_embed.decode import iter_events
from lw_embed.kernel import procfs, seccomp

pytestmark = [
    pytest.mark.linux,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, seccomp)"),
]

HELPERS = Path(__file__).resolve().parent.parent / "helpers"


#: these tests look at every single event: no folding of repeats
NO_AGGREGATION = "[aggregate.keys]\n"


def wrapper_cmd(tmp: Path, *cmd: str, config: str | None = None) -> list[str]:
    args = [sys.executable, "-m", "lw_embed", "run", "--output", str(tmp / "out"),
            "--data-dir", str(tmp / "data")]  # fmt: skip
    cfg = tmp / "lw.toml"
    cfg.write_text((config or "") + NO_AGGREGATION)
    args += ["--config", str(cfg)]
    return [*args, "--", *cmd]


def run(
    tmp: Path,
    *cmd: str,
    config: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    launcher: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    full = [*(launcher or []), *wrapper_cmd(tmp, *cmd, config=config)]
    return subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})  # fmt: skip


def events(tmp: Path, kind: str | None = None) -> list[dict[str, Any]]:
    evs = list(iter_events([str(tmp / "out")]))
    return [e for e in evs if kind is None or e["kind"] == kind]


def compile_helper(tmp: Path, name: str, *flags: str) -> str:
    if shutil.which("gcc") is None:
        pytest.fail("gcc is required for the ABI helpers (installed by .ci/run)")
    out = tmp / name
    subprocess.run(["gcc", "-O1", "-o", str(out), str(HELPERS / f"{name}.c"), *flags], check=True)
    return str(out)


def listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


def test_500_short_execs_are_500_exec_events(tmp_path: Path) -> None:
    script = "i=0; while [ $i -lt 500 ]; do /bin/true; i=$((i+1)); done"
    r = run(tmp_path, "/bin/sh", "-c", script)
    assert r.returncode == 0, r.stderr
    execs = events(tmp_path, "process.exec")
    shell = [e for e in execs if e["argv"] == ["/bin/sh", "-c", script]]
    assert len(shell) == 1
    trues = [e for e in execs if e["argv"] == ["/bin/true"]]
    assert len(trues) == 500
    true_exe = os.path.realpath("/bin/true")
    assert {e["exe"] for e in trues} == {true_exe}
    assert {e["parent_exec_id"] for e in trues} == {shell[0]["exec_id"]}
    assert all(e["source"] == "ptrace" for e in trues)
    assert all(e["ancestors"][0]["exec_id"] == shell[0]["exec_id"] for e in trues)
    exits = {e["exec_id"] for e in events(tmp_path, "process.exit")}
    assert {e["exec_id"] for e in trues} <= exits


def test_exec_id_is_the_documented_hash(tmp_path: Path) -> None:
    r = run(tmp_path, "/bin/sh", "-c", "exec /bin/sleep 0.1")
    assert r.returncode == 0
    ev = next(e for e in events(tmp_path, "process.exec") if e["argv"][0] == "/bin/sleep")
    ticks = (ev["start_time"] - procfs.boot_time_ns()) * procfs.CLOCK_TICKS // 1_000_000_000
    want = procfs.exec_id(procfs.boot_id(), procfs.pidns_inode(), ev["pid"], ticks)
    assert ev["exec_id"] == want
    assert ev["uid"] == os.getuid() and ev["cwd"] == os.getcwd()


def test_exec_from_a_worker_thread_is_one_correct_exec(tmp_path: Path) -> None:
    prog = (
        "import os, threading, time\n"
        "def go():\n"
        "    os.execv('/bin/echo', ['/bin/echo', 'from-thread'])\n"
        "for _ in range(3):\n"
        "    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
        "threading.Thread(target=go).start()\n"
        "time.sleep(30)\n"
    )
    r = run(tmp_path, sys.executable, "-c", prog, timeout=20)
    assert r.returncode == 0
    assert r.stdout == "from-thread\n"
    execs = events(tmp_path, "process.exec")
    py = [e for e in execs if e["argv"][:2] == [sys.executable, "-c"]]
    echo = [e for e in execs if e["argv"] == ["/bin/echo", "from-thread"]]
    assert len(py) == 1 and len(echo) == 1
    assert echo[0]["pid"] == py[0]["pid"]  # the thread took over the thread-group id
    exits = [e for e in events(tmp_path, "process.exit") if e["pid"] == py[0]["pid"]]
    assert len(exits) == 1 and exits[0]["exit_code"] == 0


def test_vfork_and_posix_spawn_children_are_seen(tmp_path: Path) -> None:
    prog = (
        "import os, subprocess\n"
        "pid = os.posix_spawn('/bin/echo', ['/bin/echo', 'spawned'], os.environ)\n"
        "os.waitpid(pid, 0)\n"
        "subprocess.run(['/bin/echo', 'viafork'], check=True)\n"
    )
    r = run(tmp_path, sys.executable, "-c", prog)
    assert r.returncode == 0 and r.stdout == "spawned\nviafork\n"
    execs = events(tmp_path, "process.exec")
    py = next(e for e in execs if e["argv"][:2] == [sys.executable, "-c"])
    kids = [e for e in execs if e["argv"][0] == "/bin/echo"]
    assert sorted(e["argv"][1] for e in kids) == ["spawned", "viafork"]
    assert {e["parent_exec_id"] for e in kids} == {py["exec_id"]}


def test_connect_is_traced_in_every_abi_and_no_result_changes(tmp_path: Path) -> None:
    abi = compile_helper(tmp_path, "abi")
    with listener() as lst:
        port = str(lst.getsockname()[1])
        native = subprocess.run([abi, port], capture_output=True, text=True, timeout=10)
        traced = run(tmp_path, abi, port)
    assert native.returncode == 0 and traced.returncode == 0
    assert traced.stdout == native.stdout  # the filter made no syscall fail or differ
    fds_ok = {
        int(line.split("fd=")[1].split()[0])
        for line in native.stdout.splitlines()
        if "connect" in line and line.endswith("rc=0")
    }
    assert 3 in fds_ok  # x86-64 at least
    seen = {
        e["fd"] for e in events(tmp_path, "net.connect")
        if e["port"] == int(port) and e["address"] == "127.0.0.1"
    }  # fmt: skip
    assert fds_ok <= seen


def _free_ports(n: int) -> int:
    """A base port such that base .. base+n-1 are free on 127.0.0.1 now."""
    for base in range(41000 + os.getpid() % 1000 * 20, 65000, 7):
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    pytest.fail("no free ports")


def test_bind_and_listen_are_traced_in_every_abi(tmp_path: Path) -> None:
    abi = compile_helper(tmp_path, "abi")
    with listener() as lst:
        port = str(lst.getsockname()[1])
        base = _free_ports(3)
        traced = run(tmp_path, abi, port, str(base))
    assert traced.returncode == 0, traced.stderr
    out = traced.stdout.splitlines()
    pid = int(next(ln for ln in out if ln.startswith("pid ")).split()[1])
    bound = [ln for ln in out if "bind fd=" in ln]
    assert len(bound) == 3 and all(ln.endswith("rc=0 listen rc=0") for ln in bound), bound
    # net.listen from R.LISTEN needs the R.BIND of the same (pid, fd): the right port
    # per ABI means both records carried the right fd and the bind its sockaddr
    got = {(e["port"], e["address"], e.get("pid"), e["attribution"], e["source"])
           for e in events(tmp_path, "net.listen") if base <= e["port"] < base + 3}
    want = {(base + i, "127.0.0.1", pid, "syscall", "syscall") for i in range(3)}
    assert got == want


def test_filter_allows_unknown_arch_and_unlisted_syscalls() -> None:
    prog = seccomp.build_trace_filter([seccomp.Rule("connect", 1)])
    # last dispatch fallthrough is RET_ALLOW for an unknown arch
    n_arch = len(seccomp.native_arches())
    assert prog[1 + n_arch] == (0x06, 0, 0, seccomp.SECCOMP_RET_ALLOW)
    rets = [k for code, _, _, k in prog if code == 0x06]
    assert set(rets) == {seccomp.SECCOMP_RET_ALLOW, seccomp.SECCOMP_RET_TRACE | 1}


def test_handler_exceptions_leave_no_tracee_stopped(tmp_path: Path) -> None:
    with listener() as lst:
        port = lst.getsockname()[1]
        connect = f"import socket; socket.create_connection(('127.0.0.1', {port}))"
        script = (
            "i=0; while [ $i -lt 30 ]; do /bin/true; i=$((i+1)); done; "
            f'{sys.executable} -c "{connect}"; exit 7'
        )
        r = run(tmp_path, "/bin/sh", "-c", script, timeout=30,
                env={"_LW_EMBED_FAULTS": "exec,fork,seccomp"})  # fmt: skip
    assert r.returncode == 7, r.stderr
    loss = events(tmp_path, "agent.loss")
    assert loss and loss[-1]["totals"].get("core.handler_error", 0) >= 30


def _worker_pid(core: int) -> int | None:
    for pid in procfs.list_pids():
        try:
            if procfs.read_stat(pid).ppid != core:
                continue
            argv, _ = procfs.read_cmdline(pid, 4096, 16)
        except OSError:
            continue
        if "lw_embed.runtime.worker" in argv:
            return pid
    return None


def test_killed_worker_is_restarted_and_events_resume(tmp_path: Path) -> None:
    script = "i=0; while [ $i -lt 60 ]; do /bin/true; sleep 0.05; i=$((i+1)); done"
    cfg = "[worker]\nrestart_backoff_min = 0.1\n"
    p = subprocess.Popen(wrapper_cmd(tmp_path, "/bin/sh", "-c", script, config=cfg),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        worker = None
        while worker is None and time.monotonic() < deadline:
            time.sleep(0.05)
            worker = _worker_pid(p.pid)
        assert worker is not None
        time.sleep(1.0)
        killed_at = time.time_ns()
        os.kill(worker, signal.SIGKILL)
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    trues = [e for e in events(tmp_path, "process.exec") if e["argv"] == ["/bin/true"]]
    assert any(e["time"] > killed_at + 500_000_000 for e in trues)
    status = events(tmp_path, "agent.status")
    assert max(e["metrics"].get("worker_restarts", 0) for e in status) >= 1


def _denying_launcher(tmp: Path, names: list[str]) -> list[str]:
    """A launcher that installs a seccomp filter failing ``names`` with EPERM and then
    execs the wrapper: what a restrictive container runtime profile does."""
    code = (
        "import errno, os, sys\n"
        "from lw_embed.kernel import seccomp\n"
        "seccomp.set_no_new_privs()\n"
        f"seccomp.install(seccomp.build_errno_filter({names!r}, errno.EPERM))\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    )
    path = tmp / "deny.py"
    path.write_text(code)
    return [sys.executable, str(path)]


def test_ptrace_denied_still_runs_the_workload_and_reports_procfs(tmp_path: Path) -> None:
    cfg = "[processes]\nreconcile_interval = 0.1\n"
    r = run(tmp_path, "/bin/sh", "-c", "/bin/sleep 1.5; echo ran; exit 5", config=cfg,
            launcher=_denying_launcher(tmp_path, ["ptrace"]))  # fmt: skip
    assert r.returncode == 5 and r.stdout == "ran\n", r.stderr
    caps = events(tmp_path, "agent.capabilities")
    assert len(caps) == 1
    rep = caps[0]["report"]
    assert rep["probes"]["ptrace"]["ok"] is False and "EPERM" in rep["probes"]["ptrace"]["detail"]
    assert rep["techniques"]["processes"] == "procfs"
    sleeps = [e for e in events(tmp_path, "process.exec") if e["argv"][:1] == ["/bin/sleep"]]
    assert sleeps and sleeps[0]["source"] == "procfs"


def test_agent_processes_are_never_reported(tmp_path: Path) -> None:
    cfg = "[processes]\nreconcile_interval = 0.1\n"
    p = subprocess.Popen(wrapper_cmd(tmp_path, "/bin/sleep", "1", config=cfg))
    worker = None
    deadline = time.monotonic() + 5
    while worker is None and time.monotonic() < deadline:
        time.sleep(0.05)
        worker = _worker_pid(p.pid)
    assert p.wait(timeout=20) == 0
    pids = {e.get("pid") for e in events(tmp_path) if e["kind"].startswith("process.")}
    assert worker is not None
    assert p.pid not in pids and worker not in pids
    assert pids  # the sleep itself was reported


def test_a_process_entering_the_container_is_reported_by_the_reconciler(tmp_path: Path) -> None:
    """As PID 1 of a pid namespace, the agent covers the whole namespace: a process that
    joins it from outside (like `docker exec`) is not traced, but /proc reconciliation
    reports it."""
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.fail("unshare and nsenter (util-linux) are required; .ci/run installs them")
    cfg = "[processes]\nreconcile_interval = 0.2\n"
    outer = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc",
                              *wrapper_cmd(tmp_path, "/bin/sleep", "4", config=cfg)])  # fmt: skip
    try:
        core = None
        deadline = time.monotonic() + 10
        while core is None and time.monotonic() < deadline:
            time.sleep(0.05)
            kids = [p for p in procfs.list_pids() if _ppid(p) == outer.pid]
            core = kids[0] if kids else None
        assert core is not None
        time.sleep(0.5)
        visitor = subprocess.run(["nsenter", "--target", str(core), "--pid", "--mount", "--",
                                  "/bin/sh", "-c", "exec /bin/sleep 1.5"], timeout=20)  # fmt: skip
        assert visitor.returncode == 0
        assert outer.wait(timeout=30) == 0
    finally:
        if outer.poll() is None:
            outer.kill()
            outer.wait()
    execs = events(tmp_path, "process.exec")
    visit = [e for e in execs if e["argv"] == ["/bin/sleep", "1.5"]]
    assert visit and visit[0]["source"] == "procfs"
    main = [e for e in execs if e["argv"] == ["/bin/sleep", "4"]]
    assert main and main[0]["source"] == "ptrace"


def _ppid(pid: int) -> int:
    try:
        return procfs.read_stat(pid).ppid
    except OSError:
        return -1
