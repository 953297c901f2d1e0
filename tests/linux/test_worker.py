"""The real worker process: records in on fd 3, batch files out, exact events checked."""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lw_embed.config import Config, config_from_dict, config_to_dict
from lw_embed.decode import batch_files, read_batch
from lw_embed.kernel import procfs
from lw_embed.records import R, frame
from lw_embed.runtime import worker as worker_mod

pytestmark = pytest.mark.linux

BOOT = procfs.boot_id()
NS = procfs.pidns_inode()
BOOT_NS = procfs.boot_time_ns()
VERSION = "0.1.0-test"


def cfg_dict(out: Path, **section_overrides: dict[str, Any]) -> dict[str, Any]:
    d = config_to_dict(Config())
    d["output"]["dir"] = str(out)
    d["agent"]["log_level"] = "info"
    for section, values in section_overrides.items():
        d[section].update(values)
    return d


def spec_env(cfg: dict[str, Any], scope: str, core_pid: int, iid: str = "test-inst") -> str:
    return json.dumps({
        "config": cfg, "core_pid": core_pid, "instance_id": iid, "mode": "wrapper",
        "scope": scope, "version": VERSION,
    })  # fmt: skip


class Running:
    def __init__(self, tmp: Path, spec: str) -> None:
        r, self.w = os.pipe()
        r_hi = fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(r)
        self.err = open(tmp / "worker.stderr", "w+b")  # noqa: SIM115
        env = {k: v for k, v in os.environ.items() if not k.startswith("LW_EMBED_")}
        env["_LW_EMBED_WORKER"] = spec
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lw_embed.runtime.worker"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.err, env=env,
            close_fds=False, preexec_fn=lambda: os.dup2(r_hi, 3),
        )  # fmt: skip
        os.close(r_hi)

    def wait_started(self, timeout: float = 15.0) -> None:
        """Until the worker logged that its signal handlers are in place."""
        end = time.monotonic() + timeout
        while "started:" not in self.stderr():
            assert self.proc.poll() is None and time.monotonic() < end, self.stderr()
            time.sleep(0.02)

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.w, view) :]

    def finish(self, timeout: float = 15.0) -> int:
        os.close(self.w)
        out, _ = self.proc.communicate(timeout=timeout)
        assert out == b"", "the worker must never write to stdout"
        return self.proc.returncode

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace")


def batches(out: Path) -> list[dict[str, Any]]:
    return [read_batch(p) for p in batch_files([str(out)])]


def events_of(bs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    evs = [e for b in bs for e in b["events"]]
    seqs = [b["seq"] for b in bs]
    for (_f1, l1), (f2, _l2) in itertools.pairwise(seqs):
        assert f2 == l1 + 1, f"sequence gap or overlap: {seqs}"
    for b in bs:
        assert b["seq"][1] - b["seq"][0] + 1 == len(b["events"])
    return evs


def eid(pid: int, ticks: int) -> str:
    return procfs.exec_id(BOOT, NS, pid, ticks)


def test_records_to_exact_events(tmp_path: Path) -> None:
    out = tmp_path / "out"
    w = Running(tmp_path, spec_env(cfg_dict(out), "none", os.getpid()))
    P, PT, C, CT = 4_000_001, 1000, 4_000_002, 1100
    t0 = procfs.ticks_to_ns(PT, BOOT_NS) + 1_000_000
    t_exit = procfs.ticks_to_ns(CT, BOOT_NS) + 3_000_000_000
    report = {"techniques": {"processes": "ptrace+seccomp"}, "probes": {"ptrace": {"ok": True}}}
    w.send(
        frame(R.CAPS, t0, report)
        + frame(R.WORKLOAD, t0, P, ["/app/server"])
        + frame(R.FORK, t0, 1, P, PT)
        + frame(R.EXEC, t0 + 1, P, 1, PT, "/app/server", ["/app/server", "-v"], False,
                "/srv", 1000, 1000, 1000, P)
        + b"\x00garbage\xa5 in the middle of the stream\xff" * 3
        + frame(R.FORK, t0 + 2, P, C, CT)
        + frame(R.EXEC, t0 + 3, C, P, CT, "/usr/bin/curl", ["curl", "http://x"], True,
                "/srv", 1000, 1000, 0, C)
        + frame(R.CONNECT, t0 + 4, C, C, 5, "inet", "10.1.2.3", 443)
        + frame(R.EXIT, t_exit, C, 7, None, False)
        + frame(R.FORK, t0 + 5, "not", "a", "pid")  # a well-framed but ill-typed record
        + frame(R.LOSS, t0 + 6, {"core.buffer_full": 2, "core.handler_error": 1})
        + frame(R.STATUS, t0 + 7, {"stops": 12, "buffer_bytes": 0})
    )  # fmt: skip
    assert w.finish() == 0, w.stderr()
    assert "Traceback" not in w.stderr()
    bs = batches(out)
    assert bs, w.stderr()
    for b in bs:
        assert b["agent"] == {"instance_id": "test-inst", "mode": "wrapper", "version": VERSION}
        assert b["resource"] == {"boot_id": BOOT, "pid_namespace": NS}
    evs = events_of(bs)
    kinds = [e["kind"] for e in evs]
    assert kinds == ["agent.capabilities", "process.exec", "process.exec", "net.connect",
                     "process.exit", "agent.status", "agent.loss"]  # fmt: skip
    caps, pexec, cexec, conn, cexit, status, loss = evs
    assert caps["report"] == report and caps["time"] == t0
    assert pexec == {
        "ancestors": [], "argv": ["/app/server", "-v"], "cwd": "/srv", "euid": 1000,
        "exe": "/app/server", "exec_id": eid(P, PT), "gid": 1000, "kind": "process.exec",
        "pid": P, "ppid": 1, "source": "ptrace", "start_time": procfs.ticks_to_ns(PT, BOOT_NS),
        "time": t0 + 1, "truncated": False, "uid": 1000,
    }  # fmt: skip
    assert cexec["exec_id"] == eid(C, CT)
    assert cexec["parent_exec_id"] == eid(P, PT)
    assert cexec["ancestors"] == [{"exec_id": eid(P, PT), "exe": "/app/server", "pid": P}]
    assert (cexec["truncated"], cexec["euid"], cexec["source"]) == (True, 0, "ptrace")
    assert conn == {
        "address": "10.1.2.3", "exec_id": eid(C, CT), "family": "inet", "fd": 5,
        "kind": "net.connect", "pid": C, "port": 443, "tid": C, "time": t0 + 4,
    }  # fmt: skip
    assert cexit["exec_id"] == eid(C, CT) and cexit["exit_code"] == 7
    assert cexit["duration_ns"] == 3_000_000_000 and cexit["source"] == "ptrace"
    assert "signal" not in cexit and cexit["core_dumped"] is False
    assert status["metrics"]["stops"] == 12 and "worker.processes" in status["metrics"]
    assert loss["totals"]["core.buffer_full"] == 2
    assert loss["totals"]["core.handler_error"] == 1
    assert loss["totals"]["worker.bad_frame"] >= 1
    assert loss["totals"]["worker.bad_record"] == 1
    assert loss["accepted"] == 6
    assert bs[-1]["events"][-1]["kind"] == "agent.loss"  # always in the final batch
    assert bs[-1]["loss"] == loss["totals"]
    procs = {p["exec_id"]: p for b in bs for p in b["processes"]}
    assert procs[eid(C, CT)]["parent_exec_id"] == eid(P, PT)
    assert procs[eid(P, PT)]["argv"] == ["/app/server", "-v"]


def test_tree_scope_reports_workload_not_itself(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sleeper = subprocess.Popen(["sleep", "5"])
    try:
        cfg = cfg_dict(out, processes={"reconcile_interval": 0.1})
        w = Running(tmp_path, spec_env(cfg, "tree", os.getpid()))
        time.sleep(0.8)  # snapshot plus several reconcile passes
        assert w.finish() == 0, w.stderr()
        st = procfs.read_stat(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()
    evs = events_of(batches(out))
    execs = [e for e in evs if e["kind"] == "process.exec"]
    assert [e["pid"] for e in execs] == [sleeper.pid]
    (ev,) = execs
    assert ev["source"] == "procfs" and ev["exec_id"] == eid(sleeper.pid, st.start_ticks)
    assert ev["argv"] == ["sleep", "5"] and ev["ppid"] == os.getpid()
    assert "parent_exec_id" not in ev  # the core (this test) is not reported
    assert w.proc.pid not in {e.get("pid") for e in evs}
    assert not [e for e in evs if e["kind"] == "process.exit"]
    assert evs[-1]["kind"] == "agent.loss"


def test_sigterm_flushes_early_and_does_not_kill(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = cfg_dict(out, output={"batch_max_age": 60.0})
    w = Running(tmp_path, spec_env(cfg, "none", os.getpid()))
    w.wait_started()
    w.send(frame(R.CAPS, time.time_ns(), {"x": 1}))
    deadline = time.monotonic() + 10
    first: list[str] = []
    while not first and time.monotonic() < deadline:
        w.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        first = list(batch_files([str(out)])) if out.exists() else []
    assert first, "SIGTERM did not flush"
    assert w.proc.poll() is None, "SIGTERM must not end the worker"
    w.proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    assert w.proc.poll() is None
    w.send(frame(R.SHUTDOWN, time.time_ns(), "test"))
    assert w.finish() == 0, w.stderr()
    kinds = [e["kind"] for e in events_of(batches(out))]
    assert kinds[0] == "agent.capabilities" and kinds[-1] == "agent.loss"


def test_restart_resumes_sequence(tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = spec_env(cfg_dict(out), "none", os.getpid())
    for _ in range(2):
        w = Running(tmp_path, spec)
        w.send(frame(R.CAPS, time.time_ns(), {}))
        assert w.finish() == 0, w.stderr()
    evs = events_of(batches(out))  # checks the sequence has no overlap
    assert [e["kind"] for e in evs] == ["agent.capabilities", "agent.loss"] * 2


@pytest.mark.parametrize(
    "value",
    [None, "not json", "[]", json.dumps({"core_pid": 1}), "BAD_SCOPE", "BAD_CONFIG", "BAD_ID"],
)
def test_bad_spec_exits_2(tmp_path: Path, value: str | None) -> None:
    good = json.loads(spec_env(cfg_dict(tmp_path / "out"), "none", os.getpid()))
    if value == "BAD_SCOPE":
        value = json.dumps({**good, "scope": "galaxy"})
    elif value == "BAD_CONFIG":
        value = json.dumps({**good, "config": {"output": {"batch_max_events": -1}}})
    elif value == "BAD_ID":
        value = json.dumps({**good, "instance_id": "../escape"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("_LW_EMBED")}
    if value is not None:
        env["_LW_EMBED_WORKER"] = value
    p = subprocess.run(
        [sys.executable, "-m", "lw_embed.runtime.worker"], env=env, capture_output=True,
        timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert p.returncode == 2
    assert p.stdout == b""
    assert b"_LW_EMBED_WORKER" in p.stderr


class FlakySink:
    """Fails every write of the first batch, then works."""

    def __init__(self, directory: str) -> None:
        self.written: list[tuple[int, bytes]] = []
        self.failures = 0

    def write(self, data: bytes, instance_id: str, seq_first: int) -> str:
        if seq_first == 0:
            self.failures += 1
            raise OSError(28, "No space left on device")
        self.written.append((seq_first, data))
        return ""


def test_sink_errors_retried_then_dropped_and_counted(tmp_path: Path) -> None:
    from lw_embed.codec import decode_batch

    cfg = cfg_dict(tmp_path / "out", output={"batch_max_events": 2})
    spec = worker_mod.Spec(config_from_dict(cfg), os.getpid(), "inproc", "wrapper", "none", "t")
    r, w = os.pipe()
    t = time.time_ns()
    os.write(w, b"".join(frame(R.CAPS, t + i, {"i": i}) for i in range(3)))
    os.close(w)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGPIPE)}
    try:
        wk = worker_mod.Worker(spec, fd=r)
        sink = FlakySink("")
        wk.sink = sink  # type: ignore[assignment]
        assert wk.run() == 0
    finally:
        signal.set_wakeup_fd(-1)
        for s, h in saved.items():
            signal.signal(s, h)
        os.close(r)
    assert sink.failures == worker_mod.SINK_ATTEMPTS
    ((seq_first, data),) = sink.written
    b = decode_batch(data)
    assert seq_first == 2 and b["seq"][0] == 2
    loss = b["events"][-1]
    assert loss["kind"] == "agent.loss"
    assert loss["totals"] == {"worker.sink_error": 2}  # both events of the dropped batch
    assert loss["accepted"] == 3
