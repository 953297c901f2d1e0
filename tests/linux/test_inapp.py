"""In-app mode (lw_embed.start/stop/flush): real host apps run as subprocesses, each with its
own data dir and output dir; what they did is read back from the batch files."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lw_embed.decode import batch_files, read_batch
from lw_embed.errors import ConfigError
from lw_embed.runtime.embedded import build_config
from tests.linux.conftest import clean_env, helper, kill_tree

pytestmark = pytest.mark.linux

ROOT = Path(__file__).resolve().parents[2]
APP = helper("inapp_app.py")


def run_app(tmp: Path, scenario: str, arg: str = "", env: dict[str, str] | None = None,
            timeout: float = 60.0) -> dict[str, Any]:  # fmt: skip
    proc = subprocess.run(
        [sys.executable, APP, scenario, str(tmp / "out"), str(tmp / "data"), arg],
        env=clean_env({"PYTHONPATH": str(ROOT), **(env or {})}), capture_output=True,
        text=True, timeout=timeout, cwd=str(tmp),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["stderr"] = proc.stderr
    return result


def batches(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    return [read_batch(p) for p in batch_files([str(out)])]


def events(out: Path, kind: str | None = None) -> list[dict[str, Any]]:
    evs = [e for b in batches(out) for e in b["events"]]
    return [e for e in evs if kind is None or e["kind"] == kind]


def paths(out: Path, kind: str = "file.write") -> list[str]:
    return [e["path"] for e in events(out, kind)]


def loss(out: Path) -> dict[str, int]:
    reports = sorted(events(out, "agent.loss"), key=lambda e: e["seq"])
    return reports[-1]["totals"] if reports else {}


def test_spawn_socket_and_file_are_reported(tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    r = run_app(tmp_path, "basic", str(work))
    assert r["flushed"] and r["stopped"]
    out = tmp_path / "out"
    assert {b["agent"]["mode"] for b in batches(out)} == {"in-app"}
    host = [e for e in events(out, "process.exec") if e["argv"][1:2] == [APP]]
    assert len(host) == 1 and host[0]["source"] == "procfs"
    eid = host[0]["exec_id"]
    spawn = events(out, "process.spawn")
    assert [(s["call"], s["argv"], s["exec_id"]) for s in spawn] == [
        ("subprocess.Popen", ["/bin/sleep", "1"], eid)
    ]
    child = [e for e in events(out, "process.exec") if e["pid"] == r["child"]]
    assert child and child[0]["exe"].endswith("sleep") and child[0]["parent_exec_id"] == eid
    assert [e["exec_id"] for e in events(out, "process.exit") if e["pid"] == r["child"]]
    conn = [e for e in events(out, "net.connect") if e["port"] == r["port"]]
    assert conn and conn[0]["address"] == "127.0.0.1" and conn[0]["exec_id"] == eid
    assert conn[0]["fd"] >= 0 and conn[0]["family"] == "inet"
    assert [e["address"] for e in events(out, "net.bind")] == ["127.0.0.1"]
    assert paths(out) == [str(work / "written.txt")]
    assert [(e["path"], e["target"]) for e in events(out, "file.rename")] == [
        (str(work / "written.txt"), str(work / "renamed.txt"))
    ]
    assert paths(out, "file.remove") == [str(work / "renamed.txt")]
    # the agent's own spool and batch files are not reported
    assert not [p for p in paths(out) if p.startswith(str(tmp_path / "data"))]
    assert not [p for p in paths(out) if p.startswith(str(out))]
    caps = events(out, "agent.capabilities")[0]["report"]
    assert caps["techniques"]["audit"] == "audit-hook"


def test_hostile_audit_args_never_raise_into_the_host(tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    r = run_app(tmp_path, "hostile", str(work))
    assert r["raised"] == 0
    assert r["flushed"] and r["stopped"]
    out = tmp_path / "out"
    assert str(work / "after.txt") in paths(out)
    totals = loss(out)
    assert totals.get("audit.bad_args", 0) > 0  # counted, not silently lost
    assert "Traceback" not in r["stderr"]


def test_full_queue_drops_with_a_counter(tmp_path: Path) -> None:
    n = 2000
    r = run_app(tmp_path, "queue", str(n))
    assert r["flushed"] and r["stopped"]
    out = tmp_path / "out"
    # reported = the sum of the records' counts (repeats of one drain come as one record)
    seen = sum(e.get("count", 1) for e in events(out, "file.remove")
               if e["path"].startswith("/nonexistent/q"))  # fmt: skip
    dropped = loss(out).get("audit.queue_full", 0)
    assert dropped > 0
    assert seen + dropped == n  # every call is either reported or counted


def test_start_twice_and_stop_then_start(tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    r = run_app(tmp_path, "restart", str(work))
    assert (r["first"], r["again"], r["stopped"], r["restarted"]) == (True, False, True, True)
    assert r["flushed"] and r["stopped2"]
    out = tmp_path / "out"
    written = paths(out)
    assert written.count(str(work / "one.txt")) == 1
    assert written.count(str(work / "two.txt")) == 1
    assert str(work / "between.txt") not in written
    # the same spool, so the same instance after the restart
    assert len({b["agent"]["instance_id"] for b in batches(out)}) == 1


def test_fork_both_sides_work_and_nothing_is_duplicated(tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    n = 200
    r = run_app(tmp_path, "fork", f"{work}:{n}")
    assert r["child_status"] == 0 and r["flushed"] and r["stopped"]
    out = tmp_path / "out"
    by_instance: dict[str, list[str]] = {}
    for b in batches(out):
        for e in b["events"]:
            if e["kind"] == "file.write":
                by_instance.setdefault(b["agent"]["instance_id"], []).append(e["path"])
    assert len(by_instance) == 2
    every = [p for ps in by_instance.values() for p in ps]
    for side in ("pre", "child", "parent"):
        names = [os.path.basename(p) for p in every if os.path.basename(p).startswith(side + "-")]
        assert sorted(names) == sorted(f"{side}-{i}" for i in range(n)), side  # once each
    child_inst = [i for i, ps in by_instance.items() if any("child-" in p for p in ps)]
    assert len(child_inst) == 1
    assert not [p for p in by_instance[child_inst[0]] if "/pre-" in p or "/parent-" in p]
    pids = {e["pid"] for e in events(out, "file.write")}
    assert r["child"] in pids and len(pids) == 2


@pytest.mark.parametrize("handler_first", ["1", "0"])
def test_app_sigterm_handler_still_runs(tmp_path: Path, handler_first: str) -> None:
    """"1": the app's handler was there first: the agent's runs, then calls it (chained).
    "0": the app's replaces the agent's: it runs alone, and atexit still ships."""
    work = tmp_path / "w"
    work.mkdir()
    proc = subprocess.Popen(
        [sys.executable, APP, "sigterm", str(tmp_path / "out"), str(tmp_path / "data"),
         str(work)], env=clean_env({"PYTHONPATH": str(ROOT), "HANDLER_FIRST": handler_first}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["ready"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        kill_tree(proc)
    caller = (work / "handler-ran").read_text()  # the frame the handler was called from
    if handler_first == "1":
        assert caller == "_on_sigterm"  # chained: the agent's handler called the app's
    else:
        assert caller != "_on_sigterm"  # the app's own, called directly wherever main was
    assert str(work / "before-term.txt") in paths(tmp_path / "out")  # flushed at exit


def test_sigterm_without_app_handler_flushes_then_dies_of_it(tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    proc = subprocess.Popen(
        [sys.executable, APP, "sigterm_default", str(tmp_path / "out"),
         str(tmp_path / "data"), str(work)], env=clean_env({"PYTHONPATH": str(ROOT)}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["ready"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == -signal.SIGTERM
    finally:
        kill_tree(proc)
    assert str(work / "before-term.txt") in paths(tmp_path / "out")


def test_exit_is_delayed_at_most_by_the_flush_budget_when_the_backend_is_down(
    tmp_path: Path,
) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    proc = subprocess.Popen(
        [sys.executable, APP, "exit_budget", str(tmp_path / "out"), str(tmp_path / "data"),
         f"http://127.0.0.1:{port}"], env=clean_env({"PYTHONPATH": str(ROOT)}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        json.loads(proc.stdout.readline())
        t0 = time.monotonic()
        assert proc.wait(30) == 0
        waited = time.monotonic() - t0
    finally:
        kill_tree(proc)
    # budget 1.0 s; the interpreter's own teardown comes on top (generous on a busy box)
    assert waited < 1.0 + 1.5, waited
    # what could not be sent is kept in the spool for the next start
    segs = list((tmp_path / "data" / "spool").glob("*.seg"))
    kept = [e for p in segs for e in _segment_events(str(p))]
    assert len([e for e in kept if e.get("kind") == "file.remove"]) == 50


def _segment_events(path: str) -> list[dict[str, Any]]:
    from lw_embed.decode import read_segment

    return list(read_segment(path))


def test_autostart_through_sitecustomize(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    target = tmp_path / "auto.txt"
    app.write_text(f"open({str(target)!r}, 'w').write('x')\n")
    env = clean_env({"LW_EMBED_AUTOSTART": "1", "PYTHONPATH": str(ROOT / "entrypoints"),
                     "LW_EMBED_DATA_DIR": str(tmp_path / "data"),
                     "LW_EMBED_OUTPUT_DIR": str(tmp_path / "out")})  # fmt: skip
    proc = subprocess.run([sys.executable, str(app)], env=env, capture_output=True, text=True,
                          timeout=60, cwd=str(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert str(target) in paths(tmp_path / "out")
    # without the variable, nothing starts
    env.pop("LW_EMBED_AUTOSTART")
    env["LW_EMBED_OUTPUT_DIR"] = str(tmp_path / "out2")
    subprocess.run([sys.executable, str(app)], env=env, timeout=60, check=True,
                   cwd=str(tmp_path))  # fmt: skip
    assert not (tmp_path / "out2").exists()


def test_autostart_with_a_bad_setting_leaves_the_host_running(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text("print('host ran')\n")
    env = clean_env({"LW_EMBED_AUTOSTART": "1", "PYTHONPATH": str(ROOT / "entrypoints"),
                     "LW_EMBED_INAPP_QUEUE_MAX": "1"})  # fmt: skip
    proc = subprocess.run([sys.executable, str(app)], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == "host ran\n"
    assert "inapp.queue_max" in proc.stderr


def test_options_map_to_config_keys(tmp_path: Path) -> None:
    cfg, path = build_config({"output": "/o", "data_dir": "/d", "backend": "http://x:1",
                              "token": "t", "shutdown_flush": 0.5,
                              "spool.max_bytes": 1 << 21}, {})  # fmt: skip
    assert (cfg.output.dir, cfg.agent.data_dir, cfg.backend.url, cfg.backend.token) == (
        "/o", "/d", "http://x:1", "t")  # fmt: skip
    assert cfg.shutdown.flush == 0.5 and cfg.spool.max_bytes == 1 << 21 and path is None
    env_cfg, _ = build_config({}, {"LW_EMBED_DATA_DIR": "/e", "LW_EMBED_SHUTDOWN_FLUSH": "3"})
    assert env_cfg.agent.data_dir == "/e" and env_cfg.shutdown.flush == 3.0
    with pytest.raises(ConfigError, match=r"inapp\.queue_max"):
        build_config({"inapp_queue_max": 1}, {})
    with pytest.raises(ConfigError, match="bogus"):
        build_config({"bogus": 1}, {})


def test_import_is_cheap() -> None:
    code = "import sys, lw_embed; print(sorted(m for m in sys.modules if m.startswith('lw_embed')))"
    proc = subprocess.run([sys.executable, "-c", code], env=clean_env({"PYTHONPATH": str(ROOT)}),
                          capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    assert json.loads(proc.stdout.replace("'", '"')) == ["lw_embed"]


def test_host_with_more_than_1024_fds(tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    r = run_app(tmp_path, "many_fds", str(work))
    assert r["max_fd"] >= 1100 and r["flushed"] and r["stopped"], r
    assert str(work / "with-many-fds.txt") in paths(tmp_path / "out")
    assert "Traceback" not in r["stderr"]


def test_a_failing_agent_says_why_and_turns_the_hook_off(tmp_path: Path) -> None:
    r = run_app(tmp_path, "loop_fails")
    assert r["status"]["running"] is False
    assert "injected loop failure" in (r["status"]["error"] or "")
    assert r["hook_on"] is False
    assert "in-app agent failed" in r["stderr"] and "injected loop failure" in r["stderr"]
    # the spool was closed (its lock freed): a later agent on that data dir starts
    assert run_app(tmp_path, "drain")["stopped"]


def test_the_agents_own_threads_are_not_reported(tmp_path: Path) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    host_port = srv.getsockname()[1]
    try:
        r = run_app(tmp_path, "metadata_thread", str(host_port))
    finally:
        srv.close()
    ports = {e["port"] for e in events(tmp_path / "out", "net.connect")}
    assert host_port in ports  # the host's own connect is reported
    assert r["port"] not in ports, "the identity thread's metadata request was reported"
    # once the agent's threads end, their idents (a new host thread may get one) count
    # as the host's again
    assert r["own_after"] == 0, r


def test_a_python_child_of_an_autostarted_host_starts_no_agent(tmp_path: Path) -> None:
    env = clean_env({"LW_EMBED_AUTOSTART": "1",
                     "PYTHONPATH": f"{ROOT / 'entrypoints'}:{ROOT}",
                     "LW_EMBED_DATA_DIR": str(tmp_path / "data"),
                     "LW_EMBED_OUTPUT_DIR": str(tmp_path / "out"),
                     "LW_EMBED_PROCESSES_RECONCILE_INTERVAL": "0.1"})  # fmt: skip
    proc = subprocess.run([sys.executable, APP, "child_python", "-", "-"], env=env,
                          capture_output=True, text=True, timeout=60,
                          cwd=str(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["child_agent"] is False and r["child_env"] == [], r
    assert [p.name for p in (tmp_path / "data").iterdir() if p.name.startswith("spool.")] == []
    # the child is still reported, by the parent's /proc reconciliation
    assert [e for e in events(tmp_path / "out", "process.exec") if e["argv"][:2] ==
            [sys.executable, "-c"] or e["argv"][1:2] == ["-c"]]  # fmt: skip


def test_forked_children_ending_with_os_exit_lose_nothing(tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    r = run_app(tmp_path, "fork_exit", str(work))
    assert r["flushed"] and r["stopped"], r
    got = paths(tmp_path / "out")
    for n in range(2):
        assert str(work / f"child-{n}.txt") in got, (n, r["stderr"])
    left = [p.name for p in (tmp_path / "data").iterdir() if p.name.startswith("spool.")]
    assert left == [], left


def test_exec_from_the_host_is_reported(tmp_path: Path) -> None:
    marker = f"lw-exec-{os.getpid()}"
    proc = subprocess.run(
        [sys.executable, APP, "exec_now", str(tmp_path / "out"), str(tmp_path / "data"),
         marker], env=clean_env({"PYTHONPATH": str(ROOT), "EXEC_WAIT": "1.0"}),
        capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr  # /bin/true replaced the host
    run_app(tmp_path, "drain")  # the next start on that data dir ships the spool
    spawns = [e for e in events(tmp_path / "out", "process.spawn") if e["call"] == "os.exec"]
    assert [e["argv"] for e in spawns] == [["/bin/true", marker]], spawns
    assert spawns[0]["exe"] == "/bin/true"


# --- coalescing: identical calls of one drain are one event with their count ---


def _audit_source(keys: dict[str, list[str]] | None = None) -> Any:
    import collections

    from lw_embed.pipeline.enrich import ProcessTable
    from lw_embed.sources import audit
    from lw_embed.sources.base import SourceContext

    cfg, _ = build_config({} if keys is None else {"aggregate.keys": keys}, {})
    st = audit.HookState()
    st.queue = collections.deque()
    ctx = SourceContext(cfg, "in-app", "tree", ProcessTable("b", 1, 0, 8), "/proc", "/tmp",
                        os.getpid(), time.time_ns, time.monotonic)  # fmt: skip
    return audit.AuditSource(ctx, st), st.queue


def test_identical_calls_of_one_drain_are_one_weighted_event() -> None:
    src, q = _audit_source()
    t = 1_700_000_000_000_000_000
    sock = socket.socket()
    try:
        calls: list[tuple[str, tuple[Any, ...], int, int]] = [
            ("open", ("/var/log/a.log", "a", 1089), t + i, 100 + i) for i in range(5)
        ]
        calls.insert(2, ("open", ("/var/log/b.log", "a", 1089), t + 2, 7))
        calls.insert(3, ("open", ("/var/log/a.log", "w", 577), t + 3, 7))  # other flags
        calls += [("os.remove", ("/tmp/x", None), t + 10 + i, 7) for i in range(3)]
        calls += [("socket.bind", (sock, ("127.0.0.1", 0), 5), t + 20 + i, 7) for i in range(2)]
        calls += [("subprocess.Popen", ("/bin/true", ["/bin/true"], None, None), t + 30, 7)] * 2
        q.extend(calls)
        wires = [e.to_wire() for e in src.close()]
    finally:
        sock.close()
    assert sum(w.get("count", 1) for w in wires) == len(calls)  # nothing lost
    assert src.metrics()["audit.events"] == len(calls)
    assert src.metrics()["audit.coalesced"] == 4 + 2 + 1
    a = wires[0]  # in the order of first calls; fields of the last call
    assert (a["kind"], a["path"], a["flags"], a["count"]) == ("file.write", "/var/log/a.log",
                                                                1089, 5)  # fmt: skip
    assert (a["first_seen"], a["last_seen"], a["time"], a["tid"]) == (t, t + 4, t + 4, 104)
    assert a["aggregated"] is True and list(a) == sorted(a)
    single = wires[1]  # a call made once: the plain event, as before
    assert single["path"] == "/var/log/b.log" and "count" not in single
    assert "aggregated" not in single and list(single) == sorted(single)
    assert (wires[2]["flags"], "count" in wires[2]) == (577, False)
    assert [(w["kind"], w.get("count")) for w in wires[3:]] == [
        ("file.remove", 3), ("net.bind", 2), ("process.spawn", None), ("process.spawn", None),
    ]  # fmt: skip


def test_coalescing_follows_the_aggregation_keys() -> None:
    t = 1_700_000_000_000_000_000
    calls = [("os.remove", ("/tmp/x", None), t + i, 100 + i % 2) for i in range(4)]
    # not aggregated: every call is an event of its own
    src, q = _audit_source({"process.exec": ["exe"]})
    q.extend(calls)
    assert [w.get("count") for w in (e.to_wire() for e in src.close())] == [None] * 4
    # tid in the key: a repeat is a call of the same thread
    src, q = _audit_source({"file.remove": ["path", "tid"]})
    q.extend(calls)
    assert sorted((w["tid"], w["count"]) for w in (e.to_wire() for e in src.close())) == [
        (100, 2), (101, 2),
    ]  # fmt: skip


def test_odd_repeated_calls_are_counted_by_weight() -> None:
    src, q = _audit_source()
    t = 1_700_000_000_000_000_000
    not_a_socket = ("socket.connect", (socket.socket, ["x"], -1), t, 1)
    bad_path = ("os.rename", ("/a", 5), t, 1)  # target not a path: reported alone, bad
    q.extend([not_a_socket, not_a_socket, bad_path, bad_path, bad_path])
    assert list(src.close()) == []
    assert src.losses()["audit.bad_args"] == 5


def test_a_request_loop_reports_every_call_in_few_records(tmp_path: Path) -> None:
    n = 3000
    log = tmp_path / "access.log"
    app = tmp_path / "app.py"
    app.write_text(
        "import lw_embed, sys\n"
        f"lw_embed.start(output={str(tmp_path / 'out')!r}, data_dir={str(tmp_path / 'data')!r},"
        " inapp_queue_max=100000)\n"
        f"for i in range({n}):\n"
        f"    with open({str(log)!r}, 'a') as f: f.write('x')\n"
        "assert lw_embed.flush(30) and lw_embed.stop(10)\n"
    )  # fmt: skip
    proc = subprocess.run([sys.executable, str(app)], env=clean_env({"PYTHONPATH": str(ROOT)}),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    recs = [e for e in events(tmp_path / "out", "file.write") if e["path"] == str(log)]
    assert sum(e.get("count", 1) for e in recs) + loss(tmp_path / "out").get(
        "audit.queue_full", 0) == n  # fmt: skip
    assert len(recs) < n // 10, len(recs)  # folded (at the source, then by the aggregator)
    assert all(e["aggregated"] is True for e in recs if "count" in e)
