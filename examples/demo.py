"""`make demo`: the agent wrapping a real workload, then what it saw.

The workload is a small shell script: it starts a Python HTTP server on loopback, fetches
a page from it, runs a few short-lived commands and stops the server. The wrapper runs it
as `lw-embed run --output DIR -- sh -c ...`, exactly as a container ENTRYPOINT would, and
the demo prints the decoded events as a process tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from typing import Any

WORKLOAD = f"""
set -e
{sys.executable} -m http.server --bind 127.0.0.1 18080 >/dev/null 2>&1 &
server=$!
sleep 0.5
{sys.executable} -c "import urllib.request as u; print(len(u.urlopen('http://127.0.0.1:18080/').read()), 'bytes')"
ls / >/dev/null
id -un
uname -r
kill $server
wait $server 2>/dev/null || true
echo workload done
"""


def main() -> int:
    out = tempfile.mkdtemp(prefix="lw-embed-demo-")
    cmd = [sys.executable, "-m", "lw_embed", "run", "--output", out,
           "--data-dir", os.path.join(out, "data"), "--", "/bin/sh", "-c", WORKLOAD]  # fmt: skip
    print("$ lw-embed run --output", out, "-- sh -c '<demo workload>'")
    print("---- workload output " + "-" * 40)
    rc = subprocess.run(cmd, check=False).returncode
    print("---- wrapper exited with", rc, "(the workload's exit code)")
    dec = subprocess.run([sys.executable, "-m", "lw_embed", "decode", out],
                         capture_output=True, text=True, check=False)  # fmt: skip
    events = [json.loads(line) for line in dec.stdout.splitlines() if line]
    show(events)
    print(f"\nraw events: lw-embed decode {out}")
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


if __name__ == "__main__":
    raise SystemExit(main())
