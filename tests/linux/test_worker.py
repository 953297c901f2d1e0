"""The real worker process: records in on fd 3, spool, batch files out, exact events checked.

Events reach the batch files through the durable spool and the shipper thread: each event
carries a ``seq`` (unique, increasing per spool), and batches go out by priority (agent.*
events first), so events are compared by seq or by kind, never by file order.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lw_embed.config import Config, config_to_dict, load_config
from lw_embed.decode import batch_files, read_batch
from lw_embed.kernel import procfs
from lw_embed.records import R, frame
from lw_embed.spool import Spool, priority_of

pytestmark = pytest.mark.linux

BOOT = procfs.boot_id()
NS = procfs.pidns_inode()
BOOT_NS = procfs.boot_time_ns()
VERSION = "0.1.0-test"
NO_AGGREGATION: dict[str, Any] = {"keys": {}}


def cfg_dict(tmp: Path, out: Path | None = None, **sections: dict[str, Any]) -> dict[str, Any]:
    """Default config with the data dir (spool) under ``tmp`` and batches to ``out``
    (default ``tmp/out``); aggregation off unless ``aggregate=`` says otherwise."""
    d = config_to_dict(Config())
    d["agent"].update(data_dir=str(tmp / "data"), log_level="info")
    d["output"]["dir"] = str(out or tmp / "out")
    d["aggregate"].update(NO_AGGREGATION)
    for source in ("files", "network", "packages"):  # their events are tested on their own
        if source in d:
            d[source]["enabled"] = False
    for section, values in sections.items():
        d[section].update(values)
    return d


def spec_env(cfg: dict[str, Any], scope: str, core_pid: int, iid: str = "test-inst",
             config_path: str | None = None) -> str:  # fmt: skip
    spec = {"config": cfg, "core_pid": core_pid, "instance_id": iid, "mode": "wrapper",
            "scope": scope, "version": VERSION}  # fmt: skip
    if config_path is not None:  # optional: absent means no file to watch
        spec["config_path"] = config_path
    return json.dumps(spec)


class Running:
    def __init__(self, tmp: Path, spec: str) -> None:
        r, self.w = os.pipe()
        r_hi = fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(r)
        n = len(list(tmp.glob("worker-*.stderr")))
        self.err = open(tmp / f"worker-{n}.stderr", "w+b")  # noqa: SIM115
        env = {k: v for k, v in os.environ.items() if not k.startswith("LW_EMBED_")}
        env["_LW_EMBED_WORKER"] = spec
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lw_embed.runtime.worker"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.err, env=env,
            close_fds=False, preexec_fn=lambda: os.dup2(r_hi, 3),
        )  # fmt: skip
        os.close(r_hi)

    def wait_log(self, text: str, timeout: float = 15.0, count: int = 1) -> None:
        """Until ``text`` is in the worker's log ``count`` times."""
        end = time.monotonic() + timeout
        while self.stderr().count(text) < count:
            assert self.proc.poll() is None and time.monotonic() < end, (text, self.stderr())
            time.sleep(0.02)

    def wait_started(self) -> None:
        """Until the worker logged that its signal handlers are in place."""
        self.wait_log("started:")

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.w, view) :]

    def finish(self, timeout: float = 15.0) -> int:
        os.close(self.w)
        self.w = -1
        out, _ = self.proc.communicate(timeout=timeout)
        assert out == b"", "the worker must never write to stdout"
        assert "Traceback" not in self.stderr(), self.stderr()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)  # only the worker this test started
            self.proc.wait(10)
        if self.w >= 0:
            os.close(self.w)
            self.w = -1

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace")


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[[str], Running]]:
    """``start(spec)``: a worker, killed at teardown if a failed test left it running."""
    started: list[Running] = []

    def _start(spec: str) -> Running:
        started.append(Running(tmp_path, spec))
        return started[-1]

    yield _start
    for w in started:
        w.kill()


def batches(out: Path) -> list[dict[str, Any]]:
    return [read_batch(p) for p in batch_files([str(out)])]


def events_of(bs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every event of the batches, sorted by seq, after checking the seq invariants."""
    evs = [e for b in bs for e in b["events"]]
    for b in bs:
        seqs = [e["seq"] for e in b["events"]]
        assert b["seq"] == [min(seqs), max(seqs)]
        order = [(-priority_of(e), e["seq"]) for e in b["events"]]
        assert order == sorted(order), "a batch is in priority order, oldest first"
    seqs = [e["seq"] for e in evs]
    assert all(isinstance(s, int) and not isinstance(s, bool) for s in seqs)
    assert len(set(seqs)) == len(seqs), f"a seq delivered twice: {sorted(seqs)}"
    return sorted(evs, key=lambda e: e["seq"])


def of_kind(evs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in evs if e["kind"] == kind]


def eid(pid: int, ticks: int) -> str:
    return procfs.exec_id(BOOT, NS, pid, ticks)


def exec_rec(t: int, pid: int, exe: str, *argv: str) -> bytes:
    """An EXEC of a made-up process (ppid 1, start ticks = pid % 10**6)."""
    return frame(R.EXEC, t, pid, 1, pid % 10**6, exe, [exe, *argv], False, "/", 0, 0, 0, pid)


def shutdown(budget: float) -> bytes:
    return frame(R.SHUTDOWN, time.time_ns(), "test", budget)


def spool_stats(tmp: Path) -> Any:
    sp = Spool(str(tmp / "data" / "spool"), max_bytes=1 << 28, segment_bytes=1 << 22,
               sync_interval=0.1)  # fmt: skip
    sp.open()
    try:
        return sp.stats()
    finally:
        sp.close()


def test_records_to_exact_events(tmp_path: Path, start: Callable[[str], Running]) -> None:
    out = tmp_path / "out"
    w = start(spec_env(cfg_dict(tmp_path), "none", os.getpid()))
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
    bs = batches(out)
    assert bs, w.stderr()
    for b in bs:
        assert b["agent"] == {"instance_id": "test-inst", "mode": "wrapper", "version": VERSION}
        res = b["resource"]
        assert res["boot_id"] == BOOT and res["pid_namespace"] == NS
        assert res["platform"] in ("container", "host") and "container_id_source" in res
    evs = events_of(bs)
    loss = evs[-1]  # the final report is the last event accepted
    assert loss["kind"] == "agent.loss"
    rest = [e for e in evs if e["kind"] != "agent.loss"]  # an early agent.loss may be there
    assert [e["kind"] for e in rest] == ["agent.capabilities", "process.exec", "process.exec",
                                         "net.connect", "process.exit", "agent.status"]  # fmt: skip
    caps, pexec, cexec, conn, cexit, status = rest
    assert caps["report"] == report and caps["time"] == t0
    assert pexec == {
        "ancestors": [], "argv": ["/app/server", "-v"], "cwd": "/srv", "euid": 1000,
        "exe": "/app/server", "exec_id": eid(P, PT), "gid": 1000, "kind": "process.exec",
        "pid": P, "ppid": 1, "source": "ptrace", "start_time": procfs.ticks_to_ns(PT, BOOT_NS),
        "time": t0 + 1, "truncated": False, "uid": 1000, "seq": pexec["seq"],
    }  # fmt: skip
    assert cexec["exec_id"] == eid(C, CT)
    assert cexec["parent_exec_id"] == eid(P, PT)
    assert cexec["ancestors"] == [{"exec_id": eid(P, PT), "exe": "/app/server", "pid": P}]
    assert (cexec["truncated"], cexec["euid"], cexec["source"]) == (True, 0, "ptrace")
    assert conn == {
        "address": "10.1.2.3", "exec_id": eid(C, CT), "family": "inet", "fd": 5,
        "kind": "net.connect", "pid": C, "port": 443, "tid": C, "time": t0 + 4,
        "seq": conn["seq"],
    }  # fmt: skip
    assert cexit["exec_id"] == eid(C, CT) and cexit["exit_code"] == 7
    assert cexit["duration_ns"] == 3_000_000_000 and cexit["source"] == "ptrace"
    assert "signal" not in cexit and cexit["core_dumped"] is False
    assert status["metrics"]["stops"] == 12 and "worker.processes" in status["metrics"]
    assert loss["totals"]["core.buffer_full"] == 2
    assert loss["totals"]["core.handler_error"] == 1
    assert loss["totals"]["worker.bad_frame"] >= 1
    assert loss["totals"]["worker.bad_record"] == 1
    assert loss["accepted"] == len(evs) - 1  # everything before it
    assert max(bs, key=lambda b: b["seq"][1])["loss"] == loss["totals"]
    procs = {p["exec_id"]: p for b in bs for p in b["processes"]}
    assert procs[eid(C, CT)]["parent_exec_id"] == eid(P, PT)
    assert procs[eid(P, PT)]["argv"] == ["/app/server", "-v"]


def test_loss_accounting_matches_spool(tmp_path: Path, start: Callable[[str], Running]) -> None:
    w = start(spec_env(cfg_dict(tmp_path), "none", os.getpid()))
    t = time.time_ns()
    w.send(
        b"".join(exec_rec(t + i, 4_100_000 + i, f"/bin/tool{i}") for i in range(5))
        + frame(R.LOSS, t, {"buffer_full": 1})
        + frame(R.LOSS, t + 1, {"buffer_full": 4, "core.handler_error": 2})  # cumulative
        + b"\xffnot a frame\xff"
    )
    assert w.finish() == 0, w.stderr()
    evs = events_of(batches(tmp_path / "out"))
    loss = evs[-1]
    assert loss["kind"] == "agent.loss"
    assert loss["totals"]["core.buffer_full"] == 4
    assert loss["totals"]["core.handler_error"] == 2
    assert "buffer_full" not in loss["totals"]
    assert loss["totals"]["worker.bad_frame"] >= 1
    st = spool_stats(tmp_path)
    assert loss["accepted"] == st.accepted - 1  # all accepted before the report itself
    assert st.accepted == len(evs) and st.delivered == st.accepted and st.pending == 0
    assert len(of_kind(evs, "process.exec")) == 5


def test_tree_scope_reports_workload_not_itself(
    tmp_path: Path, start: Callable[[str], Running]
) -> None:
    sleeper = subprocess.Popen(["sleep", "5"])
    try:
        cfg = cfg_dict(tmp_path, processes={"reconcile_interval": 0.1})
        w = start(spec_env(cfg, "tree", os.getpid()))
        w.wait_started()
        time.sleep(0.6)  # the first pass plus several reconcile passes
        assert w.finish() == 0, w.stderr()
        st = procfs.read_stat(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()
    evs = events_of(batches(tmp_path / "out"))
    execs = of_kind(evs, "process.exec")
    assert [e["pid"] for e in execs] == [sleeper.pid]
    (ev,) = execs
    assert ev["source"] == "procfs" and ev["exec_id"] == eid(sleeper.pid, st.start_ticks)
    assert ev["argv"] == ["sleep", "5"] and ev["ppid"] == os.getpid()
    assert "parent_exec_id" not in ev  # the core (this test) is not reported
    assert w.proc.pid not in {e.get("pid") for e in evs}
    assert not of_kind(evs, "process.exit")
    assert evs[-1]["kind"] == "agent.loss"


def test_sigterm_flushes_early_and_does_not_kill(
    tmp_path: Path, start: Callable[[str], Running]
) -> None:
    out = tmp_path / "out"
    w = start(spec_env(cfg_dict(tmp_path, output={"batch_max_age": 60.0}), "none", os.getpid()))
    w.wait_started()
    w.send(frame(R.CAPS, time.time_ns(), {"x": 1}))
    deadline = time.monotonic() + 10
    first: list[str] = []
    while not first and time.monotonic() < deadline:
        os.kill(w.proc.pid, signal.SIGTERM)
        time.sleep(0.2)
        first = list(batch_files([str(out)])) if out.exists() else []
    assert first, "SIGTERM did not flush"
    assert w.proc.poll() is None, "SIGTERM must not end the worker"
    os.kill(w.proc.pid, signal.SIGINT)
    time.sleep(0.1)
    assert w.proc.poll() is None
    w.send(shutdown(1.0))
    assert w.finish() == 0, w.stderr()
    evs = events_of(batches(out))
    assert [e["kind"] for e in evs if e["kind"] != "agent.loss"] == ["agent.capabilities"]
    assert evs[-1]["kind"] == "agent.loss"


def test_instance_id_kept_and_seq_increases_across_runs(
    tmp_path: Path, start: Callable[[str], Running]
) -> None:
    runs = []
    for n in range(2):
        out = tmp_path / f"out{n}"
        w = start(spec_env(cfg_dict(tmp_path, out), "none", os.getpid(), iid=""))
        w.send(frame(R.CAPS, time.time_ns(), {"run": n}))
        assert w.finish() == 0, w.stderr()
        runs.append(batches(out))
    kept = (tmp_path / "data" / "spool" / "instance_id").read_text().strip()
    assert kept
    assert {b["agent"]["instance_id"] for bs in runs for b in bs} == {kept}
    first, second = (events_of(bs) for bs in runs)
    assert [e["report"] for e in of_kind(first, "agent.capabilities")] == [{"run": 0}]
    assert [e["report"] for e in of_kind(second, "agent.capabilities")] == [{"run": 1}]
    assert min(e["seq"] for e in second) > max(e["seq"] for e in first)


def test_spool_keeps_what_could_not_be_delivered(
    tmp_path: Path, start: Callable[[str], Running]
) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output directory should be\n")
    w = start(spec_env(cfg_dict(tmp_path, blocked), "none", os.getpid()))
    w.wait_started()
    t = time.time_ns()
    w.send(frame(R.CAPS, t, {"run": 0}) + exec_rec(t + 1, 4_200_001, "/bin/first-run")
           + shutdown(0.5))  # fmt: skip
    w.wait_log("core shutting down")
    t_eof = time.monotonic()
    assert w.finish() == 0, w.stderr()
    assert time.monotonic() - t_eof < 2.0, "the worker overran its shutdown budget"
    assert blocked.read_text().startswith("a file"), "nothing may be written over it"
    st = spool_stats(tmp_path)
    assert st.delivered == 0 and st.pending == st.accepted >= 3

    out = tmp_path / "out"
    w2 = start(spec_env(cfg_dict(tmp_path, out), "none", os.getpid()))
    w2.send(frame(R.CAPS, time.time_ns(), {"run": 1}))
    assert w2.finish() == 0, w2.stderr()
    evs = events_of(batches(out))
    reports = [e["report"] for e in of_kind(evs, "agent.capabilities")]
    assert reports == [{"run": 0}, {"run": 1}]
    assert [e["exe"] for e in of_kind(evs, "process.exec")] == ["/bin/first-run"]
    assert len(of_kind(evs, "agent.loss")) >= 2  # the first run's final report too
    assert spool_stats(tmp_path).pending == 0


def test_filter_rules_exclude_and_tag(tmp_path: Path, start: Callable[[str], Running]) -> None:
    rules = [
        {"name": "no-excluded", "action": "exclude", "exe": ["/bin/excluded*"]},
        {"name": "curl", "action": "tag", "process_name": ["curl"]},
    ]
    cfg = cfg_dict(tmp_path, filter={"rules": rules})
    w = start(spec_env(cfg, "none", os.getpid()))
    t = time.time_ns()
    X, K, S = 4_300_001, 4_300_002, 4_300_003
    w.send(
        exec_rec(t, X, "/bin/excluded-one") + exec_rec(t + 1, X + 10, "/bin/excludedtwo")
        + exec_rec(t + 2, K, "/usr/bin/curl", "http://x") + exec_rec(t + 3, S, "/app/server")
        + frame(R.CONNECT, t + 4, X, X, 3, "inet", "10.0.0.1", 80)  # its process is excluded
        + frame(R.CONNECT, t + 5, K, K, 3, "inet", "10.0.0.2", 443)
        + frame(R.STATUS, t + 6, {})
    )  # fmt: skip
    assert w.finish() == 0, w.stderr()
    evs = events_of(batches(tmp_path / "out"))
    execs = {e["exe"]: e for e in of_kind(evs, "process.exec")}
    assert sorted(execs) == ["/app/server", "/usr/bin/curl"]
    assert execs["/usr/bin/curl"]["matched_rules"] == ["curl"]
    assert "matched_rules" not in execs["/app/server"]
    (conn,) = of_kind(evs, "net.connect")
    assert conn["pid"] == K and conn["matched_rules"] == ["curl"]
    (status,) = of_kind(evs, "agent.status")
    assert status["metrics"]["worker.filtered"] == 3
    assert not any("filter" in k for k in evs[-1]["totals"]), "filtered is not a loss"


def write_rules(path: Path, tmp: Path, rule: str) -> None:
    """A complete config file (its [filter] and [aggregate] are what a reload applies)."""
    text = (f'[agent]\ndata_dir = "{tmp / "data"}"\nlog_level = "info"\n'
            f'[output]\ndir = "{tmp / "out"}"\n[aggregate.keys]\n'
            f'[[filter.rules]]\nname = "r"\naction = "exclude"\n{rule}\n')  # fmt: skip
    tmp_file = path.with_suffix(".tmp")
    tmp_file.write_text(text)
    os.replace(tmp_file, path)  # the worker never reads a half-written file


def test_hot_reload_of_rules(tmp_path: Path, start: Callable[[str], Running]) -> None:
    path = tmp_path / "lw-embed.toml"
    write_rules(path, tmp_path, 'exe = ["/bin/a-*"]')
    cfg = config_to_dict(load_config(str(path), {}))
    w = start(spec_env(cfg, "none", os.getpid(), config_path=str(path)))
    w.wait_started()
    pid = iter(range(4_400_000, 4_500_000))

    def execs(*exes: str) -> None:
        w.send(b"".join(exec_rec(time.time_ns(), next(pid), exe) for exe in exes))

    execs("/bin/a-1", "/bin/b-1")
    write_rules(path, tmp_path, 'cmdline = "(unclosed"')
    os.kill(w.proc.pid, signal.SIGHUP)
    w.wait_log("config reload rejected")
    execs("/bin/a-2", "/bin/b-2")  # the old rule still applies
    write_rules(path, tmp_path, 'exe = ["/bin/b-*"]')  # no SIGHUP: found by polling
    w.wait_log("config reloaded", timeout=3.0)
    execs("/bin/a-3", "/bin/b-3")
    assert w.finish() == 0, w.stderr()
    evs = events_of(batches(tmp_path / "out"))
    kept = [e["exe"] for e in of_kind(evs, "process.exec")]
    assert kept == ["/bin/b-1", "/bin/b-2", "/bin/a-3"]
    rejected = of_kind(evs, "agent.config_rejected")
    assert rejected, "the rejected reload must be reported"
    assert rejected[0]["path"] == str(path)
    assert "filter.rules[0].cmdline" in rejected[0]["error"]
    assert "regular expression" in rejected[0]["error"]
    b2 = next(e for e in evs if e.get("exe") == "/bin/b-2")
    assert rejected[0]["seq"] < b2["seq"]


def test_one_sighup_is_one_reload(tmp_path: Path, start: Callable[[str], Running]) -> None:
    path = tmp_path / "lw-embed.toml"
    write_rules(path, tmp_path, 'exe = ["/bin/a-*"]')
    cfg = config_to_dict(load_config(str(path), {}))
    w = start(spec_env(cfg, "none", os.getpid(), config_path=str(path)))
    w.wait_started()
    write_rules(path, tmp_path, 'cmdline = "(unclosed"')
    os.kill(w.proc.pid, signal.SIGHUP)
    w.wait_log("config reload rejected")
    time.sleep(0.5)  # several ticks of the loop, less than the file's poll interval
    assert w.finish() == 0, w.stderr()
    evs = events_of(batches(tmp_path / "out"))
    assert len(of_kind(evs, "agent.config_rejected")) == 1


@pytest.mark.parametrize(
    "value",
    [None, "not json", "[]", json.dumps({"core_pid": 1}), "BAD_SCOPE", "BAD_CONFIG", "BAD_ID",
     "BAD_RULE", "BAD_CONFIG_PATH", "NO_INSTANCE_ID", "NO_FD"],
)  # fmt: skip
def test_bad_spec_exits_2(tmp_path: Path, value: str | None) -> None:
    why = b"fd 3" if value == "NO_FD" else b"_LW_EMBED_WORKER"
    good = json.loads(spec_env(cfg_dict(tmp_path), "none", os.getpid()))
    bad_rule = {"rules": [{"name": "x", "action": "exclude", "cmdline": "(unclosed"}]}
    bad = {
        "BAD_SCOPE": {**good, "scope": "galaxy"},
        "BAD_CONFIG": {**good, "config": {"output": {"batch_max_events": -1}}},
        "BAD_ID": {**good, "instance_id": "../escape"},
        "BAD_RULE": {**good, "config": {"filter": bad_rule}},
        "BAD_CONFIG_PATH": {**good, "config_path": 7},
        "NO_INSTANCE_ID": {k: v for k, v in good.items() if k != "instance_id"},
        "NO_FD": good,  # a good spec, but no record pipe on fd 3
    }
    if value in bad:
        value = json.dumps(bad[value])
    env = {k: v for k, v in os.environ.items() if not k.startswith("_LW_EMBED")}
    if value is not None:
        env["_LW_EMBED_WORKER"] = value
    p = subprocess.run(
        [sys.executable, "-m", "lw_embed.runtime.worker"], env=env, capture_output=True,
        timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert p.returncode == 2
    assert p.stdout == b""
    assert why in p.stderr, p.stderr
    assert not (tmp_path / "data").exists(), "nothing is created before the spec is checked"
