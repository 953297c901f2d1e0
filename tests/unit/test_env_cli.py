"""``lw-embed env`` and ``lw-embed env --json`` as a subprocess, against a fake ECS v4
endpoint (and one that is down)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_identity_http import (
    TASK_ARN,
    TASK_ID,
    FakeMetadata,
    _closed_port,
    ecs_routes,
    fixture,
)

REPO = Path(__file__).resolve().parents[2]
PLATFORM_VARS = ("K_", "CLOUD_RUN_", "ECS_", "AWS_", "KUBERNETES_", "GCE_METADATA", "LW_EMBED_",
                 "_LW_EMBED_", "POD_", "NODE_NAME")  # fmt: skip


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(PLATFORM_VARS)}
    env.update(extra)
    return env


def lw_embed(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lw_embed", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


@pytest.fixture
def fargate() -> Iterator[FakeMetadata]:
    routes = ecs_routes(fixture("ecs_fargate_container.json"), fixture("ecs_fargate_task.json"))
    with FakeMetadata(routes) as srv:
        yield srv


def fargate_env(srv: FakeMetadata) -> dict[str, str]:
    return clean_env({
        "ECS_CONTAINER_METADATA_URI_V4": srv.ecs_uri(),
        "AWS_EXECUTION_ENV": "AWS_ECS_FARGATE",
        "AWS_REGION": "eu-west-1",
    })  # fmt: skip


def test_env_json_on_fargate(fargate: FakeMetadata) -> None:
    p = lw_embed("env", "--json", env=fargate_env(fargate))
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["platform"] == "fargate"
    assert rep["shutdown_grace"] == 30.0
    assert rep["shutdown_grace_source"] == "fargate default"
    ident = rep["identity"]
    assert ident["metadata"] == "ok" and ident["errors"] == []
    c = ident["cloud"]
    assert c["task_arn"] == TASK_ARN and c["task_family"] == "shop-web"
    assert c["task_revision"] == "17" and c["availability_zone"] == "eu-west-1b"
    assert c["container_name"] == "web" and c["launch_type"] == "FARGATE"
    assert c["cluster"].endswith(":cluster/shop-prod")
    # this machine's cgroup may or may not name a container; the metadata fills the gap
    assert ident["container_id_source"] in ("cgroup", "mountinfo", "metadata")
    if ident["container_id_source"] == "metadata":
        assert ident["container_id"] == f"{TASK_ID}-2785031522"
    assert rep["resource"]["platform"] == "fargate"
    assert rep["resource"]["cloud"]["task_arn"] == TASK_ARN
    # every capability probed and the technique each source will use
    for name in ("cap_sys_ptrace", "ptrace", "gvisor", "kernel", "seccomp_mode"):
        assert name in rep["probes"], name
        assert set(rep["probes"][name]) == {"ok", "detail"}
    assert rep["techniques"]["processes"] in ("ptrace+seccomp", "ptrace", "procfs")
    assert "network.connect" in rep["techniques"]
    assert rep["reasons"]["processes"]
    assert any("Fargate" in lim for lim in rep["limits"])
    assert len(fargate.requests) == 2


def test_env_human_on_fargate(fargate: FakeMetadata) -> None:
    p = lw_embed("env", env=fargate_env(fargate))
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "on fargate" in out.splitlines()[0]
    assert "shutdown grace 30s" in out
    assert f"task_arn               {TASK_ARN}" in out
    assert "metadata               ok" in out
    assert "\ntechniques:\n" in out and "\nprobes:\n" in out
    tech = out.split("\ntechniques:\n", 1)[1].splitlines()
    assert any(line.split()[0] == "processes" for line in tech if line.strip())
    assert any(line.split()[0] == "network.connect" for line in tech if line.strip())
    assert "limits:" in out


def test_env_with_endpoint_down_is_quick_and_env_only() -> None:
    env = clean_env({"ECS_CONTAINER_METADATA_URI_V4": f"http://127.0.0.1:{_closed_port()}/v4/x",
                     "AWS_EXECUTION_ENV": "AWS_ECS_FARGATE"})  # fmt: skip
    p = lw_embed("env", "--json", "--metadata-timeout", "0.5", env=env)
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["platform"] == "fargate"
    assert rep["identity"]["metadata"] == "failed"
    assert len(rep["identity"]["errors"]) == 2
    assert "task_arn" not in rep["identity"]["cloud"]


def test_env_slow_endpoint_respects_metadata_timeout() -> None:
    def silent(h: object) -> None:
        time.sleep(10)

    with FakeMetadata({f"/v4/{TASK_ID}-2785031522": silent,
                       f"/v4/{TASK_ID}-2785031522/task": silent}) as srv:  # fmt: skip
        env = fargate_env(srv)
        t0 = time.monotonic()
        p = lw_embed("env", "--json", "--metadata-timeout", "0.5", env=env)
        took = time.monotonic() - t0
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["identity"]["metadata"] == "timeout"
    assert took < 5.0  # interpreter start + probes + 0.5 s budget; nowhere near the 10 s


def test_env_no_metadata(fargate: FakeMetadata) -> None:
    p = lw_embed("env", "--json", "--no-metadata", env=fargate_env(fargate))
    rep = json.loads(p.stdout)
    assert rep["identity"]["metadata"] == "none" and fargate.requests == []
    assert rep["identity"]["cloud"]["region"] == "eu-west-1"


@pytest.mark.parametrize("mode", ["run", "sidecar", "in-app"])
def test_env_mode_lists_every_worker_source(mode: str) -> None:
    from lw_embed.sources.base import FACTORIES

    p = lw_embed("env", "--json", "--no-metadata", "--mode", mode, env=clean_env({}))
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["mode"] == mode
    assert set(FACTORIES) <= set(rep["techniques"]), rep["techniques"]
    assert all(rep["reasons"].get(name) for name in FACTORIES)
    want_audit = "audit-hook" if mode == "in-app" else "none"
    assert rep["techniques"]["audit"] == want_audit
    if mode == "sidecar":  # never a seccomp filter there
        assert rep["techniques"]["processes"] in ("ptrace", "procfs")
        assert rep["techniques"]["network.connect"] == "none"
    # every source this tree ships answers for itself (no "?")
    assert "?" not in {rep["techniques"][name] for name in FACTORIES}, rep["techniques"]


def test_env_bad_mode_is_a_usage_error() -> None:
    p = lw_embed("env", "--mode", "daemon", env=clean_env({}))
    assert p.returncode == 2 and "--mode" in p.stderr


def test_env_grace_is_the_one_the_cores_use(fargate: FakeMetadata) -> None:
    from lw_embed.platform import detect

    env = fargate_env(fargate)
    rep = json.loads(lw_embed("env", "--json", env=env).stdout)
    assert (rep["shutdown_grace"], rep["shutdown_grace_source"]) == detect.shutdown(0.0, env)
    env["LW_EMBED_SHUTDOWN_GRACE"] = "7"
    rep = json.loads(lw_embed("env", "--json", env=env).stdout)
    assert rep["shutdown_grace"] == 7.0
    assert rep["shutdown_grace_source"] == "config ([shutdown] grace)"
    assert "stop_timeout" not in rep["identity"]
