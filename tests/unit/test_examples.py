"""The deployment examples parse, and everything they reference exists: the entrypoint
script, the subcommands, the files they copy, and every LW_EMBED_* variable they set is a
valid config override (or one of the variables the agent reads itself).

A copied example that fails at deploy time is worse than none; these checks catch a
renamed subcommand, a config key that was removed, or a COPY of a file that moved.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from lw_embed import cli
from lw_embed.config import load_config
from lw_embed.configschema import ENV_PREFIX, RESERVED_ENV

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
DOCKERFILES = sorted(EXAMPLES.glob("*/Dockerfile"))
TASKDEFS = sorted((EXAMPLES / "fargate").glob("taskdef-*.json"))
#: where the example Dockerfiles install the entrypoint script
ENTRYPOINT_IN_IMAGE = "/opt/lw-embed/entrypoints/lw-embed"


def subcommands() -> set[str]:
    parser = cli._parser()
    for action in parser._actions:
        if action.dest == "command":
            return set(action.choices)  # type: ignore[arg-type]
    raise AssertionError("no subcommands")


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        pending = f"{pending} {s}" if pending else s
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        instr, _, rest = pending.partition(" ")
        out.append((instr.upper(), rest.strip()))
        pending = ""
    assert not pending, f"{path}: dangling continuation"
    return out


def exec_form(value: str) -> list[str]:
    argv = json.loads(value)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), value
    return argv


def check_agent_argv(argv: list[str], where: str) -> None:
    """``[ENTRYPOINT, sub, ...]``: the script exists in the repo and ``sub`` is real."""
    assert argv[0] == ENTRYPOINT_IN_IMAGE, f"{where}: entrypoint {argv[0]!r}"
    assert (ROOT / "entrypoints" / "lw-embed").is_file()
    assert argv[1] in subcommands(), f"{where}: unknown subcommand {argv[1]!r}"


def check_env(names_values: dict[str, str], where: str) -> None:
    """Every LW_EMBED_* variable is reserved or a valid override with a valid value."""
    overrides = {k: v for k, v in names_values.items()
                 if k.startswith(ENV_PREFIX) and k not in RESERVED_ENV}  # fmt: skip
    load_config(None, overrides)  # raises ConfigError naming the variable
    for k in names_values:
        assert not k.startswith("_LW_EMBED_"), f"{where}: {k} is internal"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_references_exist(path: Path) -> None:
    steps = dockerfile(path)
    entry = [exec_form(a) for i, a in steps if i == "ENTRYPOINT"]
    assert len(entry) == 1, "one ENTRYPOINT, in exec form (the agent must be PID 1)"
    check_agent_argv(entry[0], str(path))
    assert entry[0][1:] == ["run", "--"]
    copies = [shlex.split(a) for i, a in steps if i == "COPY"]
    for args in copies:
        if any(a.startswith("--from") for a in args):
            continue
        for src in args[:-1]:
            assert (ROOT / src).exists(), f"{path}: COPY {src} does not exist"
    (cmd,) = [exec_form(a) for i, a in steps if i == "CMD"]
    dest = {args[-1]: args[0] for args in copies if not args[0].startswith("--")}
    assert any(c in dest for c in cmd), f"{path}: CMD {cmd} runs nothing the image copies"
    env: dict[str, str] = {}
    for i, a in steps:
        if i == "ENV":
            for kv in shlex.split(a):
                k, _, v = kv.partition("=")
                env[k] = v
    check_env(env, str(path))
    assert (path.parent / "Dockerfile.dockerignore").is_file()


@pytest.mark.parametrize("path", TASKDEFS, ids=lambda p: p.stem)
def test_task_definition(path: Path) -> None:
    td = json.loads(path.read_text())
    assert td["requiresCompatibilities"] == ["FARGATE"]
    containers = td["containerDefinitions"]
    volumes = {v["name"] for v in td.get("volumes", [])}
    agents = 0
    for c in containers:
        env = {e["name"]: e["value"] for e in c.get("environment", [])}
        env.update({s["name"]: "secret" for s in c.get("secrets", [])})
        check_env(env, f"{path}:{c['name']}")
        for m in c.get("mountPoints", []):
            assert m["sourceVolume"] in volumes
        argv = [*c.get("entryPoint", []), *c.get("command", [])]
        runs_agent = ("SYS_PTRACE" in c.get("linuxParameters", {}).get("capabilities", {})
                      .get("add", []))  # fmt: skip
        if argv and argv[0] == ENTRYPOINT_IN_IMAGE:
            check_agent_argv(argv, f"{path}:{c['name']}")
        if runs_agent:
            agents += 1
            assert not c.get("linuxParameters", {}).get("initProcessEnabled"), (
                "another init in front of the agent"
            )
            assert 2 <= c.get("stopTimeout", 30) <= 120, "Fargate allows 2..120 s"
            assert "LW_EMBED_TOKEN" not in {e["name"] for e in c.get("environment", [])}, (
                "the token comes from secrets, not plain environment"
            )
    assert agents >= 1, "no container with SYS_PTRACE runs the agent"
    if path.stem == "taskdef-sidecar":
        assert td.get("pidMode") == "task", "a sidecar needs the task's PID namespace"
        assert len(containers) >= 2


def test_there_is_a_sidecar_task_definition() -> None:
    assert {p.stem for p in TASKDEFS} >= {"taskdef-wrapper", "taskdef-sidecar"}


def test_cloudrun_service() -> None:
    svc: Any = yaml.safe_load((EXAMPLES / "cloudrun" / "service.yaml").read_text())
    assert svc["apiVersion"] == "serving.knative.dev/v1" and svc["kind"] == "Service"
    tmpl = svc["spec"]["template"]
    assert tmpl["metadata"]["annotations"]["run.googleapis.com/execution-environment"] in (
        "gen1", "gen2",
    )  # fmt: skip
    (container,) = tmpl["spec"]["containers"]
    env = {e["name"]: e.get("value", "secret") for e in container.get("env", [])}
    check_env(env, "service.yaml")
    assert "value" not in next(e for e in container["env"] if e["name"] == "LW_EMBED_TOKEN")


def test_bad_override_in_an_example_would_be_caught() -> None:
    """The env check above is not vacuous: a wrong key or value is rejected, by name."""
    from lw_embed.errors import ConfigError

    with pytest.raises(ConfigError, match="LW_EMBED_SPOOL_MAX_BYTE"):
        check_env({"LW_EMBED_SPOOL_MAX_BYTE": "1"}, "x")
    with pytest.raises(ConfigError, match="LW_EMBED_SHUTDOWN_GRACE"):
        check_env({"LW_EMBED_SHUTDOWN_GRACE": "soon"}, "x")
