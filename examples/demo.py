"""`make demo`: the agent wrapping a real workload, shipping to the bundled backend.

1. starts `lw-embed ingest` (the embedded default backend) on a free loopback port;
2. runs a small shell workload under `lw-embed run --backend URL -- sh -c ...`, exactly as
   a container ENTRYPOINT would: it starts a Python HTTP server on loopback, fetches a page
   from it, runs a few short-lived commands and stops the server;
3. asks the backend what it stored (`lw-embed query`) and prints it as a process tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from typing import Any

URL = "http://127.0.0.1:18080/"
WORKLOAD = f"""
set -e
{sys.executable} -m http.server --bind 127.0.0.1 18080 >/dev/null 2>&1 &
server=$!
sleep 0.5
{sys.executable} -c "import urllib.request as u; print(len(u.urlopen('{URL}').read()), 'bytes')"
ls / >/dev/null
id -un
uname -r
kill $server
wait $server 2>/dev/null || true
echo workload done
"""


LW = [sys.executable, "-m", "lw_embed"]


def start_ingest(work: str, token_file: str) -> tuple[subprocess.Popen[str], str]:
    db = os.path.join(work, "ingest.sqlite")
    srv = subprocess.Popen([*LW, "ingest", "--listen", "127.0.0.1:0", "--db", db,
                            "--token-file", token_file],
                           stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert srv.stdout is not None
    line = srv.stdout.readline()  # "lw-embed ingest listening on http://127.0.0.1:PORT"
    if "listening on" not in line:
        srv.kill()
        raise SystemExit(f"ingest did not start: {line!r}")
    return srv, line.split("listening on", 1)[1].strip()


def main() -> int:
    work = tempfile.mkdtemp(prefix="lw-embed-demo-")
    token_file = os.path.join(work, "token")
    token = os.urandom(16).hex()
    with open(token_file, "w") as f:
        f.write(token)
    srv, url = start_ingest(work, token_file)
    env = {**os.environ, "LW_EMBED_TOKEN": token}
    try:
        print(f"$ lw-embed ingest --listen 127.0.0.1:0 ...   # bundled backend at {url}")
        print(f"$ lw-embed run --backend {url} -- sh -c '<demo workload>'")
        print("---- workload output " + "-" * 40)
        cmd = [*LW, "run", "--backend", url, "--data-dir", os.path.join(work, "data"),
               "--", "/bin/sh", "-c", WORKLOAD]  # fmt: skip
        rc = subprocess.run(cmd, env=env, check=False).returncode
        print("---- wrapper exited with", rc, "(the workload's exit code)")
        q = subprocess.run([*LW, "query", "--server", url, "--token-file", token_file],
                           capture_output=True, text=True, check=False)  # fmt: skip
        events = sorted((json.loads(line) for line in q.stdout.splitlines() if line),
                        key=lambda e: e.get("seq", 0))  # fmt: skip
        show(events)
        print(f"\nraw events: lw-embed query --server {url} --token-file {token_file}")
    finally:
        srv.terminate()
        srv.wait(10)
    return rc


def show(events: list[dict[str, Any]]) -> None:
    by_kind: dict[str, int] = defaultdict(int)
    for e in events:
        by_kind[e["kind"]] += 1
    print("\n---- what the agent saw " + "-" * 37)
    print("events:", ", ".join(f"{k} x{n}" for k, n in sorted(by_kind.items())))
    for e in events:
        if e["kind"] == "agent.capabilities":
            t = e["report"]["techniques"]
            print("techniques:", ", ".join(f"{k}={v}" for k, v in sorted(t.items())))
    execs = [e for e in events if e["kind"] == "process.exec"]
    exits = {e["exec_id"]: e for e in events if e["kind"] == "process.exit"}
    conns: dict[str, list[str]] = defaultdict(list)
    for e in events:
        if e["kind"] == "net.connect":
            peer = e["address"] if e["family"] == "unix" else f"{e['address']}:{e['port']}"
            conns[e.get("exec_id") or ""].append(peer)
    children: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    ids = {e["exec_id"] for e in execs}
    for e in execs:
        parent = e.get("parent_exec_id")
        children[parent if parent in ids else None].append(e)

    def walk(parent: str | None, depth: int, seen: set[str]) -> None:
        for e in children.get(parent, []):
            end = exits.get(e["exec_id"])
            status = ""
            if end is not None:
                status = (f" exit={end['exit_code']}" if end.get("exit_code") is not None
                          else f" signal={end.get('signal')}")  # fmt: skip
            argv = " ".join(" ".join(e["argv"]).split())[:70]
            net = f"  connect {', '.join(conns[e['exec_id']])}" if conns.get(e["exec_id"]) else ""
            print(f"{'  ' * depth}- [{e['pid']}] {argv}{status}{net}")
            if e["exec_id"] not in seen:
                walk(e["exec_id"], depth + 1, seen | {e["exec_id"]})

    print("process tree:")
    walk(None, 1, set())
    flows = [e for e in events if e["kind"] == "net.flow"]
    if flows:
        print("network flows:")
    pids = {e["exec_id"]: e["pid"] for e in execs}
    for f in flows:
        who = f"pid {pids.get(f.get('exec_id') or '', f.get('pid', '?'))}"
        print(f"  - {f.get('proto')} {f.get('orig_addr')}:{f.get('orig_port')} -> "
              f"{f.get('resp_addr')}:{f.get('resp_port')} {f.get('conn_state', '')} "
              f"bytes {f.get('orig_bytes', 0)}/{f.get('resp_bytes', 0)} "
              f"({who}, by {f.get('attribution')})")


if __name__ == "__main__":
    raise SystemExit(main())
