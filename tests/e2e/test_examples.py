"""The Fargate/Cloud Run example run locally the way the image runs it: the entrypoint
script from the Dockerfile, the example app as CMD, the task definition's environment
(backend pointed at a local ingest, data dir in tmp), then ECS's stop: SIGTERM to PID 1.

What a user would check after copying the example: the app serves, its child process is
reported with the right parent, the container exits 0 on SIGTERM, and the events reach
the backend.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.conftest import PY, Ingest, free_port, wait_for
from tests.linux.conftest import clean_env, kill_tree

pytestmark = pytest.mark.linux

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "fargate" / "app.py"


def taskdef_env(ingest_url: str, data_dir: Path) -> dict[str, str]:
    td = json.loads((ROOT / "examples" / "fargate" / "taskdef-wrapper.json").read_text())
    (app,) = [c for c in td["containerDefinitions"] if c["name"] == "app"]
    env = {e["name"]: e["value"] for e in app["environment"]}
    assert "LW_EMBED_BACKEND_URL" in env and "LW_EMBED_AGENT_DATA_DIR" in env
    env["LW_EMBED_BACKEND_URL"] = ingest_url
    env["LW_EMBED_AGENT_DATA_DIR"] = str(data_dir)
    return env


def test_fargate_example_under_the_entrypoint(tmp_path: Path, ingest: Ingest) -> None:
    port = free_port()
    env = clean_env({
        **taskdef_env(ingest.url, tmp_path / "data"),
        "LW_EMBED_TOKEN": ingest.token,  # the task definition's secret
        "LW_EMBED_PYTHON": PY,  # the Dockerfile's ENV: the agent's interpreter
        "PORT": str(port),
        "PYTHONUNBUFFERED": "1",
    })  # fmt: skip
    log = open(tmp_path / "container.log", "w+b")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(ROOT / "entrypoints" / "lw-embed"), "run", "--", PY, str(APP)],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )  # fmt: skip
    try:

        def get(path: str) -> bytes:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                body: bytes = r.read()
                return body

        def serving() -> bool:
            try:
                return get("/healthz") == b"ok\n"
            except OSError:
                return False

        wait_for(serving, 60, "the example app to serve")
        assert b"Linux" in get("/spawn")
        os.kill(proc.pid, signal.SIGTERM)  # what ECS does at stop
        assert proc.wait(timeout=45) == 0
    finally:
        kill_tree(proc)
    log.seek(0)
    out = log.read().decode(errors="replace")
    assert "app: signal 15, shutting down" in out and "app: stopped" in out, out

    def shipped() -> bool:
        return bool(ingest.events("process.exec"))

    wait_for(shipped, 30, "events at the ingest")
    execs = ingest.events("process.exec")
    app = [e for e in execs if str(APP) in e.get("argv", [])]
    uname = [e for e in execs if e.get("argv", [])[:1] == ["uname"]]
    assert len(app) == 1 and len(uname) == 1, execs
    assert uname[0]["parent_exec_id"] == app[0]["exec_id"]
    exits = {e["exec_id"]: e for e in ingest.events("process.exit")}
    assert exits[app[0]["exec_id"]]["exit_code"] == 0
