"""End to end: ``lw-embed run`` (real ptrace tracing of a real workload) shipping over
loopback HTTP to ``lw-embed ingest`` (SQLite), then read back through ``/v1/events``,
``/v1/agents`` and the ``query``/``agents`` CLI.

Each test starts its own ingest server(s) and wrappers (stopped at teardown, by pid) and
uses its own data dir; no test depends on another.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lw_embed.spool import Spool, SpoolStats
from tests.e2e.conftest import (
    Agent,
    Ingest,
    IngestFactory,
    catches,
    children,
    exec_events,
    find_worker,
    free_port,
    is_worker_of,
    wait_for,
    write_atomic_text,
)

pytestmark = [
    pytest.mark.linux,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace of the workload)"),
]


def count_of(events: list[dict[str, Any]]) -> int:
    """What a list of possibly aggregated events stands for: sum of ``count`` or 1."""
    return sum(int(e.get("count") or 1) for e in events)


def latest(events: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    evs = [e for e in events if e.get("kind") == kind]
    return max(evs, key=lambda e: e["seq"]) if evs else None


def worker_up(wrapper_pid: int) -> bool:
    """The wrapper's worker runs its loop: it has installed its SIGHUP handler, which it
    does after it opened the spool and started watching the config file."""
    pid = find_worker(wrapper_pid)
    return pid is not None and catches(pid, signal.SIGHUP)


def spool_stats(spool_dir: Path) -> SpoolStats:
    """Open the spool the way the agent does (it must not be running), read its stats."""
    sp = Spool(str(spool_dir), max_bytes=1 << 30, segment_bytes=4 << 20, sync_interval=0.1)
    sp.open()
    try:
        return sp.stats()
    finally:
        sp.close()


#: for the runs that deliver what earlier runs left: the workload (``/bin/true``) ends at
#: once, and the flush budget then has to cover the worker's own start (slow on a loaded
#: machine) as well as the sending; draining ends as soon as the spool is empty
DELIVER = "[shutdown]\ngrace = 30.0\nflush = 15.0\n"


# -- 1. a thousand execs -----------------------------------------------------------------


def test_thousand_execs_are_all_counted(agent: Agent, ingest: Ingest) -> None:
    """1,000 ``/bin/true`` from a shell loop: default aggregation folds the repeats, and
    the stored events still stand for exactly 1,000 execs."""
    url, _token_file, _token = ingest
    script = "i=0; while [ $i -lt 1000 ]; do /bin/true; i=$((i+1)); done"
    rc, took, log = agent.run(["sh", "-c", script], backend=url, timeout=90)
    assert rc == 0, log
    iid = agent.instance_id()

    trues = exec_events(ingest.events(kind="process.exec", agent=iid), ["/bin/true"])
    assert count_of(trues) == 1000, (took, [(e["seq"], e.get("count")) for e in trues], log)
    assert len(trues) < 1000, "repeats were expected to be folded by the default aggregation"
    # the same, through the query CLI
    via_cli = ingest.query_cli("--kind", "process.exec", "--agent", iid, "--limit", "100000")
    assert count_of(exec_events(via_cli, ["/bin/true"])) == 1000

    res = ingest.cli("agents")
    assert res.returncode == 0, res.stderr
    agents = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    mine = [a for a in agents if a["instance_id"] == iid]
    assert len(mine) == 1, agents
    assert mine[0]["mode"] == "wrapper", mine


# -- 2. ingest down for a whole run --------------------------------------------------------


def test_backend_down_for_a_whole_run_is_delivered_by_the_next_start(
    agent: Agent, ingest_factory: IngestFactory
) -> None:
    """Nothing listens at --backend for the first run: it still exits 0 at once (within
    its flush budget) and keeps its events in the spool. An ingest started afterwards on
    that port gets them from the next agent start on the same data dir, stored under the
    one instance id kept beside the spool, each once."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = agent.config("[shutdown]\nflush = 1.0\n")
    script = "i=0; while [ $i -lt 50 ]; do /bin/true; i=$((i+1)); done"
    rc, took, log = agent.run(["sh", "-c", script], backend=url, config=cfg, timeout=60)
    assert rc == 0, log
    assert took < 30, f"the first run took {took:.1f}s with the backend down"
    iid = agent.instance_id()
    st = spool_stats(agent.spool)
    assert st.pending > 0 and st.delivered == 0, st

    ing = ingest_factory.start(port=port)
    assert ing.url == url
    deliver = agent.config(DELIVER, name="deliver.toml")
    rc, _, log2 = agent.run(["/bin/true"], backend=url, config=deliver, timeout=60)
    assert rc == 0, log2

    events = ing.events()
    assert {e["instance_id"] for e in events} == {iid}, "one instance id, across both runs"
    trues = exec_events(events, ["/bin/true"])
    assert count_of(trues) == 51, [(e["seq"], e.get("count")) for e in trues]
    seqs = [e["seq"] for e in events]
    assert len(seqs) == len(set(seqs))
    st = spool_stats(agent.spool)
    assert st.pending == 0, st
    assert st.delivered == len(events), (st, len(events))


# -- 3. the worker killed at random points ---------------------------------------------------

KILLS = 50
KILL_SEED = 20240611
ITERATIONS = 600


def test_worker_sigkilled_at_random_points(agent: Agent, ingest: Ingest) -> None:
    """SIGKILL the worker 50 times at random moments while a workload execs 600 distinct
    ``/bin/true N``; the core restarts it each time and the workload notices nothing.

    Guaranteed (asserted):

    - the wrapper exits 0 (the workload's status);
    - every event the spool accepted is delivered once everything is over: after one more
      agent start on the same data dir, the spool has nothing pending, and the ingest
      stores exactly ``delivered`` distinct ``(instance_id, seq)`` -- each accepted event
      stored once, whatever was sent twice after a kill between send and ack;
    - at least 90% of the 600 execs are stored; if any is not, the latest ``agent.loss``
      of the killed run must count something (a loss has to be counted, never silent);
    - nothing went to a private spool beside the shared one, and the spool's invariant
      ``accepted == delivered + pending + sum(dropped)`` holds.

    Not guaranteed: that all 600 are stored. What the core wrote into the record pipe
    survives a worker's death (the core keeps the pipe's read end and the next worker
    reads on), but records a worker had read and not yet appended to the spool die with
    it, and a frame it had half read is a bad frame to the next one. Nor that nothing is
    sent twice (the receiver dedupes by seq), nor the order of delivery. Kills are only
    made while the workload runs; a worker dying during the final flush is
    test_worker_killed_during_the_final_flush_loses_nothing_uncounted.
    """
    cfg = agent.config(
        "[aggregate.keys]\n\n"
        "[worker]\nrestart_backoff_min = 0.05\nrestart_backoff_max = 0.2\n\n"
        "[shutdown]\nflush = 5.0\n"
    )
    deliver = agent.config(DELIVER + "\n[aggregate.keys]\n", name="deliver.toml")
    # While the file "pace" exists (the kill phase) each iteration sleeps 0.02 s more, so
    # that the 50 kills (each waits out a restart backoff of up to 0.2 s) all land while
    # the workload runs, however fast this machine runs the loop.
    pace = agent.tmp / "pace"
    pace.touch()
    script = (f"i=0; while [ $i -lt {ITERATIONS} ]; do /bin/true $i; sleep 0.01; "
              "[ -e pace ] && sleep 0.02; i=$((i+1)); done")  # fmt: skip
    url = ingest.url
    proc = agent.start(["sh", "-c", script], backend=url, config=cfg)
    rng = random.Random(KILL_SEED)
    killed: list[int] = []
    t0 = time.monotonic()
    end = t0 + 30.0
    while len(killed) < KILLS and time.monotonic() < end and proc.poll() is None:
        time.sleep(rng.uniform(0.02, 0.15))
        pid = None
        while time.monotonic() < end and proc.poll() is None:  # the restarted worker
            pid = find_worker(proc.pid, exclude=set(killed))
            if pid is not None:
                break
            time.sleep(0.005)
        if pid is None or not is_worker_of(pid, proc.pid):
            continue
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    kill_time = time.monotonic() - t0
    pace.unlink()
    rc = agent.wait(proc, timeout=60)
    run_time = time.monotonic() - t0
    log = agent.log(proc)
    assert rc == 0, log
    assert len(killed) == KILLS, (
        f"only {len(killed)} kills in {kill_time:.1f}s before the workload ended")
    iid = agent.instance_id()
    before_delivery = time.time_ns()

    rc, _, log2 = agent.run(["/bin/true"], backend=url, config=deliver, timeout=60)
    assert rc == 0, log2

    spool = Spool(str(agent.spool), max_bytes=1 << 30, segment_bytes=4 << 20,
                  sync_interval=0.1)  # fmt: skip
    spool.open()
    st = spool.stats()
    spool.close()
    assert not [p for p in agent.data.iterdir() if p.name.startswith("spool.")], \
        "a private spool was used: events went around the shared one"
    assert st.pending == 0, st
    assert st.accepted == st.delivered + st.pending + sum(st.dropped.values()), st

    events = ingest.events(agent=iid)
    seqs = {e["seq"] for e in events}
    assert len(seqs) == len(events)
    assert len(seqs) == st.delivered, (len(seqs), st)

    numbers = {
        e["argv"][1]
        for e in events
        if e.get("kind") == "process.exec" and len(e.get("argv", ())) == 2
        and e["argv"][0] == "/bin/true"
    }
    assert numbers <= {str(i) for i in range(ITERATIONS)}
    stored = len(numbers)
    print(f"kills={len(killed)} in {kill_time:.1f}s, run {run_time:.1f}s, stored "
          f"{stored}/{ITERATIONS} execs, spool {st}")
    assert stored >= 0.9 * ITERATIONS, (stored, st, run_time)
    if stored < ITERATIONS:
        loss = [e for e in events
                if e.get("kind") == "agent.loss" and e["time"] < before_delivery]  # fmt: skip
        assert loss, "no agent.loss from the killed run"
        last = max(loss, key=lambda e: e["seq"])
        assert any(v > 0 for v in last["totals"].values()), (
            f"{ITERATIONS - stored} execs missing but the latest agent.loss counts nothing: "
            f"{last}")


def test_worker_killed_during_the_final_flush_loses_nothing_uncounted(
    agent: Agent, ingest: Ingest
) -> None:
    """The worker is stopped (SIGSTOP) while the workload runs a burst of 200 execs and
    exits, then SIGKILLed while the core waits for it to drain: the records still in the
    core's pipe and buffer must reach the spool (a restarted worker) or be counted as a
    loss; the next start on the data dir delivers what was accepted."""
    cfg = agent.config("[aggregate.keys]\n\n[shutdown]\ngrace = 30.0\nflush = 5.0\n")
    script = ("i=0; while [ ! -e go ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; "
              "i=0; while [ $i -lt 200 ]; do /bin/true $i; i=$((i+1)); done")  # fmt: skip
    proc = agent.start(["sh", "-c", script], backend=ingest.url, config=cfg)
    wait_for(lambda: worker_up(proc.pid), 30, "the worker to be up")
    worker = find_worker(proc.pid)
    if worker is None or not is_worker_of(worker, proc.pid):  # (setup: not the bug)
        pytest.fail("no worker")
    os.kill(worker, signal.SIGSTOP)
    try:
        (agent.tmp / "go").touch()
        # the workload has exited once the worker is the wrapper's only live child
        wait_for(lambda: all(p == worker for p in children(proc.pid)), 60, "the workload's end")
    finally:
        os.kill(worker, signal.SIGKILL)
    rc = agent.wait(proc, timeout=60)
    assert rc == 0, agent.log(proc)
    before_delivery = time.time_ns()
    deliver = agent.config(DELIVER + "\n[aggregate.keys]\n", name="deliver.toml")
    rc, _, log2 = agent.run(["/bin/true"], backend=ingest.url, config=deliver, timeout=60)
    if rc != 0 or spool_stats(agent.spool).pending:  # (setup: not the bug)
        pytest.fail(f"the delivery run failed: {log2}")

    events = ingest.events(agent=agent.instance_id())
    numbers = {e["argv"][1] for e in events if e.get("kind") == "process.exec"
               and e.get("argv", [""])[0] == "/bin/true" and len(e["argv"]) == 2}  # fmt: skip
    counted = [e for e in events if e.get("kind") == "agent.loss"
               and e["time"] < before_delivery and any(e["totals"].values())]  # fmt: skip
    assert len(numbers) == 200 or counted, (
        f"{200 - len(numbers)} of 200 execs missing, no loss counted: {agent.log(proc)}")


# -- 4. a damaged spool --------------------------------------------------------------------


def segment_records(path: Path) -> list[tuple[int, int, int]]:
    """``(offset, end, seq)`` of the records of a spool segment (format in
    lw_embed/spool/__init__.py: ``len u32 | crc u32 | seq u64 | CBOR``)."""
    data = path.read_bytes()
    out, off = [], 0
    while off + 16 <= len(data):
        length = int.from_bytes(data[off:off + 4], "little")
        end = off + 8 + length
        assert length >= 8 and end <= len(data), (path, off)
        out.append((off, end, int.from_bytes(data[off + 8:off + 16], "little")))
        off = end
    assert off == len(data), (path, off, len(data))
    return out


def test_corrupt_spool_is_quarantined_counted_and_the_rest_delivered(
    agent: Agent, ingest_factory: IngestFactory
) -> None:
    """Events kept in the spool by a run whose backend was down; then the spool is damaged
    (the newest class-1 segment loses its last 3 bytes, a byte in the middle of the oldest
    one is flipped). The next start quarantines the damaged tails, counts what they held
    as ``spool.corrupt``, exits 0 and delivers every intact event of the first run."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    down = agent.config("[shutdown]\nflush = 1.0\n\n[spool]\nsegment_bytes = 65536\n",
                        name="down.toml")  # fmt: skip
    script = "i=0; while [ $i -lt 500 ]; do /bin/true $i; i=$((i+1)); done"
    rc, _, log = agent.run(["sh", "-c", script], backend=url, config=down, timeout=60)
    assert rc == 0, log
    iid = agent.instance_id()

    segs = sorted(agent.spool.glob("p*-*.seg"))
    records = {p: segment_records(p) for p in segs}
    p1 = sorted(p for p in segs if p.name.startswith("p1-"))
    assert len(p1) >= 3, f"want >= 3 class-1 segments to damage two of them: {segs}"
    all_seqs = {seq for recs in records.values() for _, _, seq in recs}

    newest, oldest = p1[-1], p1[0]
    # truncate the newest by 3 bytes: its last record is torn
    size = newest.stat().st_size
    os.truncate(newest, size - 3)
    lost = {records[newest][-1][2]}
    # flip a byte of the CBOR of the record in the middle of the oldest: from it on, the
    # segment's records are cut off
    recs = records[oldest]
    k = next(i for i, (off, end, _) in enumerate(recs) if end > oldest.stat().st_size // 2)
    off, end, _ = recs[k]
    at = off + 16 + (end - off - 16) // 2
    with open(oldest, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))
    lost |= {seq for _, _, seq in recs[k:]}
    kept = all_seqs - lost

    ing = ingest_factory.start(port=port)
    up = agent.config(DELIVER + "\n[spool]\nsegment_bytes = 65536\n", name="up.toml")
    rc, _, log2 = agent.run(["/bin/true"], backend=url, config=up, timeout=60)
    assert rc == 0, log2

    events = ing.events(agent=iid)
    stored = {e["seq"] for e in events}
    first_run = stored & all_seqs
    assert first_run == kept, (sorted(kept - first_run)[:20], sorted(first_run & lost)[:20])
    trues = [e for e in events if e.get("kind") == "process.exec"
             and e.get("argv", [""])[0] == "/bin/true" and len(e["argv"]) == 2]  # fmt: skip
    assert trues, "no exec of the first run was delivered"

    loss = latest(events, "agent.loss")
    assert loss is not None, "no agent.loss stored"
    corrupt = loss["totals"].get("spool.corrupt", 0)
    assert corrupt > 0, loss
    assert corrupt == len(lost), (corrupt, len(lost), loss)
    [me] = [a for a in ing.agents() if a["instance_id"] == iid]
    assert me["loss"].get("spool.corrupt") == corrupt, me

    quarantine = agent.spool / "quarantine"
    assert quarantine.is_dir() and any(quarantine.iterdir()), "nothing quarantined"
    st = spool_stats(agent.spool)
    assert st.pending == 0 and st.dropped.get("spool.corrupt") == corrupt, st


# -- 5. hot reload through the wrapper ---------------------------------------------------------

NO_SLEEP = """\
[agent]
log_level = "info"

[[filter.rules]]
name = "no-sleep"
action = "exclude"
exe = ["*/sleep"]
"""
NO_RULES = """\
[agent]
log_level = "info"
"""


def test_config_change_reloads_the_rules_of_a_running_agent(
    agent: Agent, ingest: Ingest
) -> None:
    """An exclude rule for ``*/sleep`` (``sleep`` resolves to /usr/bin/sleep) drops the
    first two sleeps; the config file is rewritten without it while the workload runs,
    and the worker, polling the file, applies that: the later sleep is reported."""
    cfg = agent.config(NO_SLEEP)
    ready, go = agent.tmp / "ready", agent.tmp / "go"
    script = (
        "sleep 0.21; sleep 0.21; : > ready; "
        "i=0; while [ ! -e go ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; "
        "[ -e go ] || exit 3; sleep 0.22"
    )
    proc = agent.start(["sh", "-c", script], backend=ingest.url, config=cfg)
    wait_for(lambda: ready.exists() or proc.poll() is not None, 30, "the first sleeps")
    assert proc.poll() is None, agent.log(proc)
    # the worker takes the file as it is when it starts watching as its baseline: an edit
    # made before that (possible on a loaded machine) would never be seen
    wait_for(lambda: worker_up(proc.pid), 30, "the worker to be up")
    write_atomic_text(cfg, NO_RULES)
    # the file is stat'ed once a second: rather than sleeping 2.5 s, wait (bounded) for
    # the worker to log that it applied the new file
    end = time.monotonic() + 10.0
    while "config reloaded" not in agent.log(proc) and time.monotonic() < end:
        time.sleep(0.05)
    assert "config reloaded" in agent.log(proc), agent.log(proc)
    go.touch()
    rc = agent.wait(proc, timeout=60)
    assert rc == 0, agent.log(proc)

    iid = agent.instance_id()
    execs = ingest.events(kind="process.exec", agent=iid)
    assert exec_events(execs, ["sleep", "0.22"]), [e["argv"] for e in execs]
    assert not [e for e in execs if "0.21" in e["argv"]], "excluded before the reload"
    assert exec_events(execs, ["sleep", "0.22"])[0]["exe"].endswith("/sleep")
    assert not ingest.events(kind="agent.config_rejected", agent=iid)


def test_reloaded_rules_survive_a_worker_restart(agent: Agent, ingest: Ingest) -> None:
    """Rules hot-reloaded from the file stay in effect after the worker is restarted."""
    cfg = agent.config(NO_SLEEP)
    go = agent.tmp / "go"
    script = ("i=0; while [ ! -e go ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; "
              "[ -e go ] || exit 3; sleep 0.22")  # fmt: skip
    proc = agent.start(["sh", "-c", script], backend=ingest.url, config=cfg)
    wait_for(lambda: worker_up(proc.pid), 30, "the worker to be up")
    write_atomic_text(cfg, NO_RULES)
    wait_for(lambda: "config reloaded" in agent.log(proc), 10, "the reload")
    old = find_worker(proc.pid)
    if old is None or not is_worker_of(old, proc.pid):  # (setup: not the bug)
        pytest.fail("no worker to kill")
    os.kill(old, signal.SIGKILL)

    def restarted() -> bool:
        pid = find_worker(proc.pid, exclude={old})
        return pid is not None and catches(pid, signal.SIGHUP)

    wait_for(restarted, 30, "the restarted worker")
    go.touch()
    rc = agent.wait(proc, timeout=60)
    assert rc == 0, agent.log(proc)
    execs = ingest.events(kind="process.exec", agent=agent.instance_id())
    assert exec_events(execs, ["sleep", "0.22"]), sorted({tuple(e["argv"]) for e in execs})


RULE = """\
[agent]
log_level = "info"

[[filter.rules]]
name = "odd"
action = "tag"
cmdline = "{}"
"""


def test_sighup_reaches_the_workload_and_a_broken_config_is_rejected(
    agent: Agent, ingest: Ingest
) -> None:
    """SIGHUP to the wrapper is forwarded to the workload and makes the worker reload its
    rules; a broken regex is refused (old rules stay) with ``agent.config_rejected``.

    The broken file is written in place with the valid file's size, inode and mtime, so
    the worker's once-a-second polling of the file cannot see the change: only the
    SIGHUP can have made it reload."""
    good, bad = RULE.format("xunclosed"), RULE.format("(unclosed")
    assert len(good) == len(bad)
    cfg = agent.config(good)
    hup = agent.tmp / "hup"
    script = agent.tmp / "sighup_workload.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "got = []\n"
        "def on_hup(signum, frame):\n"
        "    got.append(signum)\n"
        f"    with open({str(hup)!r}, 'a') as f:\n"
        "        f.write('SIGHUP\\n')\n"
        "signal.signal(signal.SIGHUP, on_hup)\n"
        f"open({str(agent.tmp / 'ready')!r}, 'w').close()\n"
        "end = time.monotonic() + 30\n"
        "while not got and time.monotonic() < end:\n"
        "    time.sleep(0.02)\n"
        "time.sleep(1.5)  # several ticks of the worker loop after the SIGHUP\n"
        "sys.exit(0 if got else 4)\n"
    )
    proc = agent.start([sys.executable, str(script)], backend=ingest.url, config=cfg)
    ready = agent.tmp / "ready"
    wait_for(lambda: ready.exists() or proc.poll() is not None, 30, "the workload to start")
    assert proc.poll() is None, agent.log(proc)
    # the worker must be up -- its SIGHUP handler installed -- before we signal: one that
    # is still starting dies of the SIGHUP (see test_sighup_while_the_worker_starts)
    wait_for(lambda: worker_up(proc.pid), 30, "the worker's SIGHUP handler")

    st = os.stat(cfg)
    with open(cfg, "r+b") as f:  # same inode, same size
        f.write(bad.encode())
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    after = os.stat(cfg)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        st.st_ino, st.st_size, st.st_mtime_ns)
    os.kill(proc.pid, signal.SIGHUP)
    wait_for(lambda: hup.exists() and "SIGHUP" in hup.read_text(), 10, "the workload's SIGHUP")
    rc = agent.wait(proc, timeout=60)
    assert rc == 0, agent.log(proc)
    assert hup.read_text() == "SIGHUP\n"

    iid = agent.instance_id()
    rejected = ingest.events(kind="agent.config_rejected", agent=iid)
    assert len(rejected) == 1, rejected
    assert rejected[0]["path"] == str(cfg)
    assert "cmdline" in rejected[0]["error"], rejected[0]


def test_sighup_while_the_worker_starts(agent: Agent, ingest: Ingest) -> None:
    """A SIGHUP sent to the wrapper just after it started (its worker spawned, still
    importing) must still reload the rules, and must not cost a worker restart."""
    cfg = agent.config(RULE.format("xunclosed"))
    # the workload ignores SIGHUP (so that the agent is not draining when it arrives)
    ready = agent.tmp / "ready"
    proc = agent.start(["sh", "-c", "trap '' HUP; : > ready; sleep 2"], backend=ingest.url,
                       config=cfg)  # fmt: skip
    pid = None

    def spawned() -> bool:
        nonlocal pid
        pid = find_worker(proc.pid)
        return (pid is not None and ready.exists()) or proc.poll() is not None

    wait_for(spawned, 10, "the worker process and the workload's trap")
    if pid is None or catches(pid, signal.SIGHUP):  # (setup: not the bug)
        pytest.skip("the worker was up before the SIGHUP could be sent: no race to test")
    write_atomic_text(cfg, RULE.format("(unclosed"))  # (polling would see this only after 1 s)
    os.kill(proc.pid, signal.SIGHUP)
    rc = agent.wait(proc, timeout=60)
    log = agent.log(proc)
    assert rc == 0, log
    assert ingest.events(kind="agent.config_rejected", agent=agent.instance_id()), log
    assert "worker exited" not in log, log


def test_core_loss_totals_survive_a_worker_restart(agent: Agent, ingest: Ingest) -> None:
    """The core's own drop counters (here core.handler_error, from an injected fault in
    the exec handler) reach the worker that replaces a killed one: agent.loss totals never
    go backwards across a worker restart."""
    cfg = agent.config("[aggregate.keys]\n\n[worker]\nrestart_backoff_min = 0.1\n")
    os.mkfifo(agent.tmp / "go")
    script = "/bin/true; read x < go"  # one failing exec, then none: the totals stay put
    proc = agent.start(["sh", "-c", script], backend=ingest.url, config=cfg,
                       env={"_LW_EMBED_FAULTS": "exec"})  # fmt: skip
    wait_for(lambda: worker_up(proc.pid), 30, "the worker to be up")
    first = find_worker(proc.pid)
    if first is None or not is_worker_of(first, proc.pid):  # (setup: not the bug)
        pytest.fail("no worker")
    time.sleep(1.5)  # the first worker has the core's totals (sent at most once a second)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: find_worker(proc.pid, exclude={first}) is not None, 30, "a new worker")
    time.sleep(1.5)  # the new worker is up and the core had its chance to send the totals
    with open(agent.tmp / "go", "w") as fifo:
        fifo.write("x\n")
    assert agent.wait(proc, timeout=60) == 0, agent.log(proc)
    losses = sorted((e for e in ingest.events("agent.loss", agent=agent.instance_id())),
                    key=lambda e: e["seq"])  # fmt: skip
    assert losses and losses[-1]["totals"].get("core.handler_error", 0) >= 1, losses
